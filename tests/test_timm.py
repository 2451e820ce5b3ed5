"""timm backbones (`model.name=timm:NAME`): building, preprocessing from the pretrained config, weights
only from local files (a saved file, a Hugging Face cache laid out by hand; never the network), which
parameters train in each phase, layer-wise LR decay, Grad-CAM and ONNX export, on tiny models at 64 px."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist import UserError
from gastro_dist.config import DataConfig, ModelConfig, PhaseConfig
from gastro_dist.models.backbones import (MissingWeights, build_model, check_model_config, download_weights,
                                          head_parameter_names, model_preprocessing, resolve_preprocessing,
                                          sync_batchnorm)
from gastro_dist.models.freezing import keep_frozen_batchnorm_in_eval, set_trainable
from gastro_dist.models.param_groups import build_param_groups

timm = pytest.importorskip("timm")

CNN, VIT, CONVNEXT = "timm:resnet10t", "timm:vit_tiny_patch16_224", "timm:convnext_atto"
SIZE = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network: HF_HUB_OFFLINE=1 (also for an already imported huggingface_hub),
    and an empty Hugging Face cache unless a test lays one out."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def build(name, pretrained="none", num_classes=3, dropout=0.2, image_size=SIZE):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, pretrained=pretrained, dropout=dropout), num_classes, image_size=image_size)


def random_timm_weights(name):
    """A randomly initialised timm model's own state dict, ImageNet head and default input size included:
    what a pretrained weights file holds."""
    torch.manual_seed(1)
    return timm.create_model(name).state_dict()


def lay_out_hub_cache(cache, repo_id, state):
    """The Hugging Face hub cache as `huggingface_hub` writes it: refs/main names a snapshot holding the file."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    return repo


# ---------------------------------------------------------------- building
def test_timm_models_build_with_a_new_head_for_the_input_size():
    cnn, cnn_spec = build(CNN)
    assert cnn_spec.main == "fc" and cnn.fc.out_features == 3 and cnn.drop_rate == 0.2
    vit, vit_spec = build(VIT)
    assert vit_spec.main == "head" and vit.head.out_features == 3
    assert vit.patch_embed.grid_size == (4, 4) and vit.pos_embed.shape[1] == 1 + 16  # built for 64 px
    convnext, convnext_spec = build(CONVNEXT)
    assert convnext_spec.main == "head.fc"
    assert head_parameter_names(convnext, convnext_spec) == {"head.fc.weight", "head.fc.bias"}
    for model in (cnn, vit, convnext):
        assert model.eval()(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)


def _drop_rates(model: nn.Module) -> list[float]:
    """The stochastic depth rate of each residual block: timm's DropPath, torchvision's StochasticDepth."""
    return [float(getattr(m, "drop_prob", getattr(m, "p", 0.0))) for m in model.modules()
            if type(m).__name__ in ("DropPath", "StochasticDepth")]


def test_drop_path_sets_stochastic_depth_or_is_refused_where_a_model_has_none():
    for name in (CNN, VIT, "convnext_tiny"):  # two timm models and a torchvision one
        model, _ = build_model(ModelConfig(name=name, pretrained="none", drop_path=0.3), 3, image_size=SIZE)
        rates = _drop_rates(model)
        assert rates and max(rates) == pytest.approx(0.3) and min(rates) < 0.3, name  # deeper blocks drop more
    timm_default, _ = build(VIT)
    assert _drop_rates(timm_default) == []  # null: the model's own default (none for timm models)
    torchvision_default, _ = build_model(ModelConfig(name="convnext_tiny", pretrained="none"), 3)
    assert max(_drop_rates(torchvision_default)) == pytest.approx(0.1)  # torchvision's own for ConvNeXt-T
    model, _ = build_model(ModelConfig(name="convnext_tiny", pretrained="none", drop_path=0.0), 3)
    assert max(_drop_rates(model)) == 0.0
    for name in ("resnet18", "swin_t", "timm:vgg11"):
        with pytest.raises(UserError, match="drop_path=null"):
            build_model(ModelConfig(name=name, pretrained="none", drop_path=0.1), 3, image_size=SIZE)
    with pytest.raises(UserError, match="drop_path"):
        ModelConfig(drop_path=1.0)


