"""The CUDA paths (`pytest -m gpu`; skipped without CUDA): two-phase bf16 training with the workers
decoding and with nvJPEG decoding on the device, `accelerate launch` on the GPU, resume on the GPU,
evaluate and predict agreeing with the CPU, ONNX export of a GPU-trained run.

Every command runs in its own process, as a user runs it: no CUDA context, autocast setting or
Accelerate state passes from one to the next, and independent runs go side by side on the GPU.
Sized to take about two minutes on one H100/H200 (see benchmarks/run_gpu.sh --quick)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.training import checkpoint as ckpt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMOKE = str(REPO / "configs" / "smoke.yaml")
ON_CUDA = ["mixed_precision=bf16", "model.channels_last=true", "tracking.tracker=none"]
GASTRO_DIST = (sys.executable, "-m", "gastro_dist")
# Largest difference allowed between probabilities computed on the GPU and on the CPU from the same
# weights and inputs. cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa: ~5e-4 relative
# rounding per product), which leaves logits a few 1e-3 apart after resnet18's 20 layers, and
# probabilities about half that; bf16 autocast (~4e-3 relative) would still stay within it. A real
# difference between the devices (preprocessing, BatchNorm mode, a layer left behind) moves
# probabilities by tenths.
PROB_TOLERANCE = 0.02


def _start(log: Path, *args: str, launcher: tuple[str, ...] = GASTRO_DIST, **env: str) -> subprocess.Popen:
    """A command in its own process, its output in `log` (pipes would stall side-by-side runs)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    environment = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **env}
    environment.pop("WANDB_API_KEY", None)
    with log.open("w") as out:
        return subprocess.Popen([*launcher, *args], cwd=REPO, env=environment, stdout=out, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, log: Path, expected: int = 0, timeout_s: float = 600) -> None:
    code = process.wait(timeout=timeout_s)
    assert code == expected, f"exit {code} from {' '.join(map(str, process.args))}:\n{log.read_text()[-4000:]}"


