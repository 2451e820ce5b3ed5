"""Model export for deployment: ONNX or TorchScript plus a JSON sidecar that says how to call it.

Owns the deployable form of a trained classifier. The exported graph takes a normalised
N x 3 x H x W float32 RGB batch (dynamic N) named ``images`` and returns softmax ``probabilities``
(or ``logits``) in the order of the sidecar's ``classes``. The run's temperature T (model.json) is
part of the graph: it returns softmax(logits / T), the probabilities `predict` gives (or logits / T).
Export and check work on a CPU copy in eval mode, so the caller's model is untouched and inception
returns plain logits (no aux head).
torchvision and timm models (ViTs included: their input size is fixed at build time) export alike.

The file carries what it needs to be called without its sidecar: the ONNX model's ``metadata_props``
and the TorchScript archive's ``extra/metadata.json`` hold the class names, mean, std, input size,
input layout and output meaning (lists as JSON text), plus any ``metadata`` the caller adds
(architecture, interpolation, crop ratio: what model.json records).

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs no onnxscript and
handles every torchvision backbone with ``dynamic_axes``. onnx and onnxruntime are optional
(``pip install 'gastro-dist[export]'``) and imported only here.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import gastro_dist
from gastro_dist import UserError
from gastro_dist.files import write_bytes_atomic, write_text_atomic
from gastro_dist.models.backbones import model_logits

EXPORT_FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
INPUT_LAYOUT = "NCHW float32, RGB, normalised: (x/255 - mean)/std"
_OUTPUT_MEANINGS = {
    "probabilities": "calibrated softmax probabilities softmax(logits / temperature), one column per class "
                     "in `classes` order",
    "logits": "logits divided by the temperature, one column per class in `classes` order; softmax gives the "
              "calibrated probabilities",
}


class ExportedClassifier(nn.Module):
    """The classifier as deployed: a normalised image batch in, probabilities (or logits) out."""

    def __init__(self, model: nn.Module, probabilities: bool, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        self.probabilities = probabilities
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = model_logits(self.model(images))
        logits = logits / self.temperature
        return torch.softmax(logits, dim=1) if self.probabilities else logits


def export_model(
    model: nn.Module,
    fmt: str,
    out_file,
    input_size: int,
    classes: list[str],
    mean,
    std,
    output: str = "probabilities",
    opset: int = 17,
    metadata: Mapping[str, Any] | None = None,
    temperature: float = 1.0,
) -> Path:
    """Write the model to ``out_file`` (fmt "onnx" or "torchscript") and ``out_file``.json; returns out_file.

    ``mean``/``std`` are the per-channel normalisation used in training (0-1 pixel scale).
    ``temperature``: the run's temperature scaling, divided into the logits inside the graph.
    ``metadata``: further JSON-serialisable entries for the sidecar and the file's embedded metadata
    (e.g. model.json's architecture, interpolation, eval_crop_ratio); they may not replace the entries above.
    The ONNX file is validated with ``onnx.checker``; call :func:`check_export` to compare outputs.
    The file is built in memory and written in one go (`write_bytes_atomic`): a path that cannot be written
    is an OSError naming it, and a failed export leaves no half-written file.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of: {', '.join(EXPORT_FORMATS)}")
    if output not in _OUTPUT_MEANINGS:
        raise UserError(f"unknown export output {output!r}; use one of: {', '.join(_OUTPUT_MEANINGS)}")
    out_file = Path(out_file)
    deployment = {
        "classes": list(classes),
        "input_size": int(input_size),
        "input_name": INPUT_NAME,
        "input_layout": INPUT_LAYOUT,
        "input_shape": ["batch", 3, int(input_size), int(input_size)],
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "output": output,
        "output_name": output,
        "output_meaning": _OUTPUT_MEANINGS[output],
        "temperature": float(temperature),
        "gastro_dist_version": gastro_dist.__version__,
    }
    clashes = sorted(set(metadata or {}) & (set(deployment) | {"format", "file", "opset", "torch_version"}))
    if clashes:
        raise ValueError(f"metadata may not replace {', '.join(clashes)}")
    deployment.update(metadata or {})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    deployed = ExportedClassifier(_cpu_eval_copy(model), probabilities=output == "probabilities",
                                  temperature=temperature)
    example = torch.randn(2, 3, input_size, input_size)
    buffer = io.BytesIO()

    # Both exporters are the deprecated TorchScript-based ones (chosen on purpose, see the module
    # docstring); their deprecation notices would only confuse the people running the export.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # timm's input-size asserts, constant when traced
        if fmt == "onnx":
            onnx = _import_optional("onnx")
            torch.onnx.export(
                deployed, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[output],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
            )
            exported = onnx.load_from_string(buffer.getvalue())
            for key, value in deployment.items():
                exported.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
            onnx.checker.check_model(exported)
            data = exported.SerializeToString()
        else:
            torch.jit.save(torch.jit.trace(deployed, example), buffer,
                           _extra_files={"metadata.json": json.dumps(deployment, indent=2)})
            data = buffer.getvalue()
    write_bytes_atomic(out_file, data)

    sidecar = {"format": fmt, "file": out_file.name, **deployment,
               "opset": opset if fmt == "onnx" else None, "torch_version": torch.__version__}
    write_text_atomic(_sidecar_path(out_file), json.dumps(sidecar, indent=2) + "\n")
    return out_file


def check_export(
    model: nn.Module,
    out_file,
    fmt: str,
    input_size: int,
    atol: float = 1e-4,
    batch_sizes: tuple[int, ...] = (1, 3),
) -> float:
    """Largest absolute difference between the exported file and PyTorch on random normalised batches
    (PyTorch with the temperature the sidecar records).

    ONNX runs in onnxruntime on the CPU. Raises RuntimeError when the difference exceeds ``atol``.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of: {', '.join(EXPORT_FORMATS)}")
    out_file = Path(out_file)
    sidecar_path = _sidecar_path(out_file)
    if not out_file.exists() or not sidecar_path.exists():
        raise UserError(f"{out_file} or its sidecar {sidecar_path.name} is missing; export the model first")
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    reference = ExportedClassifier(_cpu_eval_copy(model), probabilities=sidecar["output"] == "probabilities",
                                   temperature=sidecar.get("temperature", 1.0))

    if fmt == "onnx":
        onnxruntime = _import_optional("onnxruntime")
        session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])

        def run_exported(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            run_exported = torch.jit.load(str(out_file), map_location="cpu")

    generator = torch.Generator().manual_seed(0)
    largest = 0.0
    with torch.no_grad():
        for batch_size in batch_sizes:
            images = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
            difference = (run_exported(images) - reference(images)).abs().max().item()
            largest = max(largest, difference)
    if largest > atol:
        raise RuntimeError(f"exported {fmt} model differs from PyTorch by {largest:.2e} (more than {atol:g})")
    return largest


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def _sidecar_path(out_file: Path) -> Path:
    return out_file.with_name(out_file.name + ".json")


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{name} is not installed; pip install 'gastro-dist[export]'") from None
