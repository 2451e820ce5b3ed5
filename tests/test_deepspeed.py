"""DeepSpeed ZeRO stage 2 under `accelerate launch` with two CPU processes (gloo): training,
checkpointing, preemption + resume, and evaluation of the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.training import checkpoint as ckpt

pytestmark = pytest.mark.slow  # end to end: trains, packs or launches processes

pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'gastro-dist[deepspeed]')")
pytest.importorskip("transformers", reason="accelerate's DeepSpeed plugin needs transformers")


def _launch(shards: Path, run: Path, *extra: str) -> subprocess.Popen:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "launch" / "deepspeed_zero2.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "gastro_dist", "train",
           "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", str(shards), "--out", str(run),
           *TINY_TRAIN_OVERRIDES, "data.batch_size=4", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_zero2_trains_checkpoints_resumes_and_evaluates(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    process = _launch(synthetic_shards, run, "finetune.epochs=2", "checkpoint_every_steps=1")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any(s.phase == "finetune" for s, _ in ckpt.complete_states(run)):
            (run / ".preempt_requested").touch()
            break
        time.sleep(0.05)
    output = process.communicate(timeout=300)[0]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "preempted", output[-3000:]
    state, path = ckpt.latest_state(run)
    assert (path / "pytorch_model").is_dir(), "not a DeepSpeed checkpoint"

    process = _launch(synthetic_shards, run, "finetune.epochs=2", "checkpoint_every_steps=1")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert len(summary["resumes"]) == 1 and summary["resumes"][0]["phase"] == "finetune"
    checksums = summary["rank_param_checksums"]
    assert checksums[0] == checksums[1]
    steps = [(e["epoch"], e["step"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "train" and e["phase"] == "finetune"]
    assert steps == sorted(set(steps)) and len(steps) == summary["phases"]["finetune"]["micro_steps_per_epoch"] * 2

    assert main(["evaluate", "--run", str(run), "--shards", str(synthetic_shards), "--out", str(tmp_path / "eval"),
                 "--bootstrap", "0", "--workers", "0"]) == 0