def _stop(processes) -> None:
    """Whatever a failed test left running."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *extra]


# ---------------------------------------------------------------- learning on the GPU
@pytest.fixture(scope="module")
def learn_source(tmp_path_factory) -> Path:
    """1,200 synthetic frames, made small (80-96 px wide) since they are packed for 64 px anyway."""
    source = tmp_path_factory.mktemp("learn") / "src"
    assert main(["synth", "--out", str(source), "--per-class", "400", "--size-range", "80", "96", "--seed", "0"]) == 0
    return source


@pytest.fixture(scope="module")
def learn_shards(learn_source) -> Path:
    shards = learn_source.parent / "shards"
    assert main(["pack", str(learn_source), "--out", str(shards), "--input-size", "64", "--manifest",
                 str(learn_source / "manifest.csv"), "--val-fraction", "0.15", "--test-per-class", "20"]) == 0
    return shards


@pytest.fixture(scope="module")
def learned_runs(learn_shards, tmp_path_factory) -> Iterator[dict[str, tuple[Path, subprocess.Popen, Path]]]:
    """configs/smoke.yaml (resnet18 from scratch, 64 px) in bf16 with 4 workers, once with the workers
    decoding and once with nvJPEG decoding on the GPU, side by side."""
    root = tmp_path_factory.mktemp("cuda-runs")
    runs = {}
    for decode_on in ("workers", "device"):
        log = root / f"{decode_on}.log"
        process = _start(log, *_train_args(learn_shards, root / decode_on, *ON_CUDA, "data.num_workers=4",
                                            f"data.decode_on={decode_on}", "finetune.epochs=10"))
        runs[decode_on] = (root / decode_on, process, log)
    try:
        for _, process, _ in runs.values():
            process.wait(timeout=900)
        yield runs
    finally:
        _stop(process for _, process, _ in runs.values())


def _finished_run(learned_runs, decode_on: str) -> Path:
    run, process, log = learned_runs[decode_on]
    _finish(process, log)
    return run


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_two_phase_bf16_training_on_cuda_learns(learned_runs, decode_on):
    run = _finished_run(learned_runs, decode_on)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (summary["device"], summary["mixed_precision"], summary["world_size"]) == ("cuda", "bf16", 1)
    assert summary["skipped_samples"]["count"] == 0, summary["skipped_samples"]  # every JPEG decoded
    assert all(summary["phases"][phase]["steps"] > 0 for phase in ("head", "finetune"))
    # Chance is 1/3. The same recipe and data reached 0.93 (best epoch) on a CPU in bf16; 0.6 leaves
    # room for other seeds' and kernels' numerics while a run that learns nothing stays near 0.33.
    assert summary["phases"]["finetune"]["val_accuracy"] >= 0.6, summary["phases"]["finetune"]
    assert (run / "model.safetensors").is_file()


# ---------------------------------------------------------------- launchers and resume
def test_accelerate_launch_one_process_on_cuda(synthetic_shards, tmp_path):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "gastro_dist")
    run, log = tmp_path / "run", tmp_path / "launch.log"
    process = _start(log, *_train_args(synthetic_shards, run, *TINY_TRAIN_OVERRIDES, *ON_CUDA, "data.num_workers=2"),
                     launcher=launcher)
    _finish(process, log)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 1 and summary["device"] == "cuda"


# Deterministic cuDNN and cuBLAS kernels (the few ops without a deterministic CUDA kernel only warn),
# so that two uninterrupted runs agree and a resumed one can be held to them.
DETERMINISTIC = (sys.executable, "-c", "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "from gastro_dist.cli import main; sys.exit(main(sys.argv[1:]))")


def _largest_difference(a: Path, b: Path) -> float:
    first = load_file(str(a / "checkpoints" / "finetune-last" / "model.safetensors"))
    second = load_file(str(b / "checkpoints" / "finetune-last" / "model.safetensors"))
    assert first.keys() == second.keys()
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first if first[k].numel())


def test_resume_on_cuda_gives_the_weights_of_an_uninterrupted_run(synthetic_shards, tmp_path):
    extra = [*TINY_TRAIN_OVERRIDES, *ON_CUDA, "finetune.epochs=2", "checkpoint_every_steps=1",
             "data.num_workers=2", "data.batch_size=4"]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    names = ("straight", "again", "interrupted")
    processes = {name: _start(tmp_path / f"{name}.log", *_train_args(synthetic_shards, tmp_path / name, *extra),
                              launcher=DETERMINISTIC, **env) for name in names}
    interrupted = tmp_path / "interrupted"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and processes["interrupted"].poll() is None:
            # stop it inside the finetune phase's first epoch, as the SLURM script does on its warning signal
            if any(s.phase == "finetune" and s.micro_step >= 1 for s, _ in ckpt.complete_states(interrupted)):
                (interrupted / ".preempt_requested").touch()
                break
            time.sleep(0.02)
        _finish(processes["interrupted"], tmp_path / "interrupted.log", expected=75)
        resumed_from = ckpt.latest_state(interrupted)[0]
        assert resumed_from.phase == "finetune" and resumed_from.micro_step > 0
        for name in ("straight", "again"):
            _finish(processes[name], tmp_path / f"{name}.log")
        processes["resumed"] = _start(tmp_path / "resumed.log", *_train_args(synthetic_shards, interrupted, *extra),
                                      launcher=DETERMINISTIC, **env)
        _finish(processes["resumed"], tmp_path / "resumed.log")
    finally:
        _stop(processes.values())
    assert json.loads((interrupted / "summary.json").read_text())["resumes"]

    # What two uninterrupted runs differ by is the floor (0 when every kernel is deterministic). A
    # resume that repeats or skips a step, or loses the optimizer's moments, the LR schedule's position,
    # an RNG state or the data order, moves weights by about one AdamW step: ~lr = 2e-3, 200 times the
    # 1e-5 allowed when the two straight runs agree.
    noise = _largest_difference(tmp_path / "straight", tmp_path / "again")
    assert noise <= 1e-4, f"two uninterrupted runs differ by {noise}: resume cannot be judged against them"
    worst = _largest_difference(tmp_path / "straight", interrupted)
    assert worst <= max(1e-5, 10 * noise), f"resumed weights differ by {worst} (uninterrupted runs: {noise})"


# ---------------------------------------------------------------- evaluate, predict, export
def _probabilities(path: Path, key: str) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c.startswith("prob_")]
    return {row[key]: np.array([float(row[c]) for c in columns]) for row in rows if not row.get("error")}


def _assert_same_predictions(gpu: dict[str, np.ndarray], cpu: dict[str, np.ndarray]) -> None:
    assert gpu.keys() == cpu.keys() and len(gpu) > 0
    for key, expected in cpu.items():
        assert np.abs(gpu[key] - expected).max() <= PROB_TOLERANCE, (key, gpu[key], expected)
        top_two = np.sort(expected)[-2:]
        if top_two[1] - top_two[0] > 2 * PROB_TOLERANCE:  # a near tie may go either way
            assert gpu[key].argmax() == expected.argmax(), (key, gpu[key], expected)


def test_evaluate_and_predict_on_cuda_agree_with_the_cpu(learned_runs, learn_shards, learn_source, tmp_path):
    run = _finished_run(learned_runs, "workers")
    images = learn_source / "gastric_ulcer"
    commands = {}
    for device, env in (("cuda", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        commands[f"evaluate-{device}"] = (["evaluate", "--run", str(run), "--shards", str(learn_shards), "--split",
                                           "test", "--out", str(tmp_path / f"eval-{device}"), "--bootstrap", "0",
                                           "--workers", "2"], env)
        commands[f"predict-{device}"] = (["predict", "--run", str(run), str(images), "--out",
                                          str(tmp_path / f"predict-{device}.csv"), "--batch-size", "64"], env)
    processes = {name: _start(tmp_path / f"{name}.log", *args, **env) for name, (args, env) in commands.items()}
    try:
        for name, process in processes.items():
            _finish(process, tmp_path / f"{name}.log")
    finally:
        _stop(processes.values())

    evaluated = {d: _probabilities(tmp_path / f"eval-{d}" / "predictions.csv", "key") for d in ("cuda", "cpu")}
    _assert_same_predictions(evaluated["cuda"], evaluated["cpu"])
    predicted = {d: _probabilities(tmp_path / f"predict-{d}.csv", "path") for d in ("cuda", "cpu")}
    assert len(predicted["cpu"]) == len(list(images.glob("*.jpg")))
    _assert_same_predictions(predicted["cuda"], predicted["cpu"])


def test_onnx_export_of_a_cuda_trained_run_matches_pytorch(learned_runs, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    from gastro_dist.evaluation.inference import load_trained_model

    run = _finished_run(learned_runs, "workers")
    out = tmp_path / "model.onnx"
    # The command itself checks the file against PyTorch on the CPU (1e-4) and fails otherwise.
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert "max difference" in capsys.readouterr().out
    # ... and here against the same weights on the GPU.
    trained = load_trained_model(run)
    model = trained.model.cuda().eval()
    images = torch.randn(8, 3, trained.image_size, trained.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the file holds the run's fitted temperature: softmax(logits / T)
        on_gpu = torch.softmax(model(images.cuda()).float() / trained.temperature, dim=1).cpu().numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert np.abs(exported - on_gpu).max() <= PROB_TOLERANCE