def test_preprocessing_comes_from_the_pretrained_config_unless_the_config_sets_it():
    vit = model_preprocessing("timm:vit_small_patch16_224.augreg_in21k")
    assert (vit.image_size, vit.mean, vit.std, vit.interpolation, vit.eval_crop_ratio) == (
        224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9)
    assert model_preprocessing(CNN).image_size == 176  # resnet10t.c3_in1k was trained at 176 px
    assert model_preprocessing("timm:resnet50.tv_in1k").interpolation == "bilinear"
    torchvision_resnet = model_preprocessing("resnet50")
    assert (torchvision_resnet.image_size, torchvision_resnet.eval_crop_ratio) == (224, 0.875)
    assert model_preprocessing("inception_v3").image_size == 299

    data = DataConfig(image_size=64, mean=(0.1, 0.2, 0.3), eval_crop_ratio=0.8)
    chosen = resolve_preprocessing(VIT, data, explicit={"image_size", "batch_size"})
    assert chosen.image_size == 64 and chosen.mean == (0.5, 0.5, 0.5) and chosen.eval_crop_ratio == 0.9
    chosen = resolve_preprocessing(VIT, data, explicit={"image_size", "mean", "eval_crop_ratio"})
    assert chosen.mean == (0.1, 0.2, 0.3) and chosen.eval_crop_ratio == 0.8
    assert json.loads(json.dumps(chosen.to_json())) == {
        "image_size": 64, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
        "eval_crop_ratio": 0.8}
    applied = chosen.data_config(DataConfig(batch_size=5))
    assert (applied.image_size, applied.mean, applied.std, applied.batch_size) == (64, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), 5)
    assert applied.resize_mode == "bicubic"  # the training crops and evaluation resize use the weights' filter
    # data.interpolation set (even to torchvision's bilinear) wins over the model's own
    forced = resolve_preprocessing(VIT, DataConfig(interpolation="bilinear"), explicit={"interpolation"})
    assert forced.interpolation == "bilinear" and forced.data_config(DataConfig()).resize_mode == "bilinear"


def test_unknown_names_and_tags_are_one_line_errors():
    with pytest.raises(UserError, match="did you mean timm:convnext_tiny") as err:
        build("timm:convnext_tiyn")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no pretrained tag 'nope'.*fb_in22k"):
        build("timm:convnext_tiny.nope")
    with pytest.raises(UserError, match="timm:NAME"):
        build("not_a_model")


# ---------------------------------------------------------------- weights from local files only
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_weights_from_a_file(tmp_path, suffix):
    """A 224 px ImageNet-headed file into a 64 px, 3-class model: every backbone tensor loaded, the
    position embeddings resampled to the 4 x 4 grid, the head new."""
    state = random_timm_weights("vit_tiny_patch16_224")
    weights = tmp_path / f"vit_tiny{suffix}"
    save_file(state, str(weights)) if suffix == ".safetensors" else torch.save(state, weights)
    model, _ = build(VIT, pretrained=str(weights))
    loaded = model.state_dict()
    for name, value in state.items():
        if name.startswith("head."):
            continue
        if name == "pos_embed":
            assert loaded[name].shape == (1, 17, 192) and torch.equal(loaded[name][:, 0], value[:, 0])  # class token's
        else:
            assert torch.equal(loaded[name], value), name
    assert model.head.out_features == 3
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept


