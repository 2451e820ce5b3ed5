"""Export: ONNX and TorchScript round trips, the sidecar, dynamic batch, errors users can fix."""

import json
import sys

import pytest
import torch
import torchvision

from gastro_dist import UserError
from gastro_dist.evaluation.export import check_export, export_model
from gastro_dist.evaluation.inference import predict_probabilities

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

CLASSES = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis", "normal"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    model.train()  # export must not depend on, nor change, the caller's mode
    return model


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_round_trip_matches_pytorch(tmp_path, resnet, fmt, suffix):
    out_file = export_model(resnet, fmt, tmp_path / f"model{suffix}", 64, CLASSES, MEAN, STD)
    assert out_file == tmp_path / f"model{suffix}" and out_file.stat().st_size > 1_000_000
    assert check_export(resnet, out_file, fmt, 64, atol=1e-4, batch_sizes=(1, 3)) <= 1e-4
    assert resnet.training

    sidecar = json.loads((tmp_path / f"model{suffix}.json").read_text())
    assert sidecar["format"] == fmt and sidecar["classes"] == CLASSES
    assert sidecar["input_size"] == 64 and sidecar["input_name"] == "images"
    assert sidecar["mean"] == list(MEAN) and sidecar["std"] == list(STD)
    assert sidecar["input_layout"] == "NCHW float32, RGB, normalised: (x/255 - mean)/std"
    assert sidecar["output"] == "probabilities" and "softmax" in sidecar["output_meaning"]
    assert sidecar["opset"] == (17 if fmt == "onnx" else None) and sidecar["temperature"] == 1.0
    assert sidecar["torch_version"] == torch.__version__


def test_onnx_graph_is_valid_with_dynamic_batch_and_named_io(tmp_path, resnet):
    out_file = export_model(resnet, "onnx", tmp_path / "model.onnx", 64, CLASSES, MEAN, STD)
    onnx.checker.check_model(str(out_file))
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert model_input.name == "images" and model_input.type == "tensor(float)"
    assert isinstance(model_input.shape[0], str) and model_input.shape[1:] == [3, 64, 64]
    assert model_output.name == "probabilities"
    probabilities = session.run(None, {"images": torch.randn(5, 3, 64, 64).numpy()})[0]
    assert probabilities.shape == (5, len(CLASSES))
    assert abs(probabilities.sum(axis=1) - 1).max() < 1e-5


def test_logits_output(tmp_path, resnet):
    out_file = export_model(resnet, "onnx", tmp_path / "logits.onnx", 64, CLASSES, MEAN, STD, output="logits")
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"
    assert json.loads((tmp_path / "logits.onnx.json").read_text())["output"] == "logits"
    assert check_export(resnet, out_file, "onnx", 64) <= 1e-4


def test_inception_exports_plain_logits_without_aux(tmp_path):
    model = torchvision.models.inception_v3(weights=None, num_classes=3, aux_logits=True, init_weights=False)
    out_file = export_model(model, "torchscript", tmp_path / "inception.pt", 107, CLASSES[:3], MEAN, STD)
    assert check_export(model, out_file, "torchscript", 107, batch_sizes=(2,)) <= 1e-4


def test_mistakes_are_user_errors(tmp_path, resnet, monkeypatch):
    with pytest.raises(UserError, match="onnx, torchscript"):
        export_model(resnet, "tflite", tmp_path / "m.tflite", 64, CLASSES, MEAN, STD)
    with pytest.raises(UserError, match="probabilities, logits"):
        export_model(resnet, "onnx", tmp_path / "m.onnx", 64, CLASSES, MEAN, STD, output="scores")
    with pytest.raises(UserError, match="export the model first"):
        check_export(resnet, tmp_path / "missing.onnx", "onnx", 64)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'gastro-dist\[export\]'"):
        export_model(resnet, "onnx", tmp_path / "m.onnx", 64, CLASSES, MEAN, STD)


def test_check_export_reports_a_mismatch(tmp_path, resnet):
    out_file = export_model(resnet, "torchscript", tmp_path / "model.pt", 64, CLASSES, MEAN, STD)
    changed = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        check_export(changed, out_file, "torchscript", 64)


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_exported_probabilities_are_predicts_with_the_temperature(tmp_path, resnet, fmt, suffix):
    """The run's temperature is inside the exported graph: its probabilities are `predict`'s."""
    temperature = 2.5
    out_file = export_model(resnet, fmt, tmp_path / f"model{suffix}", 64, CLASSES, MEAN, STD, temperature=temperature)
    assert json.loads((tmp_path / f"model{suffix}.json").read_text())["temperature"] == temperature
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
        exported = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    else:
        exported = torch.jit.load(str(out_file))(images)
    reference = resnet.eval()
    predicted = predict_probabilities(reference, images, temperature=temperature)
    resnet.train()
    assert (exported - predicted).abs().max().item() < 1e-5
    untempered = predict_probabilities(resnet.eval(), images)
    resnet.train()
    assert (exported - untempered).abs().max().item() > 1e-3  # the temperature did change them
    assert check_export(resnet, out_file, fmt, 64) <= 1e-4  # checked against PyTorch with the same temperature
