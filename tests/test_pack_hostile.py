"""Packing untrusted input: special files, oversize files, ambiguous or unsafe names, damaged manifests,
paths leading out of SRC and a full disk. Each pack finishes or stops with one line; nothing hangs."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import unicodedata
from contextlib import contextmanager
from pathlib import Path

import pytest
import webdataset
from imagefactory import jpeg_bytes, make_class_tree, read_index, read_jsonl, read_split, save_image
from test_pack import all_samples, assert_totals_add_up, pack, write_manifest

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data import images
from gastro_dist.data.images import BadImage, read_image_file
from gastro_dist.data.shard_index import SPLITS

CAP_MB = 0.01  # 10,000 bytes: every test image is smaller, OVERSIZE is larger
OVERSIZE = jpeg_bytes(seed=7) + bytes(20_000)  # a valid JPEG (trailing bytes are ignored), so only the cap stops it
NFC, NFD = unicodedata.normalize("NFC", "Ulcère"), unicodedata.normalize("NFD", "Ulcère")


@contextmanager
def fails_after(seconds: int):
    """A regression that opens a FIFO fails the test instead of hanging it (pytest's Failed is no OSError)."""
    def fail(signum, frame):
        pytest.fail(f"still running after {seconds} s: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def special_files(folder: Path, outside: Path) -> dict[str, str]:
    """A link to /dev/zero, a FIFO, a link to a FIFO outside the tree, an oversize image: {name: reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(outside / f"fifo-{folder.name}")
    (folder / "pipe-link.png").symlink_to(outside / f"fifo-{folder.name}")
    (folder / "huge.jpg").write_bytes(OVERSIZE)
    return {"zero.jpg": "not a regular file: character device", "pipe.jpg": "not a regular file: FIFO",
            "pipe-link.png": "not a regular file: FIFO",
            "huge.jpg": f"file too large: {len(OVERSIZE)} bytes, the limit is 10000"}


def class_tree_rows(src: Path, paths: list[Path]) -> list[dict]:
    """Manifest rows for images made by make_class_tree: the label is the first folder."""
    return [{"path": path.relative_to(src).as_posix(), "label": path.relative_to(src).parts[0]} for path in paths]


def reasons(out: Path) -> dict[str, tuple[str, str]]:
    """{path: (file, reason)} over skipped.jsonl and rejected.jsonl."""
    return {entry["path"]: (name, entry["reason"]) for name in ("skipped.jsonl", "rejected.jsonl")
            for entry in read_jsonl(out / name)}


def one_line_error(capsys) -> str:
    """The one error line (warnings pack gave on the way, e.g. about missing patient ids, left aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("gastro-dist "), lines
    return lines[0] + "\n"


# ---------------------------------------------------------------- special and oversize files
def test_devices_fifos_and_oversize_files_in_class_folders_are_listed_not_read(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"a": 4, "b": 4})
    expected = {f"a/{name}": reason for name, reason in special_files(src / "a", tmp_path).items()}
    with fails_after(30):
        pack(src, tmp_path / "out", settings=dict(max_file_mb=CAP_MB))

    listed = reasons(tmp_path / "out")
    assert {path: listed[path][1] for path in expected} == expected
    assert listed["a/huge.jpg"][0] == "rejected.jsonl"  # an image input that was not packed
    assert {listed[path][0] for path in expected if path != "a/huge.jpg"} == {"skipped.jsonl"}
    totals = assert_totals_add_up(tmp_path / "out")
    assert (totals["files_seen"], totals["packed"]) == (12, 8)
    assert read_index(tmp_path / "out")["settings"]["max_file_mb"] == CAP_MB


def test_devices_fifos_and_oversize_files_named_in_a_manifest_are_listed_not_read(tmp_path):
    src = tmp_path / "src"
    paths = make_class_tree(src, {"a": 4, "b": 4})
    special = special_files(src / "odd", tmp_path)
    rows = class_tree_rows(src, paths) + [{"path": f"odd/{name}", "label": "a"} for name in special]
    manifest = write_manifest(src / "manifest.csv", rows)
    with fails_after(30):
        assert main(["pack", str(src), "--out", str(tmp_path / "out"), "--manifest", str(manifest), "--workers", "1",
                     "--input-size", "32", "--resize-short", "48", "--max-file-mb", str(CAP_MB)]) == 0

    listed = reasons(tmp_path / "out")
    assert {name: listed[f"odd/{name}"][1] for name in special} == special
    totals = assert_totals_add_up(tmp_path / "out")
    assert (totals["files_seen"], totals["packed"]) == (12, 8)


def test_a_device_node_in_the_tree_is_skipped(tmp_path):
    make_class_tree(tmp_path / "src", {"a": 2, "b": 2})
    try:
        os.mknod(tmp_path / "src" / "a" / "null.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root")
    pack(tmp_path / "src", tmp_path / "out")
    assert reasons(tmp_path / "out")["a/null.jpg"] == ("skipped.jsonl", "not a regular file: character device")


def test_reads_stop_at_the_cap_even_when_the_file_grows_after_the_size_check(tmp_path, monkeypatch):
    path = tmp_path / "growing.jpg"
    path.write_bytes(OVERSIZE)
    real_stat, real_fstat = os.stat, os.fstat

    def claim_one_byte(info: os.stat_result) -> os.stat_result:
        return os.stat_result((*info[:6], 1, *info[7:]))  # st_size as when it was checked

    monkeypatch.setattr(images.os, "stat", lambda p: claim_one_byte(real_stat(p)) if p == path else real_stat(p))
    monkeypatch.setattr(images.os, "fstat", lambda fd: claim_one_byte(real_fstat(fd)))
    with pytest.raises(BadImage, match="file too large: grew past the limit of 10000 bytes"):
        read_image_file(path, max_bytes=10_000)
    assert read_image_file(path, max_bytes=len(OVERSIZE)) == OVERSIZE


# ---------------------------------------------------------------- class names
def test_class_names_differing_only_in_unicode_normalisation_become_one_class(tmp_path, capsys):
    save_image(tmp_path / "src" / NFC / "composed.jpg", seed=501)
    save_image(tmp_path / "src" / NFD / "decomposed.jpg", seed=502)
    make_class_tree(tmp_path / "src", {"normal": 2})
    pack(tmp_path / "src", tmp_path / "out", settings=dict(val_fraction=0))
    assert read_index(tmp_path / "out")["classes"] == [NFC, "normal"]
    assert sum(s["meta"]["label"] == NFC for s in read_split(tmp_path / "out", "train")) == 2
    err = capsys.readouterr().err
    assert f"folders {ascii(NFD)} and {ascii(NFC)} differ only in Unicode normalisation" in err

    manifest = write_manifest(tmp_path / "m.csv", [{"path": f"{NFC}/composed.jpg", "label": NFC},
                                                   {"path": f"{NFD}/decomposed.jpg", "label": NFD},
                                                   {"path": "normal/img1.jpg", "label": "normal"}])
    pack(tmp_path / "src", tmp_path / "out_manifest", manifest=manifest, settings=dict(val_fraction=0))
    assert read_index(tmp_path / "out_manifest")["classes"] == [NFC, "normal"]
    assert "manifest labels" in capsys.readouterr().err

    class_map = tmp_path / "map.json"  # keys match folders whatever their normalisation
    class_map.write_text(json.dumps({NFD: "ulcer", "normal": "normal"}))
    pack(tmp_path / "src", tmp_path / "out_map", class_map=class_map, settings=dict(val_fraction=0))
    assert read_index(tmp_path / "out_map")["splits"]["train"]["per_class"] == {"normal": 2, "ulcer": 2}
    assert "matched no folder" not in capsys.readouterr().err

    class_map.write_text(json.dumps({NFC: NFC, "normal": NFD}))  # values are class names: merged, with a warning
    pack(tmp_path / "src", tmp_path / "out_values", class_map=class_map, settings=dict(val_fraction=0))
    assert read_index(tmp_path / "out_values")["classes"] == [NFC]
    assert f"class map values {ascii(NFD)} and {ascii(NFC)} differ only" in capsys.readouterr().err


def test_class_names_differing_only_in_case_are_refused_until_merged(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"Polyp": 2, "polyp": 2, "normal": 2})
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = one_line_error(capsys)
    assert "'Polyp' and 'polyp' differ only in case" in err and "--class-map" in err
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "Polyp/img1.jpg", "label": "Polyp"},
                                                   {"path": "polyp/img1.jpg", "label": "polyp"}])
    with pytest.raises(UserError, match="'Polyp' and 'polyp' differ only in case"):
        pack(tmp_path / "src", tmp_path / "out", manifest=manifest)

    class_map = tmp_path / "map.yaml"
    class_map.write_text("Polyp: polyp\npolyp: polyp\nnormal: normal\n")
    pack(tmp_path / "src", tmp_path / "merged", class_map=class_map)
    assert read_index(tmp_path / "merged")["classes"] == ["normal", "polyp"]


