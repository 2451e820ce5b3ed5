"""Benchmarks: `gastro-dist bench loader`, `bench train`, `bench infer` (evaluate's and predict's forward pass,
PyTorch or ONNX Runtime), `bench video` (predict-video, decoding to smoothed probability) and `bench statistics` (the coverage and size simulation of `evaluation.simulation`).

`bench loader` times the real training input pipeline, `loaders.TrainLoader` (shard read, decode,
augmentation, collation into the batch tensor the trainer gets), and with `--source` the same
augmentation (`augmentation.train_transform`) through a plain torchvision ImageFolder + DataLoader over
the original images, in the same run, so that the two are compared under the same load.
`bench train` times optimizer steps on synthetic in-memory batches (compute only) and, with
`--shards`, the same step fed by `TrainLoader` (end to end); on CUDA it adds the model FLOPs
utilisation against a matmul rate measured in the same run, and the peak memory.

Every figure comes with the machine it was taken on (CPU, cores, load average, versions), since
the build machines are shared. Counts and sizes are checked before anything runs (`check_count`,
`check_batch`: a batch whose input alone exceeds the memory it would live in is refused). Torch is imported inside the handlers so `gastro-dist --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from gastro_dist import UserError

NUM_CLASSES = 3  # the study's classes: the new head is the one the trainer would build
MATMUL_SIZE = 8192  # square matmuls that run a GPU at its dense peak


# ---------------------------------------------------------------- machine and output
def machine_description() -> dict[str, Any]:
    import PIL
    import torch
    import torchvision

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu": device, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "pillow": PIL.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def _print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, _format(value))
    Console().print(table)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


# ---------------------------------------------------------------- options
def check_count(option: str, value: int, minimum: int) -> None:
    """A usage error naming `option` unless `value` >= `minimum`."""
    if value < minimum:
        raise UserError(f"{option} must be {minimum} or more, not {value}")


def check_batch(batch_size: int, image_size: int, memory_bytes: int, memory_of: str) -> None:
    """`--batch-size` and `--image-size` as every bench command takes them: image sizes as the config allows,
    and no batch whose float32 input tensor alone exceeds `memory_bytes` (`memory_of`: the device's, or the
    RAM): it could only end in an allocator's traceback, or the kernel killing the process."""
    from gastro_dist.config import MAX_IMAGE_SIZE

    check_count("--batch-size", batch_size, 1)
    if not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be in [32, {MAX_IMAGE_SIZE}], not {image_size}")
    needed = batch_size * 3 * image_size**2 * 4
    if needed > memory_bytes:
        raise UserError(f"--batch-size {batch_size} at {image_size} px needs {needed / 2**30:,.1f} GiB for the input "
                        f"batch alone, more than the {memory_bytes / 2**30:,.1f} GiB of {memory_of}; use a smaller one")


def batch_memory(device=None) -> tuple[int, str]:
    """The memory a batch lives in, in bytes, and its name: a CUDA device's, else (None too) the RAM."""
    import torch

    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


# ---------------------------------------------------------------- input pipeline
@dataclass
class LoaderRun:
    """One timed pass over a loader: wall time after the first (warm-up) batch, CPU time throughout."""
    batches: int
    images: int
    timed_images: int
    wall_s: float
    worker_cpu_s: float
    main_cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.timed_images / self.wall_s

    def summary(self, num_workers: int) -> dict[str, Any]:
        return {
            "batches": self.batches, "images": self.images, "images_per_s": self.images_per_s,
            "images_per_s_per_worker": self.images_per_s / max(num_workers, 1),
            # Worker processes are counted once reaped, so this is all of their time, start-up included.
            "worker_cpu_ms_per_image": 1000 * self.worker_cpu_s / self.images if num_workers else None,
            "main_cpu_ms_per_image": 1000 * self.main_cpu_s / self.images,
            # Per core of the processes that decode and augment (the main process when there are no workers).
            "images_per_cpu_s": self.images / (self.worker_cpu_s if num_workers else self.main_cpu_s),
        }


