"""The trainer: both transfer-learning phases of one run under Accelerate.

`Trainer.run` trains phase `head` (new head on a frozen backbone), then phase `finetune` from the
head's best weights, validating every epoch and keeping `best` (by macro accuracy: the mean of the
per-class accuracies) and `last` weights per phase; re-run, it resumes inside the epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from rich.console import Console
from rich.progress import Progress
from torch import nn

from gastro_dist import Preempted, RunFailure, UserError
from gastro_dist.config import DataConfig, PhaseConfig, TrainConfig, changed_training_keys, save_config, to_dict
from gastro_dist.data.augmentation import DeviceAugmentation, step_seed
from gastro_dist.data.decode import CorruptSample
from gastro_dist.data.epoch_plan import train_steps_per_epoch
from gastro_dist.data.loaders import TrainLoader, check_stored_resolution
from gastro_dist.data.locations import location_record, shard_location
from gastro_dist.data.shard_index import ShardIndex, load_shard_index, select_fold
from gastro_dist.files import read_yaml_file
from gastro_dist.models.backbones import (PREPROCESSING_FIELDS, Preprocessing, build_model, check_model_config,
                                         model_logits, resolve_preprocessing, sync_batchnorm)
from gastro_dist.models.checkpointing import enable_grad_checkpointing
from gastro_dist.models.freezing import keep_frozen_batchnorm_in_eval, set_trainable
from gastro_dist.progress import LineProgress
from gastro_dist.run_dir import ModelMeta, RunDir
from gastro_dist.tracking import RunLog, log_final_model
from gastro_dist.training import checkpoint as ckpt
from gastro_dist.training import ema
from gastro_dist.training.calibration import calibration_fit
from gastro_dist.training.checkpoint import TrainerState
from gastro_dist.training.console import epoch_progress, print_epoch, print_phase_table
from gastro_dist.training.distributed import (PreemptionWatch, checked_shard_index, forgets_accelerator_settings,
                                              make_accelerator, num_machines, system_facts, use_cpu_cores_fairly)
from gastro_dist.training.optim import build_optimizer, warmup_cosine
from gastro_dist.training.predict import accuracy_summary, predict_split


def class_weights_tensor(config: TrainConfig, index: ShardIndex) -> torch.Tensor | None:
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


def check_run_dir(run_dir: RunDir, config: TrainConfig, index: ShardIndex) -> None:
    """A run folder that already holds a run (finished or not) continues only with the same model,
    classes, input size, shard set and validation fold: anything else would mix two runs' weights and
    files. Checked before anything in the folder is written."""
    previous = run_dir.read_summary()
    now = {"model": config.model.name, "classes": index.classes, "image_size": config.data.image_size,
           "fold": config.data.fold, "shards_index_sha256": index.index_sha256}
    changed = [key for key, value in now.items() if key in previous and previous[key] != value]
    if changed:
        details = "; ".join(f"{key} was {previous[key]!r}, now {now[key]!r}" for key in changed
                            if key != "shards_index_sha256")
        if "shards_index_sha256" in changed:
            details = "; ".join(filter(None, [details, f"the shards' index.json differs from the one it was trained "
                                                       f"on ({previous.get('shards')})"]))
        raise UserError(f"{run_dir.path} holds a run with other settings ({details}); use a new --out directory, "
                        "or the same model and shards to resume it")
    saved = _saved_config(run_dir)
    changes = changed_training_keys(saved, config) if saved is not None else []
    if changes:
        state = "a finished run" if previous.get("status") == "completed" else "a run"
        raise UserError(f"{run_dir.path} holds {state} trained with other settings ({'; '.join(changes)}); train into "
                        f"a new --out directory, or give the settings it was trained with ({run_dir.config_yaml})")


def _saved_config(run_dir: RunDir) -> dict | None:
    """The run folder's config.yaml as a dict; None when there is none (a new run) or it cannot be read."""
    try:
        saved = read_yaml_file(run_dir.config_yaml)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


class Diverged(RunFailure):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class Stopped(Exception):
    """`on_epoch_end` asked the run to stop (a hyperparameter search pruned it); summary.json says "pruned"."""


# (phase name, epoch over the whole run counting from 1, the epoch's val macro accuracy) -> stop now?
EpochHook = Callable[[str, int, float], bool]


