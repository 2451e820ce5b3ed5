"""Backbones: torchvision classifiers and timm models, each with its ImageNet head replaced by a new one.

A plain model name is a torchvision model (`resnet50`); `timm:NAME` is a timm model, optionally with
its pretrained tag (`timm:convnext_tiny.fb_in22k`; without one, timm's default tag). Both families sit
behind one interface: `build_model`, `model_preprocessing`, `resolve_weights_path`, `download_weights`.

Pretrained weights come only from local files, never the network:
- torchvision: its own file name in the torch hub cache (`$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth`);
- timm: the model's Hugging Face repo in the hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  `~/.cache/huggingface/hub`), read as HF_HUB_OFFLINE=1 would;
- either: an explicit path (`model.pretrained=/path/file.safetensors|.pth`).
Pickle files are read with `torch.load(weights_only=True)`, so loading runs no code from a file. When
weights were asked for and the file is missing, `MissingWeights` says in one line what is expected
where and how to fetch it (`gastro-dist weights download MODEL` on a machine with internet).

Preprocessing (`model_preprocessing`): a timm model's mean, std, input size, interpolation and crop
ratio come from its pretrained config (`timm.data.resolve_data_config`); torchvision models get the
ImageNet values the paper configs were trained with. timm is imported only when a timm model is used.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

import torch
import torchvision
from torch import nn

from gastro_dist import UserError
from gastro_dist.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, ModelConfig

IMAGENET_NUM_CLASSES = 1000
TIMM_PREFIX = "timm:"
# The DataConfig fields a config may set to override a model's own preprocessing.
PREPROCESSING_FIELDS = ("image_size", "mean", "std", "eval_crop_ratio", "interpolation")
# Files of a timm Hugging Face repo that hold its weights, in the order timm itself tries them.
_TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class MissingWeights(UserError):
    """Pretrained weights were asked for but the local file is not there."""


@dataclass(frozen=True)
class HeadSpec:
    """Where a model keeps its classifier: dotted module paths of the layers that were replaced."""
    main: str
    auxiliary: str | None = None


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input is prepared, from its pretrained weights' training: stored in model.json so that
    validation, evaluate, predict, cam and export feed the model the same way."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    """Resize filter the weights were trained with: 'bilinear' or 'bicubic' (torchvision InterpolationMode names)."""
    eval_crop_ratio: float
    """Evaluation resizes the short side to image_size / eval_crop_ratio, then centre-crops image_size."""

    def to_json(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "eval_crop_ratio": self.eval_crop_ratio}

    def data_config(self, data: DataConfig) -> DataConfig:
        """`data` with these image size, mean, std, interpolation and crop ratio."""
        return dataclasses.replace(data, image_size=self.image_size, mean=self.mean, std=self.std,
                                   interpolation=self.interpolation, eval_crop_ratio=self.eval_crop_ratio)


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def is_timm_model(model: nn.Module) -> bool:
    """A timm model (a class of timm's with timm's layer-group matcher), built by create_model or directly."""
    return type(model).__module__.partition(".")[0] == "timm" and callable(getattr(model, "group_matcher", None))


# ---------------------------------------------------------------- torchvision
def available_models() -> list[str]:
    """torchvision's classification models (timm models are `timm:NAME`, see timm.list_models())."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def weights_file_name(model_name: str) -> str:
    """torchvision's file name of a model's default ImageNet weights (as stored in the hub cache)."""
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    return Path(weights.url).name


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


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


