"""Run configuration: typed dataclasses (the one source of defaults), loaded from YAML with dotted
`key=value` overrides, every field checked at load with a one-line `UserError`. Configs and overrides
are untrusted text (`files.load_yaml_untrusted`: no aliases, bounded size and nesting), whole numbers
stay within int64, and a value that becomes a path (tracking.project) must be a plain name. The two
transfer-learning phases are data: `head` and `finetune` are two `PhaseConfig` values."""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gastro_dist import UserError
from gastro_dist.files import (ECHO_CHARS, MAX_NESTING, UnparsableDocument, UntrustedDocument, excerpt,
                               load_yaml_untrusted, read_limited, safe_name)

TRACKERS = ("wandb", "mlflow", "tensorboard")
AUTO_AUGMENT_POLICIES = ("none", "randaugment", "trivialaugment")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# No pretrained classifier in torchvision or timm takes more than 800 px (EfficientNet-L2); 4096 leaves room
# while one image's activations still fit a GPU (image_size 200000 would ask for terabytes).
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**31 - 1  # each process adds its rank, and numpy takes seeds below 2**32
MAX_INT = 2**63 - 1  # torch and numpy hold whole numbers as int64


@dataclass
class ModelConfig:
    name: str = "resnet50"
    """A torchvision classification model (torchvision.models.list_models()), or timm:NAME for a timm model,
    NAME optionally with its pretrained tag (timm:convnext_tiny.fb_in22k; timm.list_pretrained())."""
    pretrained: str = "imagenet"
    """'imagenet': the model's own pretrained weights (torchvision's file in the torch hub cache, or a timm
    model's Hugging Face repo in the hub cache); 'none' (from scratch); or a weights file path."""
    dropout: float = 0.5
    """Dropout before the new linear head."""
    drop_path: float | None = None
    """Stochastic depth (residual branches dropped at random in training), given as the rate of the
    deepest block (timm's drop_path_rate, torchvision's stochastic_depth_prob; shallower blocks drop
    less). null: the model's own default (0 for most timm models; 0.1 for torchvision's ConvNeXt-T, 0.2 for its
    EfficientNets). Models without it (ResNet, VGG, Inception in torchvision) take only null."""
    aux_loss_weight: float = 0.4
    """Inception-V3 only: weight of the auxiliary head's loss in training (it is off at eval)."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on tensor cores)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm under DDP (useful for small per-GPU batches)."""
    grad_checkpointing: bool = False
    """Gradient checkpointing: keep only each backbone block's input and recompute its activations in the
    backward pass (less activation memory, for larger batches or images, at about a third more compute; the
    gradients are the same). timm models use their own switch; torchvision models checkpoint each block."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        _check(self.drop_path is None or 0.0 <= self.drop_path < 1.0, "drop_path must be in [0, 1) or null")
        _check(self.aux_loss_weight >= 0, "aux_loss_weight must be >= 0")
        _check(bool(self.pretrained), "pretrained must be 'imagenet', 'none' or a file path")


@dataclass
class DataConfig:
    image_size: int = 224
    """Square input size of the network (224 for VGG19/ResNet50, 299 for Inception-V3)."""
    batch_size: int = 32
    """Samples per process per optimizer micro-step."""
    eval_batch_size: int = 64
    """Samples per process per validation step."""
    num_workers: int = 4
    """DataLoader worker processes per training process (0 decodes in the main process)."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer (shard order is shuffled too)."""
    crop_scale_min: float = 0.35
    """Lower bound of the random-resized-crop area fraction."""
    rotation_deg: float = 15.0
    """Maximum random rotation in degrees."""
    hflip: bool = True
    """Random horizontal flips."""
    vflip: bool = True
    """Random vertical flips (endoscope orientation is arbitrary)."""
    color_jitter: float = 0.1
    """Brightness/contrast/saturation jitter strength."""
    hue_jitter: float = 0.0
    """Hue jitter (off by default: mucosal colour carries diagnostic information, and it is slow)."""
    eval_crop_ratio: float = 0.875
    """Evaluation resizes the short side to image_size / ratio, then center-crops image_size."""
    strict: bool = False
    """Stop at the first unreadable shard or sample instead of skipping and reporting it."""
    max_member_mb: int = 64
    """Largest shard member read, in MB: a sample with a larger member is skipped (a few-KB tar can
    declare a multi-GB sparse member). A 100-megapixel JPEG is ~40 MB; pack stores far smaller ones."""
    decode_on: str = "workers"
    """Where training JPEGs are decoded and cropped: "workers" (DataLoader processes, CPU) or "device"
    (the training device, nvJPEG on a GPU; workers only read the shards: for nodes with few cores per GPU)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel (RGB) mean subtracted after scaling pixels to [0, 1]: the pretrained weights' own."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel (RGB) standard deviation the pixels are divided by."""
    interpolation: str = ""
    """Resize filter of the training crops and the evaluation resize: "bilinear" or "bicubic"; "" (the
    default): the pretrained weights' own (bicubic for most timm weights, bilinear for torchvision's)."""
    fold: int | None = None
    """Cross-validation fold to validate on, for shards packed with --folds K (which need it): fold N is
    the val split and the other folds train (0..K-1; `gastro-dist cv` sets it per fold). null: the
    pack's own train and val splits."""
    max_upsampling: float = 1.5
    """Largest factor by which the model may see the stored images enlarged: the short side evaluation
    resizes to (image_size / eval_crop_ratio) over the short side pack stored (--resize-short). Above 1
    training warns; above this it is refused, since the network would learn interpolation blur that
    real frames at that size lack (re-pack with --input-size image_size, or raise this to train anyway)."""

    auto_augment: str = "none"
    """Random augmentation policy on the device batch after the flips and rotation, one draw per image:
    "none", "randaugment" (torchvision's RandAugment: auto_augment_ops operations at auto_augment_magnitude)
    or "trivialaugment" (torchvision's TrivialAugmentWide: one operation at a random magnitude)."""
    auto_augment_ops: int = 2
    """RandAugment: operations applied to each image."""
    auto_augment_magnitude: int = 9
    """RandAugment: strength of every operation, 0..30 (torchvision's 31 magnitude bins)."""
    mixup_alpha: float = 0.0
    """Mixup: each training image blended with the next in the batch, and their label-smoothed targets
    likewise, by a weight drawn from Beta(alpha, alpha) (0: off; 0.2-0.4 is usual)."""
    cutmix_alpha: float = 0.0
    """CutMix: a box of the next image in the batch pasted in, the targets mixed by its area, its size drawn
    from Beta(alpha, alpha) (0: off; 1.0 is usual)."""
    mixup_prob: float = 1.0
    """Share of the training batches mixed (mixup or CutMix), when mixup_alpha or cutmix_alpha is above 0."""
    mixup_switch_prob: float = 0.5
    """With both mixup_alpha and cutmix_alpha above 0: the chance that a mixed batch uses CutMix, not mixup."""

    def __post_init__(self) -> None:
        _check(self.image_size >= 32, "image_size must be >= 32")
        _check(self.image_size <= MAX_IMAGE_SIZE, f"image_size must be <= {MAX_IMAGE_SIZE}")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        _check(self.num_workers >= 0, "num_workers must be >= 0")
        _check(self.max_member_mb >= 1, "max_member_mb must be >= 1")
        _check(self.interpolation in ("", "bilinear", "bicubic"),
               "interpolation must be bilinear or bicubic (or empty for the model's own), "
               f"got {excerpt(self.interpolation)}")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer must be >= 1")
        _check(0.05 <= self.crop_scale_min <= 1.0, "crop_scale_min must be in [0.05, 1]")
        _check(0.5 <= self.eval_crop_ratio <= 1.0, "eval_crop_ratio must be in [0.5, 1]")
        _check(0 <= self.hue_jitter <= 0.5, "hue_jitter must be in [0, 0.5]")
        _check(self.decode_on in ("workers", "device"), f"decode_on must be workers or device, got {excerpt(self.decode_on)}")
        _check(not (self.decode_on == "device" and self.hue_jitter > 0),
               "hue_jitter needs data.decode_on=workers (hue is shifted in the workers)")
        _check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (RGB)")
        _check(self.max_upsampling >= 1.0, "max_upsampling must be >= 1 (1: never enlarge the stored images)")
        _check(self.fold is None or self.fold >= 0, f"fold must be a fold number >= 0 or null, got {self.fold}")
        _check(self.auto_augment in AUTO_AUGMENT_POLICIES,
               f"auto_augment must be {', '.join(AUTO_AUGMENT_POLICIES)}, not {excerpt(self.auto_augment)}")
        _check(1 <= self.auto_augment_ops <= 10, f"auto_augment_ops must be in [1, 10], not {self.auto_augment_ops}")
        _check(0 <= self.auto_augment_magnitude <= 30,
               f"auto_augment_magnitude must be in [0, 30], not {self.auto_augment_magnitude}")
        _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0 (0: off)")
        _check(0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1,
               "mixup_prob and mixup_switch_prob must be in [0, 1]")

    @property
    def resize_mode(self) -> str:
        """The resize filter in use: `interpolation`, or bilinear (torchvision's weights') when unset."""
        return self.interpolation or "bilinear"


