"""Packing labelled endoscopy stills, videos and DICOM objects into WebDataset shards with patient-grouped,
deterministic splits.

Owns: finding the inputs (class folders, a manifest CSV, a segments CSV, a class map), reading every
input once in worker processes (hashing, decoding, sampling a video's frames, re-encoding what is kept
into a spool in the output folder), exact-duplicate handling, the split rules, writing the shards from
the spool, pseudonymising patient ids and paths when given a key, and the bookkeeping files that account
for every input seen (index.json, rejected.jsonl, skipped.jsonl, duplicates.jsonl). Reading one input
kind is delegated: images to `images`, videos to `video`, DICOM to `dicom`, frame choice to `frames`.
The on-disk format and the rules are documented in shards/README.md.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import math
import multiprocessing
import os
import posixpath
import random
import tempfile
import unicodedata
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gastro_dist import UserError
from gastro_dist.data.dicom import DICOM_EXTENSIONS, read_dicom, require_pydicom
from gastro_dist.data.frames import MAX_FRAMES_PER_S, Frame, FrameCounts, FrameFilter, FrameRules
from gastro_dist.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadImage,
    decode_rgb,
    encode_jpeg,
    open_image,
    read_image_file,
    shrink_to_short_side,
)
from gastro_dist.data.pseudonym import METHOD, Pseudonymiser, load_pseudonymiser
from gastro_dist.data.shard_index import INDEX_FILE, fold_of_split, fold_split
from gastro_dist.data.video import VIDEO_EXTENSIONS, opened_video, require_pyav, video_frames
from gastro_dist.files import file_sha256, file_type, write_json_atomic
from gastro_dist.progress import progress

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
REJECTED_FILE = "rejected.jsonl"
SKIPPED_FILE = "skipped.jsonl"
DUPLICATES_FILE = "duplicates.jsonl"

_KIND_OF_EXTENSION = {**dict.fromkeys(IMAGE_EXTENSIONS, "image"), **dict.fromkeys(VIDEO_EXTENSIONS, "video"),
                      **dict.fromkeys(DICOM_EXTENSIONS, "dicom")}
# Extensions a pseudonymised path keeps: they say what a file is, not whose it is.
_RECORDED_EXTENSIONS = frozenset(_KIND_OF_EXTENSION) | {".csv"}
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
    folds: int | None = None  # --folds K: train+val become K patient-grouped, stratified folds (val_fraction unused)
    resize_short: int | None = None  # None: round(input_size / 0.875); 0: keep original sizes
    input_size: int = 224
    quality: int = 90
    shard_size: int = 1000
    workers: int | None = None
    seed: int = 0
    max_file_mb: float = DEFAULT_MAX_FILE_BYTES / 1e6  # larger images and DICOMs are rejected without being read
    video_fps: float = 1.0  # frames sampled per second of video (or of multi-frame DICOM)
    near_duplicate_bits: int = FrameRules.near_duplicate_bits  # 0 keeps every sampled frame
    blur_threshold: float | None = None  # --drop-blurry: dark frames and a Laplacian variance below this go
    max_frames_per_video: int = FrameRules.max_frames
    max_video_mb: float = 20_000.0  # videos are streamed, never held in memory: only hashing time grows

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            problems.append(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        elif self.val_fraction + self.test_fraction >= 1.0 and not self.folds:
            problems.append("--val-fraction plus --test-fraction must be below 1 to leave training images")
        if self.folds is not None and self.folds < 2:
            problems.append(f"--folds must be at least 2, got {self.folds}")
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
        if not 0 < self.video_fps <= MAX_FRAMES_PER_S:
            problems.append(f"--video-fps must be above 0 and at most {MAX_FRAMES_PER_S}, got {self.video_fps}")
        if not 0 <= self.near_duplicate_bits <= 64:
            problems.append(f"--near-duplicate-bits must be in 0..64 (0 keeps every frame), "
                            f"got {self.near_duplicate_bits}")
        if self.blur_threshold is not None and not 0 <= self.blur_threshold < math.inf:
            problems.append(f"--drop-blurry must be a variance of 0 or more, got {self.blur_threshold}")
        if self.max_frames_per_video < 1:
            problems.append(f"--max-frames-per-video must be at least 1, got {self.max_frames_per_video}")
        if not self.max_video_mb > 0:
            problems.append(f"--max-video-mb must be positive, got {self.max_video_mb}")
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

    @property
    def frame_rules(self) -> FrameRules:
        return FrameRules(fps=self.video_fps, near_duplicate_bits=self.near_duplicate_bits,
                          blur_threshold=self.blur_threshold, max_frames=self.max_frames_per_video)


@dataclass(frozen=True)
class PackResult:
    """Counts of a finished pack (the same numbers as index.json totals)."""

    out_dir: Path
    classes: list[str]
    split_counts: dict[str, int]
    files_seen: int
    files_packed: int  # inputs (files, manifest rows, segments) that gave samples
    packed: int  # samples in the shards: one per still, one per kept video frame
    rejected: int  # includes duplicates_dropped
    skipped: int
    duplicates_dropped: int
    label_conflicts: int
    videos_packed: int  # videos, video segments and multi-frame DICOMs among files_packed
    frames_from_videos: int
    near_duplicate_frames_dropped: int
    dark_or_blurry_frames_dropped: int


class _SpoolRef(NamedTuple):
    """Where an encoded sample waits in the spool until its split and position are known."""

    file: str
    offset: int
    length: int


class _Sample(NamedTuple):
    jpg: _SpoolRef
    orig_size: tuple[int, int]
    stored_size: tuple[int, int]
    frame_index: int | None
    frame_time_s: float | None


@dataclass
class _Input:
    """One input with its label: a still image, a DICOM, or a video (or one segment of it); reading fills
    sha256, samples and, for a video or multi-frame DICOM, frame_counts."""

    path: Path  # where to read it
    source: str  # path relative to SRC with forward slashes (or its pseudonym), as recorded everywhere
    label: str
    patient_id: str | None  # as recorded (a pseudonym with a key)
    kind: str  # "image", "video" or "dicom"
    segment_s: tuple[float, float] | None = None  # (start, end) of a --segments row
    sha256: str = ""
    samples: list[_Sample] = field(default_factory=list)
    frame_counts: FrameCounts | None = None  # None: a still

    @property
    def identity(self) -> tuple:
        """Inputs with the same identity give the same samples: the same bytes, and the same segment."""
        return self.sha256, self.segment_s

    @property
    def order(self) -> tuple:
        return self.source, self.label, self.segment_s or (0.0, 0.0)

    def entry(self, reason: str, **extra) -> dict:
        """A rejected.jsonl line for this input."""
        segment = {"segment_s": list(self.segment_s)} if self.segment_s else {}
        return {"path": self.source, "reason": reason, "label": self.label, "patient_id": self.patient_id,
                **segment, **extra}


@dataclass
class _Inputs:
    """What discovery found: candidate inputs plus everything already set aside, with reasons."""

    candidates: list[_Input] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


class _Listing(NamedTuple):
    """A CSV whose rows are the inputs."""

    option: str  # as named in messages
    path_column: str
    required_columns: tuple[str, ...]
    row_field: str  # rejected.jsonl field giving the row of an unusable row


_MANIFEST = _Listing("manifest", "path", ("path", "label"), "manifest_row")
_SEGMENTS = _Listing("segments file", "video", ("video", "start_s", "end_s", "label"), "segments_row")


@dataclass(frozen=True)
class _ReadOptions:
    """What a worker needs to read, check, sample and encode inputs."""

    short_side_px: int
    quality: int
    max_pixels: int
    max_file_bytes: int
    max_video_bytes: int
    frame_rules: FrameRules
    spool_dir: Path


class _Read(NamedTuple):
    """A worker's result for one input."""

    sha256: str
    samples: list[_Sample]
    frame_counts: FrameCounts | None
    patient_id: str | None  # a DICOM's PatientID, as written in it
    reason: str | None  # None: usable


