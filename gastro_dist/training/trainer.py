"""The trainer: both transfer-learning phases under Accelerate (DDP, mixed precision, CPU fallback).

`train(config, shards_dir, run_dir)` runs phase `head` (new head on a frozen backbone) and then
phase `finetune` (unfrozen layers at a lower backbone LR, starting from the head phase's best
weights), validating after every epoch and keeping `best` (by macro accuracy: the mean of the
per-class accuracies, the study's figure averaged) and `last` weights per phase.

Running the same command again with the same RUN resumes from the newest complete training
state, inside the epoch if it was interrupted there. A preemption request (SIGUSR1,
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
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from gastro_dist import RunFailure, UserError
from gastro_dist.config import DataConfig, PhaseConfig, TrainConfig, save_config
from gastro_dist.data import pipeline
from gastro_dist.data.shards import ShardFile, ShardIndex, ShardScan, checked_index, scan_shard
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
def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config (or --use_deepspeed) says so in the environment."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(config: TrainConfig) -> Accelerator:
    # With no CUDA, cpu=True makes several launched processes use gloo (MULTI_CPU) instead of
    # each one silently running alone.
    cpu = not torch.cuda.is_available()
    mixed_precision = config.mixed_precision
    if cpu and mixed_precision == "fp16":
        raise UserError("mixed_precision=fp16 needs a GPU; use mixed_precision=bf16 or no on CPU")
    log_with = "wandb" if config.tracking.tracker == "wandb" else None
    handlers = []
    if deepspeed_requested():
        check_deepspeed_setup(config)
        if cpu:
            # accelerate picks no process-group backend for DeepSpeed without CUDA and then counts one
            # process per rank; naming gloo gives the real world size. CPU mode (cpu=True or
            # ACCELERATE_USE_CPU, which launchers set on GPU-less nodes) would silently disable DeepSpeed.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
            os.environ.pop("ACCELERATE_USE_CPU", None)
            cpu = False
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, kwargs_handlers=handlers)
    if accelerator.state.deepspeed_plugin is not None:
        # There is no prepared DataLoader for the plugin to read batch sizes from (ours stay outside
        # prepare()), so the values DeepSpeed checks (train_batch_size = micro * accumulation * world)
        # come from the run's config.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.data.batch_size
        ds_config["gradient_accumulation_steps"] = 1
        ds_config.pop("train_batch_size", None)  # DeepSpeed derives it: micro * accumulation * world
        ds_config["gradient_clipping"] = config.grad_clip_norm
    return accelerator


def check_deepspeed_setup(config: TrainConfig) -> None:
    import importlib.util

    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        # accelerate's DeepSpeed plugin reads transformers' version even when nothing else uses it.
        raise UserError(f"DeepSpeed was requested but {' and '.join(missing)} is not installed; "
                        "run pip install 'gastro-dist[deepspeed]'")
    if config.grad_accum_steps != 1:
        raise UserError("grad_accum_steps > 1 is not supported under DeepSpeed yet; "
                        "use grad_accum_steps=1 and a larger data.batch_size or more processes")


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


def check_run_dir(run_dir: Path, config: TrainConfig, index: ShardIndex) -> None:
    """A run folder that already holds a run (finished or not) continues only with the same model,
    classes, input size and shard set: anything else would mix two runs' weights and files. Checked
    before anything in the folder is written."""
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        return
    try:
        previous = json.loads(run_json.read_text(encoding="utf-8"))
        previous = previous if isinstance(previous, dict) else {}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{run_json} is damaged; use a new --out directory") from None
    now = {"model": config.model.name, "classes": index.classes, "image_size": config.data.image_size,
           "shards_index_sha256": index.index_sha256}
    changed = [key for key, value in now.items() if key in previous and previous[key] != value]
    if changed:
        details = "; ".join(f"{key} was {previous[key]!r}, now {now[key]!r}" for key in changed
                            if key != "shards_index_sha256")
        if "shards_index_sha256" in changed:
            details = "; ".join(filter(None, [details, f"the shards' index.json differs from the one it was trained "
                                                       f"on ({previous.get('shards')})"]))
        raise UserError(f"{run_dir} holds a run with other settings ({details}); use a new --out directory, "
                        "or the same model and shards to resume it")


def checked_shard_index(accelerator: Accelerator, listed: ShardIndex, splits: list[str],
                        max_member_mb: int) -> tuple[ShardIndex, list[str]]:
    """`shards.checked_index`, each process reading a share of the shards; every process gets the
    same result, so that all plan the same epoch."""
    rank, world = accelerator.process_index, accelerator.num_processes

    def scan_all(shards: list[ShardFile]) -> list[ShardScan]:
        mine = [scan_shard(shard, max_member_mb << 20) for shard in shards[rank::world]]
        per_rank = gather_object([mine]) if world > 1 else [mine]
        return [per_rank[i % world][i // world] for i in range(len(shards))]

    return checked_index(listed, splits, max_member_mb << 20, scan_all)


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
    """Set by SIGUSR1 or by the flag file; the handler only sets a flag (saving inside a signal
    handler can deadlock collective calls). Ranks agree through an all-reduce.

    SIGTERM is deliberately not a preemption request: torchrun and DeepSpeed's launcher send it to
    the surviving ranks when one rank fails, and that must end the job, not checkpoint and requeue it.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.flag_file = run_dir / PREEMPT_FLAG
        self.requested = False
        # The per-step agreement runs on a CPU (gloo) group: an all-reduce on the GPU read back with
        # .item() would make the host wait for every step to finish and stall the next one's launch.
        self.group = None
        if accelerator.num_processes > 1:
            self.group = torch.distributed.new_group(backend="gloo")
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not in the main thread (e.g. called from a test's thread)
            pass

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        local = self.requested or self.flag_file.exists()
        if self.group is None:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, group=self.group)
        return bool(flag.item() > 0)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_split(accelerator: Accelerator, model: nn.Module, index: pipeline.ShardIndex, data: DataConfig,
                  split: str, channels_last: bool = False, with_meta: bool = False,
                  watch: PreemptionWatch | None = None) -> dict:
    """Probabilities for every readable sample of `split`, gathered from all ranks, de-duplicated by key.

    Ranks may hold one batch more or less than others; every rank runs the same number of loop
    iterations so that the preemption all-reduce stays in step. Returns keys, labels, probs,
    meta (JSON text per sample when `with_meta`), skipped (reasons, all ranks) and missing
    (samples the index lists that could not be read).
    """
    model.eval()
    loader = pipeline.eval_loader(index, data, split, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, pin_memory=accelerator.device.type == "cuda",
                                  with_meta=with_meta)
    num_loops = max(pipeline.eval_batches_per_rank(index.count(split), accelerator.num_processes,
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


# ---------------------------------------------------------------- the run
class Diverged(RunFailure):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def train(config: TrainConfig, shards_dir: str | Path, run_dir: str | Path) -> dict:
    """Run (or resume) both phases; returns summary.json's content."""
    return Trainer(config, shards_dir, run_dir).run()


class Trainer:
    """One run: setup, then each phase (epochs of train steps + validation), then the final model."""

    def __init__(self, config: TrainConfig, shards_dir: str | Path, run_dir: str | Path):
        self.config = config
        self.shards_dir = Path(shards_dir)
        self.run_dir = Path(run_dir)
        # Everything a user can get wrong is checked before the accelerator touches a device.
        listed = pipeline.load_shard_index(shards_dir)
        for split in ("train", "val"):
            if split not in listed.splits or listed.count(split) == 0:
                raise UserError(f"the {split} split in {shards_dir} is empty; re-pack with more images or a larger --val-fraction")
        self.classes = listed.classes
        check_run_dir(self.run_dir, config, listed)
        resolve_weights_path_or_fail(config)
        self.loss_weights = class_weights_tensor(config, listed)

        self.accelerator = make_accelerator(config)
        self.world_size = self.accelerator.num_processes
        self.console = Console(soft_wrap=True)  # whole lines: log files and grep see each message once
        self.index, self.shard_problems = self._check_shard_files(listed)
        self.micro_steps = pipeline.train_steps_per_epoch(self.index.count("train"), self.world_size, config.data.batch_size)
        if config.max_steps_per_epoch:
            self.micro_steps = min(self.micro_steps, config.max_steps_per_epoch)
        set_seed(config.seed, device_specific=True)
        self.model, self.spec = build_model(config.model, num_classes=len(self.classes))
        if config.model.sync_batchnorm and self.world_size > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if config.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head_names = head_parameter_names(self.model, self.spec)
        self.criterion = nn.CrossEntropyLoss(
            weight=self.loss_weights.to(self.accelerator.device) if self.loss_weights is not None else None,
            label_smoothing=config.label_smoothing)
        self.augment = pipeline.DeviceAugmentation(config.data)
        self.skipped_local: list[str] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _warn(self, message: str) -> None:
        if self.is_main:
            self.console.print(f"[yellow]warning:[/] {message}")

    def _check_shard_files(self, listed: ShardIndex) -> tuple[ShardIndex, list[str]]:
        """Every train and val shard read once (each process a share): sample counts and sha256 against
        index.json. The epoch is planned on what the files hold; what differs is reported, or stops
        the run under data.strict."""
        index, problems = checked_shard_index(self.accelerator, listed, ["train", "val"], self.config.data.max_member_mb)
        if problems and self.config.data.strict:
            raise pipeline.CorruptSample(f"{problems[0]} (data.strict=true; re-pack, or set data.strict=false to "
                                         "train on the readable samples)")
        for problem in problems[:10]:
            self._warn(problem)
        for split in ("train", "val"):
            if index.count(split) == 0:
                raise pipeline.CorruptSample(f"no readable sample in the {split} split of {self.shards_dir} "
                                             f"({problems[0] if problems else 'empty shards'}); re-pack the data")
        return index, problems

    # ------------------------------------------------------------ whole run
    def run(self) -> dict:
        resume = ckpt.latest_usable_state(self.run_dir, warn=self._warn)
        if self._already_complete(resume):
            if self.is_main:
                self.console.print(f"{self.run_dir} is already fully trained; nothing to do")
            return json.loads((self.run_dir / "summary.json").read_text())
        self._prepare_run_dir()
        self.summary = self._start_summary(resume)
        self.run_log = RunLog(self.accelerator, self.run_dir, self.config)
        self.watch = PreemptionWatch(self.accelerator, self.run_dir)
        self.total_steps = resume[0].total_optimizer_steps if resume else 0
        try:
            for phase_name, phase in self.config.phases():
                if phase.epochs == 0 or _phase_finished(resume, phase_name):
                    continue
                resume_here = resume if resume and resume[0].phase == phase_name else None
                if phase_name == "finetune" and resume_here is None:
                    best_head = ckpt.checkpoint_root(self.run_dir) / "head-best"
                    if best_head.is_dir():
                        self.model.load_state_dict(ckpt.load_weights(best_head))
                self.summary["phases"][phase_name] = self.run_phase(phase_name, phase, resume_here)
                self._write_summary()
        except Preempted:
            self.summary["status"] = "preempted"
            self._write_summary()
            self.run_log.close()
            raise
        except Diverged:
            self.summary["status"] = "diverged"
            self._write_summary()
            self.run_log.close()
            raise
        self._finish()
        return self.summary

    def _already_complete(self, resume: tuple[TrainerState, Path] | None) -> bool:
        """The newest state is the final phase, finished, and the final model was written."""
        final_phase = [name for name, phase in self.config.phases() if phase.epochs > 0][-1]
        summary_path = self.run_dir / "summary.json"
        return (resume is not None and resume[0].phase == final_phase and resume[0].phase_done
                and (self.run_dir / "model.safetensors").is_file() and summary_path.is_file()
                and json.loads(summary_path.read_text()).get("status") == "completed")

    def _prepare_run_dir(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / PREEMPT_FLAG).unlink(missing_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            write_json_atomic(self.run_dir / "run.json", {
                "classes": self.classes, "shards": str(self.shards_dir.resolve()),
                "shards_index_sha256": self.index.index_sha256,
                "model": self.config.model.name, "image_size": self.config.data.image_size})
        self.accelerator.wait_for_everyone()

    def _start_summary(self, resume: tuple[TrainerState, Path] | None) -> dict:
        summary_path = self.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
        summary.update({
            "status": "running", "world_size": self.world_size, "num_machines": num_machines(self.world_size),
            "mixed_precision": self.config.mixed_precision, "device": self.accelerator.device.type,
            "model": self.config.model.name, "classes": self.classes, "image_size": self.config.data.image_size,
        })
        summary.setdefault("phases", {})
        summary.setdefault("resumes", [])
        summary.setdefault("skipped_samples", {"count": 0, "reasons": []})
        summary["shard_problems"] = self.shard_problems
        if resume is not None:
            state, path = resume
            summary["resumes"].append({"phase": state.phase, "epoch": state.epoch, "step": state.micro_step,
                                       "optimizer_steps": state.optimizer_steps, "checkpoint": path.name})
        self.summary = summary
        self._write_summary()
        return summary

    def _write_summary(self) -> None:
        if self.is_main:
            write_json_atomic(self.run_dir / "summary.json", self.summary)

    def _finish(self) -> None:
        final_phase = [name for name, phase in self.config.phases() if phase.epochs > 0][-1]
        # Each rank's trained weights reduced to one number: DDP keeps them identical, and this shows it.
        checksum = float(sum(p.detach().double().sum() for p in self.model.parameters()))
        self.summary["rank_param_checksums"] = gather_object([checksum])
        self.model.load_state_dict(ckpt.load_weights(ckpt.checkpoint_root(self.run_dir) / f"{final_phase}-best"))
        if self.is_main:
            export_final_model(self.model, self.config, self.classes, self.run_dir, source=f"{final_phase}-best")
            self.summary["status"] = "completed"
            self._write_summary()
            self.console.print(f"[bold green]done[/]: run outputs in {self.run_dir} "
                               "(model.safetensors, summary.json, metrics.jsonl)")
        self.run_log.close()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------ one phase
    def run_phase(self, phase_name: str, phase: PhaseConfig, resume: tuple[TrainerState, Path] | None) -> dict:
        """Freeze per config, train the phase's epochs with validation, keep best/last weights."""
        config, accelerator = self.config, self.accelerator
        set_trainable(self.model, self.spec, phase.unfreeze)
        optimizer = build_optimizer(self.model, self.head_names, phase)
        steps_per_epoch = math.ceil(self.micro_steps / config.grad_accum_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            steps_per_epoch * phase.epochs, round(phase.warmup_epochs * steps_per_epoch), phase.min_lr_ratio))
        # The scheduler is stepped by us once per optimizer step and saved in trainer_state.json:
        # accelerate's prepared scheduler steps num_processes times per call (a schedule counted in
        # single-GPU steps), and its custom-object checkpoints are unpickled without weights_only.
        ddp_model, optimizer = accelerator.prepare(self.model, optimizer)
        if config.model.compile:
            ddp_model = torch.compile(ddp_model)

        state = TrainerState(phase=phase_name, total_optimizer_steps=self.total_steps)
        if resume is not None:
            state = self._load_state(resume, scheduler)

        phase_summary = {"epochs": phase.epochs, "epoch_time_s": []}
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not self.is_main)
        phase_start = time.perf_counter()
        images_seen = 0
        with progress:
            while state.epoch < phase.epochs:
                task = progress.add_task(f"{phase_name} epoch {state.epoch + 1}/{phase.epochs}", total=self.micro_steps,
                                         completed=state.micro_step, loss=float("nan"), ips=0.0)
                epoch_start = time.perf_counter()
                images_seen += self.train_epoch(state, phase, ddp_model, optimizer, scheduler, progress, task)
                epoch_time = time.perf_counter() - epoch_start
                self.end_epoch(state, phase, ddp_model, scheduler, epoch_time)
                phase_summary["epoch_time_s"].append(round(epoch_time, 3))
                progress.remove_task(task)

        best_meta = json.loads((ckpt.checkpoint_root(self.run_dir) / f"{phase_name}-best" / "meta.json").read_text())
        elapsed = time.perf_counter() - phase_start
        phase_summary.update({
            "steps": state.optimizer_steps, "micro_steps_per_epoch": self.micro_steps,
            "global_batch_size": config.data.batch_size * self.world_size * config.grad_accum_steps,
            "best_epoch": state.best_epoch, "val_accuracy": best_meta["val"]["accuracy"],
            "val_macro_accuracy": best_meta["val"]["macro_accuracy"],
            "val_per_class_accuracy": best_meta["val"]["per_class_accuracy"],
            "images_per_s": images_seen / elapsed if images_seen else None, "time_s": round(elapsed, 2),
            "nonfinite_steps_skipped": state.nonfinite_steps,
        })
        if self.is_main:
            _print_phase_table(self.console, phase_name, phase_summary, self.classes)
        self.total_steps = state.total_optimizer_steps
        accelerator.free_memory()
        return phase_summary

    def _load_state(self, resume: tuple[TrainerState, Path], scheduler) -> TrainerState:
        state, path = resume
        self.accelerator.load_state(str(path))
        scheduler.load_state_dict(state.scheduler)
        if self.is_main:
            self.console.print(f"resuming {state.phase} at epoch {state.epoch + 1}, step {state.micro_step}/"
                               f"{self.micro_steps} from {path.name}")
        return state

    def _resume_positions(self, state: TrainerState) -> list[int] | None:
        """This rank's per-worker stream positions inside the current epoch, if resuming inside it."""
        if state.micro_step == 0 or not state.data_positions:
            return None
        if len(state.data_positions) != self.world_size:
            raise UserError(f"the checkpoint was written by {len(state.data_positions)} processes and this run has "
                            f"{self.world_size}; resume an interrupted epoch with the same number of processes")
        return list(state.data_positions[self.accelerator.process_index])

    # ------------------------------------------------------------ one epoch
    def train_epoch(self, state: TrainerState, phase: PhaseConfig, ddp_model, optimizer, scheduler,
                    progress: Progress, task) -> int:
        """Train from the state's position to the end of the epoch; returns images processed (all ranks)."""
        config, accelerator = self.config, self.accelerator
        positions = self._resume_positions(state) or [0] * max(config.data.num_workers, 1)
        loader = pipeline.train_loader(self.index, config.data, seed=config.seed,
                                       epoch=_epoch_seed(state.phase, state.epoch), rank=accelerator.process_index,
                                       world_size=self.world_size, resume_batches=state.micro_step,
                                       resume_positions=positions,
                                       pin_memory=accelerator.device.type == "cuda")
        ddp_model.train()
        if phase.unfreeze != "all":
            keep_frozen_batchnorm_in_eval(self.model)
        accum = config.grad_accum_steps
        # The loss is summed on the device and read back only when logged: .item() every step would
        # make the host wait for the GPU and stall the input pipeline.
        loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
        window_start, window_images, images_seen = time.perf_counter(), 0, 0
        for batch in loader:
            if state.micro_step >= self.micro_steps:  # max_steps_per_epoch cut the epoch short
                break
            if self.watch.agreed():
                self.save_state(state, scheduler, positions)
                raise Preempted()
            images, labels, undecodable = self.augment.training_batch(batch, accelerator.device, config.model.channels_last)
            self.skipped_local.extend(undecodable)
            is_update = (state.micro_step + 1) % accum == 0 or state.micro_step + 1 == self.micro_steps
            with accelerator.no_sync(ddp_model) if not is_update else contextlib.nullcontext():
                with accelerator.autocast():
                    logits, aux_logits = model_logits(ddp_model(images))
                    loss = self.criterion(logits.float(), labels)
                    if aux_logits is not None:
                        loss = loss + config.model.aux_loss_weight * self.criterion(aux_logits.float(), labels)
                accelerator.backward(loss / accum)
            state.micro_step += 1
            positions[int(batch["worker"][0])] = int(batch["position"].max()) + 1
            self.skipped_local.extend(batch["skipped"])
            loss_sum += loss.detach().float()
            loss_count += 1
            window_images += images.shape[0] * self.world_size
            if is_update:
                self.optimizer_update(state, ddp_model, optimizer, scheduler, positions)
                if state.optimizer_steps % config.tracking.log_every_steps == 0:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = loss_sum.item() / loss_count
                    images_per_s = window_images / max(elapsed, 1e-9)
                    self.run_log.log("train", {"phase": state.phase, "epoch": state.epoch + 1, "step": state.micro_step,
                                               "optimizer_step": state.optimizer_steps, "loss": mean_loss,
                                               "lr": optimizer.param_groups[-1]["lr"], "images_per_s": images_per_s},
                                     step=state.total_optimizer_steps)
                    progress.update(task, loss=mean_loss, ips=images_per_s)
                    images_seen += window_images
                    window_start, window_images, loss_count = time.perf_counter(), 0, 0
                    loss_sum.zero_()
                if config.checkpoint_every_steps and state.optimizer_steps % config.checkpoint_every_steps == 0 \
                        and state.micro_step < self.micro_steps:
                    self.save_state(state, scheduler, positions)
            progress.update(task, completed=state.micro_step)
        if state.micro_step != self.micro_steps:
            raise RuntimeError(f"rank {accelerator.process_index} ran {state.micro_step} of {self.micro_steps} steps")
        return images_seen + window_images

    def optimizer_update(self, state: TrainerState, ddp_model, optimizer, scheduler, positions: list[int]) -> None:
        """Clip, step, and skip the update when the loss or gradients are not finite.

        The gradient norm is computed after DDP's all-reduce, so every rank sees the same value and
        takes the same decision without another collective. Under fp16 the grad scaler makes that
        decision itself (and lowers its scale), so its skipped steps are only counted.
        """
        config, accelerator = self.config, self.accelerator
        max_norm = config.grad_clip_norm if config.grad_clip_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(ddp_model.parameters(), max_norm)
        finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite or config.mixed_precision == "fp16":
            optimizer.step()
            finite = finite and not accelerator.optimizer_step_was_skipped
        optimizer.zero_grad(set_to_none=True)
        if finite:
            scheduler.step()
            state.optimizer_steps += 1
            state.total_optimizer_steps += 1
            self.consecutive_nonfinite = 0
            return
        state.nonfinite_steps += 1
        self.consecutive_nonfinite = getattr(self, "consecutive_nonfinite", 0) + 1
        self.run_log.log("nonfinite", {"phase": state.phase, "epoch": state.epoch + 1, "step": state.micro_step,
                                       "consecutive": self.consecutive_nonfinite}, step=state.total_optimizer_steps)
        if self.consecutive_nonfinite >= config.max_nonfinite_steps:
            if accelerator.state.deepspeed_plugin is None:
                # The skipped steps changed no weight: this checkpoint holds the weights from before the divergence.
                path = self.save_state(state, scheduler, positions)
            else:
                # DeepSpeed's engine steps inside backward(), before we see the norm: the newest saved state is the safe one.
                latest = ckpt.latest_state(self.run_dir)
                path = latest[1] if latest else "no checkpoint yet"
            raise Diverged(f"loss or gradients were not finite for {self.consecutive_nonfinite} consecutive steps "
                           f"({state.phase} epoch {state.epoch + 1}, step {state.micro_step}); weights from before the "
                           f"divergence are in {path}; lower the learning rate or check the data, then re-run to resume")

    def end_epoch(self, state: TrainerState, phase: PhaseConfig, ddp_model, scheduler, epoch_time_s: float) -> None:
        """Validate, keep best/last weights, log, report skipped samples, save the training state."""
        try:
            val = predict_split(self.accelerator, ddp_model, self.index, self.config.data, "val",
                                channels_last=self.config.model.channels_last, watch=self.watch)
        except Preempted:
            self.save_state(state, scheduler, [])  # the epoch's steps are done; only validation reruns
            raise
        if self.is_main:
            self.skipped_local.extend(val["skipped"])
        if len(val["labels"]) == 0:
            raise pipeline.CorruptSample(f"no sample of the val split could be read ({val['skipped'][0] if val['skipped'] else 'no reason recorded'}); "
                                         f"run `gastro-dist verify {self.shards_dir}` and re-pack the data")
        scores = accuracy_summary(val["labels"], val["probs"], self.classes)
        state.epoch += 1
        state.micro_step = 0
        improved = scores["macro_accuracy"] > state.best_score
        if improved:
            state.best_score, state.best_epoch = scores["macro_accuracy"], state.epoch
        if self.is_main:
            unwrapped = self.accelerator.unwrap_model(ddp_model)
            meta = {"phase": state.phase, "epoch": state.epoch, "val": scores, "classes": self.classes}
            ckpt.save_weights(unwrapped, ckpt.checkpoint_root(self.run_dir) / f"{state.phase}-last", meta)
            if improved:
                ckpt.save_weights(unwrapped, ckpt.checkpoint_root(self.run_dir) / f"{state.phase}-best", meta)
            _print_epoch(self.console, state.phase, state.epoch, phase.epochs, scores, improved)
        self.run_log.log("val", {"phase": state.phase, "epoch": state.epoch, "epoch_time_s": epoch_time_s, **scores},
                         step=state.total_optimizer_steps)
        self._report_skipped(state)
        state.phase_done = state.epoch >= phase.epochs
        self.save_state(state, scheduler, [])

    def _report_skipped(self, state: TrainerState) -> None:
        """Gather every rank's skipped-sample reasons; log them and keep a tally in summary.json."""
        everything = gather_object(self.skipped_local) if self.world_size > 1 else list(self.skipped_local)
        self.skipped_local = []
        if not everything:
            return
        tally = self.summary["skipped_samples"]
        tally["count"] += len(everything)
        tally["reasons"] = (tally["reasons"] + everything)[:500]
        self.run_log.log("skipped", {"phase": state.phase, "epoch": state.epoch, "count": len(everything),
                                     "reasons": everything[:100]}, step=state.total_optimizer_steps)
        self._write_summary()
        if self.is_main:
            self.console.print(f"[yellow]skipped {len(everything)} unreadable samples[/] (see summary.json)")

    def save_state(self, state: TrainerState, scheduler, positions: list[int]) -> Path:
        """All ranks: a complete training-state checkpoint at the current position."""
        state.scheduler = scheduler.state_dict()
        state.data_positions = gather_object([positions]) if self.world_size > 1 else [positions]
        return ckpt.save_training_state(self.accelerator, self.run_dir, state, keep=self.config.keep_checkpoints)


def _phase_finished(resume: tuple[TrainerState, Path] | None, phase_name: str) -> bool:
    if resume is None:
        return False
    state = resume[0]
    order = ckpt.PHASE_ORDER
    return order.index(state.phase) > order.index(phase_name) or (state.phase == phase_name and state.phase_done)


def resolve_weights_path_or_fail(config: TrainConfig) -> None:
    """Unknown model names and missing pretrained files are reported before any device work."""
    from gastro_dist.models.backbones import available_models, resolve_weights_path

    if config.model.name not in available_models():
        raise UserError(f"unknown model {config.model.name!r}; use a torchvision classification model such as "
                        "resnet50, vgg19, inception_v3, resnet18, efficientnet_b0, convnext_tiny")
    resolve_weights_path(config.model.name, config.model.pretrained)


def _epoch_seed(phase_name: str, epoch: int) -> int:
    """Distinct data order per phase and epoch."""
    return ckpt.PHASE_ORDER.index(phase_name) * 100_000 + epoch


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


def _print_epoch(console: Console, phase: str, epoch: int, epochs: int, scores: dict, improved: bool) -> None:
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
