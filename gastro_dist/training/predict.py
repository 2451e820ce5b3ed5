"""The prediction loop validation and `evaluate` share: every sample of a split exactly once across
ranks, gathered, with the samples that could not be read reported."""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from gastro_dist import Preempted
from gastro_dist.config import DataConfig
from gastro_dist.data.epoch_plan import eval_batches_per_rank
from gastro_dist.data.loaders import eval_loader
from gastro_dist.data.shard_index import ShardIndex
from gastro_dist.models.backbones import model_logits
from gastro_dist.progress import progress
from gastro_dist.training.distributed import PreemptionWatch


@torch.no_grad()
def predict_split(accelerator: Accelerator, model: nn.Module, index: ShardIndex, data: DataConfig,
                  split: str, channels_last: bool = False, with_meta: bool = False,
                  watch: PreemptionWatch | None = None, progress_label: str | None = None) -> dict:
    """Probabilities for every readable sample of `split`, gathered from all ranks, de-duplicated by key.

    Ranks may hold one batch more or less than others; every rank runs the same number of loop
    iterations so that the preemption all-reduce stays in step. Returns keys, labels, probs, logits
    (the model's float32 values, as float64), meta (JSON text per sample when `with_meta`), skipped
    (reasons, all ranks) and missing (samples the index lists that could not be read). With
    `progress_label`, the main process shows its progress (a bar, or plain lines in a log).
    """
    model.eval()
    loader = eval_loader(index, data, split, rank=accelerator.process_index, world_size=accelerator.num_processes,
                         pin_memory=accelerator.device.type == "cuda", with_meta=with_meta)
    num_loops = max(eval_batches_per_rank(index.count(split), accelerator.num_processes,
                                          max(data.num_workers, 1), data.eval_batch_size))
    batches = iter(loader)
    rows, skipped = [], []
    bar = progress(Console(stderr=True), unit="batches",
                   enabled=progress_label is not None and accelerator.is_main_process)
    with bar:
        task = bar.add_task(progress_label or "", total=num_loops)
        for _ in range(num_loops):
            _predict_batch(accelerator, model, next(batches, None), channels_last, with_meta, watch, rows, skipped)
            bar.advance(task)
    for _ in batches:  # drain: a worker's trailing broken samples are only counted as missing
        pass
    if accelerator.num_processes > 1:
        rows, skipped = gather_object(rows), gather_object(skipped)
    unique = {}
    for key, label, prob, meta, logits in rows:
        unique.setdefault(key, (label, prob, meta, logits))
    ordered = sorted(unique.items())
    return {
        "keys": [k for k, _ in ordered],
        "labels": np.array([v[0] for _, v in ordered], dtype=np.int64),
        "probs": np.array([v[1] for _, v in ordered], dtype=np.float64).reshape(len(ordered), len(index.classes)),
        "logits": np.array([v[3] for _, v in ordered], dtype=np.float64).reshape(len(ordered), len(index.classes)),
        "meta": [v[2] for _, v in ordered],
        "skipped": skipped,
        "missing": index.count(split) - len(ordered),
    }


def _predict_batch(accelerator: Accelerator, model: nn.Module, batch: dict | None, channels_last: bool, with_meta: bool,
                   watch: PreemptionWatch | None, rows: list, skipped: list) -> None:
    """One loop iteration of `predict_split` (a rank out of batches still joins the preemption check)."""
    if watch is not None and watch.agreed():
        raise Preempted()
    if batch is None:
        return
    images = batch["image"].to(accelerator.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        logits, _ = model_logits(model(images))
    logits = logits.float()
    probs = torch.softmax(logits, dim=1).cpu().numpy().tolist()
    metas = batch["meta"] if with_meta else [None] * len(probs)
    rows.extend(zip(batch["key"], batch["label"].tolist(), probs, metas, logits.cpu().numpy().tolist()))
    skipped.extend(batch["skipped"])


def accuracy_summary(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """What validation reports each epoch: accuracy, macro accuracy (the mean of the per-class
    accuracies: the study's figure averaged), per-class accuracy, the plain cross-entropy (no label
    smoothing or class weights) and the macro one-vs-rest AUC over the classes present."""
    # Imported here: sklearn.metrics takes 1.5 s to import, which every process of every run would pay at start.
    from sklearn.metrics import roc_auc_score

    predicted = probs.argmax(axis=1)
    per_class = {c: float((predicted[labels == i] == i).mean()) if (labels == i).any() else None
                 for i, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    scorable = [i for i in range(len(classes)) if 0 < (labels == i).sum() < len(labels)]
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
        "loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()),
        "macro_auc": float(np.mean([roc_auc_score(labels == i, probs[:, i]) for i in scorable])) if scorable else None,
        "num_samples": int(len(labels)),
    }