@dataclass
class PhaseConfig:
    epochs: int = 1
    """Epochs of this phase (0 skips it)."""
    optimizer: str = "adamw"
    """'adamw' or 'sgd' (with Nesterov momentum)."""
    lr: float = 1e-3
    """Learning rate of the new head (peak, after warmup)."""
    backbone_lr: float = 1e-4
    """Learning rate of the unfrozen backbone layers (ignored while the backbone is frozen)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (AdamW) or L2 (SGD); not applied to biases and norm layers."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_epochs: float = 0.0
    """Linear warmup length, then cosine decay to lr * min_lr_ratio at the end of the phase."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of the peak."""
    unfreeze: str = "none"
    """'none' (backbone frozen: head pre-training), 'all', or an integer K: the last K backbone stages."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: each backbone layer group trains at layer_decay times the LR of the one above
    it, the last at backbone_lr (1.0: one backbone LR; 0.65-0.85 is the usual ViT fine-tuning range)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "epochs must be >= 0")
        _check(self.optimizer in ("adamw", "sgd"), f"optimizer must be 'adamw' or 'sgd', not {excerpt(self.optimizer)}")
        _check(self.lr > 0 and self.backbone_lr >= 0, "lr must be > 0 and backbone_lr >= 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        _check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], not {self.layer_decay}")
        self.unfreeze = str(self.unfreeze)
        _check(self.unfreeze in ("none", "all") or (self.unfreeze.isdigit() and int(self.unfreeze) > 0),
               f"unfreeze must be 'none', 'all' or a positive number of stages, not {excerpt(self.unfreeze)}")


@dataclass
class TrackingConfig:
    tracker: Any = "wandb"
    """'wandb', 'mlflow', 'tensorboard' or 'none', or a list of several (W&B: WANDB_MODE=offline works
    with no network; MLflow: MLFLOW_TRACKING_URI, e.g. file:/path or your server)."""
    project: str = "gastro-dist"
    """W&B project, MLflow experiment, TensorBoard folder under RUN/tensorboard."""
    entity: str | None = None
    """W&B team or user (default: your W&B default)."""
    run_name: str | None = None
    """Name of the run in the trackers (default: the run folder's name)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the run (W&B tags; MLflow tags)."""
    group: str | None = None
    """Runs to show side by side (W&B group, MLflow parent run); `compare` sets it to its --out folder's name."""
    log_every_steps: int = 10
    """Training-loss log interval in optimizer steps."""

    def __post_init__(self) -> None:
        names = [self.tracker] if isinstance(self.tracker, str) else self.tracker
        _check(isinstance(names, list) and all(isinstance(n, str) for n in names),
               f"tracker must be a name or a list of names, not {excerpt(self.tracker)}")
        unknown = sorted(set(names) - set(TRACKERS) - {"none"})
        _check(not unknown, f"unknown tracker {', '.join(unknown)[:ECHO_CHARS]}: use {', '.join(TRACKERS)} or none "
                            "(or a list)")
        self.tracker = [name for name in dict.fromkeys(names) if name != "none"]
        # TensorBoard writes under RUN/tensorboard/PROJECT: a path ('../x', '/x') would write outside the run.
        _check(safe_name(self.project) == self.project,
               f"project must be a plain name (letters, digits, '.', '_', '-'; not starting with '.' or '-'), "
               f"not {excerpt(self.project)}")
        _check(self.log_every_steps >= 1, "log_every_steps must be >= 1")


@dataclass
class EmaConfig:
    decay: float = 0.0
    """Exponential moving average of the weights, updated after every optimizer step with this decay
    (0: off; 0.999-0.9999 is usual, nearer 1 for more steps). Restarted at each phase's start; validated
    every epoch beside the live weights, and the better of the two is the phase's best (model.json's
    `weights` says which the final model holds)."""
    warmup: bool = True
    """Ramp the decay up from 0 (timm's warm-up: 1 - (1 + step)^(-2/3), capped at decay), so that the
    average of a short phase is not dominated by the weights it started from."""

    def __post_init__(self) -> None:
        _check(0 <= self.decay < 1, f"decay must be in [0, 1) (0: off), not {self.decay}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone and its new head."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline: sizes, batches, workers, augmentation."""
    head: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=5, optimizer="adamw", lr=1e-3, unfreeze="none"))
    """Phase 1: the new head on a frozen backbone."""
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(
        epochs=20, optimizer="sgd", lr=1e-2, backbone_lr=1e-3, warmup_epochs=1.0, unfreeze="all"))
    """Phase 2: fine-tuning from phase 1's best weights."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers and what they log."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """Weight EMA: an averaged copy of the weights, validated beside them."""
    mixed_precision: str = "bf16"
    """'bf16', 'fp16' or 'no' (bf16 needs Ampere or newer; on CPU 'no' is fastest)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing in training (validation reports the plain cross-entropy)."""
    class_weights: Any = "none"
    """'none', 'balanced' (inverse training-class frequency) or a list with one weight per class."""
    seed: int = 0
    """Seed of weights initialisation, data order and augmentation (each process offsets it by its rank)."""
    checkpoint_every_steps: int = 0
    """Also save the training state every N optimizer steps inside an epoch (0: end of epoch only)."""
    keep_checkpoints: int = 2
    """Complete training-state checkpoints kept per run (older ones are deleted after a new one commits)."""
    max_nonfinite_steps: int = 5
    """Stop (with a checkpoint from before) after this many consecutive non-finite optimizer steps."""
    max_steps_per_epoch: int = 0
    """Cap on micro-batches per epoch for debugging and smoke runs (0: the whole training split)."""

    def __post_init__(self) -> None:
        _check(self.mixed_precision in ("bf16", "fp16", "no"),
               f"mixed_precision must be 'bf16', 'fp16' or 'no', not {excerpt(self.mixed_precision)}")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1")
        _check(self.grad_clip_norm >= 0, "grad_clip_norm must be >= 0")
        _check(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        _check(self.class_weights in ("none", "balanced") or isinstance(self.class_weights, list),
               "class_weights must be 'none', 'balanced' or a list of numbers, one per class")
        if isinstance(self.class_weights, list):
            self.class_weights = [_coerce(float, w, "class_weights") for w in self.class_weights]
            _check(all(w >= 0 for w in self.class_weights) and any(w > 0 for w in self.class_weights),
                   f"class_weights must be numbers >= 0, at least one above 0, got {excerpt(self.class_weights)}")
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1")
        _check(self.max_steps_per_epoch >= 0, "max_steps_per_epoch must be >= 0")
        _check(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], not {excerpt(self.seed)}")
        _check(self.head.epochs + self.finetune.epochs > 0, "head.epochs and finetune.epochs are both 0: nothing to train")

    def phases(self) -> list[tuple[str, PhaseConfig]]:
        return [("head", self.head), ("finetune", self.finetune)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


# ---------------------------------------------------------------- building from plain data
def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking every key and value type."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UserError(f"unknown config key {excerpt(f'{prefix}{key}')}; valid keys here: "
                            f"{', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except UserError as err:
        if not prefix:
            raise
        raise UserError(f"config section '{prefix[:-1]}': {err}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' needs a list, got {excerpt(value)}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, key) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' needs true or false, got {excerpt(value)}")
    if hint is int:
        if isinstance(value, str):  # a quoted "8", or YAML 1.1 leaving a spelling it does not know as text
            value = _parse_number(value, int)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise UserError(f"config key '{key}' needs a whole number within ±{MAX_INT}, got {excerpt(value)}")
            return value
        raise UserError(f"config key '{key}' needs a whole number, got {excerpt(value)}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text: accept every spelling Python does
            value = _parse_number(value, float)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise UserError(f"config key '{key}' needs a finite number, got {excerpt(value)}")
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted no/yes as a boolean (`mixed_precision: no`): take the word back.
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise UserError(f"config key '{key}' needs a string, got {excerpt(value)}")
    return value


def _parse_number(text: str, kind: type) -> Any:
    """`kind(text)` when Python reads it as one, else the text unchanged (the caller's error names it)."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


def plain_value(value: Any) -> Any:
    """A config value as plain YAML/JSON data (tuples become lists)."""
    if isinstance(value, (tuple, list)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config, for YAML/JSON and trackers."""
    return plain_value(dataclasses.asdict(config))


# ---------------------------------------------------------------- YAML and overrides
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to nested dict `data` (values parsed as YAML scalars/lists, as safely as
    config files; a value that is not YAML is taken as text)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not key or len(parts) > MAX_NESTING:
            raise UserError(f"override {excerpt(item)} must look like key=value, e.g. head.epochs=3")
        try:
            value = load_yaml_untrusted(raw, f"override {excerpt(key)}") if raw != "" else ""
        except UnparsableDocument:
            value = raw
        except UntrustedDocument as err:
            raise UserError(str(err)) from None
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {excerpt(item)}: {excerpt(part)} is not a config section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass one of the files in configs/ or a path to your own YAML")
        try:
            text = read_limited(path, f"config file {path}").decode("utf-8")
            data = load_yaml_untrusted(text, f"config file {path}")
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
        except UntrustedDocument as err:
            raise UserError(str(err)) from None
        if data is None:  # nothing but comments
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"config file {path} holds {excerpt(data)}, not a mapping of keys such as "
                            "`head: {epochs: 3}`")
    apply_overrides(data, overrides or [])
    return from_dict(TrainConfig, data)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right below it in this file), by field name."""
    source = Path(__file__).read_text(encoding="utf-8")
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == cls.__name__).body
    return {node.target.id: " ".join(following.value.value.split())
            for node, following in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)}


def describe_config(config: Any, defaults: Any = None, indent: str = "") -> str:
    """The resolved config as YAML, each key with its one-line doc and, where it differs, its default."""
    defaults = defaults if defaults is not None else type(config)()
    docs = field_docs(type(config))
    lines = []
    for f in dataclasses.fields(config):
        value, default = getattr(config, f.name), getattr(defaults, f.name)
        comment = docs.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:  # {comment}")
            lines.append(describe_config(value, default, indent + "  "))
            continue
        if value != default:
            comment += f" (default: {_inline_yaml(default)})"
        lines.append(f"{indent}{f.name}: {_inline_yaml(value)}  # {comment}")
    return "\n".join(lines)


def _inline_yaml(value: Any) -> str:
    return yaml.safe_dump([plain_value(value)], default_flow_style=True, width=10**6).strip()[1:-1]


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# Keys a run folder may be continued with at other values: how the run runs and reports, not what it learns.
RUN_SETTINGS = ("tracking.", "data.num_workers", "data.eval_batch_size", "data.strict", "data.max_member_mb",
                "data.decode_on", "data.max_upsampling", "model.compile", "model.grad_checkpointing",
                "checkpoint_every_steps", "keep_checkpoints", "max_nonfinite_steps")


def changed_training_keys(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """'key: was X, now Y' for every key (dotted) whose value in ``config`` differs from ``saved`` (a run's
    config.yaml), leaving out RUN_SETTINGS. A key the saved config lacks (added to the code since) counts
    as its default."""
    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(data, dict):
            return {prefix[:-1]: data}
        return {key: value for name, sub in data.items() for key, value in flat(sub, f"{prefix}{name}.").items()}

    before, now = {**flat(to_dict(TrainConfig())), **flat(saved)}, flat(to_dict(config))
    return [f"{key} was {_inline_yaml(before.get(key))}, now {_inline_yaml(now.get(key))}"
            for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key) and not key.startswith(RUN_SETTINGS)]