@forgets_accelerator_settings
def train(config: TrainConfig, shards_dir: str | Path, run_dir: str | Path, on_epoch_end: EpochHook | None = None) -> dict:
    """Run (or resume) both phases; returns summary.json's content. `on_epoch_end`, called on the main process
    after each epoch is validated and saved, may stop the run (`Stopped`): every process stops at that epoch."""
    return Trainer(config, shards_dir, run_dir, on_epoch_end).run()


@dataclasses.dataclass
class CheckedInputs:
    """What a run starts from, every user mistake in it found before any device work (`check_inputs`)."""
    preprocessing: Preprocessing
    config: TrainConfig  # with the model's preprocessing resolved into config.data
    index: ShardIndex  # index.json as listed (with data.fold applied); shard bytes not read yet
    loss_weights: torch.Tensor | None
    warnings: list[str]


def check_inputs(config: TrainConfig, shards_dir: str | Path, run_dir: RunDir) -> CheckedInputs:
    """Config, model and weights, index.json, splits, class weights, stored resolution and the run folder,
    checked without reading a shard or touching a device: a mistake is a UserError (one line, exit 2)."""
    check_model_config(config.model)
    preprocessing = resolve_preprocessing(config.model.name, config.data, _set_by_config(config.data))
    config = dataclasses.replace(config, data=preprocessing.data_config(config.data))
    listed = select_fold(load_shard_index(shards_dir), config.data.fold)  # data.fold: train/val from folds
    for split in ("train", "val"):
        if split not in listed.splits or listed.count(split) == 0:
            raise UserError(f"the {split} split in {shard_location(shards_dir)} is empty; re-pack with more images or "
                            "a larger --val-fraction")
    check_run_dir(run_dir, config, listed)
    warning = check_stored_resolution(config.data, listed)
    return CheckedInputs(preprocessing, config, listed, class_weights_tensor(config, listed),
                         [warning] if warning else [])


def check_training(config: TrainConfig, shards_dir: str | Path, run_dir: str | Path, num_processes: int) -> str:
    """`gastro-dist train --check`: everything `check_inputs` checks, and that the training split gives each of
    `num_processes` processes at least one batch. Returns a one-line description of the run it would start."""
    checked = check_inputs(config, shards_dir, RunDir(run_dir))
    config, index = checked.config, checked.index
    steps = train_steps_per_epoch(index.count("train"), num_processes, config.data.batch_size)
    for warning in checked.warnings:
        print(f"warning: {warning}")
    state = "resumes" if RunDir(run_dir).config_yaml.is_file() else "starts"
    return (f"check passed: {config.model.name} at {config.data.image_size} px on {index.count('train')} train and "
            f"{index.count('val')} val images of {len(index.classes)} classes, {num_processes} process"
            f"{'es' if num_processes > 1 else ''} x batch {config.data.batch_size} = {steps} steps per epoch; "
            f"{state} {run_dir}")


