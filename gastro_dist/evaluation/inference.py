"""Using a trained run: its model rebuilt from RUN/model.json (checked by `run_dir.ModelMeta`) and the
chosen weights (safetensors only), and predictions for image files, folders and shards into a CSV,
with the evaluation preprocessing validation uses."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from torch import nn

from gastro_dist import UserError
from gastro_dist.config import DataConfig
from gastro_dist.data.augmentation import eval_transform
from gastro_dist.data.images import BadImage, is_image_path, load_rgb, read_image_file
from gastro_dist.data.shard_reader import ShardReadError, iter_shard_samples
from gastro_dist.files import csv_text
from gastro_dist.progress import progress
from gastro_dist.models.backbones import build_model, model_logits
from gastro_dist.run_dir import ModelMeta, RunDir
from gastro_dist.training import checkpoint as ckpt


@dataclass
class TrainedModel:
    model: nn.Module
    meta: ModelMeta
    checkpoint: str

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def architecture(self) -> str:
        return self.meta.architecture

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def temperature(self) -> float:
        """Probabilities are softmax(logits / temperature) (model.json; 1.0 when none was fitted)."""
        return self.meta.temperature

    def data_config(self, batch_size: int = 32, num_workers: int = 0) -> DataConfig:
        """The evaluation preprocessing this model was validated with."""
        return self.meta.data_config(batch_size, num_workers)


def load_trained_model(run_dir: str | Path, checkpoint: str = "best") -> TrainedModel:
    run = RunDir(run_dir)
    meta = run.read_model_meta()
    if checkpoint == "best":
        weights = run.model_weights
    elif checkpoint == "last":
        weights = run.last_weights()
    else:
        weights = Path(checkpoint)
        if not weights.exists():
            raise UserError(f"--checkpoint {weights} not found; use best, last, or a .safetensors file / checkpoint folder")
    try:
        model, _ = build_model(meta.model_config(), num_classes=len(meta.classes), load_pretrained=False,
                               image_size=meta.image_size)
    except UserError as err:  # an architecture this installation does not have
        raise UserError(f"{run.model_json}: {err}") from None
    state = ckpt.load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"weights {weights} do not fit {meta.architecture} with {len(meta.classes)} classes: "
                        f"{str(err).splitlines()[0]}") from None
    model.eval()
    return TrainedModel(model=model, meta=meta, checkpoint=str(weights))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in eval mode and channels_last, the memory format convolutions run fastest in on
    GPUs and, measured with `gastro-dist bench infer` on this project's CPUs, also on CPUs (ResNet-50 1.2x,
    ResNet-18 1.5x faster than contiguous; benchmarks/README.md, "Inference"). Float32: bf16 would change
    the probabilities a report is computed from, so it is left to `bench infer --precision bf16`."""
    return model.to(device, memory_format=torch.channels_last).eval()


# ---------------------------------------------------------------- inputs of `predict` and `cam`
@dataclass
class InputImage:
    """One image to predict: its display path, and its bytes or the error that prevented reading it."""
    path: str
    data: bytes | None = None
    error: str | None = None


def iter_inputs(inputs: list[str | Path]) -> Iterator[InputImage]:
    """Image files, folders (recursively, image extensions only) and .tar shards (their jpg/png members).

    Every input gives at least one `InputImage`, and every file of a folder with an image extension
    exactly one: what is not a readable regular file (a FIFO, a link to /dev/zero, a broken link, a
    file that cannot be opened) gets its error, found by `files.open_regular_file` without reading or
    blocking; a folder with no image file, or a subfolder that cannot be listed, gets one too."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from _folder_images(path)
        elif path.suffix == ".tar" and path.is_file():
            yield from _shard_images(path)
        else:
            yield _read_file(path)


def _folder_images(folder: Path) -> Iterator[InputImage]:
    """The files of `folder` and its subfolders (links to folders not followed) whose names have an image
    extension, sorted; everything that has one is read, whatever its kind (`_read_file` says why not)."""
    found, unlisted = [], []
    for parent, _, names in os.walk(folder, onerror=unlisted.append):
        found += [Path(parent, name) for name in names if is_image_path(name)]
    for err in unlisted:
        yield InputImage(str(err.filename), error=f"folder cannot be listed: {err.strerror or err}")
    for file in sorted(found):
        yield _read_file(file)
    if not found and not unlisted:
        yield InputImage(str(folder), error="folder holds no image file (jpg, png, bmp, tif)")


def _read_file(path: Path) -> InputImage:
    try:
        return InputImage(str(path), data=read_image_file(path))
    except BadImage as bad:
        return InputImage(str(path), error=bad.reason)


def _shard_images(path: Path) -> Iterator[InputImage]:
    """The images of a shard, through the shards' reader: members of ours only, size-capped, nothing unpickled."""
    try:
        for sample in iter_shard_samples(path, DataConfig.max_member_mb << 20, members=frozenset({"jpg", "png"})):
            image_bytes = sample.members.get("jpg") or sample.members.get("png")
            yield InputImage(f"{path}#{sample.key}", data=image_bytes,
                             error=sample.problem or (None if image_bytes else "no image member"))
    except ShardReadError as err:
        yield InputImage(str(path), error=f"unreadable shard: {err}")