UNSAFE_NAMES = ["tab\there", "new\nline", "zero\u200bwidth", "back\\slash"]  # all possible folder names on Linux


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_folder_names_with_control_characters_or_separators_are_refused_until_mapped(tmp_path, capsys, name):
    make_class_tree(tmp_path / "src", {"normal": 2, name: 2})
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = one_line_error(capsys)
    assert repr(name) in err and "--class-map" in err
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({name: "clean", "normal": "normal"}))
    pack(tmp_path / "src", tmp_path / "mapped", class_map=class_map)
    assert read_index(tmp_path / "mapped")["classes"] == ["clean", "normal"]


@pytest.mark.parametrize("name", [*UNSAFE_NAMES, "nul\0byte", "slash/name"])
def test_manifest_labels_with_control_characters_or_separators_are_refused_until_mapped(tmp_path, name):
    make_class_tree(tmp_path / "src", {"normal": 4})
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "normal/img1.jpg", "label": name},
                                                   {"path": "normal/img2.jpg", "label": "normal"}])
    with pytest.raises(UserError, match="--class-map") as refused:
        pack(tmp_path / "src", tmp_path / "out", manifest=manifest)
    assert repr(name) in str(refused.value) and "\n" not in str(refused.value)
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({name: "clean", "normal": "normal"}))
    pack(tmp_path / "src", tmp_path / "mapped", manifest=manifest, class_map=class_map)
    assert read_index(tmp_path / "mapped")["classes"] == ["clean", "normal"]


