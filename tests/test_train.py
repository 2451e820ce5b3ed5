"""The trainer end to end on CPU: both phases through the real CLI, freezing, two processes under
`accelerate launch`, resume without repeating a step, W&B offline, missing weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from accelerate.utils import set_seed
from safetensors.torch import load_file

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.config import ModelConfig
from gastro_dist.models.backbones import build_model
from wandb_offline import wandb_offline_records

pytestmark = pytest.mark.slow  # end to end: trains, packs or launches processes

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *TINY_TRAIN_OVERRIDES, *extra]


def _events(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def _subprocess_env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def test_both_phases_through_the_cli(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run)) == 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["world_size"] == 1 and summary["num_machines"] == 1
    assert summary["classes"] == ["chronic_gastritis", "gastric_cancer", "gastric_ulcer"]
    for phase in ("head", "finetune"):
        info = summary["phases"][phase]
        assert info["steps"] > 0 and info["epochs"] == 1
        assert 0 <= info["val_accuracy"] <= 1
        assert set(info["val_per_class_accuracy"]) == set(summary["classes"])
    model_meta = json.loads((run / "model.json").read_text())
    assert model_meta["classes"] == summary["classes"] and model_meta["image_size"] == 48
    assert (run / "model.safetensors").is_file()
    assert "finetune:" in (run / "config.yaml").read_text()
    val_events = _events(run, "val")
    assert [e["phase"] for e in val_events] == ["head", "finetune"]
    assert {"loss", "lr", "images_per_s"} <= set(_events(run, "train")[0])


def test_decoding_on_the_device_trains_both_phases(synthetic_shards, tmp_path):
    """data.decode_on=device: one worker reads JPEG bytes, the training device (here the CPU) decodes them."""
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, "data.decode_on=device", "data.num_workers=1")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_samples"]["count"] == 0
    assert all(summary["phases"][phase]["steps"] > 0 for phase in ("head", "finetune"))


def test_head_phase_changes_only_the_head(synthetic_shards, tmp_path):
    """Phase 1 leaves every backbone parameter and BatchNorm buffer as loaded; the head learns."""
    pretrained = torchvision.models.resnet18(weights=None).state_dict()
    weights_file = tmp_path / "resnet18-local.pth"
    torch.save(pretrained, weights_file)
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, "model.name=resnet18", f"model.pretrained={weights_file}",
                            "finetune.epochs=0")) == 0

    trained = load_file(str(run / "checkpoints" / "head-last" / "model.safetensors"))
    backbone = {k: v for k, v in trained.items() if not k.startswith("fc.")}
    assert any("running_mean" in k for k in backbone)
    for name, value in backbone.items():
        assert torch.equal(value, pretrained[name]), f"{name} changed during head pre-training"
    # The trainer seeds (seed + process index, 0 here), then builds the model: the same two calls give its initial head.
    set_seed(0)
    initial, _ = build_model(ModelConfig(name="resnet18", pretrained=str(weights_file)), num_classes=3)
    assert torch.equal(initial.state_dict()["layer1.0.bn1.running_mean"], trained["layer1.0.bn1.running_mean"])
    assert not torch.allclose(initial.fc[1].weight, trained["fc.1.weight"]), "the head did not learn"


@pytest.mark.parametrize("tracker", ["none", "wandb"])
def test_two_processes_under_accelerate_launch(synthetic_shards, tmp_path, tracker):
    """The paper configs' tracker (W&B) included: every process must exit 0 after the trackers close."""
    if tracker == "wandb":
        pytest.importorskip("wandb")
    run = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gastro_dist",
           *_train_args(synthetic_shards, run, "data.batch_size=4", f"tracking.tracker={tracker}",
                        "tracking.project=two-processes")]
    env = _subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if tracker == "wandb":  # one W&B run for the job, written by the main process only
        offline_runs = list((run / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1
        assert offline_runs[0].name.endswith(json.loads((run / "tracking.json").read_text())["wandb_run_id"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    checksums = summary["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    index = json.loads((synthetic_shards / "index.json").read_text())
    # Every rank ran train_count // (2 ranks x 4) steps per epoch; validation saw every sample once.
    assert summary["phases"]["head"]["steps"] == index["splits"]["train"]["count"] // 8
    val = _events(run, "val")[-1]
    assert val["num_samples"] == index["splits"]["val"]["count"]


def test_resume_continues_without_repeating_a_step(synthetic_shards, tmp_path, monkeypatch):
    """Stopped after its first checkpoint, resumed with the same command: later steps only, same W&B run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    extra = ["finetune.epochs=2", "checkpoint_every_steps=1", "tracking.tracker=wandb", "tracking.project=resume"]
    args = [sys.executable, "-m", "gastro_dist", *_train_args(synthetic_shards, run, *extra)]
    process = subprocess.Popen(args, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if list((run / "checkpoints").glob("state-*")) if (run / "checkpoints").is_dir() else False:
            (run / ".preempt_requested").touch()  # what the SLURM script does on its warning signal
            break
        time.sleep(0.05)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 75, output[-3000:]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "preempted"

    assert main(_train_args(synthetic_shards, run, *extra)) == 0
    summary = json.loads((run / "summary.json").read_text())
    run_id = json.loads((run / "tracking.json").read_text())["wandb_run_id"]
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(d.name.endswith(run_id) for d in offline_runs)
    assert summary["status"] == "completed" and len(summary["resumes"]) == 1
    for phase in ("head", "finetune"):
        steps = [(e["epoch"], e["step"]) for e in _events(run, "train") if e["phase"] == phase]
        assert steps == sorted(set(steps)), f"{phase}: a step was done twice or out of order: {steps}"
        per_epoch = summary["phases"][phase]["micro_steps_per_epoch"]
        epochs = summary["phases"][phase]["epochs"]
        assert len(steps) == per_epoch * epochs, "a step was skipped"


def test_wandb_offline_run_holds_the_metrics(synthetic_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "my run"  # W&B takes no space in an artifact's name (the final model's is named after the run)
    assert main(_train_args(synthetic_shards, run, "tracking.tracker=wandb", "tracking.project=test")) == 0
    offline_runs, records = wandb_offline_records(run)
    assert b"model-my_run-" in records  # the final model as an artifact, its name made safe
    assert len(offline_runs) == 1
    tracking = json.loads((run / "tracking.json").read_text())
    assert offline_runs[0].name.endswith(tracking["wandb_run_id"])
    for key in (b"val/accuracy", b"val/per_class_accuracy/gastric_cancer", b"train/loss", b"train/images_per_s"):
        assert key in records, f"{key!r} was not logged to W&B"


def test_missing_pretrained_weights_is_one_clear_line(synthetic_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    code = main(_train_args(synthetic_shards, tmp_path / "run", "model.name=resnet18", "model.pretrained=imagenet"))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "empty-torch-home") in err
    assert "gastro-dist weights download resnet18" in err


def test_config_mistakes_are_one_line(synthetic_shards, tmp_path, capsys):
    assert main(_train_args(synthetic_shards, tmp_path / "r1", "model.name=resnet_nonexistent")) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(_train_args(synthetic_shards, tmp_path / "r2", "head.lr=fast")) == 2
    assert "head.lr" in capsys.readouterr().err
    assert main(["train", "--config", SMOKE, "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "r3")]) == 2
    assert "gastro-dist pack" in capsys.readouterr().err
    assert main(_train_args(synthetic_shards, tmp_path / "r4", "data.batch_size=100000")) == 2
    assert "batch_size" in capsys.readouterr().err
