"""Processes and machines: the Accelerator (DDP, DeepSpeed, CPU fallback) built from the run's
config, the preemption watch all ranks agree on, work shared between ranks (the shard scan), and
the end of the process group."""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, gather_object

from gastro_dist import UserError
from gastro_dist.config import TrainConfig
from gastro_dist.data.locations import ShardURL
from gastro_dist.data.shard_index import ShardFile, ShardIndex
from gastro_dist.data.shard_reader import ShardScan, checked_index, scan_shard
from gastro_dist.data.verified_shards import VerifiedShards, fingerprint_of
from gastro_dist.run_dir import RunDir
from gastro_dist.tracking import accelerator_tracking_kwargs, check_trackers_installed


def forgets_accelerator_settings(function):
    """For a function that builds its own Accelerator (train, evaluate_run, ...): once it returns or
    raises, the next Accelerator of the process (compare's and cv's next run, a notebook's next call)
    takes its own precision, trackers and plugins instead of failing on, or silently keeping, this
    one's. accelerate has no public way to forget an Accelerator's settings, so its private reset is
    used (accelerate's own tests do); the process group is kept."""
    @functools.wraps(function)
    def forgetting(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            AcceleratorState._reset_state()
    return forgetting


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config (or --use_deepspeed) says so in the environment."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(config: TrainConfig, run_dir: RunDir) -> Accelerator:
    # With no CUDA, cpu=True makes several launched processes use gloo (MULTI_CPU) instead of
    # each one silently running alone.
    cpu = not torch.cuda.is_available()
    mixed_precision = config.mixed_precision
    if cpu and mixed_precision == "fp16":
        raise UserError("mixed_precision=fp16 needs a GPU; use mixed_precision=bf16 or no on CPU")
    check_launcher_precision(mixed_precision)
    check_trackers_installed(config.tracking)
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
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers,
                              **accelerator_tracking_kwargs(config.tracking, run_dir))
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


def use_cpu_cores_fairly(accelerator: Accelerator) -> int:
    """On the CPU, each process's torch threads = the cores it may run on (its affinity: SLURM's and
    cgroups' limits) / the processes on this machine, unless OMP_NUM_THREADS says otherwise. Returns
    the thread count. More threads than cores only makes them wait on each other."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(max(1, cores // max(local_processes, 1)))
    return torch.get_num_threads()


def check_launcher_precision(mixed_precision: str) -> None:
    """The run config decides the precision (it is saved with the run, so a resume keeps it).
    `accelerate launch --mixed_precision` (or its config file) may repeat it, not contradict it; its
    default, "no", cannot be told from "not given" and is ignored."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", mixed_precision):
        raise UserError(f"accelerate launch asks for mixed precision {launched} but the run config says "
                        f"mixed_precision={mixed_precision}; the run config decides: add mixed_precision={launched} "
                        "to the command (or the YAML), or drop the launcher's --mixed_precision")


def check_deepspeed_setup(config: TrainConfig) -> None:
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


# SIGUSR1 received and not yet served by a checkpoint. Kept by the process, not by one run: in a process that
# trains several runs (a tune worker's trials, cv's folds) a request that arrives between two runs is served by
# the next one at its first step, instead of being lost with the finished run's watch.
_preemption_pending = False


def _on_preemption_signal(signum, frame) -> None:
    global _preemption_pending
    _preemption_pending = True


def listen_for_preemption() -> None:
    """From now on SIGUSR1 asks this process's current or next run to checkpoint and stop (Python's default
    for it would end the process); the handler only sets a flag (saving inside a signal handler can deadlock
    collective calls)."""
    try:
        signal.signal(signal.SIGUSR1, _on_preemption_signal)
    except ValueError:  # not in the main thread (e.g. called from a test's thread)
        pass