def check_output_file(out: Path, inputs: list[str | Path], option: str = "--out") -> None:
    """Refuse an output file that would destroy an input before it is read, or be read as one."""
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; give the file to write, e.g. {out / 'predictions.csv'}")
    if file_identities([out]) & file_identities(inputs):
        raise UserError(f"{option} {out} is one of the inputs: writing it would destroy it before it is read; "
                        "choose another file")
    for item in map(Path, inputs):
        if item.is_dir() and is_image_path(out) and out.resolve().is_relative_to(item.resolve()):
            raise UserError(f"{option} {out} has an image extension inside the input folder {item}, so it would be "
                            "read as an input; write a .csv, or outside that folder")


def check_output_folder(out: Path, inputs: list[str | Path], option: str = "--out") -> None:
    """Refuse an overlay folder that is an existing file (an input given in the wrong place, say)."""
    if out.exists() and not out.is_dir():
        what = "one of the inputs" if file_identities([out]) & file_identities(inputs) else "a file"
        raise UserError(f"{option} {out} is {what}, not a folder; give a folder for the overlays")


def file_identities(paths: list[str | Path]) -> set[tuple[int, int]]:
    """(device, inode) of each path that exists: one file however it is spelt, linked or symlinked."""
    identities = set()
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:  # absent or unreadable: nothing to protect
            continue
        identities.add((status.st_dev, status.st_ino))
    return identities


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation: identity and the flips used in training."""
    return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, tta: bool = False,
                          temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) of a normalised batch; with `tta`, the mean over `tta_views`."""
    views = tta_views(images) if tta else [images]
    probs = [torch.softmax(model_logits(model(v))[0].float() / temperature, dim=1) for v in views]
    return torch.stack(probs).mean(0)


def predict_files(trained: TrainedModel, inputs: list[str | Path], out_csv: str | Path, batch_size: int = 32,
                  tta: bool = False, device: torch.device | None = None) -> dict:
    """Write one CSV row per input image; unreadable images get a row with `error` filled.

    Probabilities are softmax(logits / T) with the run's temperature T, written at full precision.

    Paths and class names are untrusted text: their cells are written with `csv_text`.
    """
    out_csv = Path(out_csv)
    check_output_file(out_csv, inputs)
    device = device or default_device()
    model = for_inference(trained.model, device)
    transform = eval_transform(trained.data_config())
    classes = trained.classes
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    counts = {"predicted": 0, "errors": 0}
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "predicted_label", "confidence", *[f"prob_{c}" for c in classes], "error"])

        def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
            if not batch:
                return
            images = torch.stack([t for _, t in batch]).to(device).contiguous(memory_format=torch.channels_last)
            probs = predict_probabilities(model, images, tta=tta, temperature=trained.temperature).cpu().numpy()
            for (path, _), p in zip(batch, probs):
                k = int(p.argmax())
                writer.writerow([csv_text(path), csv_text(classes[k]), full_precision(p[k]),
                                 *map(full_precision, p), ""])
            counts["predicted"] += len(batch)
            batch.clear()

        pending: list[tuple[str, torch.Tensor]] = []
        with progress(Console(stderr=True), unit="images", transient=True) as bar:
            task = bar.add_task("predicting")
            for item in iter_inputs(inputs):
                bar.advance(task)
                error = _add_input(item, transform, pending)
                if error is not None:
                    writer.writerow([csv_text(item.path), "", "", *[""] * len(classes), error])
                    counts["errors"] += 1
                if len(pending) >= batch_size:
                    flush(pending)
        flush(pending)
    return counts


def full_precision(value) -> str:
    """A number as the shortest text that reads back as exactly the same float64 (Python's repr):
    probabilities written like this reproduce every metric computed from them, ties included."""
    return repr(float(value))


def _add_input(item: InputImage, transform, pending: list[tuple[str, torch.Tensor]]) -> str | None:
    """Queue one input's preprocessed image for prediction, or return why it cannot be read."""
    if item.error is not None:
        return item.error
    try:
        pending.append((item.path, transform(load_rgb(item.data))))
    except BadImage as bad:
        return bad.reason
    return None
