"""The start-of-run shard check remembers what it verified: a requeue or a second run on an unchanged pack
reads no shard again, a changed shard is read and checked, a damaged one is never remembered (data.strict
still stops at it), and a record copied or forged with a pack is not believed."""

from __future__ import annotations

import json
import os

import hostile
import pytest
from test_remote_shards import ShardServer

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.data import locations
from gastro_dist.data.verified_shards import RECORD_FILE

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train(shards, out, *extra: str) -> int:
    return main(["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *TINY_TRAIN_OVERRIDES,
                 "finetune.epochs=0", *extra])


def _checked_line(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("shards checked"))


@pytest.fixture
def pack(synthetic_shards, tmp_path):
    copied = hostile.copy_pack(synthetic_shards, tmp_path / "pack")
    (copied / RECORD_FILE).unlink(missing_ok=True)
    return copied


def test_a_second_run_reads_nothing_and_a_changed_shard_is_read_again(pack, tmp_path, capsys):
    num_shards = sum(len(hostile.read_index(pack)["splits"][split]["shards"]) for split in ("train", "val"))
    assert _train(pack, tmp_path / "first") == 0
    assert _checked_line(capsys).startswith(f"shards checked against index.json: 0 of {num_shards} unchanged since "
                                            f"verified, {num_shards} read")
    assert _train(pack, tmp_path / "second") == 0  # another run folder, the same pack
    assert f"{num_shards} of {num_shards} unchanged since verified, 0 read" in _checked_line(capsys)
    shard = hostile.shard_path(pack, "train")
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touched: same bytes
    assert _train(pack, tmp_path / "third") == 0
    assert f"{num_shards - 1} of {num_shards} unchanged since verified, 1 read" in _checked_line(capsys)


def test_a_damaged_shard_is_never_remembered_and_strict_still_stops(pack, tmp_path, capsys):
    hostile.replace_shard_bytes(pack, "train", hostile.shard_path(pack, "train").read_bytes()[:-1024],
                                update_sha256=False)
    num_shards = sum(len(hostile.read_index(pack)["splits"][split]["shards"]) for split in ("train", "val"))
    for run, read in (("a", num_shards), ("b", 1)):  # reported on every run, not only the first
        assert _train(pack, tmp_path / run) == 0
        out = capsys.readouterr().out
        assert "sha256 differs from index.json" in out and f", {read} read" in out
    assert _train(pack, tmp_path / "strict", "data.strict=true") != 0
    assert "sha256 differs" in capsys.readouterr().err


def test_a_record_that_came_with_a_pack_or_was_forged_is_not_believed(pack, tmp_path, capsys):
    assert _train(pack, tmp_path / "first") == 0
    capsys.readouterr()
    copied = hostile.copy_pack(pack, tmp_path / "copied")  # the record comes along; the inodes differ
    assert (copied / RECORD_FILE).is_file()
    assert _train(copied, tmp_path / "second") == 0
    assert "0 of " in _checked_line(capsys)
    (pack / RECORD_FILE).write_text("{not json")
    assert _train(pack, tmp_path / "third") == 0
    assert "0 of " in _checked_line(capsys)
    record = json.loads((pack / RECORD_FILE).read_text())  # rewritten whole by that run
    record["index_sha256"] = "0" * 64
    (pack / RECORD_FILE).write_text(json.dumps(record))
    assert _train(pack, tmp_path / "fourth") == 0
    assert "0 of " in _checked_line(capsys)


def test_a_requeued_run_on_shards_at_a_url_downloads_nothing_again(pack, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(locations, "RETRY_BACKOFF_S", 0.01)
    run = tmp_path / "run"
    with ShardServer(pack) as server:
        assert _train(server.url(), run) == 0
        first = _checked_line(capsys)
        assert "0 of " in first and " MB from " in first
        assert (run / RECORD_FILE).is_file()  # a URL's folder cannot hold the record: the run folder does
        assert _train(server.url(), run) == 0  # the requeue: same command, same run folder
        second = _checked_line(capsys)
    assert ", 0 read, 0.0 MB from" in second and " 0 of " not in second
