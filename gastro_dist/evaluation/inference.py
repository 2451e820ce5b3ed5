"""Using a trained run: load its model, predict files/folders/shards, Grad-CAM overlays, export.

A run's final model is RUN/model.safetensors + RUN/model.json (architecture, classes, input
size, mean/std). `--checkpoint` picks it ('best', the default), the last epoch's weights of the
final phase ('last'), or any weights file or checkpoint directory (a PATH). Weights are read
with safetensors, so loading never runs code from a file.

Preprocessing is `pipeline.eval_transform`, the very transform validation uses during training.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from gastro_dist import UserError
from gastro_dist.config import DataConfig, ModelConfig
from gastro_dist.data import pipeline
from gastro_dist.data.images import BadImage, is_image_path, load_rgb
from gastro_dist.models.backbones import build_model, model_logits
from gastro_dist.training import checkpoint as ckpt


@dataclass
class TrainedModel:
    model: nn.Module
    meta: dict
    checkpoint: str
    classes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = list(self.meta["classes"])

    @property
    def architecture(self) -> str:
        return self.meta["architecture"]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def data_config(self, batch_size: int = 32, num_workers: int = 0) -> DataConfig:
        """The evaluation preprocessing this model was validated with."""
        return DataConfig(image_size=self.image_size, eval_crop_ratio=float(self.meta["eval_crop_ratio"]),
                          mean=tuple(self.meta["mean"]), std=tuple(self.meta["std"]),
                          batch_size=batch_size, eval_batch_size=batch_size, num_workers=num_workers)


def load_trained_model(run_dir: str | Path, checkpoint: str = "best") -> TrainedModel:
    run_dir = Path(run_dir)
    meta_path = run_dir / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{run_dir} has no model.json: it is not a finished training run "
                        "(run `gastro-dist train ... --out RUN` to completion, or re-run it to resume)")
    meta = json.loads(meta_path.read_text())
    if checkpoint == "best":
        weights = run_dir / "model.safetensors"
    elif checkpoint == "last":
        phase = "finetune" if (ckpt.checkpoint_root(run_dir) / "finetune-last").is_dir() else "head"
        weights = ckpt.checkpoint_root(run_dir) / f"{phase}-last"
    else:
        weights = Path(checkpoint)
        if not weights.exists():
            raise UserError(f"--checkpoint {weights} not found; use best, last, or a .safetensors file / checkpoint folder")
    model_config = ModelConfig(name=meta["architecture"], pretrained=meta.get("pretrained", "none"),
                               dropout=float(meta.get("dropout", 0.0)))
    model, _ = build_model(model_config, num_classes=len(meta["classes"]), load_pretrained=False)
    state = ckpt.load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"weights {weights} do not fit {meta['architecture']} with {len(meta['classes'])} classes: "
                        f"{str(err).splitlines()[0]}") from None
    model.eval()
    return TrainedModel(model=model, meta=meta, checkpoint=str(weights))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- inputs of `predict` and `cam`
@dataclass
class InputImage:
    """One image to predict: its display path, and its bytes or the error that prevented reading it."""
    path: str
    data: bytes | None = None
    error: str | None = None


def iter_inputs(inputs: list[str | Path]) -> Iterator[InputImage]:
    """Image files, folders (recursively, image extensions only) and .tar shards (their jpg/png members)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p)):
                yield _read_file(file)
        elif path.suffix == ".tar" and path.is_file():
            yield from _shard_images(path)
        elif path.is_file():
            yield _read_file(path)
        else:
            yield InputImage(str(path), error="file not found")


def _read_file(path: Path) -> InputImage:
    try:
        return InputImage(str(path), data=path.read_bytes())
    except OSError as err:
        return InputImage(str(path), error=f"unreadable file: {err.strerror or err}")


def _shard_images(path: Path) -> Iterator[InputImage]:
    # Plain tarfile, not webdataset's decoders: only image members are read, nothing is unpickled.
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if member.isfile() and ext.lower() in ("jpg", "jpeg", "png"):
                    yield InputImage(f"{path}#{stem}", data=tar.extractfile(member).read())
    except (tarfile.TarError, OSError) as err:
        yield InputImage(str(path), error=f"unreadable shard: {err}")


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation: identity and the flips used in training."""
    return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    views = tta_views(images) if tta else [images]
    probs = [torch.softmax(model_logits(model(v))[0].float(), dim=1) for v in views]
    return torch.stack(probs).mean(0)


def predict_files(trained: TrainedModel, inputs: list[str | Path], out_csv: str | Path, batch_size: int = 32,
                  tta: bool = False, device: torch.device | None = None) -> dict:
    """Write one CSV row per input image; unreadable images get a row with `error` filled."""
    device = device or default_device()
    model = trained.model.to(device).eval()
    transform = pipeline.eval_transform(trained.data_config())
    classes = trained.classes
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    counts = {"predicted": 0, "errors": 0}
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "predicted_label", "confidence", *[f"prob_{c}" for c in classes], "error"])

        def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
            if not batch:
                return
            images = torch.stack([t for _, t in batch]).to(device)
            probs = predict_probabilities(model, images, tta=tta).cpu().numpy()
            for (path, _), p in zip(batch, probs):
                k = int(p.argmax())
                writer.writerow([path, classes[k], f"{p[k]:.6f}", *[f"{v:.6f}" for v in p], ""])
            counts["predicted"] += len(batch)
            batch.clear()

        pending: list[tuple[str, torch.Tensor]] = []
        for item in iter_inputs(inputs):
            error = item.error
            if error is None:
                try:
                    pending.append((item.path, transform(load_rgb(item.data))))
                except BadImage as bad:
                    error = bad.reason
            if error is not None:
                writer.writerow([item.path, "", "", *[""] * len(classes), error])
                counts["errors"] += 1
            if len(pending) >= batch_size:
                flush(pending)
        flush(pending)
    return counts