# ---------------------------------------------------------------- entry point
def pack_dataset(
    src: str | Path,
    out_dir: str | Path,
    settings: PackSettings,
    manifest: str | Path | None = None,
    class_map: str | Path | None = None,
    segments: str | Path | None = None,
    pseudonym_key_file: str | Path | None = None,
) -> PackResult:
    """Read every input, split by patient and write shards plus bookkeeping to `out_dir`.

    With `pseudonym_key_file`, patient ids and paths are written as keyed hashes (see `pseudonym`).
    User mistakes raise `UserError`; bad input files never do (they are listed in rejected.jsonl).
    With several workers, a calling script needs `if __name__ == "__main__":` (see `_Workers`).
    """
    console = Console(stderr=True, soft_wrap=True)
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    _check_folders(src, out_dir)
    pseudonyms = load_pseudonymiser(pseudonym_key_file, _RECORDED_EXTENSIONS, out_dir)
    label_for = _load_class_map(Path(class_map), console) if class_map else None
    listings = [(listing, Path(path)) for listing, path in ((_MANIFEST, manifest), (_SEGMENTS, segments)) if path]
    if listings:
        inputs = _read_listings(listings, src, label_for, pseudonyms, console)
    else:
        inputs = _scan_class_folders(src, out_dir, label_for, pseudonyms, console)
    if label_for is None:  # class names are folder names or listed labels as written (a map's are checked already)
        _normalise_class_names(inputs, "manifest labels" if listings else "folders", console)
    _require_decoders(inputs.candidates)
    files_seen = len(inputs.candidates) + len(inputs.skipped) + len(inputs.rejected)  # before reading moves any
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / SKIPPED_FILE, inputs.skipped)
    if not inputs.candidates:
        _write_jsonl(out_dir / REJECTED_FILE, inputs.rejected)
        raise UserError(f"no usable image files under {src} (see {SKIPPED_FILE} and {REJECTED_FILE} in {out_dir}); "
                        "pass a folder with one sub-folder per class, or --manifest / --segments")

    with tempfile.TemporaryDirectory(prefix=".spool-", dir=out_dir) as spool_dir:
        options = _ReadOptions(short_side_px=settings.stored_short_side_px, quality=settings.quality,
                               max_pixels=DEFAULT_MAX_PIXELS, max_file_bytes=settings.max_file_bytes,
                               max_video_bytes=int(settings.max_video_mb * 1e6), frame_rules=settings.frame_rules,
                               spool_dir=Path(spool_dir))
        valid = _read_inputs(inputs, options, settings.workers or _available_cpus(), pseudonyms, console)
        kept, dropped, conflicts = _drop_duplicates(valid, inputs.rejected)
        _write_jsonl(out_dir / REJECTED_FILE, inputs.rejected)
        _write_jsonl(out_dir / DUPLICATES_FILE, conflicts)
        for conflict in conflicts:
            copies = conflict["copies"]
            console.print(f"[yellow]warning:[/] identical input under labels {sorted({c['label'] for c in copies})}: "
                          f"{', '.join(c['path'] for c in copies)} (one copy per label kept, all in one split; "
                          f"see {DUPLICATES_FILE})")
        classes = _check_classes(inputs, kept, out_dir)
        splits = _assign_splits(kept, dropped, classes, settings)
        shards = _write_shards(splits, classes, out_dir, settings, options.spool_dir, pseudonyms.enabled, console)

    index = _build_index(src, listings, label_for, classes, files_seen, inputs, splits, shards, conflicts, settings,
                         pseudonyms)
    _print_summary(index, Console(soft_wrap=True))
    write_json_atomic(out_dir / INDEX_FILE, index)  # a folder without index.json is an incomplete pack
    totals = index["totals"]
    return PackResult(out_dir=out_dir, classes=classes,
                      split_counts={split: info["count"] for split, info in index["splits"].items()},
                      **{result_field.name: totals[result_field.name] for result_field in fields(PackResult)
                         if result_field.name in totals})


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