def time_batches(per_image_batches: Iterable) -> LoaderRun:
    """Consume every batch (a tensor with one row per image); the clock starts at the first batch."""
    times_before, main_before = os.times(), time.process_time()
    batches = images = timed_images = 0
    start = None
    for images_tensor in per_image_batches:
        batches += 1
        images += images_tensor.shape[0]
        if start is None:
            start = time.perf_counter()
        else:
            timed_images += images_tensor.shape[0]
    wall_s = time.perf_counter() - start if start is not None else 0.0
    times_after = os.times()
    if timed_images == 0:
        raise UserError("the loader gave fewer than 2 batches: nothing left to time after the warm-up batch; "
                        "use more data or a smaller --batch-size")
    worker_cpu_s = (times_after.children_user + times_after.children_system
                    - times_before.children_user - times_before.children_system)
    return LoaderRun(batches, images, timed_images, wall_s, worker_cpu_s, time.process_time() - main_before)


def shard_batches(shard_dir: str | Path, data, min_batches: int) -> Iterator:
    """The label tensor of each `TrainLoader` batch (one per image, decoded or not: `data.decode_on`),
    whole epochs until at least `min_batches`: every image a worker reads is consumed, so its CPU time
    is counted for an image."""
    from gastro_dist.data.epoch_plan import train_steps_per_epoch
    from gastro_dist.data.loaders import TrainLoader
    from gastro_dist.data.shard_index import load_shard_index

    index = load_shard_index(shard_dir)
    steps_per_epoch = train_steps_per_epoch(index.count("train"), 1, data.batch_size)
    loader = TrainLoader(index, data, seed=0, rank=0, world_size=1)  # its workers serve every epoch, as in training
    for epoch in range(math.ceil(min_batches / steps_per_epoch)):
        for batch in loader.epoch(epoch):
            yield batch["label"]