def test_class_map_values_with_a_path_separator_are_refused(tmp_path):
    make_class_tree(tmp_path / "src", {"a": 2, "b": 2})
    class_map = tmp_path / "map.yaml"
    class_map.write_text("a: lesions/a\nb: b\n")
    with pytest.raises(UserError, match=r"class name 'lesions/a' contains '/'"):
        pack(tmp_path / "src", tmp_path / "out", class_map=class_map)


def test_patient_ids_are_normalised_and_control_characters_are_refused(tmp_path, capsys):
    paths = make_class_tree(tmp_path / "src", {"a": 4, "b": 4})
    rows = class_tree_rows(tmp_path / "src", paths)
    for number, row in enumerate(rows):  # two images per patient, its id spelled once NFC and once NFD
        row["patient_id"] = unicodedata.normalize("NFD" if number % 2 else "NFC", f"Zoë{number // 2}")
    manifest = write_manifest(tmp_path / "m.csv", rows)
    pack(tmp_path / "src", tmp_path / "out", manifest=manifest, settings=dict(val_fraction=0.5))
    samples = [sample for split in SPLITS for sample in all_samples(tmp_path / "out")[split]]
    assert {s["meta"]["patient_id"] for s in samples} == {unicodedata.normalize("NFC", f"Zoë{n}") for n in range(4)}
    assert sum(read_index(tmp_path / "out")["splits"][split]["patients"] for split in SPLITS) == 4

    rows[2]["patient_id"] = "P\x1b[2J1"  # an escape sequence
    manifest = write_manifest(tmp_path / "bad.csv", rows)
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--manifest", str(manifest)]) == 2
    err = one_line_error(capsys)
    assert "row 4" in err and "patient_id 'P\\x1b[2J1'" in err


