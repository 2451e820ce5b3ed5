"""Shards as untrusted input: broken or lying shard sets never hang training, never crash it with a
traceback, and never give a silently wrong result. Each case is one hostile copy of the session's
pack (see tests/hostile.py); runs that could hang run in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import hostile
from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.training import checkpoint as ckpt

pytestmark = pytest.mark.slow  # end to end: trains, packs or launches processes

SMOKE = str(REPO / "configs" / "smoke.yaml")
HANG_TIMEOUT_S = 240  # a hang fails the test instead of stalling the suite


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *TINY_TRAIN_OVERRIDES,
            "finetune.epochs=0", *extra]


def _train_subprocess(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gastro_dist", *_train_args(shards, out, *extra)], env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT_S)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if "gastro-dist" in line and "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture
def shards(synthetic_shards, tmp_path) -> Path:
    return hostile.copy_pack(synthetic_shards, tmp_path / "shards")


# ---------------------------------------------------------------- nothing usable: stop, never spin
@pytest.mark.parametrize("payload", ["random", "empty"])
def test_train_shards_with_nothing_readable_stop_with_one_line(shards, tmp_path, payload):
    num_train_shards = len(hostile.read_index(shards)["splits"]["train"]["shards"])
    for position in range(num_train_shards):
        data = random.Random(position).randbytes(30_000) if payload == "random" else b""
        hostile.replace_shard_bytes(shards, "train", data, position)
    result = _train_subprocess(shards, tmp_path / "run", "data.num_workers=2")
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert "no readable sample in the train split" in line and "train-0" in line


def test_truncated_shard_with_two_workers_trains_and_reports(shards, tmp_path):
    """Each worker reads its own chunk: the one whose chunk was cut away refills instead of spinning."""
    path = hostile.shard_path(shards, "train")
    path.write_bytes(path.read_bytes()[:2048])  # one sample left, cut inside the next
    result = _train_subprocess(shards, tmp_path / "run", "data.num_workers=2", "data.batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(tmp_path / "run")
    assert any(path.name in p and "sha256 differs" in p for p in summary["shard_problems"])
    held = [p for p in summary["shard_problems"] if path.name in p and "index.json lists 8" in p]
    assert len(held) == 1
    # planned on the samples really there (the cut one takes a position too): full batches, equal on every rank
    num_held = int(held[0].split(" holds ")[1].split()[0])
    assert num_held < 8
    readable = hostile.read_index(shards)["splits"]["train"]["count"] - 8 + num_held
    assert summary["phases"]["head"]["steps"] == readable // 4


def test_negative_count_in_index_is_one_line(shards, tmp_path):
    def negative(index: dict) -> None:
        index["splits"]["train"]["shards"][0]["count"] = -5
    hostile.edit_index(shards, negative)
    result = _train_subprocess(shards, tmp_path / "run")
    assert result.returncode == 1
    assert "count -5 is not a whole number" in _error_line(result.stderr)


def test_fifo_in_place_of_a_shard_does_not_block(shards, tmp_path):
    path = hostile.shard_path(shards, "train")
    path.unlink()
    os.mkfifo(path)
    result = _train_subprocess(shards, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(path.name in p and "not a regular file" in p for p in _summary(tmp_path / "run")["shard_problems"])


def test_unreadable_val_split_is_one_line_not_nan(shards, tmp_path):
    for position in range(len(hostile.read_index(shards)["splits"]["val"]["shards"])):
        hostile.replace_shard_bytes(shards, "val", b"\0" * 10_000, position)
    code = main(_train_args(shards, tmp_path / "run"))
    assert code == 1


# ---------------------------------------------------------------- labels and counts are checked
@pytest.mark.parametrize("bad_label", [b"7", b"-100", b"1.5", b"x"])
def test_labels_outside_the_classes_are_skipped_and_counted(shards, tmp_path, bad_label):
    hostile.rewrite_shard(shards, "train", lambda members: hostile.set_labels(members, bad_label, count=2))
    assert main(_train_args(shards, tmp_path / "run")) == 0
    reasons = _summary(tmp_path / "run")["skipped_samples"]["reasons"]
    assert sum("is not a class index" in r for r in reasons) == 2, reasons


def test_index_listing_more_samples_than_a_shard_holds_is_planned_around(shards, tmp_path):
    def inflate(index: dict) -> None:
        split = index["splits"]["train"]
        split["shards"][0]["count"] += 1000  # would silently repeat samples for 1000 more positions
        split["count"] += 1000
        first_class = next(iter(split["per_class"]))
        split["per_class"][first_class] += 1000
    hostile.edit_index(shards, inflate)
    run = tmp_path / "run"
    assert main(_train_args(shards, run)) == 0
    summary = _summary(run)
    real_count = hostile.read_index(shards)["splits"]["train"]["count"] - 1000
    assert summary["phases"]["head"]["steps"] == real_count // 8
    assert any("index.json lists 1008" in p for p in summary["shard_problems"])


def test_shard_holding_more_samples_than_listed_is_refused(shards, tmp_path, capsys):
    def deflate(index: dict) -> None:
        split = index["splits"]["train"]
        split["shards"][0]["count"] -= 3  # would silently drop the last 3 samples
        split["count"] -= 3
        first_class = next(c for c, n in split["per_class"].items() if n >= 3)
        split["per_class"][first_class] -= 3
    hostile.edit_index(shards, deflate)
    assert main(_train_args(shards, tmp_path / "run")) == 1
    assert "do not belong together" in capsys.readouterr().err


def test_sha256_mismatch_is_reported_and_stops_a_strict_run(shards, tmp_path, capsys):
    path = hostile.rewrite_shard(shards, "train", lambda members: hostile.set_sample_json(members, b'{"x": 1}', 1),
                                 update_sha256=False)
    assert main(_train_args(shards, tmp_path / "run")) == 0
    assert any(path.name in p and "sha256 differs" in p for p in _summary(tmp_path / "run")["shard_problems"])
    capsys.readouterr()
    assert main(_train_args(shards, tmp_path / "strict", "data.strict=true")) == 1
    assert "sha256 differs" in capsys.readouterr().err


# ---------------------------------------------------------------- names, sizes, bombs
def test_keys_that_are_not_plain_names_are_skipped_by_training_and_refused_by_verify(shards, tmp_path, capsys):
    def escape(members):
        keys = sorted({name.split(".")[0] for name, _ in members})
        renamed = dict(zip(keys, ["../../escaped", "/tmp/absolute", "sub/dir"]))
        return hostile.rename_keys(members, lambda key: renamed.get(key, key))
    hostile.rewrite_shard(shards, "train", escape)
    assert main(["verify", str(shards)]) == 1
    assert "not a plain name" in capsys.readouterr().err
    assert main(_train_args(shards, tmp_path / "run")) == 0
    reasons = _summary(tmp_path / "run")["skipped_samples"]["reasons"]
    assert sum("not a plain name" in r for r in reasons) >= 1


def test_sparse_multi_gigabyte_member_is_refused_without_reading_it(shards, tmp_path):
    index = hostile.read_index(shards)
    name = index["splits"]["train"]["shards"][0]["file"]
    members = hostile.read_members(shards / name)
    first_jpg = next(n for n, _ in members if n.endswith(".jpg"))
    hostile.write_sparse_member_tar(shards / name, members, first_jpg, 2 * 1024**3)
    hostile.edit_index(shards, lambda i: i["splits"]["train"]["shards"][0].update(sha256=hostile.sha256(shards / name)))
    assert (shards / name).stat().st_size < 200_000

    def limit_memory() -> None:  # reading the member whole would need 2 GB: it would fail, not pass
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run([sys.executable, "-m", "gastro_dist", "verify", str(shards)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=limit_memory,
                            capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert result.returncode == 1 and "above the" in result.stderr, result.stderr[-3000:]

    result = _train_subprocess(shards, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = _summary(tmp_path / "run")["skipped_samples"]["reasons"]
    assert any("data.max_member_mb" in r for r in reasons)


def test_image_header_declaring_a_huge_frame_is_skipped(shards, tmp_path):
    bomb = bytearray(hostile.jpeg_bytes())
    marker = bomb.find(b"\xff\xc0")
    bomb[marker + 5:marker + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")

    def plant(members):
        return [(n, bytes(bomb)) if n.endswith(".jpg") and i < 6 else (n, d) for i, (n, d) in enumerate(members)]
    hostile.rewrite_shard(shards, "train", plant)
    assert main(_train_args(shards, tmp_path / "run")) == 0
    reasons = _summary(tmp_path / "run")["skipped_samples"]["reasons"]
    assert any("decompression bomb" in r for r in reasons)


# ---------------------------------------------------------------- run folders and checkpoints
def test_finished_run_with_another_model_or_other_shards_is_refused(shards, synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run)) == 0
    config_before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(_train_args(synthetic_shards, run, "model.name=resnet34")) == 2
    err = capsys.readouterr().err
    assert "model was 'shufflenet_v2_x0_5', now 'resnet34'" in err and len(err.strip().splitlines()) == 1
    hostile.edit_index(shards, lambda index: index.update(created="another pack"))
    assert main(_train_args(shards, run)) == 2
    assert "index.json differs" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config_before, "the refused command changed the run folder"
    # the same shards copied elsewhere are the same shard set
    copied = hostile.copy_pack(synthetic_shards, tmp_path / "copied")
    assert main(_train_args(copied, run)) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    extra = ["finetune.epochs=2", "keep_checkpoints=3"]
    assert main(_train_args(synthetic_shards, run, *extra)) == 0
    states = ckpt.complete_states(run)
    assert len(states) >= 2
    newest = states[-1][1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated after it was committed
    (run / "summary.json").unlink()  # so that the run is not "already complete"
    capsys.readouterr()
    assert main(_train_args(synthetic_shards, run, *extra)) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {states[-1][1].name} is damaged" in out and "previous complete one" in out


def test_garbage_pretrained_file_and_non_utf8_config_are_one_line(synthetic_shards, tmp_path, capsys):
    garbage = tmp_path / "x.safetensors"
    garbage.write_bytes(b"\x00garbage" * 100)
    assert main(_train_args(synthetic_shards, tmp_path / "r1", f"model.pretrained={garbage}")) == 2
    err = capsys.readouterr().err
    assert "not a readable .safetensors file" in err and len(err.strip().splitlines()) == 1
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model:\n  name: resnet18  # r\xe9seau\n".encode("latin-1"))
    assert main(["train", "--config", str(latin1), "--shards", str(synthetic_shards), "--out", str(tmp_path / "r2")]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_config_accepts_every_float_spelling_and_refuses_negative_class_weights(synthetic_shards, tmp_path, capsys):
    from gastro_dist.config import load_config

    config = load_config(SMOKE, ["head.lr=1e-3", "finetune.backbone_lr=2E-4", "label_smoothing=.05"])
    assert (config.head.lr, config.finetune.backbone_lr, config.label_smoothing) == (1e-3, 2e-4, 0.05)
    assert main(_train_args(synthetic_shards, tmp_path / "r", "class_weights=[1,-1,1]")) == 2
    assert "class_weights must be numbers >= 0" in capsys.readouterr().err