def test_a_file_without_a_classifier_loads_and_a_foreign_file_is_refused(tmp_path):
    state = {k: v for k, v in random_timm_weights("resnet10t").items() if not k.startswith("fc.")}
    headless = tmp_path / "features.safetensors"
    save_file(state, str(headless))
    model, _ = build(CNN, pretrained=str(headless))
    assert torch.equal(model.state_dict()["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])

    foreign = tmp_path / "convnext.safetensors"
    save_file(random_timm_weights("convnext_atto"), str(foreign))
    with pytest.raises(UserError, match="does not match timm:resnet10t") as err:
        build(CNN, pretrained=str(foreign))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_imagenet_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch, variable):
    state = random_timm_weights("resnet10t")
    if variable == "HF_HOME":
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        cache = tmp_path / "hf-home" / "hub"
    else:
        cache = tmp_path / "hub-cache"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    lay_out_hub_cache(cache, "timm/resnet10t.c3_in1k", state)
    model, _ = build(CNN, pretrained="imagenet")
    assert torch.equal(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_missing_weights_name_the_repo_the_file_and_the_command(tmp_path):
    with pytest.raises(MissingWeights) as err:
        check_model_config(ModelConfig(name="timm:convnext_tiny.fb_in22k", pretrained="imagenet"))
    message = str(err.value)
    assert "\n" not in message
    assert "timm/convnext_tiny.fb_in22k" in message and "model.safetensors" in message
    assert str(tmp_path / "empty-hf-cache") in message
    assert "gastro-dist weights download timm:convnext_tiny.fb_in22k" in message


def test_download_when_offline_is_a_one_line_error():
    with pytest.raises(UserError, match="cannot download timm/resnet10t.c3_in1k") as err:
        download_weights([CNN])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- phases
def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def names(model, *prefixes):
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def test_parameters_that_train_in_each_phase_cnn():
    model, spec = build(CNN)
    set_trainable(model, spec, "none")
    assert trainable(model) == {"fc.weight", "fc.bias"}
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    set_trainable(model, spec, "1")
    assert trainable(model) == names(model, "fc.", "layer4.")
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    assert model.layer4[0].bn1.training and not model.layer3[0].bn1.training
    set_trainable(model, spec, "2")
    assert trainable(model) == names(model, "fc.", "layer3.", "layer4.")
    set_trainable(model, spec, "5")  # the stem (conv1 with bn1) and the four stages
    assert trainable(model) == set(dict(model.named_parameters()))
    with pytest.raises(UserError, match="only 5 backbone stages"):
        set_trainable(model, spec, "6")
    set_trainable(model, spec, "all")
    assert trainable(model) == set(dict(model.named_parameters()))


def test_parameters_that_train_in_each_phase_vit():
    model, spec = build(VIT)
    set_trainable(model, spec, "none")
    assert trainable(model) == {"head.weight", "head.bias"}
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())

    set_trainable(model, spec, "1")  # the last block, with the final norm after it
    assert trainable(model) == names(model, "head.", "blocks.11.", "norm.")
    set_trainable(model, spec, "2")
    assert trainable(model) == names(model, "head.", "blocks.10.", "blocks.11.", "norm.")
    set_trainable(model, spec, "13")  # the embeddings (patch, position, class token) and the 12 blocks
    assert trainable(model) == set(dict(model.named_parameters()))
    with pytest.raises(UserError, match="only 13 backbone stages"):
        set_trainable(model, spec, "14")


def test_convnext_last_stage_includes_its_head_norm():
    model, spec = build(CONVNEXT)
    set_trainable(model, spec, "none")
    assert trainable(model) == {"head.fc.weight", "head.fc.bias"}
    set_trainable(model, spec, "1")
    assert trainable(model) == names(model, "head.", "stages.3.")


def test_layer_wise_lr_decay_on_a_vit():
    model, spec = build(VIT)
    set_trainable(model, spec, "all")
    phase = PhaseConfig(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05, layer_decay=0.5, unfreeze="all")
    groups = build_param_groups(model, spec, phase)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert sorted(lr_of) == sorted(map(id, params.values())), "every parameter in exactly one group"
    assert len(lr_of) == sum(len(g["params"]) for g in groups)

    def lr(name):
        return lr_of[id(params[name])]

    assert lr("head.weight") == 1e-3
    assert lr("blocks.11.mlp.fc1.weight") == lr("norm.weight") == 1e-4
    assert lr("blocks.10.attn.qkv.weight") == pytest.approx(1e-4 * 0.5)
    assert lr("blocks.0.attn.qkv.weight") == pytest.approx(1e-4 * 0.5 ** 11)
    assert lr("cls_token") == lr("pos_embed") == lr("patch_embed.proj.weight") == pytest.approx(1e-4 * 0.5 ** 12)
    for name in ("cls_token", "pos_embed", "blocks.3.norm1.weight", "blocks.3.attn.qkv.bias", "head.bias"):
        assert decay_of[id(params[name])] == 0.0, name
    for name in ("blocks.3.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"):
        assert decay_of[id(params[name])] == 0.05, name

    peak_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=phase.lr)  # what the trainer builds; its schedule scales each group
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr * 0.5 for lr in peak_lrs])


def test_without_layer_decay_the_groups_are_head_and_backbone():
    model, spec = build(VIT)
    set_trainable(model, spec, "none")
    assert [g["name"] for g in build_param_groups(model, spec, PhaseConfig())] == ["head.no_decay", "head.decay"]
    set_trainable(model, spec, "all")
    groups = build_param_groups(model, spec, PhaseConfig(lr=1e-3, backbone_lr=1e-4))
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("backbone.no_decay", 1e-4), ("backbone.decay", 1e-4), ("head.no_decay", 1e-3), ("head.decay", 1e-3)]


def test_layer_decay_on_a_torchvision_model_follows_its_stages():
    model, spec = build("resnet18")
    set_trainable(model, spec, "all")
    groups = build_param_groups(model, spec, PhaseConfig(lr=1e-2, backbone_lr=1e-3, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["layer4.0.conv1.weight"])] == 1e-3
    assert lr_of[id(params["layer1.0.conv1.weight"])] == pytest.approx(1e-3 * 0.5 ** 3)
    assert lr_of[id(params["bn1.weight"])] == lr_of[id(params["conv1.weight"])] == pytest.approx(1e-3 * 0.5 ** 4)
    assert lr_of[id(params["fc.1.weight"])] == 1e-2


