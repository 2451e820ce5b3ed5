"""Packing image trees into shards: inputs, validation, splits, shard contents, CLI (tiny images, CPU)."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from imagefactory import (
    jpeg_bytes,
    make_class_tree,
    noise_image,
    png_header_only,
    read_index,
    read_jsonl,
    read_split,
    save_image,
    truncated_jpeg_bytes,
)
from PIL import Image

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data.images import BadImage, load_rgb
from gastro_dist.data.pack import PackSettings, pack_dataset
from gastro_dist.data.shard_index import SPLITS

SMALL = dict(input_size=32, resize_short=48, workers=1)  # tiny stored images keep the tests fast


def pack(src: Path, out: Path, **overrides):
    settings = PackSettings(**{**SMALL, **overrides.pop("settings", {})})
    return pack_dataset(src, out, settings, **overrides)


def all_samples(out: Path) -> dict[str, list[dict]]:
    return {split: read_split(out, split) for split in SPLITS}


def assert_totals_add_up(out: Path) -> dict:
    totals = read_index(out)["totals"]
    assert totals["files_seen"] == totals["packed"] + totals["rejected"] + totals["skipped"]
    assert totals["rejected"] == len(read_jsonl(out / "rejected.jsonl"))
    assert totals["skipped"] == len(read_jsonl(out / "skipped.jsonl"))
    return totals


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def patient_dataset(root: Path, num_patients_per_class: int = 8) -> Path:
    """Three classes, patients with 1-3 images each, one patient with images in two classes; returns the manifest."""
    rng = np.random.default_rng(1)
    rows = []
    for class_number, cls in enumerate(["gastritis", "normal", "ulcer"]):
        for patient in range(num_patients_per_class):
            patient_id = f"{cls[:2].upper()}{patient:03d}"
            for shot in range(int(rng.integers(1, 4))):
                path = f"frames/{patient_id}_{shot}.png"
                save_image(root / path, seed=len(rows) + 1)
                rows.append({"path": path, "label": cls, "patient_id": patient_id, "scanner": "x"})
    for cls in ("gastritis", "ulcer"):  # one patient seen with two findings
        path = f"frames/MULTI_{cls}.jpg"
        save_image(root / path, seed=500 + len(rows))
        rows.append({"path": path, "label": cls, "patient_id": "MULTI", "scanner": "y"})
    return write_manifest(root / "manifest.csv", rows)


# ---------------------------------------------------------------- class folders
@pytest.mark.parametrize("class_names", [
    ["Barrett's oesophagus", "normal-z-line", "polyp (sessile)"],
    ["a", "b", "c", "d"],
    ["normal", "abnormal"],
])
def test_class_tree_round_trip_with_plain_webdataset(tmp_path, class_names):
    counts = {cls: 7 + i for i, cls in enumerate(class_names)}
    make_class_tree(tmp_path / "src", counts)
    result = pack(tmp_path / "src", tmp_path / "out", settings=dict(val_fraction=0.2, shard_size=5))

    index = read_index(tmp_path / "out")
    classes = sorted(class_names)
    assert index["classes"] == classes == result.classes
    samples = all_samples(tmp_path / "out")
    packed = [sample for split in SPLITS for sample in samples[split]]
    assert len(packed) == result.packed == sum(counts.values())
    assert len({sample["key"] for sample in packed}) == len(packed)
    assert all("." not in sample["key"] for sample in packed)
    assert Counter(sample["meta"]["label"] for sample in packed) == counts
    for sample in packed:
        meta = sample["meta"]
        assert sample["cls"] == classes.index(meta["label"])
        assert meta["source"].split("/")[0] == meta["label"]  # the class is the first-level folder
        assert sample["img"].mode == "RGB" and list(sample["img"].size) == meta["stored_size"]
        source_bytes = (tmp_path / "src" / meta["source"]).read_bytes()
        assert meta["sha256"] == hashlib.sha256(source_bytes).hexdigest()
    for split in SPLITS:
        info = index["splits"][split]
        assert info["count"] == len(samples[split])
        assert info["per_class"] == {cls: sum(s["meta"]["label"] == cls for s in samples[split]) for cls in classes}
        for shard in info["shards"]:
            data = (tmp_path / "out" / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert 1 <= shard["count"] <= 5
        assert sum(shard["count"] for shard in info["shards"]) == info["count"]
    assert all(count >= 1 for count in index["splits"]["val"]["per_class"].values())
    assert index["splits"]["test"] == {"count": 0, "per_class": dict.fromkeys(classes, 0), "patients": 0, "shards": []}
    assert not list((tmp_path / "out").glob("test-*.tar"))  # an empty split writes no tar
    assert assert_totals_add_up(tmp_path / "out")["packed"] == result.packed


def test_symlink_loop_is_listed_and_does_not_hang(tmp_path):
    make_class_tree(tmp_path / "src", {"a": 3, "b": 3})
    (tmp_path / "src" / "a" / "loop").symlink_to(tmp_path / "src" / "a", target_is_directory=True)
    (tmp_path / "src" / "b-link").symlink_to(tmp_path / "src" / "b", target_is_directory=True)
    pack(tmp_path / "src", tmp_path / "out")
    skipped = {entry["path"]: entry["reason"] for entry in read_jsonl(tmp_path / "out" / "skipped.jsonl")}
    assert skipped["a/loop/"] == "symlink loop"
    assert skipped["b-link/"] == "already scanned: same folder as b"
    assert read_index(tmp_path / "out")["totals"]["packed"] == 6


def test_class_map_merges_folders_and_matches_nested_paths(tmp_path):
    src = tmp_path / "src"
    folders = [("lower-gi/findings/polyps", 4), ("lower-gi/findings/polyps/small", 2), ("lower-gi/landmarks/cecum", 3),
               ("upper-gi/z-line", 3), ("upper-gi/pylorus", 3), ("unsorted", 2)]
    for folder_number, (folder, num_images) in enumerate(folders):
        for i in range(num_images):
            save_image(src / folder / f"{i}.jpg", seed=100 * folder_number + i)
    class_map = tmp_path / "map.yaml"
    class_map.write_text("lower-gi/findings/polyps: polyp\nlower-gi/landmarks/cecum: landmark\n"
                         "upper-gi/z-line: landmark\nupper-gi/pylorus: landmark\nmissing-folder: other\n")
    pack(src, tmp_path / "out", class_map=class_map)

    index = read_index(tmp_path / "out")
    assert index["classes"] == ["landmark", "polyp"]
    per_class = Counter(s["meta"]["label"] for split in SPLITS for s in read_split(tmp_path / "out", split))
    assert per_class == {"polyp": 6, "landmark": 9}  # nested polyps/small inherits the longest mapped prefix
    skipped = read_jsonl(tmp_path / "out" / "skipped.jsonl")
    assert sorted(entry["path"] for entry in skipped) == ["unsorted/0.jpg", "unsorted/1.jpg"]
    assert {entry["reason"] for entry in skipped} == {"no class mapping"}
    assert_totals_add_up(tmp_path / "out")


def test_resize_short_never_upscales_and_zero_keeps_sizes(tmp_path):
    save_image(tmp_path / "src" / "a" / "big.jpg", size=(160, 120), seed=1)
    save_image(tmp_path / "src" / "a" / "portrait.png", size=(90, 150), seed=2)
    save_image(tmp_path / "src" / "b" / "small.jpg", size=(64, 40), seed=3)
    save_image(tmp_path / "src" / "b" / "other.jpg", size=(100, 100), seed=4)
    pack(tmp_path / "src", tmp_path / "out", settings=dict(resize_short=60, val_fraction=0))
    stored = {s["meta"]["source"]: s["meta"]["stored_size"] for s in read_split(tmp_path / "out", "train")}
    assert stored == {"a/big.jpg": [80, 60], "a/portrait.png": [60, 100],
                      "b/small.jpg": [64, 40], "b/other.jpg": [60, 60]}  # small.jpg is not upscaled

    pack(tmp_path / "src", tmp_path / "out0", settings=dict(resize_short=0, val_fraction=0))
    for sample in read_split(tmp_path / "out0", "train"):
        assert sample["meta"]["stored_size"] == sample["meta"]["orig_size"]
    assert PackSettings().stored_short_side_px == 256 and PackSettings(input_size=299).stored_short_side_px == 342


# ---------------------------------------------------------------- manifests and splits
def test_manifest_patients_never_straddle_splits_and_test_is_exact(tmp_path):
    manifest = patient_dataset(tmp_path / "src")
    settings = dict(test_per_class=3, val_fraction=0.2, seed=7)
    pack(tmp_path / "src", tmp_path / "out", manifest=manifest, settings=settings)

    samples = all_samples(tmp_path / "out")
    assert Counter(s["meta"]["label"] for s in samples["test"]) == {"gastritis": 3, "normal": 3, "ulcer": 3}
    split_of_patient: dict[str, set[str]] = {}
    for split in SPLITS:
        for sample in samples[split]:
            split_of_patient.setdefault(sample["meta"]["patient_id"], set()).add(split)
    assert all(len(splits) == 1 for splits in split_of_patient.values()), split_of_patient
    assert all(n >= 1 for n in read_index(tmp_path / "out")["splits"]["val"]["per_class"].values())
    rows = list(csv.DictReader((tmp_path / "src" / "manifest.csv").open()))
    assert sum(len(samples[split]) for split in SPLITS) == len(rows)

    # same seed: identical membership and byte-identical shards (tar mtimes are fixed)
    pack(tmp_path / "src", tmp_path / "again", manifest=manifest, settings=settings)
    assert read_index(tmp_path / "again")["splits"] == read_index(tmp_path / "out")["splits"]
    pack(tmp_path / "src", tmp_path / "seed8", manifest=manifest, settings={**settings, "seed": 8})
    membership = {split: {s["meta"]["source"] for s in read_split(tmp_path / "seed8", split)} for split in SPLITS}
    assert membership != {split: {s["meta"]["source"] for s in samples[split]} for split in SPLITS}


def test_two_workers_give_the_same_shards_as_one(tmp_path):
    manifest = patient_dataset(tmp_path / "src", num_patients_per_class=5)
    pack(tmp_path / "src", tmp_path / "one", manifest=manifest, settings=dict(test_fraction=0.2))
    pack(tmp_path / "src", tmp_path / "two", manifest=manifest, settings=dict(test_fraction=0.2, workers=2))
    assert read_index(tmp_path / "two")["splits"] == read_index(tmp_path / "one")["splits"]
    assert read_index(tmp_path / "two")["splits"]["test"]["count"] > 0


def test_without_patient_ids_each_image_is_its_own_group(tmp_path):
    rows = []
    for cls in ("a", "b"):
        for i in range(10):
            save_image(tmp_path / "src" / f"{cls}{i}.png", seed=len(rows))
            rows.append({"path": f"{cls}{i}.png", "label": cls})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    pack(tmp_path / "src", tmp_path / "out", manifest=manifest, settings=dict(val_fraction=0.3, test_per_class=2))
    index = read_index(tmp_path / "out")
    assert index["splits"]["val"]["per_class"] == {"a": 2, "b": 2}  # round(0.3 * 8): single images fill exactly
    assert index["splits"]["test"]["per_class"] == {"a": 2, "b": 2}
    assert all(s["meta"]["patient_id"] is None for s in read_split(tmp_path / "out", "train"))


def test_test_per_class_that_a_class_cannot_give_is_a_user_error(tmp_path):
    make_class_tree(tmp_path / "src", {"a": 6, "b": 3})
    with pytest.raises(UserError, match="too few in: b"):
        pack(tmp_path / "src", tmp_path / "out", settings=dict(test_per_class=3))
    rows = [{"path": f"{i}.png", "label": "a", "patient_id": "P1" if i < 3 else "P2"} for i in range(6)]
    for i in range(6):
        save_image(tmp_path / "m" / f"{i}.png", seed=100 + i)
    manifest = write_manifest(tmp_path / "m" / "manifest.csv", rows)
    with pytest.raises(UserError, match="exactly 2 test images"):  # two patients of 3 images each
        pack(tmp_path / "m", tmp_path / "out2", manifest=manifest, settings=dict(test_per_class=2))


def test_duplicates_are_dropped_within_a_label_and_reported_across_labels(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"a": 6, "b": 6})
    same = jpeg_bytes(seed=42)
    for path in ("a/copy1.jpg", "a/copy2.jpg", "b/conflict.jpg", "b/also_b.jpg"):
        (src / path).write_bytes(same)
    pack(src, tmp_path / "out", settings=dict(val_fraction=0.4))

    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert sorted((r["path"], r["reason"]) for r in rejected) == [
        ("a/copy2.jpg", "duplicate of a/copy1.jpg"), ("b/conflict.jpg", "duplicate of b/also_b.jpg")]
    conflicts = read_jsonl(tmp_path / "out" / "duplicates.jsonl")
    assert len(conflicts) == 1 and conflicts[0]["sha256"] == hashlib.sha256(same).hexdigest()
    assert {copy["label"] for copy in conflicts[0]["copies"]} == {"a", "b"}
    packed_copies = [(split, s["meta"]["source"]) for split in SPLITS for s in read_split(tmp_path / "out", split)
                     if s["meta"]["sha256"] == conflicts[0]["sha256"]]
    assert sorted(source for _, source in packed_copies) == ["a/copy1.jpg", "b/also_b.jpg"]
    assert len({split for split, _ in packed_copies}) == 1  # identical bytes never in two splits
    totals = assert_totals_add_up(tmp_path / "out")
    assert (totals["duplicates_dropped"], totals["label_conflicts"], totals["packed"]) == (2, 1, 14)


# ---------------------------------------------------------------- validation and conversion
def awkward_tree(src: Path) -> None:
    """Class 'ok' holds plain images; class 'odd' every mode we convert; 'bad' every kind of reject."""
    make_class_tree(src, {"ok": 4})
    odd = src / "odd"
    save_image(odd / "gray.JPEG", img=noise_image(seed=1).convert("L"))
    palette = Image.new("P", (64, 48), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.paste(2, (0, 0, 32, 48))  # left half green index 2, transparent
    save_image(odd / "palette.png", img=palette, transparency=2)
    save_image(odd / "cmyk.jpg", img=Image.new("CMYK", (64, 48), (0, 255, 255, 0)))  # red in CMYK
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (32, 0, 64, 48))  # right half fully transparent green
    save_image(odd / "rgba.png", img=rgba)
    save_image(odd / "sixteen.png", img=Image.fromarray(np.full((48, 64), 32896, dtype=np.uint16)))  # 32896/257 = 128
    save_image(odd / "scan.TIF", seed=5)
    save_image(odd / "scan.bmp", seed=6)
    rotated = Image.new("RGB", (96, 64), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 24, 16))  # red marker top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    save_image(odd / "rotated.jpg", img=rotated, exif=exif.tobytes(), quality=95)
    bad = src / "bad"
    save_image(bad / "fine.jpg", seed=7)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (bad / "truncated.jpg").write_bytes(truncated_jpeg_bytes())
    (bad / "text.png").write_text("this is not a png\n")
    (bad / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # PIL's own hard limit
    (bad / "large.png").write_bytes(png_header_only(12_000, 10_000))  # our 100 MP limit
    (bad / "notes.txt").write_text("exported by the scope\n")
    (bad / ".DS_Store").write_bytes(b"\0\0")
    (src / "README.md").write_text("top-level file\n")


def test_bad_files_are_rejected_with_reasons_and_odd_modes_are_converted(tmp_path):
    awkward_tree(tmp_path / "src")
    result = pack(tmp_path / "src", tmp_path / "out", settings=dict(resize_short=0, val_fraction=0))

    rejected = {Path(r["path"]).name: r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert {name: r["reason"].split(":")[0] for name, r in rejected.items()} == {
        "empty.jpg": "empty file", "random.jpg": "not an image", "truncated.jpg": "truncated image",
        "text.png": "not an image", "bomb.png": "decompression bomb", "large.png": "decompression bomb"}
    assert all(r["label"] == "bad" for r in rejected.values())
    skipped = {r["path"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "skipped.jsonl")}
    assert skipped == {"bad/.DS_Store": "hidden file", "bad/notes.txt": "not an image extension",
                       "README.md": "not an image extension"}
    totals = assert_totals_add_up(tmp_path / "out")
    assert (totals["files_seen"], totals["packed"], result.packed) == (22, 13, 13)

    stored = {s["meta"]["source"]: s for s in read_split(tmp_path / "out", "train")}
    assert "bad/fine.jpg" in stored and all(s["img"].mode == "RGB" for s in stored.values())

    def pixel(source: str, xy: tuple[int, int]) -> np.ndarray:
        return np.asarray(stored[source]["img"], dtype=int)[xy[1], xy[0]]

    assert np.abs(pixel("odd/rgba.png", (8, 24)) - [255, 0, 0]).max() < 20
    assert np.abs(pixel("odd/rgba.png", (56, 24))).max() < 20  # transparency composited on black
    assert np.abs(pixel("odd/palette.png", (8, 24))).max() < 20 and pixel("odd/palette.png", (56, 24))[0] > 230
    assert np.abs(pixel("odd/sixteen.png", (30, 20)) - 128).max() <= 3  # scaled, not clipped to 255
    assert pixel("odd/cmyk.jpg", (30, 20))[0] > 230 and pixel("odd/cmyk.jpg", (30, 20))[1] < 30
    meta = stored["odd/rotated.jpg"]["meta"]
    assert meta["orig_size"] == [96, 64] and meta["stored_size"] == [64, 96]
    assert pixel("odd/rotated.jpg", (58, 5))[0] > 200 and pixel("odd/rotated.jpg", (5, 5))[2] > 200  # marker top-right


def test_load_rgb_limit_and_reasons():
    assert load_rgb(jpeg_bytes()).size == (128, 96)
    assert load_rgb(jpeg_bytes(), min_short_side_px=40).size == (64, 48)  # JPEG draft decode at 1/2 scale
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(jpeg_bytes(), max_pixels=1000)
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(truncated_jpeg_bytes(), min_short_side_px=1)  # truncation is caught at the cheapest scale too
    with pytest.raises(BadImage, match="unreadable file"):
        load_rgb(Path("/nonexistent/x.jpg"))


# ---------------------------------------------------------------- user errors and CLI
def test_user_errors_name_the_fix(tmp_path):
    make_class_tree(tmp_path / "src", {"a": 3, "b": 3})
    with pytest.raises(UserError, match="does not exist"):
        pack(tmp_path / "nope", tmp_path / "out")
    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("file,class\na/img1.jpg,a\n")
    with pytest.raises(UserError, match="lacks column.*path, label"):
        pack(tmp_path / "src", tmp_path / "out", manifest=bad_manifest)
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a/img1.jpg", "label": "a"},
                                                    {"path": "b/img1.jpg", "label": "b"},
                                                    {"path": "gone.jpg", "label": "lost"}])
    with pytest.raises(UserError, match="lost have no usable images"):
        pack(tmp_path / "src", tmp_path / "out", manifest=manifest)
    assert read_jsonl(tmp_path / "out" / "rejected.jsonl") == [
        {"path": "gone.jpg", "reason": "missing file", "label": "lost", "patient_id": None}]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no usable image files"):
        pack(tmp_path / "empty", tmp_path / "out_empty")
    with pytest.raises(UserError, match="--val-fraction"):
        PackSettings(val_fraction=1.5)
    with pytest.raises(UserError, match="either --test-per-class or --test-fraction"):
        PackSettings(test_per_class=2, test_fraction=0.1)


def test_cli_packs_and_reports_user_errors_on_one_line(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"a": 4, "b": 4})
    argv = ["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--resize-short", "48",
            "--input-size", "32", "--workers", "1"]
    assert main(argv) == 0
    assert "files seen 8 = packed 8" in capsys.readouterr().out
    assert main(argv) == 2  # the folder now holds shards
    assert "already contains shards; pass an empty folder" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "does not exist" in err
