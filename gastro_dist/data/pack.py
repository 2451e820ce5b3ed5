"""Packing a labelled image tree into WebDataset shards with patient-grouped, deterministic splits.

Owns: finding the inputs (class folders, a manifest CSV, a class map), validating and hashing every
image in worker processes, exact-duplicate handling, the split rules, writing the shards, and the
bookkeeping files that account for every file seen (index.json, rejected.jsonl, skipped.jsonl,
duplicates.jsonl). The on-disk format and the rules are documented in shards/README.md.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import multiprocessing
import os
import posixpath
import random
import unicodedata
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gastro_dist import UserError
from gastro_dist.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    BadImage,
    decode_rgb,
    encode_jpeg,
    is_image_path,
    load_rgb,
    open_image,
    read_image_file,
    shrink_to_short_side,
)
from gastro_dist.data.shard_index import INDEX_FILE
from gastro_dist.files import file_type

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
REJECTED_FILE = "rejected.jsonl"
SKIPPED_FILE = "skipped.jsonl"
DUPLICATES_FILE = "duplicates.jsonl"

_IMAGES_PER_TASK = 8  # enough to amortise inter-process overhead, small enough to balance load
_TASKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: results are consumed in order as they arrive
_TAR_MTIME = 0  # fixed member mtime, so identical inputs and settings give byte-identical shards
_EXACT_TEST_ATTEMPTS = 50  # reshuffles tried before --test-per-class is declared unreachable


@dataclass
class PackSettings:
    """The `pack` options, validated here and recorded in index.json (`workers` never changes the result)."""

    val_fraction: float = 0.1
    test_per_class: int | None = None
    test_fraction: float = 0.0
    resize_short: int | None = None  # None: round(input_size / 0.875); 0: keep original sizes
    input_size: int = 224
    quality: int = 90
    shard_size: int = 1000
    workers: int | None = None
    seed: int = 0
    max_file_mb: float = DEFAULT_MAX_FILE_BYTES / 1e6  # larger files are rejected without being read

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            problems.append(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        elif self.val_fraction + self.test_fraction >= 1.0:
            problems.append("--val-fraction plus --test-fraction must be below 1 to leave training images")
        if self.test_per_class is not None:
            if self.test_per_class < 1:
                problems.append(f"--test-per-class must be at least 1, got {self.test_per_class}")
            if self.test_fraction > 0:
                problems.append("pass either --test-per-class or --test-fraction, not both")
        if self.input_size < 1:
            problems.append(f"--input-size must be positive, got {self.input_size}")
        if self.resize_short is not None and self.resize_short < 0:
            problems.append(f"--resize-short must be 0 (keep sizes) or positive, got {self.resize_short}")
        elif self.resize_short and self.resize_short < self.input_size:
            problems.append(
                f"--resize-short {self.resize_short} is smaller than --input-size {self.input_size}: "
                "training crops would be upscaled; raise --resize-short or leave it out"
            )
        if not 1 <= self.quality <= 100:
            problems.append(f"--quality must be in 1..100, got {self.quality}")
        if self.shard_size < 1:
            problems.append(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if not self.max_file_mb > 0:
            problems.append(f"--max-file-mb must be positive, got {self.max_file_mb}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def stored_short_side_px(self) -> int:
        """The shorter side stored in the shards (0: original size kept)."""
        if self.resize_short is None:
            return round(self.input_size / 0.875)  # the usual resize-then-centre-crop ratio (224 -> 256)
        return self.resize_short

    @property
    def max_file_bytes(self) -> int:
        """The file-size cap in bytes (an MB is 10^6 bytes)."""
        return int(self.max_file_mb * 1e6)


@dataclass(frozen=True)
class PackResult:
    """Counts of a finished pack (the same numbers as index.json totals)."""

    out_dir: Path
    classes: list[str]
    split_counts: dict[str, int]
    files_seen: int
    packed: int
    rejected: int  # includes duplicates_dropped
    skipped: int
    duplicates_dropped: int
    label_conflicts: int


@dataclass
class _InputImage:
    """One input file with its label; sha256 and orig_size are filled by validation."""

    path: Path  # where to read it
    source: str  # path relative to SRC with forward slashes, as recorded everywhere
    label: str
    patient_id: str | None
    sha256: str = ""
    orig_size: tuple[int, int] = (0, 0)

    def entry(self, reason: str, **extra) -> dict:
        """A rejected.jsonl line for this image."""
        return {"path": self.source, "reason": reason, "label": self.label, "patient_id": self.patient_id, **extra}


@dataclass
class _Inputs:
    """What discovery found: candidate images plus everything already set aside, with reasons."""

    images: list[_InputImage] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


class _Inspection(NamedTuple):
    sha256: str
    orig_size: tuple[int, int]
    reason: str | None  # None: a usable image


class _Encoded(NamedTuple):
    jpg: bytes
    stored_size: tuple[int, int]
    reason: str | None


# ---------------------------------------------------------------- entry point
def pack_dataset(
    src: str | Path,
    out_dir: str | Path,
    settings: PackSettings,
    manifest: str | Path | None = None,
    class_map: str | Path | None = None,
) -> PackResult:
    """Validate every input image, split by patient and write shards plus bookkeeping to `out_dir`.

    User mistakes raise `UserError`; bad image files never do (they are listed in rejected.jsonl).
    With several workers, a calling script needs `if __name__ == "__main__":` (see `_Workers`).
    """
    console = Console(stderr=True, soft_wrap=True)
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    _check_folders(src, out_dir)
    label_for = _load_class_map(Path(class_map), console) if class_map else None
    if manifest:
        inputs = _read_manifest(Path(manifest), src, label_for, console)
    else:
        inputs = _scan_class_folders(src, out_dir, label_for, console)
    if label_for is None:  # class names are folder names or manifest labels as written (a map's are checked already)
        _normalise_class_names(inputs, "manifest labels" if manifest else "folders", console)
    files_seen = len(inputs.images) + len(inputs.skipped) + len(inputs.rejected)  # before validation moves any
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / SKIPPED_FILE, inputs.skipped)
    if not inputs.images:
        _write_jsonl(out_dir / REJECTED_FILE, inputs.rejected)
        raise UserError(f"no usable image files under {src} (see {SKIPPED_FILE} and {REJECTED_FILE} in {out_dir}); "
                        "pass a folder with one sub-folder per class, or --manifest")
    num_workers = min(settings.workers or _available_cpus(), -(-len(inputs.images) // _IMAGES_PER_TASK))

    with _Workers(num_workers) as workers:
        valid = _validate(inputs, workers, settings.max_file_bytes, console)
        kept, dropped, conflicts = _drop_duplicates(valid, inputs.rejected)
        _write_jsonl(out_dir / REJECTED_FILE, inputs.rejected)
        _write_jsonl(out_dir / DUPLICATES_FILE, conflicts)
        for conflict in conflicts:
            copies = conflict["copies"]
            console.print(f"[yellow]warning:[/] identical image under labels {sorted({c['label'] for c in copies})}: "
                          f"{', '.join(c['path'] for c in copies)} (one copy per label kept, all in one split; "
                          f"see {DUPLICATES_FILE})")
        classes = _check_classes(inputs, kept, out_dir)
        splits = _assign_splits(kept, dropped, classes, settings)
        shards, written = _write_shards(splits, classes, out_dir, settings, workers, inputs.rejected, console)
    _write_jsonl(out_dir / REJECTED_FILE, inputs.rejected)  # again: encoding may have rejected a file

    index = _build_index(src, manifest, label_for, classes, files_seen, inputs, written, shards, conflicts, settings)
    _print_summary(index, Console(soft_wrap=True))
    _write_json_atomically(out_dir / INDEX_FILE, index)
    totals = index["totals"]
    return PackResult(
        out_dir=out_dir,
        classes=classes,
        split_counts={split: info["count"] for split, info in index["splits"].items()},
        files_seen=totals["files_seen"],
        packed=totals["packed"],
        rejected=totals["rejected"],
        skipped=totals["skipped"],
        duplicates_dropped=totals["duplicates_dropped"],
        label_conflicts=totals["label_conflicts"],
    )


def _check_folders(src: Path, out_dir: Path) -> None:
    if not src.is_dir():
        raise UserError(f"source folder {src} does not exist or is not a folder; pass the folder holding the images")
    if out_dir == src:
        raise UserError("--out must not be the source folder; pass a new, empty folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file; pass an empty folder")
        if (out_dir / INDEX_FILE).exists() or any(out_dir.glob("*.tar")):
            raise UserError(f"{out_dir} already contains shards; pass an empty folder (or delete the old shards)")


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- discovery
def _load_class_map(path: Path, console: Console) -> dict[str, str]:
    """Map of folder path (or manifest label) to class name, keys normalised to NFC 'a/b/c', names checked."""
    if not path.is_file():
        raise UserError(f"class map {path} not found; pass a YAML or JSON file mapping folders to classes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"class map {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        if path.suffix.lower() == ".json":
            mapping = json.loads(text)
        else:
            import yaml

            mapping = yaml.safe_load(text)
    except Exception as err:
        raise UserError(f"class map {path} cannot be parsed ({type(err).__name__}: {err}); fix its syntax") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"class map {path} must be a non-empty mapping of folder -> class name")
    names_as_written = {}
    for key, value in mapping.items():
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"class map {path}: the class for {key!r} must be a non-empty string")
        names_as_written[_map_key(str(key))] = value.strip()
    class_of = _class_names(set(names_as_written.values()), "class map values", console)
    return {key: class_of[name] for key, name in names_as_written.items()}


def _nfc(text: str) -> str:
    """One spelling per name: macOS stores names decomposed (NFD), most other systems composed (NFC)."""
    return unicodedata.normalize("NFC", text)


def _map_key(text: str) -> str:
    """A class-map key, or the folder path or manifest label looked up in the map: NFC, 'a/b/c'."""
    return _nfc(text).strip().replace("\\", "/").strip("/")


def _unprintable_characters(text: str) -> list[str]:
    """Control, format, surrogate, private-use and unassigned characters (Unicode category C*) in `text`."""
    return sorted({char for char in text if unicodedata.category(char).startswith("C")})


def _class_names(names_as_written: set[str], what: str, console: Console) -> dict[str, str]:
    """Map each class name as written to the name used everywhere (NFC), refusing ambiguous or unsafe names.

    Names that differ only in Unicode normalisation become one class, with a warning. Names that differ
    only in case are refused (a person must say whether they are one class), and so are names holding
    control characters or path separators: class names end up in CSV headers, tracker keys and file names.
    """
    spellings: dict[str, set[str]] = defaultdict(set)
    for name in sorted(names_as_written):
        bad = _unprintable_characters(name) + [char for char in "/\\" if char in name]
        if bad:
            raise UserError(f"class name {name!r} contains {', '.join(map(repr, bad))}; rename it, or give it a "
                            "clean name with --class-map (a YAML/JSON file mapping folders or labels to class names)")
        spellings[_nfc(name)].add(name)
    for name, forms in sorted(spellings.items()):
        if len(forms) > 1:
            console.print(f"[yellow]warning:[/] {what} {escape(' and '.join(map(ascii, sorted(forms))))} differ only "
                          f"in Unicode normalisation; packed as one class {escape(repr(name))}")
    by_case: dict[str, list[str]] = defaultdict(list)
    for name in sorted(spellings):
        by_case[name.casefold()].append(name)
    for names in by_case.values():
        if len(names) > 1:
            raise UserError(f"class names {' and '.join(map(repr, names))} differ only in case; merge them into one "
                            "class with --class-map (a YAML/JSON file mapping folders or labels to class names), "
                            "or rename them")
    return {name: _nfc(name) for name in names_as_written}


def _normalise_class_names(inputs: _Inputs, what: str, console: Console) -> None:
    """Replace the labels of inputs (images and rejected files) by their checked class names."""
    class_of = _class_names({image.label for image in inputs.images} |
                            {entry["label"] for entry in inputs.rejected if entry.get("label")}, what, console)
    for image in inputs.images:
        image.label = class_of[image.label]
    for entry in inputs.rejected:
        if entry.get("label"):
            entry["label"] = class_of[entry["label"]]


def _warn_unused_keys(label_for: dict[str, str], used_keys: set[str], what: str, console: Console) -> None:
    for key in sorted(set(label_for) - used_keys):
        console.print(f"[yellow]warning:[/] class map key {key!r} matched no {what}")


def _scan_class_folders(src: Path, out_dir: Path, label_for: dict[str, str] | None, console: Console) -> _Inputs:
    """Class = first-level folder, or with a class map the longest mapped folder prefix of the path."""
    inputs = _Inputs()
    files = _walk_tree(src, exclude_dir=out_dir, skipped=inputs.skipped)
    used_keys: set[str] = set()
    for source, path in files:
        folders = source.split("/")[:-1]
        if not is_image_path(source):
            inputs.skipped.append({"path": source, "reason": "not an image extension"})
            continue
        if label_for is None:
            label = folders[0] if folders else None
            missing_reason = "not inside a class folder"
        else:
            prefixes = (_map_key("/".join(folders[:depth])) for depth in range(len(folders), 0, -1))
            key = next((prefix for prefix in prefixes if prefix in label_for), None)
            label = label_for[key] if key else None
            used_keys.add(key or "")
            missing_reason = "no class mapping"
        if label is None:
            inputs.skipped.append({"path": source, "reason": missing_reason})
        else:
            inputs.images.append(_InputImage(path=path, source=source, label=label, patient_id=None))
    if label_for is not None:
        _warn_unused_keys(label_for, used_keys, "folder", console)
    return inputs


def _walk_tree(src: Path, exclude_dir: Path, skipped: list[dict]) -> list[tuple[str, Path]]:
    """All files under src as (relative path, path), in sorted order, following folder symlinks.

    Hidden entries, folders reached twice (symlink loops or two links to one folder) and unreadable
    folders are appended to `skipped`, one entry each, instead of being entered.
    """
    files: list[tuple[str, Path]] = []
    first_visit: dict[str, str] = {}  # real path of each entered folder -> relative path it was entered as

    def visit(folder: Path, rel_folder: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(folder)
        if real in first_visit:
            is_loop = real in ancestors
            reason = "symlink loop" if is_loop else f"already scanned: same folder as {first_visit[real] or '.'}"
            skipped.append({"path": rel_folder + "/", "reason": reason})
            return
        first_visit[real] = rel_folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            skipped.append({"path": rel_folder + "/", "reason": f"unreadable folder: {err.strerror or err}"})
            return
        for entry in entries:
            rel_path = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            is_dir = entry.is_dir()  # follows symlinks
            if entry.name.startswith("."):
                kind = "folder" if is_dir else "file"
                skipped.append({"path": rel_path + ("/" if is_dir else ""), "reason": f"hidden {kind}"})
            elif is_dir:
                if os.path.realpath(entry.path) != str(exclude_dir):
                    visit(Path(entry.path), rel_path, ancestors | {real})
            elif entry.is_file():  # links followed
                files.append((rel_path, Path(entry.path)))
            else:
                try:
                    kind = file_type(entry.stat().st_mode)  # never opened: a FIFO blocks, a device never ends
                except OSError:  # a broken link: rejected as unreadable later, with its label
                    files.append((rel_path, Path(entry.path)))
                else:
                    skipped.append({"path": rel_path, "reason": f"not a regular file: {kind}"})

    visit(src, "", frozenset())
    return files


def _read_manifest(manifest: Path, src: Path, label_for: dict[str, str] | None, console: Console) -> _Inputs:
    """Only manifest rows are inputs; with a class map, labels are renamed and unmapped ones skipped.

    Rows are untrusted: a path leading outside SRC is skipped and never read, and so is anything but a regular file.
    """
    if not manifest.is_file():
        raise UserError(f"manifest {manifest} not found; pass a CSV with columns path,label[,patient_id]")
    inputs = _Inputs()
    used_keys: set[str] = set()
    for row_number, row in _manifest_rows(manifest):
        source = _manifest_source(row["path"], src) if row["path"] else f"<manifest row {row_number}>"
        label, patient_id = row["label"], _nfc(row.get("patient_id", "")) or None
        if label_for is not None and label:
            used_keys.add(_map_key(label))
            label = label_for.get(_map_key(label), "")
            if not label:
                inputs.skipped.append({"path": source or row["path"], "reason": "no class mapping",
                                       "label": row["label"]})
                continue
        if source is None:
            inputs.skipped.append({"path": row["path"], "reason": "outside the source folder", "label": label})
            continue
        image = _InputImage(path=src / source, source=source, label=label, patient_id=patient_id)
        if not row["path"]:
            inputs.rejected.append(image.entry("empty path in manifest", manifest_row=row_number))
        elif not label:
            inputs.rejected.append(image.entry("empty label in manifest", manifest_row=row_number))
        elif not is_image_path(source):
            inputs.skipped.append({"path": source, "reason": "not an image extension", "label": label})
        else:
            try:
                kind = file_type(os.stat(image.path).st_mode)  # links followed, nothing opened
            except OSError as err:
                missing = isinstance(err, (FileNotFoundError, NotADirectoryError))
                inputs.rejected.append(image.entry("missing file" if missing else
                                                   f"unreadable file: {err.strerror or err}"))
                continue
            if kind == "file":
                inputs.images.append(image)
            else:
                inputs.skipped.append({"path": source, "reason": f"not a regular file: {kind}", "label": label})
    if label_for is not None:
        _warn_unused_keys(label_for, used_keys, "manifest label", console)
    return inputs


def _manifest_rows(manifest: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped cells by lower-case column name) of each data row of a UTF-8 CSV."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet exports add a BOM
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]  # "Path, Label" works too
            missing_columns = [name for name in ("path", "label") if name not in reader.fieldnames]
            if missing_columns:
                raise UserError(
                    f"manifest {manifest} lacks column(s) {', '.join(missing_columns)}; "
                    "its first row must be a header with path,label[,patient_id]"
                )
            for row_number, raw_row in enumerate(reader, start=2):
                row = {key: (value or "").strip() for key, value in raw_row.items() if key}
                _refuse_damaged_row(manifest, row_number, row)
                yield row_number, row
    except UnicodeDecodeError:
        raise UserError(f"manifest {manifest} is not UTF-8 text; save it as UTF-8 ('CSV UTF-8')") from None
    except csv.Error as err:
        raise UserError(f"manifest {manifest} is not a readable CSV ({err}); save it again as CSV") from None


def _refuse_damaged_row(manifest: Path, row_number: int, row: dict[str, str]) -> None:
    """A NUL in a path or an unprintable character in a patient id means a damaged (or hostile) manifest: stop.

    (A patient id is the unit the splits keep apart, so a garbled one must not silently become a new patient.)
    """
    if "\0" in row["path"]:
        raise UserError(f"manifest {manifest} row {row_number}: the path {row['path']!r} contains a NUL character; "
                        "fix that row")
    bad = _unprintable_characters(row.get("patient_id", ""))
    if bad:
        raise UserError(f"manifest {manifest} row {row_number}: patient_id {row['patient_id']!r} contains "
                        f"{', '.join(map(repr, bad))}; fix that row")


def _manifest_source(cell: str, src: Path) -> str | None:
    """The row's path relative to SRC with forward slashes, or None when it leads outside SRC.

    '..' is resolved on the text ('a/../b.jpg' is 'b.jpg'), so it can never climb out of SRC through a folder
    link. An absolute path counts when it lies under SRC as written or once its folder links are resolved.
    """
    path = posixpath.normpath(cell.replace("\\", "/"))
    if not posixpath.isabs(path):
        return None if path == ".." or path.startswith("../") else path
    folder, name = posixpath.split(path)
    for candidate in (Path(folder), Path(os.path.realpath(folder))):
        if candidate.is_relative_to(src):
            return (candidate.relative_to(src) / name).as_posix()
    return None


# ---------------------------------------------------------------- validation (worker processes)
def _inspect_files(paths: list[Path], max_pixels: int, max_file_bytes: int) -> list[_Inspection]:
    """Hash and fully decode each file (at the cheapest JPEG scale: the whole stream is still read)."""
    results = []
    for path in paths:
        try:
            data = read_image_file(path, max_file_bytes)
        except BadImage as err:
            results.append(_Inspection("", (0, 0), err.reason))
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            img = open_image(data, max_pixels)
            orig_size = img.size
            decode_rgb(img, min_short_side_px=1)
        except BadImage as err:
            results.append(_Inspection(sha256, (0, 0), err.reason))
        except Exception as err:  # one bad file must never stop the run
            results.append(_Inspection(sha256, (0, 0), f"corrupt image: {type(err).__name__}: {err}"))
        else:
            results.append(_Inspection(sha256, orig_size, None))
    return results


def _encode_files(jobs: list[tuple[Path, str]], short_side_px: int, quality: int, max_pixels: int,
                  max_file_bytes: int) -> list[_Encoded]:
    """Decode, shrink and re-encode each (path, expected sha256); a file edited since validation is rejected."""
    results = []
    for path, expected_sha256 in jobs:
        try:
            data = read_image_file(path, max_file_bytes)
            if hashlib.sha256(data).hexdigest() != expected_sha256:
                raise BadImage("file changed during packing")
            img = load_rgb(data, max_pixels=max_pixels, min_short_side_px=short_side_px or None)
            img = shrink_to_short_side(img, short_side_px)
            results.append(_Encoded(encode_jpeg(img, quality), img.size, None))
        except BadImage as err:
            results.append(_Encoded(b"", (0, 0), err.reason))
        except Exception as err:  # one bad file must never stop the run
            results.append(_Encoded(b"", (0, 0), f"corrupt image: {type(err).__name__}: {err}"))
    return results


class _Workers:
    """Runs a function over chunks of items in worker processes (in this process for one worker).

    Results come back in input order with only a few chunks per worker in flight, so memory stays
    bounded however many images there are. One pool serves both passes. "spawn" rather than fork: the
    parent runs rich's refresh thread and, by the second pass, torch (imported by webdataset), and forking
    a threaded process can deadlock the child. So scripts that call `pack_dataset` with several workers
    need the usual `if __name__ == "__main__":` guard.
    """

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._pool = (ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"))
                      if num_workers > 1 else None)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def map_in_order(self, function: Callable[[list], list], items: list) -> Iterator:
        chunks = (items[start:start + _IMAGES_PER_TASK] for start in range(0, len(items), _IMAGES_PER_TASK))
        if self._pool is None:
            for chunk in chunks:
                yield from function(chunk)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self._pool.submit(function, chunk))
            if len(pending) >= _TASKS_IN_FLIGHT_PER_WORKER * self.num_workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _validate(inputs: _Inputs, workers: _Workers, max_file_bytes: int, console: Console) -> list[_InputImage]:
    """Fill sha256/orig_size of the readable images; move the others to inputs.rejected."""
    valid = []
    inspect = functools.partial(_inspect_files, max_pixels=DEFAULT_MAX_PIXELS, max_file_bytes=max_file_bytes)
    with _progress(console) as progress:
        task = progress.add_task("validating", total=len(inputs.images))
        paths = [image.path for image in inputs.images]
        for image, inspection in zip(inputs.images, workers.map_in_order(inspect, paths)):
            image.sha256 = inspection.sha256
            if inspection.reason is None:
                image.orig_size = inspection.orig_size
                valid.append(image)
            else:
                inputs.rejected.append(image.entry(inspection.reason))
            progress.advance(task)
    return valid


def _check_classes(inputs: _Inputs, kept: list[_InputImage], out_dir: Path) -> list[str]:
    """Sorted class names; a class whose every image was rejected is an error, not a silent drop."""
    classes = sorted({image.label for image in kept})
    if not classes:
        raise UserError(f"none of the {len(inputs.images)} image files could be read; see {out_dir / REJECTED_FILE}")
    labels_seen = {image.label for image in inputs.images}
    labels_seen |= {entry["label"] for entry in inputs.rejected if entry["label"]}
    empty_labels = sorted(labels_seen - set(classes))
    if empty_labels:
        raise UserError(
            f"label(s) {', '.join(empty_labels)} have no usable images (see {out_dir / REJECTED_FILE}); "
            "fix or remove those files / manifest rows"
        )
    return classes


# ---------------------------------------------------------------- duplicates and splits
def _drop_duplicates(images: list[_InputImage],
                     rejected: list[dict]) -> tuple[list[_InputImage], list[_InputImage], list[dict]]:
    """Split into (kept, dropped copies, label conflicts): identical bytes are packed once per label.

    Copies are taken in sorted source order, so the kept copy is the first path alphabetically.
    Identical bytes under different labels are all kept (the labels disagree; a human must decide)
    and reported; the split rules keep them in one split.
    """
    copies_by_sha: dict[str, list[_InputImage]] = defaultdict(list)
    for image in sorted(images, key=lambda image: (image.source, image.label)):
        copies_by_sha[image.sha256].append(image)
    kept, dropped, conflicts = [], [], []
    for sha256, copies in copies_by_sha.items():
        first_by_label: dict[str, _InputImage] = {}
        for image in copies:
            first = first_by_label.setdefault(image.label, image)
            if first is image:
                kept.append(image)
            else:
                dropped.append(image)
                rejected.append(image.entry(f"duplicate of {first.source}", duplicate_of=first.source, sha256=sha256))
        if len(first_by_label) > 1:
            conflicts.append({"sha256": sha256, "copies": [
                {"path": image.source, "label": image.label, "patient_id": image.patient_id} for image in copies]})
    kept.sort(key=lambda image: (image.source, image.label))
    return kept, dropped, conflicts


class _Group(NamedTuple):
    """Images that must share a split: same patient, or transitively the same bytes."""

    images: list[_InputImage]
    class_counts: Counter


def _group_images(kept: list[_InputImage], dropped: list[_InputImage]) -> list[_Group]:
    """Union-find over images, patient ids and sha256s; groups come out in sorted-source order.

    Dropped duplicate copies still link their patient to the kept copy's group, so a patient whose
    frame was filed twice never straddles splits through the other copy's patient.
    """
    parent: dict[tuple, tuple] = {}

    def find(node: tuple) -> tuple:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a: tuple, b: tuple) -> None:
        parent[find(a)] = find(b)

    for position, image in enumerate(kept):
        union(("image", position), ("sha", image.sha256))
        if image.patient_id is not None:
            union(("image", position), ("patient", image.patient_id))
    for image in dropped:
        if image.patient_id is not None:
            union(("patient", image.patient_id), ("sha", image.sha256))
    members: dict[tuple, list[_InputImage]] = defaultdict(list)
    for position, image in enumerate(kept):
        members[find(("image", position))].append(image)
    return [_Group(images, Counter(image.label for image in images)) for images in members.values()]


def _fill_quotas(groups: list[_Group], quota: dict[str, int], rng: random.Random,
                 top_up_empty: bool) -> tuple[set[int], Counter]:
    """Pick whole groups (indices) in seeded random order, class by class, without overshooting any quota.

    A group counts toward every class it contains. With `top_up_empty`, a class that got nothing because
    every group overshoots receives its smallest group, provided another group of that class remains.
    """
    chosen: set[int] = set()
    taken: Counter = Counter()
    for cls in sorted(quota):
        order = [index for index, group in enumerate(groups) if cls in group.class_counts]
        rng.shuffle(order)
        for index in order:
            if taken[cls] >= quota[cls]:
                break
            fits = all(taken[k] + n <= quota.get(k, 0) for k, n in groups[index].class_counts.items())
            if fits and index not in chosen:
                chosen.add(index)
                taken.update(groups[index].class_counts)
        remaining = [index for index in order if index not in chosen]
        if top_up_empty and quota[cls] > 0 and taken[cls] == 0 and len(remaining) > 1:
            smallest = min(remaining, key=lambda index: sum(groups[index].class_counts.values()))
            chosen.add(smallest)
            taken.update(groups[smallest].class_counts)
    return chosen, taken


def _fraction_quota(groups: list[_Group], fraction: float) -> dict[str, int]:
    """round(fraction * images) per class, at least 1 and at most all but one when the class has >= 2."""
    class_counts = sum((group.class_counts for group in groups), Counter())
    if fraction <= 0:
        return {cls: 0 for cls in class_counts}
    return {cls: min(max(round(fraction * n), 1), n - 1) for cls, n in class_counts.items()}


def _take_exact_test(groups: list[_Group], classes: list[str], per_class: int, rng: random.Random) -> set[int]:
    class_counts = sum((group.class_counts for group in groups), Counter())
    too_small = [f"{cls} ({class_counts[cls]})" for cls in classes if class_counts[cls] <= per_class]
    if too_small:
        raise UserError(
            f"--test-per-class {per_class} needs more than {per_class} images in every class (some must stay for "
            f"training); too few in: {', '.join(too_small)}. Lower --test-per-class"
        )
    quota = {cls: per_class for cls in classes}
    for _ in range(_EXACT_TEST_ATTEMPTS):
        chosen, taken = _fill_quotas(groups, quota, rng, top_up_empty=False)
        short = [f"{cls} ({taken[cls]})" for cls in classes if taken[cls] != per_class]
        if not short:
            return chosen
    raise UserError(
        f"cannot pick exactly {per_class} test images per class from whole patients (best attempt fell short in: "
        f"{', '.join(short)}); patients with many images make exact counts impossible: try another "
        "--test-per-class or --seed"
    )


def _assign_splits(kept: list[_InputImage], dropped: list[_InputImage], classes: list[str],
                   settings: PackSettings) -> dict[str, list[_InputImage]]:
    """Test first (exact per class, or a fraction), then a stratified val fraction of the rest; rest is train."""
    groups = _group_images(kept, dropped)
    rng = random.Random(f"{settings.seed}:splits")
    if settings.test_per_class:
        test = _take_exact_test(groups, classes, settings.test_per_class, rng)
    else:
        test, _ = _fill_quotas(groups, _fraction_quota(groups, settings.test_fraction), rng, top_up_empty=True)
    remaining = [index for index in range(len(groups)) if index not in test]
    remaining_groups = [groups[index] for index in remaining]
    val_positions, _ = _fill_quotas(remaining_groups, _fraction_quota(remaining_groups, settings.val_fraction), rng,
                                    top_up_empty=True)
    val = {remaining[position] for position in val_positions}
    splits: dict[str, list[_InputImage]] = {split: [] for split in SPLITS}
    for index, group in enumerate(groups):
        splits["test" if index in test else "val" if index in val else "train"].extend(group.images)
    _check_disjoint(splits)
    return splits


def _check_disjoint(splits: dict[str, list[_InputImage]]) -> None:
    """The leakage guarantee, checked on the result rather than trusted from the algorithm."""
    for attribute in ("patient_id", "sha256"):
        split_of: dict[str, str] = {}
        for split, images in splits.items():
            for image in images:
                value = getattr(image, attribute)
                if value is not None and split_of.setdefault(value, split) != split:
                    raise RuntimeError(f"internal error: {attribute} {value} is in both {split_of[value]} and {split}")


# ---------------------------------------------------------------- shards
def _write_shards(splits: dict[str, list[_InputImage]], classes: list[str], out_dir: Path, settings: PackSettings,
                  workers: _Workers, rejected: list[dict],
                  console: Console) -> tuple[dict[str, list[dict]], dict[str, list[_InputImage]]]:
    """Encode in workers, write in this process split by split; returns (shards, written images) per split."""
    import webdataset as wds  # imports torch: only the parent pays for it, and only once shards are written

    ordered = []
    for split in SPLITS:
        images = sorted(splits[split], key=lambda image: (image.source, image.label))
        random.Random(f"{settings.seed}:{split}:order").shuffle(images)  # so every shard mixes classes
        ordered.extend((split, position, image) for position, image in enumerate(images))
    encode = functools.partial(_encode_files, short_side_px=settings.stored_short_side_px,
                               quality=settings.quality, max_pixels=DEFAULT_MAX_PIXELS,
                               max_file_bytes=settings.max_file_bytes)
    results = workers.map_in_order(encode, [(image.path, image.sha256) for _, _, image in ordered])

    samples_per_file: dict[str, Counter] = {split: Counter() for split in SPLITS}
    written: dict[str, list[_InputImage]] = {split: [] for split in SPLITS}
    writer, writer_split = None, None
    try:
        with _progress(console) as progress:
            task = progress.add_task("writing shards", total=len(ordered))
            for (split, position, image), encoded in zip(ordered, results):
                progress.advance(task)
                if encoded.reason is not None:
                    rejected.append(image.entry(encoded.reason))
                    continue
                if split != writer_split:  # opened lazily: a split with no samples gets no tar at all
                    if writer is not None:
                        writer.close()
                    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
                    writer = wds.ShardWriter(pattern, maxcount=settings.shard_size, verbose=0, mtime=_TAR_MTIME)
                    writer_split = split
                meta = {"label": image.label, "patient_id": image.patient_id, "source": image.source,
                        "sha256": image.sha256, "orig_size": list(image.orig_size),
                        "stored_size": list(encoded.stored_size)}
                writer.write({
                    "__key__": f"{split}_{position:07d}_{image.sha256[:12]}",
                    "jpg": encoded.jpg,
                    "cls": str(classes.index(image.label)).encode("ascii"),
                    "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                })
                samples_per_file[split][Path(writer.fname).name] += 1
                written[split].append(image)
    finally:
        if writer is not None:
            writer.close()
    shards = {split: [{"file": name, "count": count, "sha256": file_sha256(out_dir / name)}
                      for name, count in samples_per_file[split].items()] for split in SPLITS}
    return shards, written


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- bookkeeping
def _reason_kind(entry: dict) -> str:
    """'duplicate' or the part of the reason before its detail ('truncated image: ...' -> 'truncated image')."""
    return "duplicate" if "duplicate_of" in entry else entry["reason"].split(":")[0]


def _build_index(src: Path, manifest: str | Path | None, label_for: dict[str, str] | None, classes: list[str],
                 files_seen: int, inputs: _Inputs, written: dict[str, list[_InputImage]],
                 shards: dict[str, list[dict]], conflicts: list[dict], settings: PackSettings) -> dict:
    splits = {}
    for split in SPLITS:
        per_class = Counter(image.label for image in written[split])
        splits[split] = {
            "count": len(written[split]),
            "per_class": {cls: per_class[cls] for cls in classes},
            "patients": len({image.patient_id for image in written[split] if image.patient_id is not None}),
            "shards": shards[split],
        }
    totals = {
        "files_seen": files_seen,
        "packed": sum(info["count"] for info in splits.values()),
        "rejected": len(inputs.rejected),
        "skipped": len(inputs.skipped),
        "duplicates_dropped": sum(1 for entry in inputs.rejected if "duplicate_of" in entry),
        "label_conflicts": len(conflicts),
    }
    if totals["files_seen"] != totals["packed"] + totals["rejected"] + totals["skipped"]:
        raise RuntimeError(f"internal error: files are unaccounted for: {totals}")
    return {
        "format_version": FORMAT_VERSION,
        "classes": classes,
        "splits": splits,
        "settings": {**asdict(settings), "resize_short": settings.stored_short_side_px,
                     "max_image_pixels": DEFAULT_MAX_PIXELS},
        "totals": totals,
        "rejected_by_reason": dict(Counter(_reason_kind(entry) for entry in inputs.rejected).most_common()),
        "skipped_by_reason": dict(Counter(_reason_kind(entry) for entry in inputs.skipped).most_common()),
        "source": str(src),
        "manifest": str(Path(manifest).resolve()) if manifest else None,
        "class_map": label_for,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _print_summary(index: dict, console: Console) -> None:
    table = Table(title="packed images per split")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    splits = index["splits"]
    for cls in index["classes"]:
        counts = [splits[split]["per_class"][cls] for split in SPLITS]
        table.add_row(cls, *map(str, counts), str(sum(counts)))
    table.add_row("[bold]all", *(f"[bold]{splits[split]['count']}" for split in SPLITS),
                  f"[bold]{index['totals']['packed']}")
    console.print(table)
    totals = index["totals"]
    console.print(f"files seen {totals['files_seen']} = packed {totals['packed']} + rejected {totals['rejected']} "
                  f"(incl. {totals['duplicates_dropped']} duplicate copies) + skipped {totals['skipped']}")
    for title, by_reason in (("rejected", index["rejected_by_reason"]), ("skipped", index["skipped_by_reason"])):
        if by_reason:
            console.print(f"{title}: " + ", ".join(f"{count} {reason}" for reason, count in by_reason.items()))
    if totals["label_conflicts"]:
        console.print(f"[yellow]{totals['label_conflicts']} identical image(s) carry different labels; "
                      f"see {DUPLICATES_FILE}")


def _write_jsonl(path: Path, entries: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _write_json_atomically(path: Path, data: dict) -> None:
    """Readers never see a half-written index: a folder without index.json is an incomplete pack."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