def _require_decoders(candidates: list[_Input]) -> None:
    """Stop before reading anything when an optional decoder that the inputs need is missing."""
    kinds = Counter(item.kind for item in candidates)
    if kinds["video"]:
        require_pyav(kinds["video"])
    if kinds["dicom"]:
        require_pydicom(kinds["dicom"])


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
    """Replace the labels of inputs (candidates and rejected ones) by their checked class names."""
    class_of = _class_names({item.label for item in inputs.candidates} |
                            {entry["label"] for entry in inputs.rejected if entry.get("label")}, what, console)
    for item in inputs.candidates:
        item.label = class_of[item.label]
    for entry in inputs.rejected:
        if entry.get("label"):
            entry["label"] = class_of[entry["label"]]


def _warn_unused_keys(label_for: dict[str, str], used_keys: set[str], what: str, console: Console) -> None:
    for key in sorted(set(label_for) - used_keys):
        console.print(f"[yellow]warning:[/] class map key {key!r} matched no {what}")


def _input_kind(path: str) -> str | None:
    """'image', 'video' or 'dicom' by the extension (any case); None: not an input."""
    return _KIND_OF_EXTENSION.get(Path(path).suffix.lower())


def _scan_class_folders(src: Path, out_dir: Path, label_for: dict[str, str] | None, pseudonyms: Pseudonymiser,
                        console: Console) -> _Inputs:
    """Class = first-level folder, or with a class map the longest mapped folder prefix of the path."""
    inputs = _Inputs()
    files = _walk_tree(src, exclude_dir=out_dir, skipped=inputs.skipped, pseudonyms=pseudonyms)
    used_keys: set[str] = set()
    for source, path in files:
        folders = source.split("/")[:-1]
        kind = _input_kind(source)
        if kind is None:
            inputs.skipped.append({"path": pseudonyms.path(source), "reason": "not an image extension"})
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
            inputs.skipped.append({"path": pseudonyms.path(source), "reason": missing_reason})
        else:
            inputs.candidates.append(_Input(path=path, source=pseudonyms.path(source), label=label, patient_id=None,
                                            kind=kind))
    if label_for is not None:
        _warn_unused_keys(label_for, used_keys, "folder", console)
    return inputs


