"""The prediction loop validation and `evaluate` share: every sample of a split exactly once across
ranks, gathered, with the samples that could not be read reported."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from gastro_dist.config import DataConfig
from gastro_dist.data.epoch_plan import eval_batches_per_rank
from gastro_dist.data.loaders import eval_loader
from gastro_dist.data.shard_index import ShardIndex
from gastro_dist.models.backbones import model_logits
from gastro_dist.training.distributed import Preempted, PreemptionWatch


@torch.no_grad()
def predict_split(accelerator: Accelerator, model: nn.Module, index: ShardIndex, data: DataConfig,
                  split: str, channels_last: bool = False, with_meta: bool = False,
                  watch: PreemptionWatch | None = None) -> dict:
    """Probabilities for every readable sample of `split`, gathered from all ranks, de-duplicated by key.

    Ranks may hold one batch more or less than others; every rank runs the same number of loop
    iterations so that the preemption all-reduce stays in step. Returns keys, labels, probs,
    meta (JSON text per sample when `with_meta`), skipped (reasons, all ranks) and missing
    (samples the index lists that could not be read).
    """
    model.eval()
    loader = eval_loader(index, data, split, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, pin_memory=accelerator.device.type == "cuda",
                                  with_meta=with_meta)
    num_loops = max(eval_batches_per_rank(index.count(split), accelerator.num_processes,
                                                   max(data.num_workers, 1), data.eval_batch_size))
    batches = iter(loader)
    rows, skipped = [], []
    for _ in range(num_loops):
        if watch is not None and watch.agreed():
            raise Preempted()
        batch = next(batches, None)
        if batch is None:
            continue
        images = batch["image"].to(accelerator.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits, _ = model_logits(model(images))
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy().tolist()
        metas = batch["meta"] if with_meta else [None] * len(probs)
        rows.extend(zip(batch["key"], batch["label"].tolist(), probs, metas))
        skipped.extend(batch["skipped"])
    for _ in batches:  # drain: a worker's trailing broken samples are only counted as missing
        pass
    if accelerator.num_processes > 1:
        rows, skipped = gather_object(rows), gather_object(skipped)
    unique = {}
    for key, label, prob, meta in rows:
        unique.setdefault(key, (label, prob, meta))
    ordered = sorted(unique.items())
    return {
        "keys": [k for k, _ in ordered],
        "labels": np.array([v[0] for _, v in ordered], dtype=np.int64),
        "probs": np.array([v[1] for _, v in ordered], dtype=np.float64).reshape(len(ordered), len(index.classes)),
        "meta": [v[2] for _, v in ordered],
        "skipped": skipped,
        "missing": index.count(split) - len(ordered),
    }


def accuracy_summary(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    predicted = probs.argmax(axis=1)
    per_class = {c: float((predicted[labels == i] == i).mean()) if (labels == i).any() else None
                 for i, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
        "num_samples": int(len(labels)),
    }
