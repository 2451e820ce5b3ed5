"""The trainer: both transfer-learning phases under Accelerate (DDP, mixed precision, CPU fallback).

`train(config, shards_dir, run_dir)` runs phase `head` (new head on a frozen backbone) and then
phase `finetune` (unfrozen layers at a lower backbone LR, starting from the head phase's best
weights), validating after every epoch and keeping `best` (by macro accuracy: the mean of the
per-class accuracies, the study's figure averaged) and `last` weights per phase.

Running the same command again with the same RUN resumes from the newest complete training
state, inside the epoch if it was interrupted there. A preemption request (SIGUSR1/SIGTERM,
or the file RUN/.preempt_requested written by a SLURM batch script) is agreed by all ranks at
the next step boundary; they save one checkpoint and `train` raises `Preempted`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from gastro_dist import UserError
from gastro_dist.config import DataConfig, PhaseConfig, TrainConfig, save_config
from gastro_dist.data import pipeline
from gastro_dist.models.backbones import build_model, head_parameter_names, model_logits
from gastro_dist.models.freezing import keep_frozen_batchnorm_in_eval, set_trainable
from gastro_dist.tracking import RunLog, write_json_atomic
from gastro_dist.training import checkpoint as ckpt
from gastro_dist.training.checkpoint import TrainerState

PREEMPT_FLAG = ".preempt_requested"
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the SLURM script requeues on it


class Preempted(Exception):
    """Training stopped at a step boundary after a preemption request; a checkpoint was saved."""


# ---------------------------------------------------------------- setup
def make_accelerator(config: TrainConfig) -> Accelerator:
    # With no CUDA, cpu=True makes several launched processes use gloo (MULTI_CPU) instead of
    # each one silently running alone.
    cpu = not torch.cuda.is_available()
    mixed_precision = config.mixed_precision
    if cpu and mixed_precision == "fp16":
        raise UserError("mixed_precision=fp16 needs a GPU; use mixed_precision=bf16 or no on CPU")
    log_with = "wandb" if config.tracking.tracker == "wandb" else None
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with)


def num_machines(world_size: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, world_size // max(local, 1))


def class_weights_tensor(config: TrainConfig, index: pipeline.ShardIndex) -> torch.Tensor | None:
    if config.class_weights == "none":
        return None
    if config.class_weights == "balanced":
        counts = np.array([index.per_class("train").get(c, 0) for c in index.classes], dtype=np.float64)
        if (counts == 0).any():
            missing = [c for c, n in zip(index.classes, counts) if n == 0]
            raise UserError(f"class_weights=balanced but the training split has no images of {missing}")
        weights = counts.sum() / (len(counts) * counts)
        return torch.tensor(weights, dtype=torch.float32)
    if len(config.class_weights) != len(index.classes):
        raise UserError(f"class_weights has {len(config.class_weights)} values but the shards have "
                        f"{len(index.classes)} classes ({index.classes})")
    return torch.tensor([float(w) for w in config.class_weights], dtype=torch.float32)


def check_run_dir(run_dir: Path, classes: list[str]) -> None:
    """A run directory being resumed must hold the same classes as the shards."""
    model_json = run_dir / "run.json"
    if model_json.is_file():
        previous = json.loads(model_json.read_text()).get("classes")
        if previous is not None and previous != classes:
            raise UserError(f"{run_dir} was trained on classes {previous} but the shards have {classes}; "
                            "use a new --out directory for this data")


# ---------------------------------------------------------------- optimiser and schedule
def build_optimizer(model: nn.Module, head_names: set[str], phase: PhaseConfig) -> torch.optim.Optimizer:
    """Param groups: head / backbone, each split into decayed weights and undecayed biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name in head_names
        decay = param.ndim > 1
        groups.setdefault((is_head, decay), []).append(param)
    param_groups = [
        {"params": params, "lr": phase.lr if is_head else phase.backbone_lr,
         "weight_decay": phase.weight_decay if decay else 0.0}
        for (is_head, decay), params in sorted(groups.items())
    ]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=phase.lr, momentum=phase.momentum, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=phase.lr)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# ---------------------------------------------------------------- preemption
