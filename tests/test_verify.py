"""Verifying packs: a good pack passes; damaged shards or a tampered index are reported, never a traceback."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from imagefactory import make_class_tree, read_index

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data.pack import PackSettings, pack_dataset
from gastro_dist.data.verify import verify_shards


@pytest.fixture(scope="module")
def good_pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    make_class_tree(root / "src", {"a": 6, "b": 6, "c": 6})
    settings = PackSettings(input_size=32, resize_short=48, workers=1, val_fraction=0.2, shard_size=4)
    pack_dataset(root / "src", root / "pack", settings)
    return root / "pack"


@pytest.fixture
def pack_copy(good_pack, tmp_path) -> Path:
    return Path(shutil.copytree(good_pack, tmp_path / "pack"))


def rewrite_index(pack_dir: Path, edit) -> None:
    index = read_index(pack_dir)
    edit(index)
    (pack_dir / "index.json").write_text(json.dumps(index))


def test_good_pack_is_ok(good_pack, capsys):
    assert verify_shards(good_pack) == []
    assert capsys.readouterr().out.strip() == "OK: 18 samples in 5 shards"  # train 15 in 4 shards of <= 4, val 3 in 1
    assert main(["verify", str(good_pack)]) == 0


def test_truncated_shard_is_caught_without_traceback(pack_copy, capsys):
    shard = pack_copy / read_index(pack_copy)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    problems = verify_shards(pack_copy)
    assert any("sha256 differs" in problem for problem in problems)
    read_problems = [problem for problem in problems if "unreadable tar" in problem or "index.json lists" in problem]
    assert read_problems and all(problem.startswith(shard.name) for problem in read_problems)
    capsys.readouterr()
    assert main(["verify", str(pack_copy)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.startswith("PROBLEM: ")


def test_modified_count_and_stray_tar_are_problems(pack_copy):
    def bump_count(index):
        index["splits"]["val"]["shards"][0]["count"] += 1

    rewrite_index(pack_copy, bump_count)
    (pack_copy / "train-999999.tar").write_bytes(b"")
    problems = verify_shards(pack_copy)
    assert any("holds" in problem and "index.json lists" in problem for problem in problems)
    assert any("train-999999.tar: not listed in index.json" == problem for problem in problems)


def test_wrong_class_index_is_a_problem(pack_copy):
    shard = pack_copy / read_index(pack_copy)["splits"]["train"]["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".cls"):
                data = str((int(data) + 1) % 3).encode()
            tar.addfile(member, io.BytesIO(data))
    problems = verify_shards(pack_copy)
    assert any(" but label " in problem for problem in problems)


def test_missing_index_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="not a finished pack"):
        verify_shards(tmp_path)
    assert main(["verify", str(tmp_path)]) == 2
