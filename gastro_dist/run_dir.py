"""A run folder: every file a run writes or reads, by name, and the schema of model.json (`ModelMeta`).

Training, evaluate, predict, cam, export and the checkpoint code find their files here; nothing
else builds a path inside a run folder. No secret from the environment is ever written (`redact`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gastro_dist import UserError
from gastro_dist.config import MAX_IMAGE_SIZE, DataConfig, ModelConfig
from gastro_dist.files import UntrustedDocument, excerpt, load_json_untrusted, read_limited, write_json_atomic

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Mask values under secret-looking keys, and any string equal to a secret environment variable."""
    secrets = {v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8}

    def walk(obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            return {k: walk(v, str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, key) for v in obj]
        if isinstance(obj, str) and (_SECRET_KEY.search(key) or any(s in obj for s in secrets)):
            return "***"
        return obj

    return walk(value)


def write_run_json(path: Path, data: Any) -> None:
    """A JSON file of a run folder: atomic, and with secrets masked."""
    write_json_atomic(path, redact(data))


# ---------------------------------------------------------------- model.json
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _are_rgb_numbers(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))


def _are_class_names(value: Any) -> bool:
    """Class names end up in error lines, CSV headers and reports: distinct printable one-line text."""
    return (isinstance(value, list) and len(value) >= 2 and len(set(value)) == len(value)
            and all(isinstance(name, str) and name.strip() and name.isprintable() for name in value))


