"""Packing labelled endoscopy stills, videos and DICOM objects into WebDataset shards with patient-grouped,
deterministic splits.

Owns the order of the work and what is written: the pack options, reading every input once in worker
processes (hashing, decoding, sampling a video's frames, re-encoding what is kept into a spool in the
output folder), writing the shards from the spool, and the bookkeeping files that account for every
input seen (index.json, rejected.jsonl, skipped.jsonl, duplicates.jsonl), and for every part of a packed
input that was left out (a damaged video's lost frames, frames labelled twice: skipped.jsonl lines with
`part`, and a warning). Finding the inputs is
`discovery`'s work, duplicates and splits `splitting`'s, a reviewer's decisions (--relabel) `relabel`'s;
reading one input kind is delegated: images to `images`, videos to `video`, DICOM to `dicom`, frame choice
to `frames`, pseudonyms to `pseudonym`.
The on-disk format and the rules are documented in shards/README.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import tempfile
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple

from rich.console import Console
from rich.table import Table

from gastro_dist import UserError
from gastro_dist.data.dicom import read_dicom, require_pydicom
from gastro_dist.data.discovery import (
    MANIFEST,
    RECORDED_EXTENSIONS,
    SEGMENTS,
    Input,
    Inputs,
    Listing,
    Sample,
    SpoolRef,
    load_class_map,
    nfc,
    normalise_class_names,
    read_listings,
    scan_class_folders,
    unprintable_characters,
)
from gastro_dist.data.frames import MAX_FRAMES_PER_S, Frame, FrameCounts, FrameFilter, FrameRules, LeftOut
from gastro_dist.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    BadImage,
    decode_rgb,
    encode_jpeg,
    open_image,
    read_image_file,
    shrink_to_short_side,
)
from gastro_dist.data.pseudonym import METHOD, Pseudonymiser, load_pseudonymiser
from gastro_dist.data.relabel import UNMATCHED_FILE, apply_decisions, read_decisions
from gastro_dist.data.shard_index import INDEX_FILE, fold_of_split
from gastro_dist.data.splitting import SplitRules, assign_splits, drop_duplicates, keep_frames_once, samples_per_class
from gastro_dist.data.synth import read_synthetic_marker
from gastro_dist.data.video import opened_video, require_pyav, video_frames
from gastro_dist.files import file_sha256, write_json_atomic
from gastro_dist.progress import progress

FORMAT_VERSION = 1
REJECTED_FILE = "rejected.jsonl"
SKIPPED_FILE = "skipped.jsonl"
DUPLICATES_FILE = "duplicates.jsonl"

_IMAGES_PER_TASK = 8  # enough to amortise inter-process overhead, small enough to balance load
_TASKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: results are consumed in order as they arrive
_TAR_MTIME = 0  # fixed member mtime, so identical inputs and settings give byte-identical shards


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
    def split_rules(self) -> SplitRules:
        return SplitRules(seed=self.seed, val_fraction=self.val_fraction, test_per_class=self.test_per_class,
                          test_fraction=self.test_fraction, folds=self.folds)

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
    parts_skipped: int  # parts of packed inputs left out (lost frames, frames labelled twice): lines with `part`
    duplicates_dropped: int
    label_conflicts: int
    videos_packed: int  # videos, video segments and multi-frame DICOMs among files_packed
    frames_from_videos: int
    near_duplicate_frames_dropped: int
    dark_or_blurry_frames_dropped: int


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
    samples: list[Sample]
    frame_counts: FrameCounts | None
    patient_id: str | None  # a DICOM's PatientID, as written in it
    reason: str | None  # None: usable
    left_out: tuple[LeftOut, ...] = ()  # parts of a usable input that are not packed (a damaged video)


# ---------------------------------------------------------------- entry point
def pack_dataset(
    src: str | Path,
    out_dir: str | Path,
    settings: PackSettings,
    manifest: str | Path | None = None,
    class_map: str | Path | None = None,
    segments: str | Path | None = None,
    pseudonym_key_file: str | Path | None = None,
    relabel: str | Path | None = None,
) -> PackResult:
    """Read every input, split by patient and write shards plus bookkeeping to `out_dir`.

    With `pseudonym_key_file`, patient ids and paths are written as keyed hashes (see `pseudonym`).
    With `relabel`, a reviewer's decisions (`relabel`) are applied to the inputs read, before duplicates
    and splits, and index.json records them, so that the result is another shard set.
    User mistakes raise `UserError`; bad input files never do (they are listed in rejected.jsonl).
    With several workers, a calling script needs `if __name__ == "__main__":` (see `_Workers`).
    """
    console = Console(stderr=True, soft_wrap=True)
    src, out_dir = Path(src).resolve(), Path(out_dir).resolve()
    _check_folders(src, out_dir)
    pseudonyms = load_pseudonymiser(pseudonym_key_file, RECORDED_EXTENSIONS, out_dir)
    label_for = load_class_map(Path(class_map), console) if class_map else None
    decisions = read_decisions(Path(relabel)) if relabel else None
    listings = [(listing, Path(path)) for listing, path in ((MANIFEST, manifest), (SEGMENTS, segments)) if path]
    if listings:
        inputs = read_listings(listings, src, label_for, pseudonyms, console)
    else:
        inputs = scan_class_folders(src, out_dir, label_for, pseudonyms, console)
    if label_for is None:  # class names are folder names or listed labels as written (a map's are checked already)
        normalise_class_names(inputs, "manifest labels" if listings else "folders", console)
    if decisions is not None:
        decisions.check_labels({item.label for item in inputs.candidates})
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
        relabel_record = None
        if decisions is not None:
            valid, relabel_record, unmatched = apply_decisions(decisions, valid, inputs, pseudonyms, console)
            _write_jsonl(out_dir / UNMATCHED_FILE, unmatched)
        kept, dropped, conflicts = drop_duplicates(valid, inputs.rejected)
        for conflict in conflicts:
            copies = conflict["copies"]
            console.print(f"[yellow]warning:[/] identical input under labels {sorted({c['label'] for c in copies})}: "
                          f"{', '.join(c['path'] for c in copies)} (one copy per label kept, all in one split; "
                          f"see {DUPLICATES_FILE})")
        kept, frames_dropped, frame_conflicts = keep_frames_once(kept, inputs.rejected, inputs.skipped)
        for conflict in frame_conflicts:
            console.print(f"[yellow]warning:[/] {_frame_conflict(conflict)}")
        dropped, conflicts = dropped + frames_dropped, conflicts + frame_conflicts
        _write_jsonl(out_dir / REJECTED_FILE, inputs.rejected)
        _write_jsonl(out_dir / SKIPPED_FILE, inputs.skipped)  # again: parts of packed inputs were added
        _write_jsonl(out_dir / DUPLICATES_FILE, conflicts)
        classes = _check_classes(inputs, kept, out_dir)
        without_patient_id = _warn_missing_patient_ids(kept, console)
        splits = assign_splits(kept, dropped, classes, settings.split_rules)
        shards = _write_shards(splits, classes, out_dir, settings, options.spool_dir, pseudonyms.enabled, console)

    index = _build_index(src, listings, label_for, classes, files_seen, inputs, splits, shards, conflicts, settings,
                         pseudonyms)
    index["without_patient_id"] = without_patient_id
    index["synthetic"] = read_synthetic_marker(src)
    index["relabel"] = relabel_record
    _print_summary(index, Console(soft_wrap=True))
    write_json_atomic(out_dir / INDEX_FILE, index)  # a folder without index.json is an incomplete pack
    totals = index["totals"]
    return PackResult(out_dir=out_dir, classes=classes,
                      split_counts={split: info["count"] for split, info in index["splits"].items()},
                      **{result_field.name: totals[result_field.name] for result_field in fields(PackResult)
                         if result_field.name in totals})


def _warn_missing_patient_ids(kept: list[Input], console: Console) -> dict[str, int]:
    """Stills and videos without a patient id, counted (index.json's without_patient_id) and said in one
    line: each is then a patient of its own, so one patient's images can fall into train and test."""
    stills = sum(1 for item in kept if item.patient_id is None and item.frame_counts is None)
    videos = sum(1 for item in kept if item.patient_id is None and item.frame_counts is not None)
    if stills or videos:
        what = " and ".join(f"{count} {name}" for count, name in ((stills, "stills"), (videos, "videos")) if count)
        console.print(f"[yellow]warning:[/] {what} of {len(kept)} inputs have no patient id: each counts as a patient "
                      "of its own (a video's frames stay together), so one patient's images can sit in train and test "
                      "and the intervals treat them as independent; a --manifest with a patient_id column "
                      "(path,label,patient_id) keeps a patient's images in one split")
    return {"stills": stills, "videos": videos}


def _frame_conflict(conflict: dict) -> str:
    """One line for a duplicates.jsonl entry of `splitting.keep_frames_once`."""
    start_s, end_s = conflict["seconds"]
    labelled = " and ".join(f"{copy['label']} in {copy['path']}"
                            + (" ({:g}-{:g} s)".format(*copy["segment_s"]) if copy["segment_s"] else "")
                            for copy in conflict["copies"])
    return (f"the same frames ({start_s:g} s to {f'{end_s:g} s' if end_s else 'the end'} of one recording) are "
            f"labelled {labelled}: kept out under both labels (see {SKIPPED_FILE}, {REJECTED_FILE}, {DUPLICATES_FILE})")


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


def _require_decoders(candidates: list[Input]) -> None:
    """Stop before reading anything when an optional decoder that the inputs need is missing."""
    kinds = Counter(item.kind for item in candidates)
    if kinds["video"]:
        require_pyav(kinds["video"])
    if kinds["dicom"]:
        require_pydicom(kinds["dicom"])


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
                left_out: list[LeftOut] = []
                frames = video_frames(handle, options.frame_rules, options.max_pixels, segment_s, left_out)
                return _spooled(sha256, frames, True, options, spool)._replace(left_out=tuple(left_out))
        data = read_image_file(path, options.max_file_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        if kind == "dicom":
            dicom = read_dicom(data, options.max_pixels, options.max_file_bytes)
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
        samples.append(Sample(SpoolRef(Path(spool.name).name, spool.tell(), len(jpg)), frame.orig_size, img.size,
                               frame.index, frame.time_s))
        spool.write(jpg)
    if not samples:
        sampled = frame_filter.counts.sampled
        raise BadImage(f"no usable frames: all {sampled} sampled frames were dark or blurry (--drop-blurry)"
                       if sampled else "no frames: nothing to decode (in the segment)")
    return _Read(sha256, samples, frame_filter.counts if frame_filter else None, patient_id, None)


def _tasks(candidates: list[Input]) -> list[list[Input]]:
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


def _read_inputs(inputs: Inputs, options: _ReadOptions, max_workers: int, pseudonyms: Pseudonymiser,
                 console: Console) -> list[Input]:
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
                patient_id = nfc(result.patient_id)
                if unprintable_characters(patient_id):
                    reason = "unusable PatientID: it holds control characters"
                else:
                    item.patient_id = pseudonyms.patient_id(patient_id)
            if reason is not None:
                inputs.rejected.append(item.entry(reason))
                continue
            item.sha256, item.samples, item.frame_counts = result.sha256, result.samples, result.frame_counts
            valid.append(item)
            for part, reason in result.left_out:
                inputs.skipped.append({**item.entry(reason), "part": part})
                console.print(f"[yellow]warning:[/] {item.source}: {reason}; packed without {part} "
                              f"(see {SKIPPED_FILE})")
    return valid


def _check_classes(inputs: Inputs, kept: list[Input], out_dir: Path) -> list[str]:
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


# ---------------------------------------------------------------- shards
def _write_shards(splits: dict[str, list[Input]], classes: list[str], out_dir: Path, settings: PackSettings,
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
                label = item.sample_label(sample)
                meta = {"label": label, "patient_id": item.patient_id, "source": item.source,
                        "sha256": item.sha256, "orig_size": list(sample.orig_size),
                        "stored_size": list(sample.stored_size), "source_kind": item.kind,
                        "frame_index": sample.frame_index, "frame_time_s": sample.frame_time_s,
                        "segment_s": list(item.segment_s) if item.segment_s else None, "pseudonymised": pseudonymised,
                        "fold": fold_of_split(split)}
                writer.write({
                    "__key__": f"{split}_{position:07d}_{item.sha256[:12]}",
                    "jpg": spool_file.read(sample.jpg.length),
                    "cls": str(classes.index(label)).encode("ascii"),
                    "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                })
                samples_per_file[split][Path(writer.fname).name] += 1
        finally:
            if writer is not None:
                writer.close()
    return {split: [{"file": name, "count": count, "sha256": file_sha256(out_dir / name),
                     "bytes": (out_dir / name).stat().st_size}
                    for name, count in samples_per_file[split].items()] for split in splits}


# ---------------------------------------------------------------- bookkeeping
def _reason_kind(entry: dict) -> str:
    """'duplicate' or the part of the reason before its detail ('truncated image: ...' -> 'truncated image')."""
    return "duplicate" if "duplicate_of" in entry else entry["reason"].split(":")[0]


def _build_index(src: Path, listings: list[tuple[Listing, Path]], label_for: dict[str, str] | None,
                 classes: list[str], files_seen: int, inputs: Inputs, splits: dict[str, list[Input]],
                 shards: dict[str, list[dict]], conflicts: list[dict], settings: PackSettings,
                 pseudonyms: Pseudonymiser) -> dict:
    split_info = {}
    for split in splits:
        per_class = samples_per_class(splits[split])
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
        "skipped": sum(1 for entry in inputs.skipped if "part" not in entry),
        "parts_skipped": sum(1 for entry in inputs.skipped if "part" in entry),
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
        "manifest": recorded_listings.get(MANIFEST),
        "segments": recorded_listings.get(SEGMENTS),
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
    if totals["parts_skipped"]:
        console.print(f"[yellow]{totals['parts_skipped']} part(s) of packed inputs left out[/] (damaged or oversized "
                      f"frames, a lost tail, frames labelled twice); see {SKIPPED_FILE}")
    if totals["videos_packed"]:
        console.print(f"{totals['videos_packed']} video(s) gave {totals['frames_from_videos']} frames; dropped "
                      f"{totals['near_duplicate_frames_dropped']} near-duplicate and "
                      f"{totals['dark_or_blurry_frames_dropped']} dark or blurry frames")
    for title, by_reason in (("rejected", index["rejected_by_reason"]), ("skipped", index["skipped_by_reason"])):
        if by_reason:
            console.print(f"{title}: " + ", ".join(f"{count} {reason}" for reason, count in by_reason.items()))
    if totals["label_conflicts"]:
        console.print(f"[yellow]{totals['label_conflicts']} identical input(s) or frames carry different labels; "
                      f"see {DUPLICATES_FILE}")


def _write_jsonl(path: Path, entries: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