class PreemptionWatch:
    """Set by SIGUSR1/SIGTERM or by the flag file; the handler only sets a flag (saving inside a
    signal handler can deadlock collective calls). Ranks agree through an all-reduce."""

    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.flag_file = run_dir / PREEMPT_FLAG
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread (e.g. called from a test's thread)
                pass

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        local = self.requested or self.flag_file.exists()
        flag = torch.tensor([1.0 if local else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_split(accelerator: Accelerator, model: nn.Module, index: pipeline.ShardIndex, data: DataConfig,
                  split: str, channels_last: bool = False, with_meta: bool = False,
                  watch: PreemptionWatch | None = None) -> dict:
    """Probabilities for every sample of `split`, gathered from all ranks and de-duplicated by key.

    Ranks may hold one batch more or less than others; every rank runs the same number of loop
    iterations so that the preemption all-reduce stays in step.
    """
    model.eval()
    loader = pipeline.eval_loader(index, data, split, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, pin_memory=accelerator.device.type == "cuda",
                                  with_meta=with_meta)
    num_loops = max(pipeline.eval_batches_per_rank(index.count(split), accelerator.num_processes,
                                                   max(data.num_workers, 1), data.eval_batch_size))
    batches = iter(loader)
    keys, labels, probs, metas = [], [], [], []
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
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.extend(batch["label"].tolist())
        keys.extend(batch["key"])
        if with_meta:
            metas.extend(batch["meta"])
    local = list(zip(keys, labels, torch.cat(probs).numpy().tolist() if probs else [], metas or [None] * len(keys)))
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    unique = {}
    for key, label, prob, meta in gathered:
        unique.setdefault(key, (label, prob, meta))
    ordered = sorted(unique.items())
    return {
        "keys": [k for k, _ in ordered],
        "labels": np.array([v[0] for _, v in ordered], dtype=np.int64),
        "probs": np.array([v[1] for _, v in ordered], dtype=np.float64).reshape(len(ordered), len(index.classes)),
        "meta": [v[2] for _, v in ordered],
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


# ---------------------------------------------------------------- the run
def train(config: TrainConfig, shards_dir: str | Path, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    index = pipeline.load_shard_index(shards_dir)
    for split in ("train", "val"):
        if index.count(split) == 0:
            raise UserError(f"the {split} split in {shards_dir} is empty; re-pack with more images or a larger --val-fraction")
    classes = index.classes
    accelerator = make_accelerator(config)
    world_size = accelerator.num_processes
    micro_steps = pipeline.train_steps_per_epoch(index.count("train"), world_size, config.data.batch_size)
    if config.max_steps_per_epoch:
        micro_steps = min(micro_steps, config.max_steps_per_epoch)
    check_run_dir(run_dir, classes)
    set_seed(config.seed, device_specific=True)

    model, spec = build_model(config.model, num_classes=len(classes))
    if config.model.sync_batchnorm and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    head_names = head_parameter_names(model, spec)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PREEMPT_FLAG).unlink(missing_ok=True)
        save_config(config, run_dir / "config.yaml")
        write_json_atomic(run_dir / "run.json", {"classes": classes, "shards": str(Path(shards_dir).resolve()),
                                                 "model": config.model.name, "image_size": config.data.image_size})
    accelerator.wait_for_everyone()

    resume = ckpt.latest_state(run_dir)
    summary_path = run_dir / "summary.json"
    summary = _load_summary(summary_path) if resume else {}
    summary.update({
        "status": "running", "world_size": world_size, "num_machines": num_machines(world_size),
        "mixed_precision": config.mixed_precision, "device": accelerator.device.type,
        "model": config.model.name, "classes": classes, "image_size": config.data.image_size,
    })
    summary.setdefault("phases", {})
    summary.setdefault("resumes", [])
    if resume is not None:
        state, _ = resume
        summary["resumes"].append({"phase": state.phase, "epoch": state.epoch, "step": state.micro_step,
                                   "optimizer_steps": state.optimizer_steps})

    run_log = RunLog(accelerator, run_dir, config)
    if accelerator.is_main_process:
        write_json_atomic(summary_path, summary)
    watch = PreemptionWatch(accelerator, run_dir)
    loss_weights = class_weights_tensor(config, index)
    criterion = nn.CrossEntropyLoss(weight=loss_weights.to(accelerator.device) if loss_weights is not None else None,
                                    label_smoothing=config.label_smoothing)
    total_steps_done = resume[0].total_optimizer_steps if resume else 0
    console = Console()
    scheduler_slot = SchedulerSlot()
    accelerator.register_for_checkpointing(scheduler_slot)

    try:
        for phase_name, phase in config.phases():
            if phase.epochs == 0:
                continue
            resume_here = resume if resume and resume[0].phase == phase_name else None
            if resume and ckpt.PHASE_ORDER.index(resume[0].phase) > ckpt.PHASE_ORDER.index(phase_name):
                continue  # this phase finished before the interruption
            if resume_here and resume_here[0].phase_done:
                continue
            if phase_name == "finetune" and not resume_here:
                best_head = ckpt.checkpoint_root(run_dir) / "head-best"
                if best_head.is_dir():
                    model.load_state_dict(ckpt.load_weights(best_head))
            phase_summary, total_steps_done = run_phase(
                accelerator, model, spec, head_names, index, config, phase_name, phase, criterion, run_dir,
                run_log, watch, console, micro_steps, resume_here, total_steps_done, scheduler_slot)
            summary["phases"][phase_name] = phase_summary
            if accelerator.is_main_process:
                write_json_atomic(summary_path, summary)
            resume = None
    except Preempted:
        summary["status"] = "preempted"
        if accelerator.is_main_process:
            write_json_atomic(summary_path, summary)
        run_log.close()
        raise

    final_phase = [name for name, phase in config.phases() if phase.epochs > 0][-1]
    # Each rank's trained weights, reduced to one number: DDP keeps them identical, and this shows it.
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    summary["rank_param_checksums"] = gather_object([checksum])
    model.load_state_dict(ckpt.load_weights(ckpt.checkpoint_root(run_dir) / f"{final_phase}-best"))
    if accelerator.is_main_process:
        export_final_model(model, config, classes, run_dir, source=f"{final_phase}-best")
        summary["status"] = "completed"
        write_json_atomic(summary_path, summary)
        console.print(f"[bold green]done[/]: run outputs in {run_dir} (model.safetensors, summary.json, metrics.jsonl)")
    run_log.close()
    accelerator.wait_for_everyone()
    return summary


def _load_summary(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def export_final_model(model: nn.Module, config: TrainConfig, classes: list[str], run_dir: Path, source: str) -> None:
    """RUN/model.safetensors + RUN/model.json: everything evaluate/predict/export need."""
    meta = {
        "architecture": config.model.name, "classes": classes, "num_classes": len(classes),
        "image_size": config.data.image_size, "eval_crop_ratio": config.data.eval_crop_ratio,
        "mean": list(config.data.mean), "std": list(config.data.std), "dropout": config.model.dropout,
        "pretrained": config.model.pretrained,
        "source_checkpoint": source, "format": "safetensors state_dict of torchvision model with new head",
    }
    ckpt.save_weights(model, run_dir / ".final-model", meta)
    os.replace(run_dir / ".final-model" / "model.safetensors", run_dir / "model.safetensors")
    os.replace(run_dir / ".final-model" / "meta.json", run_dir / "model.json")
    (run_dir / ".final-model").rmdir()


def run_phase(accelerator: Accelerator, model: nn.Module, spec, head_names: set[str], index: pipeline.ShardIndex,
              config: TrainConfig, phase_name: str, phase: PhaseConfig, criterion: nn.Module, run_dir: Path,
              run_log: RunLog, watch: PreemptionWatch, console: Console, micro_steps: int,
              resume: tuple[TrainerState, Path] | None, total_steps_done: int,
              scheduler_slot: "SchedulerSlot") -> tuple[dict, int]:
    """One phase: freeze per config, train its epochs with validation, keep best/last weights."""
    set_trainable(model, spec, phase.unfreeze)
    optimizer = build_optimizer(model, head_names, phase)
    accum = config.grad_accum_steps
    steps_per_epoch = math.ceil(micro_steps / accum)
    total = steps_per_epoch * phase.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, round(phase.warmup_epochs * steps_per_epoch), phase.min_lr_ratio))
    # The scheduler is stepped by us, once per optimizer step: accelerate's prepared scheduler
    # steps num_processes times per call, which assumes a schedule counted in single-GPU steps.
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    scheduler_slot.scheduler = scheduler
    if config.model.compile:
        ddp_model = torch.compile(ddp_model)

    state = TrainerState(phase=phase_name, total_optimizer_steps=total_steps_done)
    if resume is not None:
        state, path = resume
        accelerator.load_state(str(path))
        if accelerator.is_main_process:
            console.print(f"resuming {phase_name} at epoch {state.epoch + 1}, step {state.micro_step}/{micro_steps} from {path.name}")

    frozen_backbone = phase.unfreeze == "none"
    aux_weight = config.model.aux_loss_weight
    global_batch = config.data.batch_size * accelerator.num_processes
    pin = accelerator.device.type == "cuda"
    phase_summary = {"epochs": phase.epochs, "steps": 0, "val_accuracy": None, "val_per_class_accuracy": None,
                     "images_per_s": None, "epoch_time_s": []}
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not accelerator.is_main_process)
    phase_start = time.perf_counter()
    images_seen = 0
    with progress:
        while state.epoch < phase.epochs:
            task = progress.add_task(f"{phase_name} epoch {state.epoch + 1}/{phase.epochs}", total=micro_steps,
                                     completed=state.micro_step, loss=float("nan"), ips=0.0)
            loader = pipeline.train_loader(index, config.data, seed=config.seed, epoch=_epoch_seed(phase_name, state.epoch),
                                           rank=accelerator.process_index, world_size=accelerator.num_processes,
                                           skip_batches=state.micro_step, pin_memory=pin)
            ddp_model.train()
            if frozen_backbone or phase.unfreeze != "all":
                keep_frozen_batchnorm_in_eval(model)
            epoch_start = time.perf_counter()
            # The loss is summed on the device and read back only when logged: .item() every step would
            # synchronise the GPU with the host and stall the input pipeline.
            window_start, window_images, loss_sum, loss_count = epoch_start, 0, torch.zeros((), device=accelerator.device), 0
            for batch in loader:
                if state.micro_step >= micro_steps:  # max_steps_per_epoch cut the epoch short
                    break
                if watch.agreed():
                    save_position(accelerator, run_dir, state, config)
                    raise Preempted()
                images = batch["image"].to(accelerator.device, non_blocking=True)
                labels = batch["label"].to(accelerator.device, non_blocking=True)
                if config.model.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                is_update = (state.micro_step + 1) % accum == 0 or state.micro_step + 1 == micro_steps
                context = accelerator.no_sync(ddp_model) if not is_update else contextlib.nullcontext()
                with context:
                    with accelerator.autocast():
                        logits, aux_logits = model_logits(ddp_model(images))
                        loss = criterion(logits.float(), labels)
                        if aux_logits is not None:
                            loss = loss + aux_weight * criterion(aux_logits.float(), labels)
                    accelerator.backward(loss / accum)
                state.micro_step += 1
                loss_sum += loss.detach().float()
                loss_count += 1
                window_images += images.shape[0] * accelerator.num_processes
                if is_update:
                    if config.grad_clip_norm > 0:
                        accelerator.clip_grad_norm_(ddp_model.parameters(), config.grad_clip_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.optimizer_steps += 1
                    state.total_optimizer_steps += 1
                    if state.optimizer_steps % config.tracking.log_every_steps == 0:
                        elapsed = time.perf_counter() - window_start
                        mean_loss = loss_sum.item() / loss_count
                        run_log.log("train", {"phase": phase_name, "epoch": state.epoch + 1, "step": state.micro_step,
                                              "optimizer_step": state.optimizer_steps, "loss": mean_loss,
                                              "lr": optimizer.param_groups[-1]["lr"],
                                              "images_per_s": window_images / max(elapsed, 1e-9)},
                                    step=state.total_optimizer_steps)
                        progress.update(task, loss=mean_loss, ips=window_images / max(elapsed, 1e-9))
                        images_seen += window_images
                        window_start, window_images, loss_count = time.perf_counter(), 0, 0
                        loss_sum.zero_()
                    if config.checkpoint_every_steps and state.optimizer_steps % config.checkpoint_every_steps == 0 \
                            and state.micro_step < micro_steps:
                        save_position(accelerator, run_dir, state, config)
                progress.update(task, completed=state.micro_step)
            images_seen += window_images
            epoch_time = time.perf_counter() - epoch_start
            assert state.micro_step == micro_steps, f"rank {accelerator.process_index} ran {state.micro_step}/{micro_steps} steps"

            try:
                val = predict_split(accelerator, ddp_model, index, config.data, "val",
                                    channels_last=config.model.channels_last, watch=watch)
            except Preempted:
                save_position(accelerator, run_dir, state, config)  # the epoch's steps are done; validation reruns
                raise
            scores = accuracy_summary(val["labels"], val["probs"], index.classes)
            state.epoch += 1
            state.micro_step = 0
            improved = scores["macro_accuracy"] > state.best_score
            if improved:
                state.best_score, state.best_epoch = scores["macro_accuracy"], state.epoch
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(ddp_model)
                meta = {"phase": phase_name, "epoch": state.epoch, "val": scores, "classes": index.classes}
                ckpt.save_weights(unwrapped, ckpt.checkpoint_root(run_dir) / f"{phase_name}-last", meta)
                if improved:
                    ckpt.save_weights(unwrapped, ckpt.checkpoint_root(run_dir) / f"{phase_name}-best", meta)
            run_log.log("val", {"phase": phase_name, "epoch": state.epoch, "epoch_time_s": epoch_time,
                                **scores}, step=state.total_optimizer_steps)
            phase_summary["epoch_time_s"].append(round(epoch_time, 3))
            if accelerator.is_main_process:
                _print_epoch(console, phase_name, state.epoch, phase.epochs, scores, index.classes, improved)
            state.phase_done = state.epoch >= phase.epochs
            ckpt.save_training_state(accelerator, run_dir, state, keep=config.keep_checkpoints)
            progress.remove_task(task)

    best_meta = _read_meta(ckpt.checkpoint_root(run_dir) / f"{phase_name}-best")
    elapsed = time.perf_counter() - phase_start
    phase_summary.update({
        "steps": state.optimizer_steps, "micro_steps_per_epoch": micro_steps, "global_batch_size": global_batch * accum,
        "best_epoch": state.best_epoch, "val_accuracy": best_meta["val"]["accuracy"],
        "val_macro_accuracy": best_meta["val"]["macro_accuracy"],
        "val_per_class_accuracy": best_meta["val"]["per_class_accuracy"],
        "images_per_s": images_seen / elapsed if images_seen else None, "time_s": round(elapsed, 2),
    })
    if accelerator.is_main_process:
        _print_phase_table(console, phase_name, phase_summary, index.classes)
    accelerator.free_memory()
    return phase_summary, state.total_optimizer_steps


class SchedulerSlot:
    """The current phase's LR scheduler, registered once with accelerate's checkpointing
    (accelerate keeps registered objects for the accelerator's lifetime; each phase has its own scheduler)."""

    scheduler = None

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _epoch_seed(phase_name: str, epoch: int) -> int:
    """Distinct data order per phase and epoch."""
    return ckpt.PHASE_ORDER.index(phase_name) * 100_000 + epoch


def save_position(accelerator: Accelerator, run_dir: Path, state: TrainerState, config: TrainConfig) -> None:
    ckpt.save_training_state(accelerator, run_dir, state, keep=config.keep_checkpoints)


def _read_meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def _print_epoch(console: Console, phase: str, epoch: int, epochs: int, scores: dict, classes: list[str], improved: bool) -> None:
    per_class = "  ".join(f"{c}={v:.3f}" for c, v in scores["per_class_accuracy"].items() if v is not None)
    mark = " [green]best[/]" if improved else ""
    console.print(f"{phase} epoch {epoch}/{epochs}: val acc {scores['accuracy']:.3f} "
                  f"macro {scores['macro_accuracy']:.3f} | {per_class}{mark}")


def _print_phase_table(console: Console, phase: str, summary: dict, classes: list[str]) -> None:
    table = Table(title=f"phase {phase}: best epoch {summary['best_epoch']}")
    table.add_column("class")
    table.add_column("val accuracy", justify="right")
    for c in classes:
        v = summary["val_per_class_accuracy"].get(c)
        table.add_row(c, "n/a" if v is None else f"{v:.3f}")
    table.add_row("[bold]overall[/]", f"{summary['val_accuracy']:.3f}")
    table.add_row("images/s", f"{summary['images_per_s']:.1f}" if summary["images_per_s"] else "n/a")
    console.print(table)