class Trainer:
    """One run: setup, then each phase (epochs of train steps + validation), then the final model."""

    def __init__(self, config: TrainConfig, shards_dir: str | Path, run_dir: str | Path,
                 on_epoch_end: EpochHook | None = None):
        self.on_epoch_end = on_epoch_end
        self.shards_dir = shard_location(shards_dir)  # a folder or a URL; str() holds no credentials
        self.run_dir = RunDir(run_dir)
        # Everything a user can get wrong is checked before the accelerator touches a device.
        checked = check_inputs(config, shards_dir, self.run_dir)
        self.preprocessing, self.config, listed = checked.preprocessing, checked.config, checked.index
        config, loss_weights = self.config, checked.loss_weights
        self.classes = listed.classes

        self.accelerator = make_accelerator(config, self.run_dir)
        self.world_size = self.accelerator.num_processes
        use_cpu_cores_fairly(self.accelerator)
        self.console = Console(soft_wrap=True)  # whole lines: log files and grep see each message once
        if self.is_main:
            device = self.accelerator.device
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            machines = num_machines(self.world_size)
            self.console.print(f"gastro-dist train: {device.type} ({name}), {self.world_size} process"
                               f"{'es' if self.world_size > 1 else ''} on {machines} machine{'s' if machines > 1 else ''}"
                               f", precision {config.mixed_precision}"
                               + ("" if self.world_size == 1 else f", {self.accelerator.distributed_type.value}") + " | "
                               f"{config.model.name} at {config.data.image_size} px -> {self.run_dir.path}", highlight=False)
        for warning in checked.warnings:
            self._warn(warning)
        self.index, self.shard_problems = self._check_shard_files(listed)
        self.micro_steps_per_epoch = train_steps_per_epoch(self.index.count("train"), self.world_size,
                                                           config.data.batch_size)
        if config.max_steps_per_epoch:
            self.micro_steps_per_epoch = min(self.micro_steps_per_epoch, config.max_steps_per_epoch)
        set_seed(config.seed, device_specific=True)
        self.model, self.spec = build_model(config.model, num_classes=len(self.classes),
                                            image_size=config.data.image_size)
        if config.model.sync_batchnorm and self.world_size > 1:
            self.model = sync_batchnorm(self.model)
        if config.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.model.grad_checkpointing:
            enable_grad_checkpointing(self.model, self.spec)
        # With mixup/CutMix the targets are probabilities: PyTorch's cross-entropy smooths those too, so the
        # label smoothing applies to the mixed targets.
        self.criterion = nn.CrossEntropyLoss(
            weight=loss_weights.to(self.accelerator.device) if loss_weights is not None else None,
            label_smoothing=config.label_smoothing)
        self.augment = DeviceAugmentation(config.data, num_classes=len(self.classes))
        self.ema: nn.Module | None = None  # the phase's weight EMA (ema.decay), made by `run_phase`
        self.watch = PreemptionWatch(self.accelerator, self.run_dir.preempt_flag)
        self.skipped_local: list[str] = []  # this rank's skipped-sample reasons since the last report
        self.summary: dict = {}  # summary.json's content, from `run`
        self.run_log: RunLog | None = None  # created by `run`, once the run folder is written
        self.total_optimizer_steps = 0  # over all phases: the trackers' step axis
        self.consecutive_nonfinite_steps = 0
        self.train_batches: TrainLoader | None = None  # made at the first epoch, its workers kept to the end

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
        index, problems = checked_shard_index(self.accelerator, listed, ["train", "val"], self.config.data.max_member_mb,
                                              run_dir=self.run_dir.path)
        if problems and self.config.data.strict:
            raise CorruptSample(f"{problems[0]} (data.strict=true; re-pack, or set data.strict=false to "
                                         "train on the readable samples)")
        for problem in problems[:10]:
            self._warn(problem)
        for split in ("train", "val"):
            if index.count(split) == 0:
                raise CorruptSample(f"no readable sample in the {split} split of {self.shards_dir} "
                                             f"({problems[0] if problems else 'empty shards'}); re-pack the data")
        return index, problems

    # ------------------------------------------------------------ whole run
    def run(self) -> dict:
        resume = ckpt.latest_usable_state(self.run_dir, warn=self._warn)
        if self._already_complete(resume):
            if self.is_main:
                self.console.print(f"{self.run_dir} is already fully trained; nothing to do")
            return self.run_dir.read_summary()
        self._prepare_run_dir()
        self._start_summary(resume)
        self.run_log = RunLog(self.accelerator, self.run_dir, self.config.tracking, to_dict(self.config))
        self.run_log.log_facts("system", self.summary["system"])
        self.total_optimizer_steps = resume[0].total_optimizer_steps if resume else 0
        try:
            for phase_name, phase in self.config.phases():
                if phase.epochs == 0 or _phase_finished(resume, phase_name):
                    continue
                resume_here = resume if resume and resume[0].phase == phase_name else None
                if phase_name == "finetune" and resume_here is None:
                    best_head = self.run_dir.phase_weights("head", "best")
                    if best_head.is_dir():
                        self.model.load_state_dict(ckpt.load_weights(best_head))
                self.summary["phases"][phase_name] = self.run_phase(phase_name, phase, resume_here)
                self._write_summary()
        except Preempted:
            self.summary["status"] = "preempted"
            self._write_summary()
            self.run_log.close()
            raise
        except Stopped:
            self.summary["status"] = "pruned"
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
        return (resume is not None and resume[0].phase == final_phase and resume[0].phase_done
                and self.run_dir.model_weights.is_file() and self.run_dir.read_summary().get("status") == "completed")

    def _prepare_run_dir(self) -> None:
        if self.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self.run_dir.preempt_flag.unlink(missing_ok=True)
            save_config(self.config, self.run_dir.config_yaml)
        self.accelerator.wait_for_everyone()

    def _start_summary(self, resume: tuple[TrainerState, Path] | None) -> None:
        summary = self.run_dir.read_summary() if resume else {}
        summary.update({
            "status": "running", "world_size": self.world_size, "num_machines": num_machines(self.world_size),
            "mixed_precision": self.config.mixed_precision, "device": self.accelerator.device.type,
            # what `check_run_dir` compares when this folder is run again
            "model": self.config.model.name, "classes": self.classes, "image_size": self.config.data.image_size,
            "fold": self.config.data.fold, "shards": location_record(self.shards_dir),
            "shards_index_sha256": self.index.index_sha256,
            "system": system_facts(self.accelerator, self.index.index_sha256),
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

    def _write_summary(self) -> None:
        if self.is_main:
            self.run_dir.write_summary(self.summary)

    def _finish(self) -> None:
        final_phase = [name for name, phase in self.config.phases() if phase.epochs > 0][-1]
        # Each rank's trained weights reduced to one number: DDP keeps them identical, and this shows it.
        checksum = float(sum(p.detach().double().sum() for p in self.model.parameters()))
        self.summary["rank_param_checksums"] = gather_object([checksum])
        # float32 again: DeepSpeed's bf16 engine converts the module's own parameters; the final model and
        # the calibration pass below must not depend on the engine.
        best = self.run_dir.phase_weights(final_phase, "best")
        self.model.float().load_state_dict(ckpt.load_weights(best))
        # Temperature scaling, fitted on the final model's validation logits (each rank predicts its share).
        val = predict_split(self.accelerator, self.model, self.index, self.config.data, "val",
                            channels_last=self.config.model.channels_last)
        self.summary["calibration"] = calibration_fit(val["logits"], val["labels"])
        if self.is_main:
            ckpt.save_final_model(self.model, self.run_dir, ModelMeta(
                architecture=self.config.model.name, classes=self.classes, image_size=self.config.data.image_size,
                eval_crop_ratio=self.config.data.eval_crop_ratio, mean=list(self.config.data.mean),
                std=list(self.config.data.std), dropout=self.config.model.dropout,
                pretrained=self.config.model.pretrained, source_checkpoint=f"{final_phase}-best",
                interpolation=self.preprocessing.interpolation, temperature=self.summary["calibration"]["temperature"],
                weights=ckpt.load_weights_meta(best).get("weights", "live")))
            self.summary["status"] = "completed"
            self._write_summary()
            log_final_model(self.run_log, self.run_dir)
            self.console.print(f"[bold green]done[/]: run outputs in {self.run_dir} "
                               "(model.safetensors, summary.json, metrics.jsonl)")
        self.run_log.close()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------ one phase
    def run_phase(self, phase_name: str, phase: PhaseConfig, resume: tuple[TrainerState, Path] | None) -> dict:
        """Freeze per config, train the phase's epochs with validation, keep best/last weights."""
        config, accelerator = self.config, self.accelerator
        set_trainable(self.model, self.spec, phase.unfreeze)
        optimizer = build_optimizer(self.model, self.spec, phase)
        steps_per_epoch = math.ceil(self.micro_steps_per_epoch / config.grad_accum_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            steps_per_epoch * phase.epochs, round(phase.warmup_epochs * steps_per_epoch), phase.min_lr_ratio))
        # The scheduler is stepped by us once per optimizer step and saved in trainer_state.json:
        # accelerate's prepared scheduler steps num_processes times per call (a schedule counted in
        # single-GPU steps), and its custom-object checkpoints are unpickled without weights_only.
        self.ema = ema.make_ema(self.model, config.ema)  # from the phase's starting weights, before DDP wraps them
        ddp_model, optimizer = accelerator.prepare(self.model, optimizer)
        if config.model.compile:
            ddp_model = torch.compile(ddp_model)

        state = TrainerState(phase=phase_name, total_optimizer_steps=self.total_optimizer_steps)
        if resume is not None:
            state = self._load_state(resume, scheduler)

        phase_summary = {"epochs": phase.epochs, "epoch_time_s": []}
        progress = epoch_progress(self.console, enabled=self.is_main)
        phase_start = time.perf_counter()
        images_seen = 0
        with progress:
            while state.epoch < phase.epochs:
                task = progress.add_task(f"{phase_name} epoch {state.epoch + 1}/{phase.epochs}", total=self.micro_steps_per_epoch,
                                         completed=state.micro_step, loss=float("nan"), ips=0.0)
                epoch_start = time.perf_counter()
                epoch_images, train_loss = self.train_epoch(state, phase, ddp_model, optimizer, scheduler, progress, task)
                images_seen += epoch_images
                epoch_time = time.perf_counter() - epoch_start
                self.end_epoch(state, phase, ddp_model, optimizer, scheduler, epoch_time, epoch_images, train_loss)
                phase_summary["epoch_time_s"].append(round(epoch_time, 3))
                progress.remove_task(task)

        best_meta = ckpt.load_weights_meta(self.run_dir.phase_weights(phase_name, "best"))
        elapsed = time.perf_counter() - phase_start
        phase_summary.update({
            "steps": state.optimizer_steps, "micro_steps_per_epoch": self.micro_steps_per_epoch,
            "global_batch_size": config.data.batch_size * self.world_size * config.grad_accum_steps,
            "best_epoch": state.best_epoch, "best_weights": best_meta.get("weights", "live"),
            "val_accuracy": best_meta["val"]["accuracy"],
            "val_macro_accuracy": best_meta["val"]["macro_accuracy"],
            "val_per_class_accuracy": best_meta["val"]["per_class_accuracy"],
            "images_per_s": images_seen / elapsed if images_seen else None, "time_s": round(elapsed, 2),
            "nonfinite_steps_skipped": state.nonfinite_steps,
        })
        if self.is_main:
            print_phase_table(self.console, phase_name, phase_summary, self.classes)
        self.total_optimizer_steps = state.total_optimizer_steps
        accelerator.free_memory()
        return phase_summary

    def _load_state(self, resume: tuple[TrainerState, Path], scheduler) -> TrainerState:
        state, path = resume
        self.accelerator.load_state(str(path))
        scheduler.load_state_dict(state.scheduler)
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_FILE))
        if self.is_main:
            self.console.print(f"resuming {state.phase} at epoch {state.epoch + 1}, step {state.micro_step}/"
                               f"{self.micro_steps_per_epoch} from {path.name}")
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
                    progress: Progress | LineProgress, task: int) -> tuple[int, float]:
        """Train from the state's position to the end of the epoch; returns the images processed (all ranks) and
        the epoch's mean training loss."""
        config, accelerator = self.config, self.accelerator
        positions = self._resume_positions(state) or [0] * max(config.data.num_workers, 1)
        if self.train_batches is None:  # one set of loader workers for every epoch and phase of the run
            self.train_batches = TrainLoader(self.index, config.data, seed=config.seed,
                                             rank=accelerator.process_index, world_size=self.world_size,
                                             pin_memory=accelerator.device.type == "cuda")
        loader = self.train_batches.epoch(_epoch_seed(state.phase, state.epoch), resume_batches=state.micro_step,
                                          resume_positions=positions)
        ddp_model.train()
        if phase.unfreeze != "all":
            keep_frozen_batchnorm_in_eval(self.model)
        accum = config.grad_accum_steps
        # The loss is summed on the device and read back only when logged: .item() every step would
        # make the host wait for the GPU and stall the input pipeline.
        loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
        epoch_loss_sum, epoch_steps = torch.zeros((), device=accelerator.device), 0  # for the epoch's line
        window_start, window_images, images_seen = time.perf_counter(), 0, 0
        shown: dict[str, float] = {}  # the last logged loss and images/s, for the progress bar
        for batch in loader:
            if state.micro_step >= self.micro_steps_per_epoch:  # max_steps_per_epoch cut the epoch short
                break
            if self.watch.agreed():
                self.save_state(state, scheduler, positions)
                raise Preempted()
            seed = step_seed(config.seed, _epoch_seed(state.phase, state.epoch), state.micro_step,
                             accelerator.process_index)
            images, targets, undecodable = self.augment.training_batch(batch, accelerator.device,
                                                                       config.model.channels_last, seed)
            self.skipped_local.extend(undecodable)
            is_update = (state.micro_step + 1) % accum == 0 or state.micro_step + 1 == self.micro_steps_per_epoch
            with accelerator.no_sync(ddp_model) if not is_update else contextlib.nullcontext():
                with accelerator.autocast():
                    logits, aux_logits = model_logits(ddp_model(images))
                    loss = self.criterion(logits.float(), targets)
                    if aux_logits is not None:
                        loss = loss + config.model.aux_loss_weight * self.criterion(aux_logits.float(), targets)
                accelerator.backward(loss / accum)
            state.micro_step += 1
            positions[int(batch["worker"][0])] = int(batch["position"].max()) + 1
            self.skipped_local.extend(batch["skipped"])
            loss_sum += loss.detach().float()
            loss_count += 1
            epoch_loss_sum += loss.detach().float()
            epoch_steps += 1
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
                    shown = {"loss": mean_loss, "ips": images_per_s}
                    images_seen += window_images
                    window_start, window_images, loss_count = time.perf_counter(), 0, 0
                    loss_sum.zero_()
                if config.checkpoint_every_steps and state.optimizer_steps % config.checkpoint_every_steps == 0 \
                        and state.micro_step < self.micro_steps_per_epoch:
                    self.save_state(state, scheduler, positions)
            progress.update(task, completed=state.micro_step, **shown)
        if state.micro_step != self.micro_steps_per_epoch:
            raise RuntimeError(f"rank {accelerator.process_index} ran {state.micro_step} of {self.micro_steps_per_epoch} steps")
        # The mean training loss of the steps every rank ran this epoch (since a resume, if it resumed): one
        # collective per epoch.
        mean_loss = accelerator.reduce(epoch_loss_sum / max(epoch_steps, 1), reduction="mean")
        return images_seen + window_images, float(mean_loss)

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
            self.consecutive_nonfinite_steps = 0
            if self.ema is not None:
                self.ema.update(self.model, step=state.optimizer_steps)
            return
        state.nonfinite_steps += 1
        self.consecutive_nonfinite_steps += 1
        self.run_log.log("nonfinite", {"phase": state.phase, "epoch": state.epoch + 1, "step": state.micro_step,
                                       "consecutive": self.consecutive_nonfinite_steps}, step=state.total_optimizer_steps)
        if self.consecutive_nonfinite_steps >= config.max_nonfinite_steps:
            if accelerator.state.deepspeed_plugin is None:
                # The skipped steps changed no weight: this checkpoint holds the weights from before the divergence.
                path = self.save_state(state, scheduler, positions)
            else:
                # DeepSpeed's engine steps inside backward(), before we see the norm: the newest saved state is the safe one.
                latest = ckpt.latest_state(self.run_dir)
                path = latest[1] if latest else "no checkpoint yet"
            raise Diverged(f"loss or gradients were not finite for {self.consecutive_nonfinite_steps} consecutive steps "
                           f"({state.phase} epoch {state.epoch + 1}, step {state.micro_step}); weights from before the "
                           f"divergence are in {path}; lower the learning rate or check the data, then re-run to resume")

    def end_epoch(self, state: TrainerState, phase: PhaseConfig, ddp_model, optimizer, scheduler, epoch_time_s: float,
                  epoch_images: int, train_loss: float) -> None:
        """Validate (the live weights, and the EMA's with ema.decay), keep best/last weights, log, report skipped
        samples, save the training state. `<phase>-best` holds whichever weights, live or EMA, scored best."""
        try:
            val = predict_split(self.accelerator, ddp_model, self.index, self.config.data, "val",
                                channels_last=self.config.model.channels_last, watch=self.watch)
            if self.ema is not None:
                ema.synchronise(self.accelerator, self.ema)
                ema_val = predict_split(self.accelerator, self.ema.module, self.index, self.config.data, "val",
                                        channels_last=self.config.model.channels_last, watch=self.watch)
        except Preempted:
            self.save_state(state, scheduler, [])  # the epoch's steps are done; only validation reruns
            raise
        if self.is_main:
            self.skipped_local.extend(val["skipped"])
        if len(val["labels"]) == 0:
            raise CorruptSample(f"no sample of the val split could be read ({val['skipped'][0] if val['skipped'] else 'no reason recorded'}); "
                                         f"run `gastro-dist verify {self.shards_dir}` and re-pack the data")
        scores = accuracy_summary(val["labels"], val["probs"], self.classes)
        ema_scores = None if self.ema is None else accuracy_summary(ema_val["labels"], ema_val["probs"], self.classes)
        # Ties go to the live weights.
        ema_won = ema_scores is not None and ema_scores["macro_accuracy"] > scores["macro_accuracy"]
        winner, winner_scores = ("ema", ema_scores) if ema_won else ("live", scores)
        state.epoch += 1
        state.micro_step = 0
        improved = winner_scores["macro_accuracy"] > state.best_score
        if improved:
            state.best_score, state.best_epoch = winner_scores["macro_accuracy"], state.epoch
        if self.is_main:
            unwrapped = self.accelerator.unwrap_model(ddp_model)
            meta = {"phase": state.phase, "epoch": state.epoch, "val": scores, "classes": self.classes}
            ckpt.save_weights(unwrapped, self.run_dir.phase_weights(state.phase, "last"), meta)
            if improved:
                ckpt.save_weights(self.ema.module if ema_won else unwrapped,
                                  self.run_dir.phase_weights(state.phase, "best"),
                                  {**meta, "val": winner_scores, "weights": winner})
        learning_rates = {group.get("name", f"group{i}"): group["lr"] for i, group in enumerate(optimizer.param_groups)}
        if self.is_main:
            print_epoch(self.console, state.phase, state.epoch, phase.epochs, scores, improved, train_loss,
                        learning_rates, epoch_time_s, ema_scores=ema_scores, winner=winner)
        if ema_scores is not None:
            self.run_log.log("val_ema", {"phase": state.phase, "epoch": state.epoch, **ema_scores},
                             step=state.total_optimizer_steps, epoch=self._epochs_before(state.phase) + state.epoch)
        self.run_log.log("val", {"phase": state.phase, "epoch": state.epoch, "epoch_time_s": epoch_time_s,
                                 "images_per_s": epoch_images / max(epoch_time_s, 1e-9), "lr": learning_rates,
                                 "train_loss": train_loss,
                                 "best_macro_accuracy": state.best_score, **scores},
                         step=state.total_optimizer_steps, epoch=self._epochs_before(state.phase) + state.epoch)
        self._report_skipped(state)
        state.phase_done = state.epoch >= phase.epochs
        self.save_state(state, scheduler, [])
        if self.on_epoch_end is not None:
            stop = [self.on_epoch_end(state.phase, self._epochs_before(state.phase) + state.epoch,
                                      winner_scores["macro_accuracy"]) if self.is_main else False]
            if self.world_size > 1:
                broadcast_object_list(stop)  # the main process's decision: every process stops at this epoch
            if stop[0]:
                raise Stopped(f"stopped after {state.phase} epoch {state.epoch}")

    def _epochs_before(self, phase_name: str) -> int:
        """Epochs of the phases before `phase_name`: with them, the epoch axis runs over the whole run."""
        names = [name for name, _ in self.config.phases()]
        return sum(phase.epochs for name, phase in self.config.phases()[:names.index(phase_name)])

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
        if self.ema is not None:
            ema.synchronise(self.accelerator, self.ema)
        return ckpt.save_training_state(self.accelerator, self.run_dir, state, keep=self.config.keep_checkpoints,
                                        ema_model=self.ema.module if self.ema is not None else None)


def _phase_finished(resume: tuple[TrainerState, Path] | None, phase_name: str) -> bool:
    if resume is None:
        return False
    state = resume[0]
    order = ckpt.PHASE_ORDER
    return order.index(state.phase) > order.index(phase_name) or (state.phase == phase_name and state.phase_done)


def _epoch_seed(phase_name: str, epoch: int) -> int:
    """Distinct data order per phase and epoch."""
    return ckpt.PHASE_ORDER.index(phase_name) * 100_000 + epoch


def _set_by_config(data: DataConfig) -> set[str]:
    """The preprocessing fields a config sets, taken as those that differ from the defaults: the others
    come from the model's pretrained configuration (timm's; torchvision's are the defaults themselves).
    A value set to exactly the default cannot be told apart, and yields to the model's own."""
    defaults = DataConfig()
    return {key for key in PREPROCESSING_FIELDS if getattr(data, key) != getattr(defaults, key)}