def test_sync_batchnorm_keeps_timms_batchnorm_activations():
    model, _ = build("timm:mobilenetv3_small_050")
    activation = type(model.bn1.act)  # timm's BatchNormAct2d: BatchNorm then its activation
    converted = sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert isinstance(converted.bn1, nn.SyncBatchNorm) and type(converted.bn1.act) is activation


# ---------------------------------------------------------------- Grad-CAM and export
@pytest.mark.parametrize("name,kwargs,target", [
    ("resnet10t", {}, lambda m: m.layer4),
    ("convnext_atto", {}, lambda m: m.stages[3]),
    # class-token readout: the input of the last attention; pooled tokens: the last block's output
    ("vit_tiny_patch16_224", {"img_size": SIZE}, lambda m: m.blocks[-1].norm1),
    ("vit_tiny_patch16_224", {"img_size": SIZE, "global_pool": "avg"}, lambda m: m.blocks[-1]),
])
def test_grad_cam_on_timm_models(name, kwargs, target):
    from gastro_dist.evaluation.cam import find_target_layer, grad_cam

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    nn.init.zeros_(model.get_classifier().bias)  # as test_cam.build: positive evidence for the predicted class
    assert find_target_layer(model) is target(model)
    cams, logits = grad_cam(model, torch.randn(2, 3, SIZE, SIZE))
    assert cams.shape == (2, SIZE, SIZE) and logits.shape == (2, 3)
    assert all(cam.max() - cam.min() > 0.5 for cam in cams)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_of_a_timm_vit_matches_pytorch_and_embeds_its_metadata(tmp_path, fmt):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from gastro_dist.evaluation.export import check_export, export_model

    model, _ = build(VIT)
    classes = ["chronic_gastritis", "gastric_cancer", "gastric_ulcer"]
    out_file = export_model(model, fmt, tmp_path / f"vit.{fmt}", SIZE, classes, (0.5,) * 3, (0.5,) * 3,
                            metadata={"architecture": VIT, "interpolation": "bicubic"})
    assert check_export(model, out_file, fmt, SIZE, atol=1e-4) <= 1e-4
    if fmt == "onnx":
        embedded = {p.key: p.value for p in onnx.load(str(out_file)).metadata_props}
    else:
        extra = {"metadata.json": ""}
        torch.jit.load(str(out_file), _extra_files=extra)
        embedded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(extra["metadata.json"]).items()}
    assert json.loads(embedded["classes"]) == classes
    assert json.loads(embedded["mean"]) == json.loads(embedded["std"]) == [0.5, 0.5, 0.5]
    assert json.loads(embedded["input_size"]) == SIZE
    assert embedded["architecture"] == VIT and embedded["interpolation"] == "bicubic"
    sidecar = json.loads((tmp_path / f"vit.{fmt}.json").read_text())
    assert sidecar["architecture"] == VIT and sidecar["classes"] == classes
    with pytest.raises(ValueError, match="may not replace classes"):
        export_model(model, fmt, tmp_path / f"again.{fmt}", SIZE, classes, (0.5,) * 3, (0.5,) * 3,
                     metadata={"classes": ["x", "y", "z"]})


# ---------------------------------------------------------------- the trainer, end to end
@pytest.mark.slow  # end to end: trains both phases
def test_both_phases_of_a_timm_vit_through_the_cli(synthetic_shards, tmp_path):
    """Train a ViT from a saved random state (layer decay in fine-tuning), then rebuild it from model.json."""
    from gastro_dist.cli import main
    from gastro_dist.evaluation.inference import load_trained_model

    weights = tmp_path / "vit_tiny.safetensors"
    save_file(random_timm_weights("vit_tiny_patch16_224"), str(weights))
    run = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", str(synthetic_shards),
            "--out", str(run), *TINY_TRAIN_OVERRIDES, f"model.name={VIT}", f"model.pretrained={weights}",
            "finetune.layer_decay=0.75"]
    assert main(args) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    meta = json.loads((run / "model.json").read_text())
    assert meta["architecture"] == VIT and meta["image_size"] == 48  # TINY_TRAIN_OVERRIDES sets data.image_size
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["interpolation"] == "bicubic"  # the model's own: not set
    trained = load_trained_model(run)
    assert trained.data_config().resize_mode == "bicubic"  # evaluate and predict resize as training cropped
    assert trained.model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