def image_folder_batches(source: Path, data, num_batches: int) -> Iterator:
    """The same augmentation through a plain ImageFolder (PIL loader, full decode) and DataLoader."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    from gastro_dist.data.augmentation import train_transform

    dataset = ImageFolder(str(source), transform=train_transform(data))
    sampler = RandomSampler(dataset, num_samples=num_batches * data.batch_size)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers)
    for (images, _augment_params), _labels in loader:
        yield images


@contextlib.contextmanager
def _one_thread_like_a_worker(active: bool) -> Iterator[None]:
    """With no workers the main process decodes: give it one thread, as DataLoader gives each worker,
    so that the figure is the cost on one core (torch's intra-op threads spin on tiny tensors)."""
    import torch

    threads = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_loader(shards: str | Path, *, source: Path | None, num_workers: int, num_batches: int, batch_size: int,
                 image_size: int, decode_on: str = "workers") -> dict[str, Any]:
    from gastro_dist.config import DataConfig
    from gastro_dist.data.locations import location_record
    from gastro_dist.data.shard_index import load_shard_index

    check_count("--batches", num_batches, 1)
    check_count("--workers", num_workers, 0)
    check_batch(batch_size, image_size, *batch_memory())  # the workers build the batches
    where = location_record(load_shard_index(shards).root)  # mistakes in either folder are reported before anything runs
    if source is not None and not source.is_dir():
        raise UserError(f"--source {source} is not a folder of class folders")
    data = DataConfig(image_size=image_size, batch_size=batch_size, num_workers=num_workers, decode_on=decode_on)
    machine = machine_description()
    with _one_thread_like_a_worker(num_workers == 0):
        shard_run = time_batches(shard_batches(shards, data, num_batches)).summary(num_workers)
        baseline = time_batches(image_folder_batches(source, data, num_batches)).summary(num_workers) if source else None
    return {
        "shards_images_per_s": shard_run["images_per_s"],
        "baseline_images_per_s": baseline["images_per_s"] if baseline else None,
        "ratio": shard_run["images_per_s"] / baseline["images_per_s"] if baseline else None,
        "worker_cpu_ratio": (baseline["worker_cpu_ms_per_image"] / shard_run["worker_cpu_ms_per_image"]
                             if baseline and num_workers else None),
        "workers": num_workers, "image_size": image_size, "batch_size": batch_size, "batches_asked": num_batches,
        "decode_on": decode_on,
        "shards": {"dir": where, **shard_run},  # a URL without its credentials
        "baseline": {"dir": str(source), **baseline} if baseline else None,
        "machine": {**machine, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }


def _print_loader(result: dict) -> None:
    rows: list[tuple[str, Any]] = []
    for name in ("shards", "baseline"):
        run = result[name]
        if run is None:
            continue
        rows += [(f"{name}: images/s", run["images_per_s"]),
                 (f"{name}: images/s per worker", run["images_per_s_per_worker"]),
                 (f"{name}: worker CPU ms/image", run["worker_cpu_ms_per_image"]),
                 (f"{name}: images per CPU-second (one core)", run["images_per_cpu_s"]),
                 (f"{name}: main-process CPU ms/image", run["main_cpu_ms_per_image"]),
                 (f"{name}: batches", run["batches"])]
    rows += [("speed-up (wall)", result["ratio"]), ("speed-up (worker CPU per image)", result["worker_cpu_ratio"]),
             ("load average before", " ".join(map(str, result["machine"]["load_average"]))),
             ("load average after", " ".join(map(str, result["machine"]["load_average_after"])))]
    _print_table(f"input pipeline: {result['workers']} workers, {result['image_size']} px, "
                 f"batch {result['batch_size']}", rows)


def _cmd_bench_loader(args: argparse.Namespace) -> int:
    result = bench_loader(args.shards, source=args.source, num_workers=args.workers, num_batches=args.batches,
                          batch_size=args.batch_size, image_size=args.image_size, decode_on=args.decode_on)
    _print_loader(result)
    _write_json(args.json, result)
    return 0


# ---------------------------------------------------------------- training step
@dataclass
class TrainSetup:
    """A model with a new 3-class head, its optimizer and the trainer's loss, on one device."""
    model: Any
    optimizer: Any
    criterion: Any
    scaler: Any
    device: Any
    autocast_dtype: Any  # None: full precision
    channels_last: bool
    aux_loss_weight: float

    def step(self, images, labels) -> None:
        """Forward, loss, backward, gradient clipping and optimizer step, as the trainer runs one."""
        import torch

        from gastro_dist.models.backbones import model_logits

        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits, aux_logits = model_logits(self.model(images))
            loss = self.criterion(logits.float(), labels)
            if aux_logits is not None:
                loss = loss + self.aux_loss_weight * self.criterion(aux_logits.float(), labels)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def train_device(name: str | None):
    """`--device`: cuda or cpu as asked (cuda refused when none is visible), else cuda when there is one."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_train_setup(model_name: str, precision: str, channels_last: bool, device=None,
                      image_size: int | None = None) -> TrainSetup:
    import torch

    from gastro_dist.config import ModelConfig, PhaseConfig
    from gastro_dist.models.backbones import build_model
    from gastro_dist.training.optim import build_optimizer

    device = device or train_device(None)
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU; use bf16 or no on CPU")
    config = ModelConfig(name=model_name, pretrained="none", channels_last=channels_last)
    model, spec = build_model(config, num_classes=NUM_CLASSES, image_size=image_size)  # ViTs are built for it
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.train()
    optimizer = build_optimizer(model, spec, PhaseConfig(optimizer="sgd", lr=1e-3, backbone_lr=1e-4, unfreeze="all"))
    return TrainSetup(
        model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"), device=device,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[precision],
        channels_last=channels_last, aux_loss_weight=config.aux_loss_weight)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(setup: TrainSetup, batches: Iterator[tuple[Any, Any]], *, warmup: int, steps: int) -> float:
    """Images per second over `steps` optimizer steps after `warmup` untimed ones."""
    for _ in range(warmup):
        setup.step(*next(batches))
    _synchronize(setup.device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images_tensor, labels = next(batches)
        setup.step(images_tensor, labels)
        images += images_tensor.shape[0]
    _synchronize(setup.device)
    return images / (time.perf_counter() - start)


def synthetic_batches(batch_size: int, image_size: int, device) -> Iterator[tuple[Any, Any]]:
    """The same in-memory batch again and again: compute only, no input pipeline."""
    import torch

    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    while True:
        yield images, labels


def loader_batches(shards: str | Path, data, device, channels_last: bool) -> Iterator[tuple[Any, Any]]:
    """`TrainLoader` batches, epoch after epoch, moved to the device and augmented there as the trainer does."""
    from gastro_dist.data.augmentation import DeviceAugmentation
    from gastro_dist.data.loaders import TrainLoader
    from gastro_dist.data.shard_index import load_shard_index

    index = load_shard_index(shards)
    augment = DeviceAugmentation(data)
    loader = TrainLoader(index, data, seed=0, rank=0, world_size=1, pin_memory=device.type == "cuda")
    for epoch in itertools.count():
        for batch in loader.epoch(epoch):
            images, labels, _ = augment.training_batch(batch, device, channels_last)
            yield images, labels


def model_flops_per_image(setup: TrainSetup, image_size: int) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gastro_dist.models.backbones import model_logits

    count_batch = 2  # training-mode BatchNorm needs more than one value per channel
    images = torch.randn(count_batch, 3, image_size, image_size, device=setup.device)
    labels = torch.randint(0, NUM_CLASSES, (count_batch,), device=setup.device)
    with FlopCounterMode(display=False) as counter:
        logits, aux_logits = model_logits(setup.model(images))
        loss = setup.criterion(logits, labels)
        if aux_logits is not None:
            loss = loss + setup.criterion(aux_logits, labels)
        loss.backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / count_batch


def matmul_flops_per_s(device, dtype, size: int = MATMUL_SIZE, repeats: int = 20) -> float:
    """The device's dense matmul rate in this run: the denominator of MFU."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def bench_train(model_name: str, *, batch_size: int, image_size: int, precision: str, channels_last: bool,
                compile_model: bool, steps: int, warmup: int, shards: str | Path | None, num_workers: int,
                decode_on: str = "workers", device: str | None = None,
                compile_backend: str = "inductor") -> dict[str, Any]:
    import torch

    from gastro_dist.config import DataConfig
    from gastro_dist.data.shard_index import load_shard_index

    check_count("--steps", steps, 1)
    check_count("--warmup", warmup, 0)
    check_count("--workers", num_workers, 0)
    target = train_device(device)
    check_batch(batch_size, image_size, *batch_memory(target))
    if shards is not None:
        load_shard_index(shards)  # a wrong folder is reported before the compute-only run
    machine = machine_description()
    setup = build_train_setup(model_name, precision, channels_last, target, image_size=image_size)
    flops_per_image = model_flops_per_image(setup, image_size)
    if compile_model:
        setup.model = torch.compile(setup.model, backend=compile_backend)
    on_gpu = setup.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(setup.device)
    images_per_s = time_steps(setup, synthetic_batches(batch_size, image_size, setup.device), warmup=warmup, steps=steps)
    peak_memory_gib = torch.cuda.max_memory_allocated(setup.device) / 2**30 if on_gpu else None
    end_to_end = None
    if shards is not None:
        data = DataConfig(image_size=image_size, batch_size=batch_size, num_workers=num_workers, decode_on=decode_on)
        with contextlib.closing(loader_batches(shards, data, setup.device, channels_last)) as batches:  # stops the workers
            end_to_end = time_steps(setup, batches, warmup=warmup, steps=steps)
    peak_flops = matmul_flops_per_s(setup.device, setup.autocast_dtype or torch.float32) if on_gpu else None
    return {
        "images_per_s": images_per_s, "end_to_end_images_per_s": end_to_end,
        "end_to_end_fraction": end_to_end / images_per_s if end_to_end else None,
        "model": model_name, "batch_size": batch_size, "image_size": image_size, "precision": precision,
        "channels_last": channels_last, "compile": compile_model,
        "compile_backend": compile_backend if compile_model else None, "steps": steps, "warmup": warmup,
        "workers": num_workers if shards is not None else None,
        "decode_on": decode_on if shards is not None else None,
        "device": torch.cuda.get_device_name(setup.device) if on_gpu else f"cpu ({machine['cpu_model']})",
        "model_flops_per_image": flops_per_image,
        "achieved_flops_per_s": flops_per_image * images_per_s,
        "matmul_flops_per_s": peak_flops,
        "mfu": flops_per_image * images_per_s / peak_flops if peak_flops else None,
        "peak_memory_gib": peak_memory_gib,
        "machine": {**machine, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }


def _print_train(result: dict) -> None:
    rows = [("compute only: images/s", result["images_per_s"]),
            ("end to end from shards: images/s", result["end_to_end_images_per_s"]),
            ("model GFLOPs per image (fwd+bwd)", result["model_flops_per_image"] / 1e9),
            ("achieved TFLOP/s", result["achieved_flops_per_s"] / 1e12),
            ("matmul TFLOP/s (same run)", result["matmul_flops_per_s"] / 1e12 if result["matmul_flops_per_s"] else None),
            ("MFU", f"{result['mfu']:.1%}" if result["mfu"] is not None else None),
            ("peak memory GiB", result["peak_memory_gib"]),
            ("load average before", " ".join(map(str, result["machine"]["load_average"])))]
    _print_table(f"{result['model']} on {result['device']}: batch {result['batch_size']}, {result['image_size']} px, "
                 f"{result['precision']}{', channels_last' if result['channels_last'] else ''}"
                 f"{', compiled' if result['compile'] else ''}", rows)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    result = bench_train(args.model, batch_size=args.batch_size, image_size=args.image_size, precision=args.precision,
                         channels_last=args.channels_last, compile_model=args.compile, steps=args.steps,
                         warmup=args.warmup, shards=args.shards, num_workers=args.workers, decode_on=args.decode_on,
                         device=args.device, compile_backend=args.compile_backend)
    _print_train(result)
    _write_json(args.json, result)
    return 0


# ---------------------------------------------------------------- inference
def bench_infer(model_name: str, *, batch_size: int, image_size: int, backend: str, precision: str,
                channels_last: bool, batches: int, warmup: int, device: str | None = None) -> dict[str, Any]:
    """Images per second of the forward pass `evaluate` and `predict` run (softmax included), on a batch of
    random normalised images: PyTorch in eval mode under inference_mode (`backend` torch), or ONNX Runtime
    on the file `export` writes (`backend` onnx; CPU, or CUDA when onnxruntime-gpu provides it)."""
    import tempfile

    import numpy as np
    import torch

    from gastro_dist.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
    from gastro_dist.evaluation.export import export_model
    from gastro_dist.models.backbones import build_model

    check_count("--batches", batches, 1)
    check_count("--warmup", warmup, 0)
    target = train_device(device)
    check_batch(batch_size, image_size, *batch_memory(target))
    machine = machine_description()
    model, _ = build_model(ModelConfig(name=model_name, pretrained="none"), num_classes=NUM_CLASSES,
                           image_size=image_size)
    model.eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    if backend == "onnx":
        if precision != "fp32":
            raise UserError("--backend onnx runs the exported float32 graph; use --precision fp32")
        try:
            import onnxruntime
        except ImportError:
            raise UserError("--backend onnx needs onnxruntime: pip install 'gastro-dist[export]'") from None
        with tempfile.TemporaryDirectory() as folder:
            path = export_model(model, "onnx", Path(folder) / "model.onnx", input_size=image_size,
                                classes=[f"class_{k}" for k in range(NUM_CLASSES)], mean=IMAGENET_MEAN, std=IMAGENET_STD)
            providers = (["CUDAExecutionProvider"] if target.type == "cuda" else []) + ["CPUExecutionProvider"]
            session = onnxruntime.InferenceSession(str(path), providers=providers)
        feed = {session.get_inputs()[0].name: images.numpy().astype(np.float32)}

        def forward() -> None:
            session.run(None, feed)
        where = session.get_providers()[0]
    else:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(target, memory_format=memory_format)
        images = images.to(target).contiguous(memory_format=memory_format)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        if dtype is torch.float16 and target.type != "cuda":
            raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")

        def forward() -> None:
            with torch.inference_mode(), torch.autocast(target.type, dtype=dtype, enabled=dtype is not None):
                torch.softmax(model(images).float(), dim=1)
        where = target.type
    for _ in range(warmup):
        forward()
    _synchronize(target)
    started = time.perf_counter()
    for _ in range(batches):
        forward()
    _synchronize(target)
    elapsed = time.perf_counter() - started
    return {"images_per_s": batch_size * batches / elapsed, "ms_per_batch": 1000 * elapsed / batches,
            "model": model_name, "backend": backend, "runs_on": where, "batch_size": batch_size,
            "image_size": image_size, "precision": precision,
            "channels_last": channels_last if backend == "torch" else None, "batches": batches, "warmup": warmup,
            "device": torch.cuda.get_device_name(target) if target.type == "cuda" else f"cpu ({machine['cpu_model']})",
            "threads": torch.get_num_threads(),
            "machine": {**machine, "load_average_after": [round(x, 2) for x in os.getloadavg()]}}


def _cmd_bench_infer(args: argparse.Namespace) -> int:
    result = bench_infer(args.model, batch_size=args.batch_size, image_size=args.image_size, backend=args.backend,
                         precision=args.precision, channels_last=not args.contiguous, batches=args.batches,
                         warmup=args.warmup, device=args.device)
    _print_table(f"inference: {result['model']} on {result['device']} ({result['backend']}, {result['runs_on']}): "
                 f"batch {result['batch_size']}, {result['image_size']} px, {result['precision']}"
                 f"{', channels_last' if result['channels_last'] else ''}",
                 [("images/s", result["images_per_s"]), ("ms per batch", result["ms_per_batch"]),
                  ("threads", result["threads"]),
                  ("load average before", " ".join(map(str, result["machine"]["load_average"])))])
    _write_json(args.json, result)
    return 0


# ---------------------------------------------------------------- video
def bench_video(model_name: str, *, image_size: int, backend: str, seconds: float, fps: int, batch_size: int,
                width_px: int, height_px: int, predict_fps: float | None = None,
                device: str | None = None) -> dict[str, Any]:
    """`predict-video` on a synthetic recording (H.264, a moving textured scene) with an untrained model:
    throughput reading every frame as fast as possible, then the same recording replayed at its own frame
    rate as a live feed (`--realtime`): frames dropped and per-frame latency p50/p95, from the decoder's
    output to the smoothed probability (the wait in the queue, preprocessing, the batch's forward pass,
    smoothing). A configuration keeps up when it drops nothing at `fps` (`predict_fps`: predict only that
    many frames a second, `predict-video --fps`)."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from gastro_dist.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
    from gastro_dist.evaluation.export import export_model
    from gastro_dist.evaluation.inference import load_trained_model
    from gastro_dist.evaluation.video_predict import VideoSettings, predict_videos
    from gastro_dist.models.backbones import build_model
    from gastro_dist.run_dir import ModelMeta, RunDir

    check_count("--fps", fps, 1)
    check_count("--batch-size", batch_size, 1)
    if not 1 <= seconds <= 600:
        raise UserError(f"--seconds must be in [1, 600], not {seconds}")
    target = train_device(device)
    check_batch(batch_size, image_size, *batch_memory(target))
    machine = machine_description()
    classes = [f"class_{k}" for k in range(NUM_CLASSES)]
    with tempfile.TemporaryDirectory() as folder:
        run = RunDir(Path(folder) / "run")
        run.path.mkdir()
        model, _ = build_model(ModelConfig(name=model_name, pretrained="none"), num_classes=NUM_CLASSES,
                               load_pretrained=False, image_size=image_size)
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(run.model_weights))
        meta = ModelMeta(architecture=model_name, classes=classes, image_size=image_size, eval_crop_ratio=0.875,
                         mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        meta.write(run.model_json)
        onnx_file = None
        if backend == "onnx":
            onnx_file = export_model(model, "onnx", Path(folder) / "model.onnx", input_size=image_size,
                                     classes=classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        recording = _synthetic_recording(Path(folder) / "recording.mp4", seconds, fps, width_px, height_px)
        trained = load_trained_model(run.path)
        figures = {}
        for mode, realtime in (("as_fast_as_possible", False), ("realtime", True)):
            settings = VideoSettings(fps=predict_fps, batch_size=batch_size, realtime=realtime)
            result = predict_videos(trained, [str(recording)], Path(folder) / mode, settings, backend=backend,
                                    onnx_file=onnx_file, device=target, report=lambda line: None)[0]
            if result.status != "predicted":
                raise UserError(f"bench video: the synthetic recording was not predicted: {result.error}")
            figures[mode] = {"frames_per_s": result.frames_per_s, "video_s_per_s": seconds / result.wall_s,
                             "frames": result.info.num_read,
                             "frames_predicted": result.num_predicted, "frames_dropped": result.num_dropped,
                             "latency_p50_ms": result.latency_ms(50), "latency_p95_ms": result.latency_ms(95)}
    realtime = figures["realtime"]
    return {"model": model_name, "backend": backend, "image_size": image_size, "batch_size": batch_size,
            "video": f"{width_px}x{height_px} H.264, {fps} fps, {seconds:g} s", "predict_fps": predict_fps or fps,
            "frames_per_s": figures["as_fast_as_possible"]["frames_per_s"],
            "video_s_per_s": figures["as_fast_as_possible"]["video_s_per_s"],
            "keeps_up": realtime["frames_dropped"] == 0, **{f"realtime_{k}": v for k, v in realtime.items()},
            "as_fast_as_possible": figures["as_fast_as_possible"],
            "device": torch.cuda.get_device_name(target) if target.type == "cuda" else f"cpu ({machine['cpu_model']})",
            "threads": torch.get_num_threads(),
            "machine": {**machine, "load_average_after": [round(x, 2) for x in os.getloadavg()]}}


def _synthetic_recording(path: Path, seconds: float, fps: int, width_px: int, height_px: int) -> Path:
    """A textured scene drifting a few pixels a frame: what an encoder and decoder work on in a procedure."""
    import av
    import numpy as np

    texture = np.random.default_rng(0).integers(0, 256, (height_px // 8 + 64, width_px // 8 + 64, 3), dtype=np.uint8)
    texture = texture.repeat(8, axis=0).repeat(8, axis=1)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width_px, height_px, "yuv420p"
        for k in range(round(seconds * fps)):
            shift = (2 * k) % 512
            pixels = np.ascontiguousarray(texture[shift // 2:shift // 2 + height_px, shift:shift + width_px])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def _cmd_bench_video(args: argparse.Namespace) -> int:
    result = bench_video(args.model, image_size=args.image_size, backend=args.backend, seconds=args.seconds,
                         fps=args.fps, batch_size=args.batch_size, width_px=args.width, height_px=args.height,
                         predict_fps=args.predict_fps, device=args.device)
    _print_table(f"predict-video: {result['model']} on {result['device']} ({result['backend']}): "
                 f"{result['image_size']} px, batch {result['batch_size']}, {result['video']}, "
                 f"{result['predict_fps']:g} predicted a second",
                 [("frames predicted/s (as fast as possible)", result["frames_per_s"]),
                  ("seconds of video/s (>= 1: keeps up)", result["video_s_per_s"]),
                  ("realtime: frames dropped", result["realtime_frames_dropped"]),
                  ("realtime: latency p50 (ms)", result["realtime_latency_p50_ms"]),
                  ("realtime: latency p95 (ms)", result["realtime_latency_p95_ms"]),
                  ("keeps up", "yes" if result["keeps_up"] else "no"), ("threads", result["threads"]),
                  ("load average before", " ".join(map(str, result["machine"]["load_average"])))])
    _write_json(args.json, result)
    return 0


# ---------------------------------------------------------------- command line
def _cmd_bench_statistics(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation import simulation

    if args.datasets < 1 or args.bootstrap < 1:
        raise UserError("--datasets and --bootstrap must be 1 or more")
    result = simulation.run(args.datasets, args.bootstrap, args.seed)
    text = simulation.markdown(result)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    _write_json(args.json, result)
    return 0


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure input-pipeline and training throughput")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")

    q = bench_sub.add_parser("loader", help="images/s of the training input pipeline (and of a plain ImageFolder)")
    q.add_argument("--shards", required=True, help="folder written by `gastro-dist pack`, or its URL (https://, s3://, gs://)")
    q.add_argument("--source", type=Path, default=None,
                   help="the original image tree (class folders): also time ImageFolder + DataLoader over it")
    q.add_argument("--workers", type=int, default=4, help="DataLoader workers, for both pipelines")
    q.add_argument("--batches", type=int, default=50,
                   help="batches to time (the shard pipeline runs whole epochs, so at least this many)")
    q.add_argument("--batch-size", type=int, default=32, help="images per batch")
    q.add_argument("--image-size", type=int, default=224, help="network input size the crops are resized to")
    q.add_argument("--decode-on", choices=("workers", "device"), default="workers",
                   help="data.decode_on: 'device' times what the workers still do (reading the shards)")
    q.add_argument("--json", type=Path, default=None, help="also write the figures here")
    q.set_defaults(handler=_cmd_bench_loader)

    q = bench_sub.add_parser("train", help="optimizer-step images/s (compute only, and end to end with --shards)")
    q.add_argument("--model", required=True,
                   help="model name, e.g. resnet50, vgg19, inception_v3, timm:convnext_tiny, timm:vit_small_patch16_224")
    q.add_argument("--batch-size", type=int, default=64, help="images per optimizer step")
    q.add_argument("--image-size", type=int, default=224, help="square input size")
    q.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16", help="autocast precision")
    q.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    q.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    q.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile (the CPU dry run of benchmarks/run_gpu.sh uses eager: "
                        "dynamo's graph capture without compiling kernels)")
    q.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where to train (default: cuda when a GPU is visible, else cpu); cuda fails when none is")
    q.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    q.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cuDNN autotuning)")
    q.add_argument("--shards", default=None, help="also time the step fed by the training input pipeline (a folder or a URL)")
    q.add_argument("--workers", type=int, default=4, help="DataLoader workers for --shards")
    q.add_argument("--decode-on", choices=("workers", "device"), default="workers",
                   help="data.decode_on for --shards: 'device' decodes and crops on the GPU")
    q.add_argument("--json", type=Path, default=None, help="also write the figures here")
    q.set_defaults(handler=_cmd_bench_train)

    q = bench_sub.add_parser("infer", help="images/s of evaluate's and predict's forward pass (PyTorch or ONNX Runtime)")
    q.add_argument("--model", required=True, help="model name, e.g. resnet18, resnet50, timm:convnext_tiny")
    q.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    q.add_argument("--image-size", type=int, default=224, help="square input size")
    q.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="PyTorch (evaluate and predict), or ONNX Runtime on the exported graph")
    q.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (torch backend; evaluate and predict use fp32)")
    q.add_argument("--contiguous", action="store_true",
                   help="contiguous tensors instead of channels_last (evaluate's and predict's default)")
    q.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when a GPU is visible")
    q.add_argument("--batches", type=int, default=10, help="timed forward passes")
    q.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    q.add_argument("--json", type=Path, default=None, help="also write the figures here")
    q.set_defaults(handler=_cmd_bench_infer)

    q = bench_sub.add_parser("video", help="frames/s and per-frame latency of predict-video on a synthetic recording, "
                                           "as fast as possible and replayed in real time")
    q.add_argument("--model", default="resnet18", help="model name, e.g. resnet18, resnet50")
    q.add_argument("--image-size", type=int, default=224, help="square input size")
    q.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="PyTorch or ONNX Runtime")
    q.add_argument("--seconds", type=float, default=10.0, help="length of the synthetic recording")
    q.add_argument("--fps", type=int, default=25, help="its frame rate: the rate to keep up with")
    q.add_argument("--predict-fps", type=float, default=None,
                   help="predict only this many frames a second (predict-video --fps; default: every frame)")
    q.add_argument("--width", type=int, default=1280, help="its frame width in pixels")
    q.add_argument("--height", type=int, default=720, help="its frame height in pixels")
    q.add_argument("--batch-size", type=int, default=8, help="frames per forward pass at most")
    q.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when a GPU is visible")
    q.add_argument("--json", type=Path, default=None, help="also write the figures here")
    q.set_defaults(handler=_cmd_bench_video)

    q = bench_sub.add_parser("statistics", help="coverage of the report's intervals and size of its tests, simulated")
    q.add_argument("--datasets", type=int, default=500, help="simulated test sets per scenario")
    q.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per test set")
    q.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    q.add_argument("--out", type=Path, default=None, help="write the tables (Markdown) here, e.g. benchmarks/statistics.md")
    q.add_argument("--json", type=Path, default=None, help="also write the figures here")
    q.set_defaults(handler=_cmd_bench_statistics)
