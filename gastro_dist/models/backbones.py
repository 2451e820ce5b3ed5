"""Backbones: any torchvision classifier with its ImageNet head replaced by a new one.

Pretrained weights come only from local files, never the network: torchvision's own file
name in the torch hub cache (`$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth`), or an
explicit path (.pth/.pt with a plain state dict, or .safetensors). Files are read with
`torch.load(weights_only=True)` so that loading runs no code from the file. When weights
were asked for and the file is missing, `MissingWeights` says which file is expected where
and how to fetch it (`gastro-dist weights download MODEL` on a machine with internet).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from gastro_dist import UserError
from gastro_dist.config import ModelConfig

IMAGENET_NUM_CLASSES = 1000


class MissingWeights(UserError):
    """Pretrained weights were asked for but the local file is not there."""


@dataclass(frozen=True)
class HeadSpec:
    """Where a family keeps its ImageNet classifier: dotted module paths of the Linear layers to replace."""
    main: str
    auxiliary: str | None = None


def head_spec(model: nn.Module) -> HeadSpec:
    """Find the final classifier layer(s): the last nn.Linear with 1000 outputs (and Inception's aux head)."""
    linears = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.out_features == IMAGENET_NUM_CLASSES]
    if not linears:
        raise UserError(f"{type(model).__name__} has no 1000-way linear classifier to replace; "
                        "pick a torchvision classification model (torchvision.models.list_models(module=torchvision.models))")
    aux = next((n for n in linears if n.startswith("AuxLogits.")), None)
    main = next(n for n in reversed(linears) if n != aux)
    return HeadSpec(main=main, auxiliary=aux)


def available_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def weights_file_name(model_name: str) -> str:
    """torchvision's file name of a model's default ImageNet weights (as stored in the hub cache)."""
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    return Path(weights.url).name


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights_path(model_name: str, pretrained: str) -> Path | None:
    """The local file to load for `pretrained` ('imagenet', 'none' or a path); raise if it is missing."""
    if pretrained == "none":
        return None
    if pretrained != "imagenet":
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise MissingWeights(f"model.pretrained file {path} not found; give an existing .pth/.safetensors "
                                 "file, 'imagenet' for torchvision's weights, or 'none' to train from scratch")
        return path
    file_name = weights_file_name(model_name)
    path = hub_checkpoint_dir() / file_name
    if not path.is_file():
        raise MissingWeights(
            f"ImageNet weights for {model_name} not found: expected {path}. On a machine with internet run "
            f"`gastro-dist weights download {model_name}` and copy {file_name} into {hub_checkpoint_dir()} "
            "(or set TORCH_HOME), or set model.pretrained=PATH, or model.pretrained=none to train from scratch")
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain tensor state dict without executing code from the file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' own error type: not a safetensors file, or a truncated one
            raise UserError(f"model.pretrained file {path} is not a readable .safetensors file "
                            f"({str(err).strip().splitlines()[-1][:160]}); download or convert it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends: the file needs code execution or is broken
        raise UserError(f"refusing to load {path}: it is not a plain tensor file that loads with "
                        f"weights_only=True ({type(err).__name__}); convert it to a state dict or .safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _new_linear_head(old: nn.Linear, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(old.in_features, num_classes))


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_model(config: ModelConfig, num_classes: int, load_pretrained: bool = True) -> tuple[nn.Module, HeadSpec]:
    """Build `config.name` with ImageNet weights (if asked), then replace the head for `num_classes`.

    `load_pretrained=False` builds the same architecture without reading weights, for loading a
    trained model's own weights afterwards.
    """
    _check_model_name(config.name)
    if num_classes < 2:
        raise UserError(f"need at least 2 classes to train a classifier, got {num_classes}")
    weights_path = resolve_weights_path(config.name, config.pretrained) if load_pretrained else None
    kwargs: dict = {"weights": None}
    if config.name == "inception_v3":
        # torchvision enables transform_input with its ImageNet weights (they expect its own normalisation).
        pretrained = config.pretrained != "none"
        kwargs.update(aux_logits=True, init_weights=not pretrained, transform_input=pretrained)
    model = torchvision.models.get_model(config.name, **kwargs)
    if weights_path is not None:
        state = load_state_dict_file(weights_path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise UserError(f"weights file {weights_path} does not match {config.name}: {first}") from None
    spec = head_spec(model)
    for dotted in filter(None, (spec.main, spec.auxiliary)):
        old = model.get_submodule(dotted)
        head = _new_linear_head(old, num_classes, config.dropout) if dotted == spec.main else nn.Linear(old.in_features, num_classes)
        _replace_module(model, dotted, head)
    return model, spec


def head_parameter_names(model: nn.Module, spec: HeadSpec) -> set[str]:
    prefixes = tuple(f"{p}." for p in (spec.main, spec.auxiliary) if p)
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def download_weights(model_names: list[str]) -> list[Path]:
    """Fetch torchvision's default ImageNet weights into the hub cache (needs internet) and return the paths."""
    paths = []
    for name in model_names:
        if name not in available_models():
            raise UserError(f"unknown model {name!r}")
        weights = torchvision.models.get_model_weights(name).DEFAULT
        weights.get_state_dict(progress=True, check_hash=True)
        paths.append(hub_checkpoint_dir() / weights_file_name(name))
    return paths


def check_model_config(config: ModelConfig) -> None:
    """Unknown model names and missing pretrained files, reported before any device work."""
    _check_model_name(config.name)
    resolve_weights_path(config.name, config.pretrained)


def _check_model_name(name: str) -> None:
    if name not in available_models():
        raise UserError(f"unknown model {name!r}; use a torchvision classification model such as "
                        "resnet50, vgg19, inception_v3, resnet18, efficientnet_b0, convnext_tiny")


def model_logits(output: torch.Tensor | tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, auxiliary logits or None) from a model's forward output (Inception returns a namedtuple in training)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if hasattr(output, "logits"):
        return output.logits, getattr(output, "aux_logits", None)
    return output[0], (output[1] if len(output) > 1 else None)