def _new_linear_head(old: nn.Linear, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(old.in_features, num_classes))


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _Torchvision:
    """Any torchvision classification model, named as torchvision names it."""

    def check(self, name: str) -> None:
        if name not in available_models():
            raise UserError(f"unknown model {name!r}; use a torchvision classification model such as resnet50, "
                            "vgg19, inception_v3, resnet18, efficientnet_b0, convnext_tiny, or timm:NAME for a timm model")

    def preprocessing(self, name: str) -> Preprocessing:
        # The input size torchvision evaluates its weights at (299 for inception_v3); the crop ratio and
        # interpolation the paper configs have always used.
        crop_size = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0]
        return Preprocessing(image_size=int(crop_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             interpolation="bilinear", eval_crop_ratio=DataConfig.eval_crop_ratio)

    def imagenet_weights(self, name: str) -> Path:
        file_name = weights_file_name(name)
        path = hub_checkpoint_dir() / file_name
        if not path.is_file():
            raise MissingWeights(
                f"ImageNet weights for {name} not found: expected {path}. On a machine with internet run "
                f"`gastro-dist weights download {name}` and copy {file_name} into {hub_checkpoint_dir()} "
                "(or set TORCH_HOME), or set model.pretrained=PATH, or model.pretrained=none to train from scratch")
        return path

    def create(self, config: ModelConfig, num_classes: int, weights_path: Path | None,
               image_size: int | None) -> tuple[nn.Module, HeadSpec]:
        kwargs: dict = {"weights": None}
        if config.name == "inception_v3":
            # torchvision enables transform_input with its ImageNet weights (they expect its own normalisation).
            pretrained = config.pretrained != "none"
            kwargs.update(aux_logits=True, init_weights=not pretrained, transform_input=pretrained)
        if config.drop_path is not None:
            kwargs["stochastic_depth_prob"] = config.drop_path
        try:
            model = torchvision.models.get_model(config.name, **kwargs)
        except TypeError as err:  # the builder has no such argument, or sets it itself (Swin, MaxViT)
            if "stochastic_depth_prob" not in str(err):
                raise
            raise UserError(f"torchvision's {config.name} does not take a stochastic depth rate; set "
                            "model.drop_path=null, or use a timm model (timm:NAME), where most have one") from None
        if weights_path is not None:
            _load_strict(model, load_state_dict_file(weights_path), weights_path, config.name)
        spec = head_spec(model)
        for dotted in filter(None, (spec.main, spec.auxiliary)):
            old = model.get_submodule(dotted)
            head = (_new_linear_head(old, num_classes, config.dropout) if dotted == spec.main
                    else nn.Linear(old.in_features, num_classes))
            _replace_module(model, dotted, head)
        return model, spec

    def download(self, name: str) -> Path:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        weights.get_state_dict(progress=True, check_hash=True)
        return hub_checkpoint_dir() / weights_file_name(name)


# ---------------------------------------------------------------- timm
def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (read at each call, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


class _Timm:
    """Any timm model as `timm:ARCH` or `timm:ARCH.TAG`, built by timm.create_model."""

    def name_in_timm(self, name: str) -> str:
        return name[len(TIMM_PREFIX):]

    def check(self, name: str) -> None:
        import timm

        arch, tag = timm.models.split_model_name_tag(self.name_in_timm(name))
        if not arch or not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else ""
            raise UserError(f"unknown timm model {arch!r}{hint}; timm.list_models('PATTERN*') lists the names")
        if tag:
            try:
                timm.models.get_pretrained_cfg(self.name_in_timm(name))
            except RuntimeError:
                tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
                raise UserError(f"timm model {arch} has no pretrained tag {tag!r}; its tags: "
                                f"{', '.join(tags) or 'none (use timm:' + arch + ' with model.pretrained=none)'}") from None

    def pretrained_cfg(self, name: str):
        """timm's PretrainedCfg of `name` (its tag's, or the default tag's), or None when it has none."""
        import timm

        return timm.models.get_pretrained_cfg(self.name_in_timm(name))

    def preprocessing(self, name: str) -> Preprocessing:
        from timm.data import resolve_data_config

        cfg = self.pretrained_cfg(name)
        data = resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else None)
        # The evaluation crop here is a centre crop of at most the whole short side (DataConfig's range).
        return Preprocessing(image_size=int(data["input_size"][-1]),
                             mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                             interpolation=str(data["interpolation"]),
                             eval_crop_ratio=min(1.0, max(0.5, float(data["crop_pct"]))))

    def _hub_files(self, cfg) -> tuple[str, ...]:
        return (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _TIMM_WEIGHT_FILES

    def imagenet_weights(self, name: str) -> Path:
        from huggingface_hub import try_to_load_from_cache

        cfg = self.pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            raise MissingWeights(f"{name} has no pretrained weights on the Hugging Face hub; set "
                                 "model.pretrained=PATH to a weights file, or model.pretrained=none to train from scratch")
        cache = hf_hub_cache_dir()
        for file_name in self._hub_files(cfg):
            found = try_to_load_from_cache(cfg.hf_hub_id, file_name, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
        raise MissingWeights(
            f"pretrained weights for {name} not found: expected {self._hub_files(cfg)[0]} of the Hugging Face repo "
            f"{cfg.hf_hub_id} in the hub cache {cache}. On a machine with internet run `gastro-dist weights download "
            f"{name}` and copy the folder it prints into {cache} (or set HF_HOME or HF_HUB_CACHE), or set "
            "model.pretrained=PATH, or model.pretrained=none to train from scratch")

    def create(self, config: ModelConfig, num_classes: int, weights_path: Path | None,
               image_size: int | None) -> tuple[nn.Module, HeadSpec]:
        import timm

        name = self.name_in_timm(config.name)
        cfg = self.pretrained_cfg(config.name)
        kwargs: dict[str, Any] = {"drop_rate": config.dropout}
        if config.drop_path is not None:
            kwargs["drop_path_rate"] = config.drop_path
        if image_size is not None and cfg is not None and cfg.fixed_input_size and image_size != cfg.input_size[-1]:
            # ViT-style models size their position embeddings (and Swin its windows) at build time.
            kwargs["img_size"] = image_size
        try:
            if weights_path is None:
                model = timm.create_model(name, num_classes=num_classes, **kwargs)
            else:
                model = self._create_pretrained(name, cfg, weights_path, kwargs)
                model.reset_classifier(num_classes)
        except TypeError as err:  # the model class takes no drop_path_rate
            if "drop_path_rate" not in str(err):
                raise
            raise UserError(f"timm's {name} has no stochastic depth; set model.drop_path=null") from None
        return model, _timm_head_spec(model)

    def _create_pretrained(self, name: str, cfg, weights_path: Path, kwargs: dict[str, Any]) -> nn.Module:
        """The model with the file's weights, through timm's own loading (its checkpoint filters resample
        position embeddings to the input size, for instance), loaded strictly: built with the file's
        number of classes (0, no classifier, when the file has none), so every tensor must fit."""
        import timm

        state = load_state_dict_file(weights_path)
        classifier = cfg.classifier if cfg is not None else None
        first = classifier if isinstance(classifier, str) else (classifier[0] if classifier else None)
        weight = state.get(f"{first}.weight") if first else None
        file_classes = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 0
        overlay = {"state_dict": state, "num_classes": file_classes, "label_offset": 0}
        try:
            model = timm.create_model(name, pretrained=True, num_classes=file_classes,
                                      pretrained_cfg_overlay=overlay, **kwargs)
        except (RuntimeError, KeyError, ValueError) as err:  # load_state_dict, or a checkpoint filter on a foreign file
            raise UserError(f"weights file {weights_path} does not match timm:{name}: {_first_detail(err)}") from None
        model.pretrained_cfg.pop("state_dict", None)  # timm keeps the overlay: do not hold a second copy of the weights
        return model

    def download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        cfg = self.pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            raise UserError(f"{name} has no pretrained weights on the Hugging Face hub to download")
        cache = hf_hub_cache_dir()
        for file_name in self._hub_files(cfg):
            try:
                hf_hub_download(cfg.hf_hub_id, file_name, cache_dir=cache)
            except LocalEntryNotFoundError as err:  # offline, or the hub unreachable: not a missing file
                raise UserError(f"cannot download {cfg.hf_hub_id} for {name}: {_first_detail(err)}; run this on a "
                                "machine with internet access and HF_HUB_OFFLINE unset") from None
            except EntryNotFoundError:  # the repo has no such file: try the next name
                continue
            except Exception as err:  # offline mode, no network, a gated repo: huggingface_hub's many error types
                raise UserError(f"cannot download {cfg.hf_hub_id} for {name}: {_first_detail(err)}; run this on a "
                                "machine with internet access and HF_HUB_OFFLINE unset") from None
            return cache / ("models--" + cfg.hf_hub_id.replace("/", "--"))
        raise UserError(f"the Hugging Face repo {cfg.hf_hub_id} holds none of {', '.join(self._hub_files(cfg))}")


def _timm_head_spec(model: nn.Module) -> HeadSpec:
    """The module path(s) of a timm model's classifier (two for distilled models)."""
    classifier = model.get_classifier()
    heads = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    names = {id(module): name for name, module in model.named_modules()}
    main, *rest = [names[id(head)] for head in heads]
    return HeadSpec(main=main, auxiliary=rest[0] if rest else None)


_FAMILIES = {"torchvision": _Torchvision(), "timm": _Timm()}


def _family(name: str) -> _Torchvision | _Timm:
    return _FAMILIES["timm" if is_timm_name(name) else "torchvision"]


# ---------------------------------------------------------------- the interface
def check_model_name(name: str) -> None:
    """Raise UserError unless `name` is a torchvision model or `timm:ARCH[.TAG]` with a known tag."""
    _family(name).check(name)


def model_preprocessing(name: str) -> Preprocessing:
    """The preprocessing `name`'s pretrained weights expect (timm's pretrained config, or torchvision's ImageNet)."""
    check_model_name(name)
    return _family(name).preprocessing(name)


def resolve_preprocessing(name: str, data: DataConfig, explicit: Collection[str]) -> Preprocessing:
    """The model's own preprocessing, except the `PREPROCESSING_FIELDS` named in `explicit` (the `data.*` keys
    the user's config or overrides set), which come from `data`."""
    own = model_preprocessing(name)
    chosen = {key: getattr(data, key) for key in PREPROCESSING_FIELDS if key in explicit}
    for key in ("mean", "std"):
        if key in chosen:
            chosen[key] = tuple(float(v) for v in chosen[key])
    return dataclasses.replace(own, **chosen)


def resolve_weights_path(model_name: str, pretrained: str) -> Path | None:
    """The local file to load for `pretrained` ('imagenet', 'none' or a path); raise if it is missing."""
    if pretrained == "none":
        return None
    if pretrained != "imagenet":
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise MissingWeights(f"model.pretrained file {path} not found; give an existing .pth/.safetensors "
                                 "file, 'imagenet' for the model's own pretrained weights, or 'none' to train from scratch")
        return path
    check_model_name(model_name)
    return _family(model_name).imagenet_weights(model_name)


def check_model_config(config: ModelConfig) -> None:
    """Unknown model names and missing pretrained files, reported before any device work."""
    check_model_name(config.name)
    resolve_weights_path(config.name, config.pretrained)


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


def _first_detail(err: BaseException) -> str:
    """The most telling line of an exception (load_state_dict puts it on the second line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__)[:300]


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], weights_path: Path, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"weights file {weights_path} does not match {name}: {_first_detail(err)}") from None


def build_model(config: ModelConfig, num_classes: int, load_pretrained: bool = True,
                image_size: int | None = None) -> tuple[nn.Module, HeadSpec]:
    """Build `config.name` with its pretrained weights (if asked), with a new head for `num_classes`.

    `load_pretrained=False` builds the same architecture without reading weights, for loading a
    trained model's own weights afterwards. `image_size` is the square input size the model will see:
    models whose size is fixed at build time (timm ViTs, Swin) are built for it, their pretrained position
    embeddings resampled; other models ignore it. Pass the same size when rebuilding a trained model.
    """
    check_model_name(config.name)
    if num_classes < 2:
        raise UserError(f"need at least 2 classes to train a classifier, got {num_classes}")
    weights_path = resolve_weights_path(config.name, config.pretrained) if load_pretrained else None
    return _family(config.name).create(config, num_classes, weights_path, image_size)


def head_parameter_names(model: nn.Module, spec: HeadSpec) -> set[str]:
    prefixes = tuple(f"{p}." for p in (spec.main, spec.auxiliary) if p)
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm, timm's BatchNorm+activation layers included (torch's converter
    would turn those into plain SyncBatchNorm and drop their activation)."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def download_weights(model_names: list[str]) -> list[Path]:
    """Fetch each model's pretrained weights into its local cache (needs internet); return what to copy:
    the torch hub file of a torchvision model, the Hugging Face repo folder of a timm model."""
    for name in model_names:
        check_model_name(name)
    return [_family(name).download(name) for name in model_names]


def model_logits(output: torch.Tensor | tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, auxiliary logits or None) from a model's forward output (Inception returns a namedtuple in training)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if hasattr(output, "logits"):
        return output.logits, getattr(output, "aux_logits", None)
    return output[0], (output[1] if len(output) > 1 else None)