class PreemptionWatch:
    """Set by SIGUSR1 (`listen_for_preemption`) or by the flag file. Ranks agree through an all-reduce; the
    request counts as served once they have agreed (the caller then saves and raises `Preempted`).

    SIGTERM is deliberately not a preemption request: torchrun and DeepSpeed's launcher send it to
    the surviving ranks when one rank fails, and that must end the job, not checkpoint and requeue it.
    """

    def __init__(self, accelerator: Accelerator, flag_file: Path):
        self.accelerator = accelerator
        self.flag_file = flag_file
        # The per-step agreement runs on a CPU (gloo) group: an all-reduce on the GPU read back with
        # .item() would make the host wait for every step to finish and stall the next one's launch.
        self.group = None
        if accelerator.num_processes > 1:
            self.group = torch.distributed.new_group(backend="gloo")
        listen_for_preemption()

    def agreed(self) -> bool:
        global _preemption_pending
        local = _preemption_pending or self.flag_file.exists()
        if self.group is not None:
            flag = torch.tensor([1 if local else 0], dtype=torch.int32)
            torch.distributed.all_reduce(flag, group=self.group)
            local = bool(flag.item() > 0)
        if local:
            _preemption_pending = False
        return local


def checked_shard_index(accelerator: Accelerator, listed: ShardIndex, splits: list[str], max_member_mb: int,
                        run_dir: Path | None = None) -> tuple[ShardIndex, list[str]]:
    """`shards.checked_index`, each process reading a share of the shards; every process gets the
    same result, so that all plan the same epoch. A shard verified before and unchanged since
    (`verified_shards`: the record next to index.json, or in `run_dir`) is not read again; the main
    process says what was read and, for shards at a URL, how much was downloaded."""
    rank, world = accelerator.process_index, accelerator.num_processes
    started, scans = time.monotonic(), []
    verified = VerifiedShards.load(listed, max_member_mb << 20, run_dir)

    def scan_or_recall(shard: ShardFile) -> tuple[ShardScan, dict | None, bool]:
        fingerprint = fingerprint_of(shard.path)  # before the read: a file changed during it fails its sha256
        known = verified.recall(shard, fingerprint)
        return (known, fingerprint, True) if known else (scan_shard(shard, max_member_mb << 20), fingerprint, False)

    def scan_all(shards: list[ShardFile]) -> list[ShardScan]:
        mine = [scan_or_recall(shard) for shard in shards[rank::world]]
        per_rank = gather_object([mine]) if world > 1 else [mine]
        in_order = [per_rank[i % world][i // world] for i in range(len(shards))]
        scans.extend(in_order)  # every split's, for the record and the report below
        return [scan for scan, _, _ in in_order]

    checked = checked_index(listed, splits, max_member_mb << 20, scan_all)
    if accelerator.is_main_process and scans:
        read = [scan for scan, _, recalled in scans if not recalled]
        for scan, fingerprint, recalled in scans:
            if not recalled:
                verified.remember(scan, fingerprint)
        if read:
            verified.save()
        downloaded = (f", {sum(s.num_bytes for s in read) / 1e6:,.1f} MB from {listed.root}"
                      if isinstance(listed.root, ShardURL) else "")
        print(f"shards checked against index.json: {len(scans) - len(read)} of {len(scans)} unchanged since verified, "
              f"{len(read)} read{downloaded} in {time.monotonic() - started:,.1f} s", flush=True)
    return checked


def system_facts(accelerator: Accelerator, shards_index_sha256: str) -> dict:
    """What a run ran on, for its record: versions, devices of every process, the project's commit
    and the shard set's identity. All processes call this (the device names are gathered)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    device = accelerator.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    devices = gather_object([device_name]) if accelerator.num_processes > 1 else [device_name]
    return {
        "versions": {name: installed(name) for name in ("gastro-dist", "torch", "torchvision", "accelerate",
                                                       "webdataset", "timm", "deepspeed")}
        | {"python": platform.python_version(), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "devices": devices, "world_size": accelerator.num_processes,
        "num_machines": num_machines(accelerator.num_processes),
        "git_commit": _project_commit(), "shards_index_sha256": shards_index_sha256,
    }


def _project_commit() -> str | None:
    """The commit of the gastro-dist checkout this runs from, if it is one (not an installed wheel)."""
    import subprocess

    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def end_process_group() -> None:
    """A clean exit for each process of `accelerate launch`: torch warns about a process group left alive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