def _walk_tree(src: Path, exclude_dir: Path, skipped: list[dict], pseudonyms: Pseudonymiser) -> list[tuple[str, Path]]:
    """All files under src as (relative path, path), in sorted order, following folder symlinks.

    Hidden entries, folders reached twice (symlink loops or two links to one folder) and unreadable
    folders are appended to `skipped`, one entry each (paths as recorded), instead of being entered.
    """
    files: list[tuple[str, Path]] = []
    first_visit: dict[str, str] = {}  # real path of each entered folder -> relative path it was entered as

    def skip(rel_path: str, reason: str) -> None:
        skipped.append({"path": pseudonyms.path(rel_path), "reason": reason})

    def visit(folder: Path, rel_folder: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(folder)
        if real in first_visit:
            first = first_visit[real]
            is_loop = real in ancestors
            skip(rel_folder + "/", "symlink loop" if is_loop else
                 f"already scanned: same folder as {pseudonyms.path(first) if first else '.'}")
            return
        first_visit[real] = rel_folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            skip(rel_folder + "/", f"unreadable folder: {err.strerror or err}")
            return
        for entry in entries:
            rel_path = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            is_dir = entry.is_dir()  # follows symlinks
            if entry.name.startswith("."):
                kind = "folder" if is_dir else "file"
                skip(rel_path + ("/" if is_dir else ""), f"hidden {kind}")
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
                    skip(rel_path, f"not a regular file: {kind}")

    visit(src, "", frozenset())
    return files


def _read_listings(listings: list[tuple[_Listing, Path]], src: Path, label_for: dict[str, str] | None,
                   pseudonyms: Pseudonymiser, console: Console) -> _Inputs:
    """The rows of --manifest and --segments are the only inputs; with a class map, labels are renamed and
    unmapped ones skipped. Segments of one video that overlap are rejected (a frame would get two labels)."""
    inputs = _Inputs()
    used_keys: set[str] = set()
    for listing, path in listings:
        _read_listing(listing, path, src, label_for, pseudonyms, inputs, used_keys)
    _reject_overlapping_segments(inputs)
    if label_for is not None:
        _warn_unused_keys(label_for, used_keys, "manifest label", console)
    return inputs


def _read_listing(listing: _Listing, csv_path: Path, src: Path, label_for: dict[str, str] | None,
                  pseudonyms: Pseudonymiser, inputs: _Inputs, used_keys: set[str]) -> None:
    """Rows are untrusted: a path leading outside SRC is skipped and never read, and so is anything but a
    regular file."""
    if not csv_path.is_file():
        raise UserError(f"{listing.option} {csv_path} not found; pass a CSV with columns "
                        f"{','.join(listing.required_columns)}[,patient_id]")
    for row_number, row in _csv_rows(csv_path, listing):
        cell = row[listing.path_column]
        relative = _manifest_source(cell, src) if cell else f"<{listing.option} row {row_number}>"
        source = pseudonyms.path(relative or cell)
        label, patient_id = row["label"], pseudonyms.patient_id(_nfc(row.get("patient_id", "")) or None)
        if label_for is not None and label:
            used_keys.add(_map_key(label))
            label = label_for.get(_map_key(label), "")
            if not label:
                inputs.skipped.append({"path": source, "reason": "no class mapping", "label": row["label"]})
                continue
        if relative is None:
            inputs.skipped.append({"path": source, "reason": "outside the source folder", "label": label})
            continue
        kind = _input_kind(relative)
        item = _Input(path=src / relative, source=source, label=label, patient_id=patient_id, kind=kind or "")
        if not cell:
            inputs.rejected.append(item.entry(f"empty path in {listing.option}", **{listing.row_field: row_number}))
        elif not label:
            inputs.rejected.append(item.entry(f"empty label in {listing.option}", **{listing.row_field: row_number}))
        elif kind is None or (listing is _SEGMENTS and kind != "video"):
            extension = "a video" if listing is _SEGMENTS else "an image"
            inputs.skipped.append({"path": source, "reason": f"not {extension} extension", "label": label})
        else:
            if listing is _SEGMENTS:
                try:
                    item.segment_s = _segment_times(row)
                except ValueError as err:
                    inputs.rejected.append(item.entry(f"bad segment: {err}", **{listing.row_field: row_number}))
                    continue
            try:
                kind_on_disk = file_type(os.stat(item.path).st_mode)  # links followed, nothing opened
            except OSError as err:
                missing = isinstance(err, (FileNotFoundError, NotADirectoryError))
                inputs.rejected.append(item.entry("missing file" if missing else
                                                  f"unreadable file: {err.strerror or err}"))
                continue
            if kind_on_disk == "file":
                inputs.candidates.append(item)
            else:
                inputs.skipped.append({"path": source, "reason": f"not a regular file: {kind_on_disk}", "label": label})


def _segment_times(row: dict[str, str]) -> tuple[float, float]:
    try:
        start_s, end_s = float(row["start_s"]), float(row["end_s"])
    except ValueError:
        raise ValueError(f"start_s {row['start_s']!r} and end_s {row['end_s']!r} must be numbers of seconds") from None
    if not (math.isfinite(end_s) and 0 <= start_s < end_s):
        raise ValueError(f"start_s {start_s:g} and end_s {end_s:g} must satisfy 0 <= start_s < end_s")
    return start_s, end_s


def _reject_overlapping_segments(inputs: _Inputs) -> None:
    """Of segments of one video that overlap, the one starting first is kept and the others rejected."""
    segments_of_video: dict[Path, list[_Input]] = defaultdict(list)
    for item in inputs.candidates:
        if item.segment_s is not None:
            segments_of_video[Path(os.path.normpath(item.path))].append(item)
    overlapping: set[int] = set()
    for segments in segments_of_video.values():
        previous = None
        for item in sorted(segments, key=lambda item: (item.segment_s, item.label)):
            if previous is not None and item.segment_s[0] < previous.segment_s[1]:
                start_s, end_s = previous.segment_s
                inputs.rejected.append(item.entry(f"overlapping segment: the same video's segment "
                                                  f"{start_s:g}-{end_s:g} s ({previous.label}) covers part of it"))
                overlapping.add(id(item))
            else:
                previous = item
    inputs.candidates = [item for item in inputs.candidates if id(item) not in overlapping]


def _csv_rows(path: Path, listing: _Listing) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped cells by lower-case column name) of each data row of a UTF-8 CSV."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet exports add a BOM
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]  # "Path, Label" works too
            missing_columns = [name for name in listing.required_columns if name not in reader.fieldnames]
            if missing_columns:
                raise UserError(
                    f"{listing.option} {path} lacks column(s) {', '.join(missing_columns)}; "
                    f"its first row must be a header with {','.join(listing.required_columns)}[,patient_id]"
                )
            for row_number, raw_row in enumerate(reader, start=2):
                row = {key: (value or "").strip() for key, value in raw_row.items() if key}
                _refuse_damaged_row(path, listing, row_number, row)
                yield row_number, row
    except UnicodeDecodeError:
        raise UserError(f"{listing.option} {path} is not UTF-8 text; save it as UTF-8 ('CSV UTF-8')") from None
    except csv.Error as err:
        raise UserError(f"{listing.option} {path} is not a readable CSV ({err}); save it again as CSV") from None


