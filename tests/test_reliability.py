"""Hostile data and interrupted runs: corrupt shards, pickles that must not run, kill -9 at random
moments, exact resume, non-finite losses, config errors, secrets."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hostile
from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.training import checkpoint as ckpt
from wandb_offline import finish_wandb_writes

pytestmark = pytest.mark.slow  # end to end: trains, packs or launches processes

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *TINY_TRAIN_OVERRIDES, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


class _Payload:
    """Unpickling this creates a marker file: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _first_train_shard(shards: Path) -> Path:
    index = json.loads((shards / "index.json").read_text())
    return shards / index["splits"]["train"]["shards"][0]["file"]


# ---------------------------------------------------------------- corrupt data
def test_truncated_shard_is_skipped_counted_and_steps_stay_equal(synthetic_shards, tmp_path):
    shards = _copy_shards(synthetic_shards, tmp_path / "shards")
    broken = _first_train_shard(shards)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    run = tmp_path / "run"
    assert main(_train_args(shards, run)) == 0
    summary = json.loads((run / "summary.json").read_text())
    index = json.loads((shards / "index.json").read_text())
    # the epoch is planned on the samples the shard still holds (reported), the cut one skipped
    held = [p for p in summary["shard_problems"] if p.startswith(broken.name) and "index.json lists" in p]
    num_held = int(held[0].split(" holds ")[1].split()[0])
    expected_steps = (index["splits"]["train"]["count"] - 8 + num_held) // 8
    assert summary["phases"]["head"]["steps"] == expected_steps
    assert summary["skipped_samples"]["count"] >= 1
    assert any(broken.name in reason for reason in summary["skipped_samples"]["reasons"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "skipped" for e in logged)

    # evaluate on the broken split: the readable samples are scored, the lost ones reported
    assert main(["evaluate", "--run", str(run), "--shards", str(shards), "--split", "train",
                 "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--workers", "0"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["skipped_samples"]["missing"] >= 1
    assert metrics["num_samples"] + metrics["skipped_samples"]["missing"] == index["splits"]["train"]["count"]


def test_undecodable_image_is_skipped_and_strict_mode_stops(synthetic_shards, tmp_path, capsys):
    shards = _copy_shards(synthetic_shards, tmp_path / "shards")
    shard = _first_train_shard(shards)
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(shard) as src, tarfile.open(rewritten, "w") as dst:
        first_jpg = None
        for member in src:
            payload = src.extractfile(member).read()
            if member.name.endswith(".jpg") and first_jpg is None:
                first_jpg = member.name
                payload = b"\xff\xd8\xff\xe0 not really a jpeg"
            member.size = len(payload)
            dst.addfile(member, __import__("io").BytesIO(payload))
    os.replace(rewritten, shard)
    hostile.edit_index(shards, lambda index: index["splits"]["train"]["shards"][0].update(sha256=hostile.sha256(shard)))
    bad_key = first_jpg.rsplit(".", 1)[0]

    assert main(_train_args(shards, tmp_path / "run")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any(bad_key in r for r in summary["skipped_samples"]["reasons"])

    capsys.readouterr()
    code = main(_train_args(shards, tmp_path / "strict", "data.strict=true"))
    err = capsys.readouterr().err
    assert code == 1 and bad_key in err and "data.strict" in err


def test_pickled_members_in_a_shard_never_run(synthetic_shards, tmp_path):
    shards = _copy_shards(synthetic_shards, tmp_path / "shards")
    marker = tmp_path / "pwned"
    shard = _first_train_shard(shards)
    with tarfile.open(shard) as tar:
        first_key = tar.getmembers()[0].name.split(".")[0]
    payload = pickle.dumps(_Payload(marker))
    with tarfile.open(shard, "a") as tar:  # appended members of an existing sample, plus a new one
        for name in (f"{first_key}.pyd", f"{first_key}.pickle", "evil_000000.pth"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
    assert main(_train_args(shards, tmp_path / "run")) == 0
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--shards", str(shards), "--split", "train",
                 "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--workers", "0"]) == 0
    assert main(["predict", "--run", str(tmp_path / "run"), str(shard), "--out", str(tmp_path / "p.csv")]) == 0
    assert not marker.exists(), "a pickle inside a shard was executed"


# ---------------------------------------------------------------- files that need pickle
def test_pickle_files_are_refused_and_never_run(synthetic_shards, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"weights": _Payload(marker)}, evil)

    # as pretrained weights
    assert main(_train_args(synthetic_shards, tmp_path / "r1", f"model.pretrained={evil}")) == 2
    assert "weights_only" in capsys.readouterr().err

    # as the training state a resume reads (accelerate's optimizer file replaced)
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, "finetune.epochs=2")) == 0
    state_dir = ckpt.latest_state(run)[1]
    shutil.copy(evil, state_dir / "optimizer.bin")
    state = json.loads((state_dir / ckpt.STATE_FILE).read_text())
    state.update(phase_done=False, epoch=1)  # make it resume into the finetune phase
    (state_dir / ckpt.STATE_FILE).write_text(json.dumps(state))
    capsys.readouterr()
    assert main(_train_args(synthetic_shards, run, "finetune.epochs=2")) == 2
    assert "refusing to load checkpoint" in capsys.readouterr().err

    # as --checkpoint of evaluate / predict / export
    for command in (["evaluate", "--shards", str(synthetic_shards), "--out", str(tmp_path / "e")],
                    ["predict", str(tmp_path), "--out", str(tmp_path / "p.csv")],
                    ["export", "--format", "torchscript", "--out", str(tmp_path / "m.pt")]):
        assert main([command[0], "--run", str(run), "--checkpoint", str(evil), *command[1:]]) == 2
        assert "safetensors" in capsys.readouterr().err
    assert not marker.exists(), "a pickle was executed"