# What each model.json field must be before a model or a transform is built from it.
_REQUIRED_FIELDS = {
    "architecture": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "classes": (_are_class_names, "a list of at least 2 distinct printable class names"),
    "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= MAX_IMAGE_SIZE,
                   f"a whole number of pixels in [32, {MAX_IMAGE_SIZE}]"),
    "eval_crop_ratio": (_is_number, "a number"),
    "mean": (_are_rgb_numbers, "3 numbers (R, G, B)"),
    "std": (lambda v: _are_rgb_numbers(v) and min(v) > 0, "3 positive numbers (R, G, B)"),
}
_OPTIONAL_FIELDS = {
    "dropout": (_is_number, "a number"),
    "pretrained": (lambda v: isinstance(v, str), "a string"),
    "source_checkpoint": (lambda v: isinstance(v, str), "a string"),
    "interpolation": (lambda v: v in ("bilinear", "bicubic"), "'bilinear' or 'bicubic'"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "weights": (lambda v: v in ("live", "ema"), "'live' or 'ema'"),
}


@dataclass(frozen=True)
class ModelMeta:
    """model.json: everything evaluate, predict, cam and export need to rebuild and feed the model."""
    architecture: str
    classes: list[str]
    image_size: int
    eval_crop_ratio: float
    mean: list[float]
    std: list[float]
    dropout: float = 0.0
    pretrained: str = "none"
    source_checkpoint: str = ""
    interpolation: str = "bilinear"
    """Resize filter of the training crops and the evaluation resize ('bilinear' or 'bicubic'): the
    pretrained weights' own unless the config set data.interpolation."""
    temperature: float = 1.0
    """Temperature scaling fitted on the validation split: probabilities are softmax(logits / temperature);
    1.0 for runs trained before it was fitted."""
    weights: str = "live"
    """Which weights model.safetensors holds: 'live' (the trained weights) or 'ema' (their moving average,
    ema.decay, when it validated better)."""
    format: str = field(default="safetensors state_dict of the model with its new head")

    def model_config(self) -> ModelConfig:
        return ModelConfig(name=self.architecture, pretrained=self.pretrained, dropout=self.dropout)

    def export_metadata(self) -> dict:
        """What an exported model carries beside classes, mean, std and input size."""
        return {"architecture": self.architecture, "interpolation": self.interpolation,
                "eval_crop_ratio": self.eval_crop_ratio}

    def data_config(self, batch_size: int = 32, num_workers: int = 0) -> DataConfig:
        """The evaluation preprocessing this model was validated with."""
        return DataConfig(image_size=self.image_size, eval_crop_ratio=self.eval_crop_ratio, mean=tuple(self.mean),
                          std=tuple(self.std), interpolation=self.interpolation, batch_size=batch_size,
                          eval_batch_size=batch_size, num_workers=num_workers)

    @classmethod
    def read(cls, path: Path) -> ModelMeta:
        """A model.json, checked field by field: a run folder may come from anywhere, and a wrong field
        would otherwise surface as a traceback deep in model building or preprocessing."""
        fix = "restore the run's model.json, or re-run `gastro-dist train` with the same --out to write it again"
        try:
            data = load_json_untrusted(read_limited(path, str(path)), str(path))
        except UntrustedDocument as err:
            raise UserError(f"{err}; {fix}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a JSON object; {fix}")
        missing = [key for key in _REQUIRED_FIELDS if key not in data]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; {fix}")
        fields = {**_REQUIRED_FIELDS, **{k: v for k, v in _OPTIONAL_FIELDS.items() if k in data}}
        for key, (valid, expected) in fields.items():
            if not valid(data[key]):
                raise UserError(f"{path}: {key} must be {expected}, not {excerpt(data[key])}; {fix}")
        meta = cls(**{key: data[key] for key in fields})
        try:  # the ranges the configs check (e.g. image_size >= 32, dropout in [0, 1))
            meta.data_config()
            meta.model_config()
        except UserError as err:
            raise UserError(f"{path}: {err}; {fix}") from None
        return meta

    def write(self, path: Path) -> None:
        write_run_json(path, asdict(self))


# ---------------------------------------------------------------- the folder
class RunDir:
    """The files of one run folder. Paths only, and the run-level JSON files; weights and training
    states are written by `training.checkpoint` into the folders named here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:  # a RunDir works wherever a path does
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    config_yaml = property(lambda self: self.path / "config.yaml", doc="the resolved config, plain YAML")
    summary_json = property(lambda self: self.path / "summary.json", doc="status, phases, skipped samples")
    metrics_jsonl = property(lambda self: self.path / "metrics.jsonl", doc="one JSON object per logged event")
    tracking_json = property(lambda self: self.path / "tracking.json", doc="the tracker's run id, for resume")
    model_weights = property(lambda self: self.path / "model.safetensors", doc="the final model's weights")
    model_json = property(lambda self: self.path / "model.json", doc="`ModelMeta` of the final model")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="training states and per-phase weights")
    preempt_flag = property(lambda self: self.path / ".preempt_requested",
                            doc="written by a SLURM batch script to ask for a checkpoint and a requeue")

    def phase_weights(self, phase: str, which: str) -> Path:
        """The weights folder of a phase's `best` or `last` epoch."""
        return self.checkpoints / f"{phase}-{which}"

    def last_weights(self) -> Path:
        """The last epoch's weights of the final phase that ran."""
        finetune = self.phase_weights("finetune", "last")
        return finetune if finetune.is_dir() else self.phase_weights("head", "last")

    def read_summary(self) -> dict:
        """summary.json, or {} when there is none (or it cannot be read: it is rewritten as the run goes)."""
        return read_json_object(self.summary_json)

    def write_summary(self, summary: dict) -> None:
        write_run_json(self.summary_json, summary)

    def read_tracking(self) -> dict:
        return read_json_object(self.tracking_json)

    def write_tracking(self, tracking: dict) -> None:
        write_run_json(self.tracking_json, tracking)

    def read_model_meta(self) -> ModelMeta:
        if not self.model_json.is_file():
            inner = self.runs_inside()
            if inner:
                shown = ", ".join(str(path) for path in inner[:3]) + (f" and {len(inner) - 3} more" if len(inner) > 3 else "")
                raise UserError(f"{self.path} is not a run but holds {'runs' if len(inner) > 1 else 'one'} one level "
                                f"down: pass --run {inner[0]}" + (f" (or {shown})" if len(inner) > 1 else ""))
            raise UserError(f"{self.path} has no model.json: it is not a finished training run "
                            "(run `gastro-dist train ... --out RUN` to completion, or re-run it to resume)")
        return ModelMeta.read(self.model_json)

    def runs_inside(self) -> list[Path]:
        """Finished runs one folder down (compare's and cv's output folders hold them), sorted."""
        try:
            return sorted(child for child in self.path.iterdir() if (child / "model.json").is_file())
        except OSError:
            return []


def read_json_object(path: Path) -> dict:
    """A small JSON object file (summary.json, cv.json, metrics.json), {} when absent, unreadable or not one."""
    try:
        data = load_json_untrusted(read_limited(path, str(path)), str(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