def _refuse_damaged_row(path: Path, listing: _Listing, row_number: int, row: dict[str, str]) -> None:
    """A NUL in a path or an unprintable character in a patient id means a damaged (or hostile) file: stop.

    (A patient id is the unit the splits keep apart, so a garbled one must not silently become a new patient.)
    """
    cell = row[listing.path_column]
    if "\0" in cell:
        raise UserError(f"{listing.option} {path} row {row_number}: the path {cell!r} contains a NUL character; "
                        "fix that row")
    bad = _unprintable_characters(row.get("patient_id", ""))
    if bad:
        raise UserError(f"{listing.option} {path} row {row_number}: patient_id {row['patient_id']!r} contains "
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


# ---------------------------------------------------------------- reading (worker processes)
def _read_task(jobs: list[tuple[Path, str, tuple[float, float] | None]], options: _ReadOptions) -> list[_Read]:
    """Read each (path, kind, segment) of one task; encoded samples go to this process's own spool file."""
    with (options.spool_dir / f"{os.getpid()}.spool").open("ab") as spool:
        return [_read_one(path, kind, segment_s, options, spool) for path, kind, segment_s in jobs]


def _read_one(path: Path, kind: str, segment_s: tuple[float, float] | None, options: _ReadOptions,
              spool: BinaryIO) -> _Read:
    """Hash, fully decode, sample and encode one input, or say why it cannot be used."""
    try:
        if kind == "video":
            with opened_video(path, options.max_video_bytes) as (handle, sha256):
                frames = video_frames(handle, options.frame_rules, options.max_pixels, segment_s)
                return _spooled(sha256, frames, True, options, spool)
        data = read_image_file(path, options.max_file_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        if kind == "dicom":
            dicom = read_dicom(data, options.max_pixels)
            return _spooled(sha256, dicom.frames(options.frame_rules), dicom.num_frames > 1, options, spool,
                            dicom.patient_id)
        img = open_image(data, options.max_pixels)
        orig_size = img.size  # before EXIF rotation, which decoding applies in place
        # decoded at the cheapest JPEG scale that still covers the stored size (the whole stream is still read)
        still = Frame(decode_rgb(img, min_short_side_px=options.short_side_px or None), orig_size, None, None)
        return _spooled(sha256, [still], False, options, spool)
    except BadImage as err:
        return _Read("", [], None, None, err.reason)
    except OSError:
        raise  # writing the spool failed (a full disk): the pack stops, as for any write
    except Exception as err:  # one bad file must never stop the run
        return _Read("", [], None, None, f"corrupt {kind}: {type(err).__name__}: {err}")


def _spooled(sha256: str, frames: Iterable[Frame], moving: bool, options: _ReadOptions, spool: BinaryIO,
             patient_id: str | None = None) -> _Read:
    """Shrink and encode each frame into the spool; a moving input's frames pass the frame filters first."""
    frame_filter = FrameFilter(options.frame_rules) if moving else None
    samples = []
    for frame in frames:
        if frame_filter is not None and not frame_filter.keep(frame.image):
            continue
        img = shrink_to_short_side(frame.image, options.short_side_px)
        jpg = encode_jpeg(img, options.quality)
        samples.append(_Sample(_SpoolRef(Path(spool.name).name, spool.tell(), len(jpg)), frame.orig_size, img.size,
                               frame.index, frame.time_s))
        spool.write(jpg)
    if not samples:
        sampled = frame_filter.counts.sampled
        raise BadImage(f"no usable frames: all {sampled} sampled frames were dark or blurry (--drop-blurry)"
                       if sampled else "no frames: nothing to decode (in the segment)")
    return _Read(sha256, samples, frame_filter.counts if frame_filter else None, patient_id, None)


def _tasks(candidates: list[_Input]) -> list[list[_Input]]:
    """Stills in chunks of `_IMAGES_PER_TASK`; each video or DICOM a task of its own (it may hold thousands of
    frames, and a chunk of several would leave the other workers idle)."""
    tasks, stills = [], []
    for item in candidates:
        if item.kind != "image":
            tasks.append([item])
            continue
        stills.append(item)
        if len(stills) == _IMAGES_PER_TASK:
            tasks.append(stills)
            stills = []
    return tasks + ([stills] if stills else [])


class _Workers:
    """Runs a function over chunks of items in worker processes (in this process for one worker).

    Results come back in input order with only a few chunks per worker in flight, so memory stays
    bounded however many inputs there are. "spawn" rather than fork: the parent runs rich's refresh
    thread, and forking a threaded process can deadlock the child. So scripts that call `pack_dataset`
    with several workers need the usual `if __name__ == "__main__":` guard.
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

    def map_in_order(self, function: Callable[[list], list], chunks: list[list]) -> Iterator:
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


def _read_inputs(inputs: _Inputs, options: _ReadOptions, max_workers: int, pseudonyms: Pseudonymiser,
                 console: Console) -> list[_Input]:
    """Fill sha256, samples and frame counts of the usable inputs (a DICOM's PatientID stands in for a
    missing patient id); move the others to inputs.rejected."""
    tasks = _tasks(inputs.candidates)
    jobs = [[(item.path, item.kind, item.segment_s) for item in task] for task in tasks]
    valid = []
    with _Workers(min(max_workers, len(tasks))) as workers, progress(console, unit="files", transient=True) as bar:
        reading = bar.add_task("reading", total=len(inputs.candidates))
        results = workers.map_in_order(functools.partial(_read_task, options=options), jobs)
        for item, result in zip((item for task in tasks for item in task), results):
            bar.advance(reading)
            reason = result.reason
            if reason is None and item.patient_id is None and result.patient_id:
                patient_id = _nfc(result.patient_id)
                if _unprintable_characters(patient_id):
                    reason = "unusable PatientID: it holds control characters"
                else:
                    item.patient_id = pseudonyms.patient_id(patient_id)
            if reason is not None:
                inputs.rejected.append(item.entry(reason))
                continue
            item.sha256, item.samples, item.frame_counts = result.sha256, result.samples, result.frame_counts
            valid.append(item)
    return valid


def _check_classes(inputs: _Inputs, kept: list[_Input], out_dir: Path) -> list[str]:
    """Sorted class names; a class whose every input was rejected is an error, not a silent drop."""
    classes = sorted({item.label for item in kept})
    if not classes:
        raise UserError(f"none of the {len(inputs.candidates)} input files could be read; "
                        f"see {out_dir / REJECTED_FILE}")
    labels_seen = {item.label for item in inputs.candidates}
    labels_seen |= {entry["label"] for entry in inputs.rejected if entry["label"]}
    empty_labels = sorted(labels_seen - set(classes))
    if empty_labels:
        raise UserError(
            f"label(s) {', '.join(empty_labels)} have no usable images (see {out_dir / REJECTED_FILE}); "
            "fix or remove those files / manifest rows"
        )
    return classes


# ---------------------------------------------------------------- duplicates and splits
def _drop_duplicates(items: list[_Input], rejected: list[dict]) -> tuple[list[_Input], list[_Input], list[dict]]:
    """Split into (kept, dropped copies, label conflicts): identical inputs are packed once per label.

    Identical means the same bytes (and, for video segments, the same segment). Copies are taken in sorted
    source order, so the kept copy is the first path alphabetically. Identical inputs under different labels
    are all kept (the labels disagree; a human must decide) and reported; the split rules keep them in one split.
    """
    copies_by_identity: dict[tuple, list[_Input]] = defaultdict(list)
    for item in sorted(items, key=lambda item: item.order):
        copies_by_identity[item.identity].append(item)
    kept, dropped, conflicts = [], [], []
    for (sha256, _), copies in copies_by_identity.items():
        first_by_label: dict[str, _Input] = {}
        for item in copies:
            first = first_by_label.setdefault(item.label, item)
            if first is item:
                kept.append(item)
            else:
                dropped.append(item)
                rejected.append(item.entry(f"duplicate of {first.source}", duplicate_of=first.source, sha256=sha256))
        if len(first_by_label) > 1:
            conflicts.append({"sha256": sha256, "copies": [
                {"path": item.source, "label": item.label, "patient_id": item.patient_id} for item in copies]})
    kept.sort(key=lambda item: item.order)
    return kept, dropped, conflicts


class _Group(NamedTuple):
    """Inputs that must share a split: same patient, or transitively the same bytes (every segment of a video)."""

    items: list[_Input]
    class_counts: Counter  # samples per class


def _group_inputs(kept: list[_Input], dropped: list[_Input]) -> list[_Group]:
    """Union-find over inputs, patient ids and sha256s; groups come out in sorted-source order.

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

    for position, item in enumerate(kept):
        union(("input", position), ("sha", item.sha256))
        if item.patient_id is not None:
            union(("input", position), ("patient", item.patient_id))
    for item in dropped:
        if item.patient_id is not None:
            union(("patient", item.patient_id), ("sha", item.sha256))
    members: dict[tuple, list[_Input]] = defaultdict(list)
    for position, item in enumerate(kept):
        members[find(("input", position))].append(item)
    return [_Group(items, _samples_per_class(items)) for items in members.values()]


def _samples_per_class(items: Iterable[_Input]) -> Counter:
    counts: Counter = Counter()
    for item in items:
        counts[item.label] += len(item.samples)
    return counts


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


def _assign_splits(kept: list[_Input], dropped: list[_Input], classes: list[str],
                   settings: PackSettings) -> dict[str, list[_Input]]:
    """Test first (exact per class, or a fraction), then a stratified val fraction of the rest; rest is train.
    With --folds K the rest goes to K folds instead (the test split is the same as without folds).

    Quotas count samples, so a video counts with its frames."""
    groups = _group_inputs(kept, dropped)
    rng = random.Random(f"{settings.seed}:splits")
    if settings.test_per_class:
        test = _take_exact_test(groups, classes, settings.test_per_class, rng)
    else:
        test, _ = _fill_quotas(groups, _fraction_quota(groups, settings.test_fraction), rng, top_up_empty=True)
    remaining = [index for index in range(len(groups)) if index not in test]
    remaining_groups = [groups[index] for index in remaining]
    if settings.folds:
        return _fold_splits(groups, test, remaining_groups, settings)
    val_positions, _ = _fill_quotas(remaining_groups, _fraction_quota(remaining_groups, settings.val_fraction), rng,
                                    top_up_empty=True)
    val = {remaining[position] for position in val_positions}
    splits: dict[str, list[_Input]] = {split: [] for split in SPLITS}
    for index, group in enumerate(groups):
        splits["test" if index in test else "val" if index in val else "train"].extend(group.items)
    _check_disjoint(splits)
    return splits


def _fold_splits(groups: list[_Group], test: set[int], remaining_groups: list[_Group],
                 settings: PackSettings) -> dict[str, list[_Input]]:
    """fold-0 .. fold-(K-1) from the groups outside the test split, then test."""
    fold_of_group = assign_folds([group.class_counts for group in remaining_groups], settings.folds,
                                 random.Random(f"{settings.seed}:folds"))
    splits: dict[str, list[_Input]] = {fold_split(fold): [] for fold in range(settings.folds)}
    for group, fold in zip(remaining_groups, fold_of_group):
        splits[fold_split(fold)].extend(group.items)
    splits["test"] = [item for index in sorted(test) for item in groups[index].items]
    _check_disjoint(splits)
    return splits


def assign_folds(class_counts: list[Counter], num_folds: int, rng: random.Random) -> list[int]:
    """The fold of each group (given as its samples per class), with StratifiedGroupKFold's aim: whole
    groups, and every fold as close as possible to an equal share of every class.

    Greedy, largest group first (equal sizes in seeded random order): each group goes to the fold where
    it adds least to the squared distance from the equal shares, i.e. the smallest sum over its classes
    of (its samples of the class x the fold's samples of the class); ties go to the fold with fewer
    samples, then the lower number. One-image groups thus keep each class's folds within one image of
    each other; a larger group can make a class's folds differ by up to its size.
    """
    if len(class_counts) < num_folds:
        raise UserError(f"--folds {num_folds} needs at least {num_folds} patients (or images without a patient id) "
                        f"outside the test split, and there are {len(class_counts)}; use fewer folds")
    order = list(range(len(class_counts)))
    rng.shuffle(order)
    order.sort(key=lambda index: -sum(class_counts[index].values()))  # stable: shuffled within each size
    in_fold = [Counter() for _ in range(num_folds)]
    size_of_fold = [0] * num_folds
    fold_of = [0] * len(class_counts)
    for index in order:
        counts = class_counts[index]
        fold = min(range(num_folds), key=lambda f: (sum(n * in_fold[f][cls] for cls, n in counts.items()),
                                                    size_of_fold[f], f))
        fold_of[index] = fold
        in_fold[fold].update(counts)
        size_of_fold[fold] += sum(counts.values())
    return fold_of


def _check_disjoint(splits: dict[str, list[_Input]]) -> None:
    """The leakage guarantee, checked on the result rather than trusted from the algorithm."""
    for attribute in ("patient_id", "sha256"):
        split_of: dict[str, str] = {}
        for split, items in splits.items():
            for item in items:
                value = getattr(item, attribute)
                if value is not None and split_of.setdefault(value, split) != split:
                    raise RuntimeError(f"internal error: {attribute} {value} is in both {split_of[value]} and {split}")


# ---------------------------------------------------------------- shards
def _write_shards(splits: dict[str, list[_Input]], classes: list[str], out_dir: Path, settings: PackSettings,
                  spool_dir: Path, pseudonymised: bool, console: Console) -> dict[str, list[dict]]:
    """Write each split's samples, in seeded random order, from the spool; returns the shards per split."""
    import webdataset as wds  # imports torch: only the parent pays for it, and only once shards are written

    ordered = []
    for split in splits:
        samples = [(item, sample) for item in sorted(splits[split], key=lambda item: item.order)
                   for sample in item.samples]
        random.Random(f"{settings.seed}:{split}:order").shuffle(samples)  # so every shard mixes classes and videos
        ordered.extend((split, position, item, sample) for position, (item, sample) in enumerate(samples))

    samples_per_file: dict[str, Counter] = {split: Counter() for split in splits}
    writer, writer_split = None, None
    with contextlib.ExitStack() as spool_files, progress(console, unit="samples", transient=True) as bar:
        spool = {path.name: spool_files.enter_context(path.open("rb")) for path in spool_dir.iterdir()}
        try:
            writing = bar.add_task("writing shards", total=len(ordered))
            for split, position, item, sample in ordered:
                bar.advance(writing)
                if split != writer_split:  # opened lazily: a split with no samples gets no tar at all
                    if writer is not None:
                        writer.close()
                    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
                    writer = wds.ShardWriter(pattern, maxcount=settings.shard_size, verbose=0, mtime=_TAR_MTIME)
                    writer_split = split
                spool_file = spool[sample.jpg.file]
                spool_file.seek(sample.jpg.offset)
                meta = {"label": item.label, "patient_id": item.patient_id, "source": item.source,
                        "sha256": item.sha256, "orig_size": list(sample.orig_size),
                        "stored_size": list(sample.stored_size), "source_kind": item.kind,
                        "frame_index": sample.frame_index, "frame_time_s": sample.frame_time_s,
                        "segment_s": list(item.segment_s) if item.segment_s else None, "pseudonymised": pseudonymised,
                        "fold": fold_of_split(split)}
                writer.write({
                    "__key__": f"{split}_{position:07d}_{item.sha256[:12]}",
                    "jpg": spool_file.read(sample.jpg.length),
                    "cls": str(classes.index(item.label)).encode("ascii"),
                    "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                })
                samples_per_file[split][Path(writer.fname).name] += 1
        finally:
            if writer is not None:
                writer.close()
    return {split: [{"file": name, "count": count, "sha256": file_sha256(out_dir / name)}
                    for name, count in samples_per_file[split].items()] for split in splits}


# ---------------------------------------------------------------- bookkeeping
def _reason_kind(entry: dict) -> str:
    """'duplicate' or the part of the reason before its detail ('truncated image: ...' -> 'truncated image')."""
    return "duplicate" if "duplicate_of" in entry else entry["reason"].split(":")[0]


def _build_index(src: Path, listings: list[tuple[_Listing, Path]], label_for: dict[str, str] | None,
                 classes: list[str], files_seen: int, inputs: _Inputs, splits: dict[str, list[_Input]],
                 shards: dict[str, list[dict]], conflicts: list[dict], settings: PackSettings,
                 pseudonyms: Pseudonymiser) -> dict:
    split_info = {}
    for split in splits:
        per_class = _samples_per_class(splits[split])
        split_info[split] = {
            "count": sum(per_class.values()),
            "per_class": {cls: per_class[cls] for cls in classes},
            "patients": len({item.patient_id for item in splits[split] if item.patient_id is not None}),
            "shards": shards[split],
        }
    packed_inputs = [item for items in splits.values() for item in items]
    moving = [item for item in packed_inputs if item.frame_counts is not None]
    totals = {
        "files_seen": files_seen,
        "files_packed": len(packed_inputs),
        "packed": sum(info["count"] for info in split_info.values()),
        "rejected": len(inputs.rejected),
        "skipped": len(inputs.skipped),
        "duplicates_dropped": sum(1 for entry in inputs.rejected if "duplicate_of" in entry),
        "label_conflicts": len(conflicts),
        "videos_packed": len(moving),
        "frames_from_videos": sum(len(item.samples) for item in moving),
        "near_duplicate_frames_dropped": sum(item.frame_counts.near_duplicates for item in moving),
        "dark_or_blurry_frames_dropped": sum(item.frame_counts.dark_or_blurry for item in moving),
    }
    if (totals["files_seen"] != totals["files_packed"] + totals["rejected"] + totals["skipped"]
            or totals["packed"] != totals["files_packed"] - totals["videos_packed"] + totals["frames_from_videos"]):
        raise RuntimeError(f"internal error: inputs or samples are unaccounted for: {totals}")
    recorded_listings = {listing: pseudonyms.path(str(path.resolve())) for listing, path in listings}
    return {
        "format_version": FORMAT_VERSION,
        "classes": classes,
        "splits": split_info,
        "settings": {**asdict(settings), "resize_short": settings.stored_short_side_px,
                     "max_image_pixels": DEFAULT_MAX_PIXELS, **({"val_fraction": None} if settings.folds else {})},
        "totals": totals,
        "rejected_by_reason": dict(Counter(_reason_kind(entry) for entry in inputs.rejected).most_common()),
        "skipped_by_reason": dict(Counter(_reason_kind(entry) for entry in inputs.skipped).most_common()),
        "source": pseudonyms.path(str(src)),
        "manifest": recorded_listings.get(_MANIFEST),
        "segments": recorded_listings.get(_SEGMENTS),
        "class_map": {pseudonyms.path(key): name for key, name in label_for.items()} if label_for else None,
        "pseudonymisation": ({"method": METHOD, "key_fingerprint": pseudonyms.key_fingerprint()}
                             if pseudonyms.enabled else None),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _print_summary(index: dict, console: Console) -> None:
    table = Table(title="packed images per split")
    table.add_column("class")
    splits = index["splits"]
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for cls in index["classes"]:
        counts = [splits[split]["per_class"][cls] for split in splits]
        table.add_row(cls, *map(str, counts), str(sum(counts)))
    table.add_row("[bold]all", *(f"[bold]{splits[split]['count']}" for split in splits),
                  f"[bold]{index['totals']['packed']}")
    console.print(table)
    for split, info in splits.items():
        absent = [cls for cls, count in info["per_class"].items() if count == 0]
        if fold_of_split(split) is not None and absent:
            console.print(f"[yellow]warning:[/] {split} has no image of {', '.join(absent)} (too few patients): "
                          "validating on it gives no accuracy for that class")
    totals = index["totals"]
    console.print(f"files seen {totals['files_seen']} = packed {totals['files_packed']} + rejected "
                  f"{totals['rejected']} (incl. {totals['duplicates_dropped']} duplicate copies) + skipped "
                  f"{totals['skipped']}")
    if totals["videos_packed"]:
        console.print(f"{totals['videos_packed']} video(s) gave {totals['frames_from_videos']} frames; dropped "
                      f"{totals['near_duplicate_frames_dropped']} near-duplicate and "
                      f"{totals['dark_or_blurry_frames_dropped']} dark or blurry frames")
    for title, by_reason in (("rejected", index["rejected_by_reason"]), ("skipped", index["skipped_by_reason"])):
        if by_reason:
            console.print(f"{title}: " + ", ".join(f"{count} {reason}" for reason, count in by_reason.items()))
    if totals["label_conflicts"]:
        console.print(f"[yellow]{totals['label_conflicts']} identical input(s) carry different labels; "
                      f"see {DUPLICATES_FILE}")


def _write_jsonl(path: Path, entries: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