# ---------------------------------------------------------------- interruptions
def test_kill_at_random_moments_always_leaves_a_loadable_checkpoint(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "gastro_dist", *_train_args(synthetic_shards, run, "finetune.epochs=3",
                                                             "checkpoint_every_steps=1")]
    rng = random.Random(7)
    for _ in range(6):
        process = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.time() + 120  # start-up (imports, the shard scan) takes seconds on a loaded machine
        while not (run / "metrics.jsonl").is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 5.0))  # then anywhere in training
        if process.poll() is not None:
            break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        latest = ckpt.latest_state(run)
        if latest is not None:  # the newest complete checkpoint loads
            state, path = latest
            assert (path / ckpt.COMPLETE_MARKER).is_file()
            assert load_file(str(path / "model.safetensors"))
    result = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert len(summary["resumes"]) >= 1
    assert all({"phase", "epoch", "step"} <= set(r) for r in summary["resumes"])


def test_resume_inside_an_epoch_gives_the_same_weights(synthetic_shards, tmp_path):
    """Interrupted mid-epoch and resumed == uninterrupted, to 1e-6 (CPU, deterministic)."""
    # Two data workers per process: the resumed epoch must continue their round-robin where it stopped.
    extra = ["finetune.epochs=2", "checkpoint_every_steps=1", "data.num_workers=2", "data.batch_size=4"]
    straight = tmp_path / "straight"
    assert main(_train_args(synthetic_shards, straight, *extra)) == 0

    interrupted = tmp_path / "interrupted"
    args = [sys.executable, "-m", "gastro_dist", *_train_args(synthetic_shards, interrupted, *extra)]
    process = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a checkpoint in the middle of the finetune phase's first epoch
        states = [s for s, _ in ckpt.complete_states(interrupted)]
        if any(s.phase == "finetune" and s.micro_step >= 1 for s in states):
            (interrupted / ".preempt_requested").touch()
            break
        time.sleep(0.02)
    assert process.wait(timeout=300) == 75
    resumed_from = ckpt.latest_state(interrupted)[0]
    assert resumed_from.phase == "finetune" and 0 < resumed_from.micro_step
    assert main(_train_args(synthetic_shards, interrupted, *extra)) == 0

    a = load_file(str(straight / "checkpoints" / "finetune-last" / "model.safetensors"))
    b = load_file(str(interrupted / "checkpoints" / "finetune-last" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    assert worst <= 1e-6, f"resumed weights differ by {worst}"


def test_a_sigusr1_between_two_runs_of_one_process_is_served_by_the_next(synthetic_shards, tmp_path):
    """A tune worker or cv trains several runs in one process: SIGUSR1 after one run has finished (its watch
    gone) must checkpoint and stop the next run at its first step, once, not vanish or end the process."""
    from gastro_dist import Preempted
    from gastro_dist.config import load_config
    from gastro_dist.training.trainer import train

    config = load_config(REPO / "configs" / "smoke.yaml", TINY_TRAIN_OVERRIDES)
    train(config, synthetic_shards, tmp_path / "first")
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the test runs outside the main thread: no signal handler could be installed")
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(Preempted):
        train(config, synthetic_shards, tmp_path / "second")
    second = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert second["status"] == "preempted"
    assert train(config, synthetic_shards, tmp_path / "second")["status"] == "completed"  # served once, not again


# ---------------------------------------------------------------- divergence
def test_nonfinite_loss_skips_steps_then_stops_with_a_checkpoint(synthetic_shards, tmp_path, monkeypatch, capsys):
    original = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def poisoned(self, logits, target):
        calls["n"] += 1
        loss = original(self, logits, target)
        return loss * float("nan") if calls["n"] > 1 else loss  # the head phase's 2nd and 3rd steps

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    run = tmp_path / "run"
    code = main(_train_args(synthetic_shards, run, "max_nonfinite_steps=2"))
    err = capsys.readouterr().err
    assert code == 1 and "not finite" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    state, path = ckpt.latest_state(run)
    assert state.phase == "head" and state.nonfinite_steps == 2 and state.optimizer_steps == 1
    weights = load_file(str(path / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("nonfinite") == 2


# ---------------------------------------------------------------- config errors and secrets
def test_resuming_with_other_classes_is_refused(synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"classes": ["a", "b"]}))
    assert main(_train_args(synthetic_shards, run)) == 2
    err = capsys.readouterr().err
    assert "new --out" in err and len(err.strip().splitlines()) == 1


def test_no_secret_reaches_any_file(synthetic_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", "hf_" + secret[:30])
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, "tracking.tracker=wandb", "tracking.project=secrets")) == 0
    assert main(["evaluate", "--run", str(run), "--shards", str(synthetic_shards), "--out", str(run / "eval"),
                 "--bootstrap", "0", "--workers", "0"]) == 0
    finish_wandb_writes()  # W&B's own log of the run is complete before it is searched
    leaks = [p for p in run.rglob("*") if p.is_file() and (secret.encode() in p.read_bytes()
                                                            or secret[:30].encode() in p.read_bytes())]
    assert not leaks, f"secret found in {leaks}"
