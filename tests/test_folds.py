"""Cross-validation folds: pack --folds K (patient-grouped, class-stratified, deterministic, the test split
untouched), verify's fold checks, and data.fold's view of the folds as train and val (tiny images, CPU)."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from imagefactory import make_class_tree, read_index, read_split, save_image

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.config import load_config
from gastro_dist.data.pack import PackSettings, pack_dataset
from gastro_dist.data.splitting import assign_folds
from gastro_dist.files import file_sha256
from gastro_dist.data.shard_index import load_shard_index, select_fold
from gastro_dist.data.verify import verify_shards
from gastro_dist.run_dir import RunDir
from gastro_dist.training.trainer import check_run_dir

SMALL = dict(input_size=32, resize_short=48, workers=1, shard_size=5)
CLASSES = ["gastritis", "normal", "ulcer"]
FOLDS = [f"fold-{fold}" for fold in range(3)]


def patients_with_a_duplicate(root: Path) -> Path:
    """Three classes of patients with 1-3 images each, one patient with two findings, and one file
    whose exact bytes were filed for two patients (DUPA, DUPB); returns the manifest."""
    rng = random.Random(5)
    rows = []
    for cls in CLASSES:
        for patient in range(9):
            patient_id = f"{cls[:2].upper()}{patient:02d}"
            for shot in range(rng.randint(1, 3)):
                path = f"frames/{patient_id}_{shot}.png"
                save_image(root / path, seed=len(rows) + 1)
                rows.append({"path": path, "label": cls, "patient_id": patient_id})
    for cls in ("gastritis", "ulcer"):
        save_image(root / f"frames/MULTI_{cls}.png", seed=900 + len(rows))
        rows.append({"path": f"frames/MULTI_{cls}.png", "label": cls, "patient_id": "MULTI"})
    save_image(root / "frames/DUPA.png", seed=999)
    save_image(root / "frames/DUPB_other.png", seed=998)
    shutil.copy(root / "frames/DUPA.png", root / "frames/DUPB.png")  # the same bytes under another patient
    rows += [{"path": "frames/DUPA.png", "label": "normal", "patient_id": "DUPA"},
             {"path": "frames/DUPB.png", "label": "normal", "patient_id": "DUPB"},
             {"path": "frames/DUPB_other.png", "label": "normal", "patient_id": "DUPB"}]
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folds") / "src"
    return root, patients_with_a_duplicate(root)


@pytest.fixture(scope="module")
def fold_pack(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "folds"
    pack_dataset(source[0], out, PackSettings(**SMALL, folds=3, test_per_class=3, seed=4), manifest=source[1])
    return out


# ---------------------------------------------------------------- the assignment itself
def test_one_image_groups_keep_every_class_within_one_image_per_fold():
    """Without patient ids every image is its own group: each class's fold counts differ by at most 1,
    for any class sizes and fold count, and the same seed gives the same folds."""
    rng = random.Random(0)
    for trial in range(200):
        num_folds = rng.randint(2, 6)
        sizes = {f"c{k}": rng.randint(num_folds, 40) for k in range(rng.randint(2, 5))}
        groups = [Counter({cls: 1}) for cls, n in sizes.items() for _ in range(n)]
        rng.shuffle(groups)
        folds = assign_folds(groups, num_folds, random.Random(f"{trial}:folds"))
        for cls in sizes:
            per_fold = Counter(fold for fold, group in zip(folds, groups) if cls in group)
            counts = [per_fold[fold] for fold in range(num_folds)]
            assert max(counts) - min(counts) <= 1, (trial, cls, counts)
        assert folds == assign_folds(groups, num_folds, random.Random(f"{trial}:folds"))


def test_patient_groups_stay_whole_and_classes_spread_by_at_most_a_group():
    rng = random.Random(1)
    for trial in range(100):
        num_folds = rng.randint(2, 5)
        groups = [Counter({f"c{rng.randint(0, 2)}": rng.randint(1, 4)}) for _ in range(rng.randint(3 * num_folds, 60))]
        folds = assign_folds(groups, num_folds, random.Random(trial))
        for cls in {cls for group in groups for cls in group}:
            counts = [sum(group[cls] for fold, group in zip(folds, groups) if fold == f) for f in range(num_folds)]
            largest = max(group[cls] for group in groups)
            assert max(counts) - min(counts) <= largest, (trial, cls, counts)
            if sum(cls in group for group in groups) >= num_folds:
                assert min(counts) > 0, (trial, cls, counts)  # a class with K groups reaches every fold


def test_fewer_groups_than_folds_is_a_user_error():
    with pytest.raises(UserError, match="--folds 4 needs at least 4 patients"):
        assign_folds([Counter(a=2), Counter(b=1), Counter(a=1)], 4, random.Random(0))


# ---------------------------------------------------------------- packing with folds
def test_folds_are_patient_grouped_stratified_and_recorded_in_every_sample(fold_pack, source):
    index = read_index(fold_pack)
    assert list(index["splits"]) == [*FOLDS, "test"]  # no train or val split: data.fold chooses them
    assert index["settings"]["folds"] == 3 and index["settings"]["val_fraction"] is None
    samples = {split: read_split(fold_pack, split) for split in index["splits"]}
    split_of = {"patient_id": {}, "sha256": {}}
    for split, items in samples.items():
        fold = None if split == "test" else int(split.split("-")[1])
        assert len(items) == index["splits"][split]["count"] > 0
        for sample in items:
            assert sample["meta"]["fold"] == fold and sample["key"].startswith(f"{split}_")
            for field, seen in split_of.items():
                assert seen.setdefault(sample["meta"][field], split) == split, f"{field} in two splits"
    # The bytes filed for DUPA and DUPB were packed once (DUPA's copy) and joined the two patients:
    # DUPB's other image is in DUPA's fold.
    rejected = [json.loads(line) for line in (fold_pack / "rejected.jsonl").read_text().splitlines()]
    assert [(entry["patient_id"], entry["duplicate_of"]) for entry in rejected] == [("DUPB", "frames/DUPA.png")]
    assert split_of["patient_id"]["DUPA"] == split_of["patient_id"]["DUPB"] in FOLDS
    assert Counter(s["meta"]["label"] for s in samples["test"]) == dict.fromkeys(CLASSES, 3)
    # every class spread over the folds within its largest patient's share (3 images; MULTI/DUPA hold 1-2 per class)
    for cls in CLASSES:
        counts = [index["splits"][fold]["per_class"][cls] for fold in FOLDS]
        assert max(counts) - min(counts) <= 3 and min(counts) > 0, (cls, counts)
    assert verify_shards(fold_pack) == []


def test_folds_are_deterministic_and_leave_the_test_split_as_without_folds(fold_pack, source, tmp_path):
    pack_dataset(source[0], tmp_path / "again", PackSettings(**SMALL, folds=3, test_per_class=3, seed=4),
                 manifest=source[1])
    assert read_index(tmp_path / "again")["splits"] == read_index(fold_pack)["splits"]  # shard sha256s included

    pack_dataset(source[0], tmp_path / "plain", PackSettings(**SMALL, test_per_class=3, seed=4), manifest=source[1])
    plain, folded = read_index(tmp_path / "plain"), read_index(fold_pack)
    assert plain["splits"]["test"] == folded["splits"]["test"]  # byte-identical test shards
    assert [file_sha256(tmp_path / "plain" / s["file"]) for s in plain["splits"]["test"]["shards"]] == \
        [file_sha256(fold_pack / s["file"]) for s in folded["splits"]["test"]["shards"]]
    sources = lambda out, splits: sorted(s["meta"]["source"] for split in splits for s in read_split(out, split))  # noqa: E731
    assert sources(fold_pack, FOLDS) == sources(tmp_path / "plain", ["train", "val"])


# ---------------------------------------------------------------- verify
def _rewrite_shard(pack_dir: Path, split: str, edit_json) -> None:
    """Rewrite a shard's first sample's json with `edit_json`, and index.json to match the new bytes."""
    index = read_index(pack_dir)
    entry = index["splits"][split]["shards"][0]
    shard = pack_dir / entry["file"]
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    edited = False
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith(".json") and not edited:
                data = json.dumps(edit_json(json.loads(data))).encode()
                member.size, edited = len(data), True
            tar.addfile(member, io.BytesIO(data))
    entry["sha256"] = file_sha256(shard)
    (pack_dir / "index.json").write_text(json.dumps(index))


def test_verify_reports_a_sample_in_the_wrong_fold_and_an_inconsistent_index(fold_pack, tmp_path, capsys):
    copy = Path(shutil.copytree(fold_pack, tmp_path / "pack"))
    _rewrite_shard(copy, "fold-0", lambda meta: {**meta, "fold": 1})
    _rewrite_shard(copy, "test", lambda meta: {**meta, "fold": 2})
    problems = verify_shards(copy)
    assert len(problems) == 2, problems
    assert "json fold is 1 but the sample is in fold-0" in problems[0]
    assert "json fold is 2 but test is not a fold" in problems[1]

    index = read_index(copy)
    index["settings"]["folds"] = 4
    (copy / "index.json").write_text(json.dumps(index))
    problems = verify_shards(copy)
    assert len(problems) == 1 and "settings.folds is 4 but the fold splits are" in problems[0], problems
    capsys.readouterr()


# ---------------------------------------------------------------- data.fold
def test_data_fold_trains_on_the_other_folds_and_validates_on_its_own(fold_pack):
    index = load_shard_index(fold_pack)
    assert index.num_folds == 3
    view = select_fold(index, 1)
    assert set(view.splits) == {"train", "val", "test"}
    assert view.shards("val") == index.shards("fold-1")
    assert view.shards("train") == index.shards("fold-0") + index.shards("fold-2")
    assert view.count("train") + view.count("val") == sum(index.count(split) for split in FOLDS)
    for cls in index.classes:
        assert view.per_class("train")[cls] == index.per_class("fold-0")[cls] + index.per_class("fold-2")[cls]
    assert view.shards("test") == index.shards("test") and view.index_sha256 == index.index_sha256

    with pytest.raises(UserError, match="packed with --folds 3.*data.fold=N"):
        select_fold(index, None)
    with pytest.raises(UserError, match="has 3 folds: choose 0..2"):
        select_fold(index, 3)


def test_data_fold_needs_a_folded_pack_and_a_run_folder_keeps_its_fold(fold_pack, tmp_path):
    make_class_tree(tmp_path / "src", {"a": 4, "b": 4})
    pack_dataset(tmp_path / "src", tmp_path / "plain", PackSettings(**SMALL, val_fraction=0.25))
    plain = load_shard_index(tmp_path / "plain")
    assert plain.num_folds == 0 and select_fold(plain, None) is plain
    with pytest.raises(UserError, match="packed without --folds"):
        select_fold(plain, 0)

    index = select_fold(load_shard_index(fold_pack), 0)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_summary({"model": "resnet18", "classes": index.classes, "image_size": 64, "fold": 0,
                       "shards_index_sha256": index.index_sha256})
    config = load_config(None, ["model.name=resnet18", "data.image_size=64", "data.fold=0"])
    check_run_dir(run, config, index)  # the same fold resumes
    with pytest.raises(UserError, match="fold was 0, now 1"):
        check_run_dir(run, load_config(None, ["model.name=resnet18", "data.image_size=64", "data.fold=1"]), index)
    with pytest.raises(UserError, match="fold must be a fold number >= 0"):
        load_config(None, ["data.fold=-1"])


def test_pack_folds_on_the_command_line(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"a": 5, "b": 4})
    common = ["pack", str(tmp_path / "src"), "--input-size", "32", "--resize-short", "48", "--workers", "1"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--folds", "1"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad"), "--folds", "2", "--val-fraction", "0.2"]) == 2
    assert "--folds and --val-fraction exclude each other" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "ok"), "--folds", "2"]) == 0
    index = read_index(tmp_path / "ok")
    assert [index["splits"][split]["per_class"] for split in ("fold-0", "fold-1")] == [{"a": 3, "b": 2},
                                                                                         {"a": 2, "b": 2}]
    assert main(["verify", str(tmp_path / "ok")]) == 0