# ---------------------------------------------------------------- damaged manifests and class maps
def test_files_that_are_not_utf8_are_one_line_user_errors(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"a": 2, "b": 2})
    argv = ["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("path,label\na/img1.jpg,Ulcère\n".encode("cp1252"))
    assert main([*argv, "--manifest", str(manifest)]) == 2
    err = one_line_error(capsys)
    assert str(manifest) in err and "save it as UTF-8" in err
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("path,label\na/img1.jpg,a\n", encoding="utf-16")
    assert main([*argv, "--manifest", str(utf16)]) == 2
    assert "save it as UTF-8" in one_line_error(capsys)
    class_map = tmp_path / "map.yaml"
    class_map.write_bytes("a: Ulcère\nb: b\n".encode("cp1252"))
    assert main([*argv, "--class-map", str(class_map)]) == 2
    err = one_line_error(capsys)
    assert str(class_map) in err and "save it as UTF-8" in err


def test_damaged_manifest_rows_are_one_line_user_errors(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"a": 2, "b": 2})
    argv = ["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1", "--manifest"]
    huge_cell = tmp_path / "huge.csv"
    huge_cell.write_text(f"path,label\na/img1.jpg,{'x' * 200_000}\n")  # past the csv module's field limit
    assert main([*argv, str(huge_cell)]) == 2
    assert "is not a readable CSV" in one_line_error(capsys)
    nul_path = tmp_path / "nul.csv"
    nul_path.write_text("path,label\na/img1.jpg,a\nb/img\0.jpg,b\n")
    assert main([*argv, str(nul_path)]) == 2
    assert "row 3: the path 'b/img\\x00.jpg' contains a NUL character" in one_line_error(capsys)


# ---------------------------------------------------------------- manifest paths outside SRC
def test_manifest_paths_leading_outside_src_are_skipped_never_read(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"a": 3, "b": 3})
    save_image(tmp_path / "outside.jpg", seed=99)
    (src / "link").symlink_to(src / "a", target_is_directory=True)
    outside = {"../outside.jpg", str(tmp_path / "outside.jpg"), "a/../../outside.jpg", "link/../../outside.jpg",
               "a\\..\\..\\outside.jpg", "/etc/passwd.jpg"}
    inside = {"a/img1.jpg": "a/img1.jpg", str(src / "b" / "img1.jpg"): "b/img1.jpg",
              "./a/./img2.jpg": "a/img2.jpg", "b/sub/../img2.jpg": "b/img2.jpg"}
    rows = [{"path": path, "label": "a"} for path in sorted(outside)]
    rows += [{"path": path, "label": source[0]} for path, source in inside.items()]
    pack(src, tmp_path / "out", manifest=write_manifest(tmp_path / "m.csv", rows))

    skipped = {entry["path"]: entry["reason"] for entry in read_jsonl(tmp_path / "out" / "skipped.jsonl")}
    assert skipped == dict.fromkeys(outside, "outside the source folder")
    packed = {s["meta"]["source"] for split in SPLITS for s in read_split(tmp_path / "out", split)}
    assert packed == set(inside.values())
    assert assert_totals_add_up(tmp_path / "out")["files_seen"] == len(rows)


# ---------------------------------------------------------------- a full disk
@pytest.mark.parametrize("full_file", ["skipped.jsonl", "rejected.jsonl", "index.json"])
def test_a_full_disk_while_writing_bookkeeping_is_one_line_and_leaves_no_index(tmp_path, capsys, monkeypatch,
                                                                                 full_file):
    make_class_tree(tmp_path / "src", {"a": 3, "b": 3})
    (tmp_path / "src" / "a" / "notes.txt").write_text("skipped\n")
    (tmp_path / "src" / "a" / "empty.jpg").write_bytes(b"")  # rejected
    (tmp_path / "out").mkdir()
    if full_file == "index.json":  # written through a temporary file of its own: full where it is opened
        real_open = Path.open
        monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: real_open(
            Path("/dev/full") if self.name.startswith(".index.json.") else self, mode.replace("x", "w"), *a, **k))
    else:
        (tmp_path / "out" / full_file).symlink_to("/dev/full")  # every write fails with ENOSPC, like a full disk
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert "No space left on device" in one_line_error(capsys)
    assert not (tmp_path / "out" / "index.json").exists()


def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_no_index(tmp_path, capsys, monkeypatch):
    def disk_full(self, sample):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.fname)

    monkeypatch.setattr(webdataset.ShardWriter, "write", disk_full)
    make_class_tree(tmp_path / "src", {"a": 3, "b": 3})
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    err = one_line_error(capsys)
    assert "No space left on device" in err and "train-000000.tar" in err
    assert not (tmp_path / "out" / "index.json").exists()
