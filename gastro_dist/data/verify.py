"""`gastro-dist verify`: a finished pack re-read with the training reader and checked against its
index.json, sample by sample (the rules: shards/README.md), cross-validation folds included (each
sample's fold, no patient or image in two folds); damage is reported, never a traceback."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from gastro_dist import RunFailure, UserError
from gastro_dist.config import DataConfig
from gastro_dist.data.images import BadImage, decode_rgb, open_image
from gastro_dist.data.locations import Location, ShardURL, shard_location
from gastro_dist.data.shard_index import (INDEX_FILE, BadIndex, ShardFile, fold_of_split, parse_shard_index,
                                          read_index_bytes)
from gastro_dist.data.shard_reader import TarSample, scan_shard
from gastro_dist.progress import progress

SAMPLE_MEMBERS = ("cls", "jpg", "json")
SAMPLE_JSON_FIELDS = ("label", "patient_id", "source", "sha256", "orig_size", "stored_size")


@dataclass
class _Seen:
    """What earlier shards contained, for the checks that span shards and splits."""

    keys: set[str] = field(default_factory=set)
    split_of_patient: dict[str, str] = field(default_factory=dict)
    split_of_sha256: dict[str, str] = field(default_factory=dict)


def verify_shards(shard_dir: str | Location, max_member_mb: int = DataConfig.max_member_mb) -> list[str]:
    """Check a pack folder (local, or at a URL); returns the problems found (empty: all good) and prints
    a one-line verdict."""
    shard_dir = shard_location(shard_dir)
    if isinstance(shard_dir, Path) and not (shard_dir / INDEX_FILE).is_file():
        raise UserError(f"{shard_dir / INDEX_FILE} not found: not a finished pack; pass the --out folder of a completed `pack`")
    started = time.monotonic()
    try:
        index_bytes = read_index_bytes(shard_dir)  # downloaded once: the index and its totals
        index = parse_shard_index(shard_dir, index_bytes)
        raw = json.loads(index_bytes.decode("utf-8"))
        totals, splits_json = raw.get("totals") or {}, raw["splits"]
    except BadIndex as err:
        problems = [str(err)]
        _report(problems, 0, 0)
        return problems

    problems: list[str] = []
    seen = _Seen()
    num_samples = num_shards = num_bytes = 0
    num_listed_samples = sum(index.count(split) for split in index.splits)
    console = Console(stderr=True)
    with progress(console, unit="samples", transient=True) as bar:
        task = bar.add_task("verifying", total=num_listed_samples)
        for split in index.splits:
            per_class: Counter = Counter()
            for shard in index.shards(split):
                num_shard_samples, num_shard_bytes = _check_shard(shard, split, index.classes, per_class, seen,
                                                                  problems, max_member_mb << 20)
                bar.advance(task, num_shard_samples)
                num_samples += num_shard_samples
                num_bytes += num_shard_bytes
                num_shards += 1
            listed_count = splits_json.get(split, {}).get("count") if isinstance(splits_json.get(split), dict) else None
            if listed_count is not None and listed_count != index.count(split):
                problems.append(f"{split}: index.json says {listed_count} samples, its shard list says {index.count(split)}")
            listed_per_class = {cls: n for cls, n in index.per_class(split).items() if n}
            if dict(per_class) != listed_per_class:
                problems.append(f"{split}: per-class counts {dict(sorted(per_class.items()))} differ from index.json "
                                f"{listed_per_class}")
    listed_files = {shard.path.name for split in index.splits for shard in index.shards(split)}
    local_files = shard_dir.glob("*.tar") if isinstance(shard_dir, Path) else []  # a folder at a URL is not listed
    for stray in sorted(path.name for path in local_files if path.name not in listed_files):
        problems.append(f"{stray}: not listed in index.json")
    packed = totals.get("packed") if isinstance(totals, dict) else None
    if packed is not None and packed != num_listed_samples:
        problems.append(f"index.json totals say {packed} packed, its shard list says {num_listed_samples}")
    if isinstance(shard_dir, ShardURL):  # what checking a remote pack costs: every shard downloaded once
        print(f"read {num_bytes / 1e6:,.1f} MB from {shard_dir} in {time.monotonic() - started:,.1f} s")
    _report(problems, num_samples, num_shards)
    return problems


def _check_shard(shard: ShardFile, split: str, classes: list[str], per_class: Counter, seen: _Seen,
                 problems: list[str], max_member_bytes: int) -> tuple[int, int]:
    """Append this shard's problems; returns how many samples it holds and how many bytes were read."""
    name = shard.path.name
    sample_problems: list[str] = []

    def check(sample: TarSample) -> None:
        if sample.problem:
            sample_problems.append(f"{name}: {sample.key!r}: {sample.problem}")
        else:
            found = _check_sample(sample.key, sample.members, split, classes, per_class, seen)
            sample_problems.extend(f"{name}: {problem}" for problem in found)

    scan = scan_shard(shard, max_member_bytes, on_sample=check)  # count, sha256 and samples in one read
    if scan.stops_run:  # a server that stalls or sends without end: the next shard would only wait on it again
        raise RunFailure(scan.stop_message())
    problems.extend(scan.problems() + sample_problems)
    return scan.num_samples, scan.num_bytes


def _check_sample(key: str, members: dict[str, bytes], split: str, classes: list[str], per_class: Counter,
                  seen: _Seen) -> list[str]:
    if key in seen.keys:
        return [f"{key}: duplicate key"]
    seen.keys.add(key)
    missing = [extension for extension in SAMPLE_MEMBERS if extension not in members]
    if missing:
        return [f"{key}: missing member(s) {', '.join(missing)}"]
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        missing_fields = [name for name in SAMPLE_JSON_FIELDS if name not in meta]
        class_index = int(members["cls"].decode("ascii"))
    except (ValueError, UnicodeDecodeError, TypeError) as err:
        return [f"{key}: unreadable cls/json ({type(err).__name__}: {err})"]
    if missing_fields:
        return [f"{key}: json lacks {', '.join(missing_fields)}"]
    problems = []
    label = meta["label"]
    if label not in classes:
        problems.append(f"{key}: label {label!r} is not in index.json classes")
    elif class_index != classes.index(label):
        problems.append(f"{key}: cls {class_index} but label {label!r} has index {classes.index(label)}")
    per_class[label] += 1
    problems.extend(_fold_problems(key, meta, split))
    try:
        img = open_image(members["jpg"])
        if list(img.size) != list(meta["stored_size"]):
            problems.append(f"{key}: jpg is {img.size[0]}x{img.size[1]}, json stored_size says {meta['stored_size']}")
        decode_rgb(img, min_short_side_px=1)  # cheapest full decode: still reads the whole stream
    except BadImage as err:
        problems.append(f"{key}: jpg does not decode ({err.reason})")
    for value, split_of, what in ((meta["patient_id"], seen.split_of_patient, "patient"),
                                  (meta["sha256"], seen.split_of_sha256, "image sha256")):
        if value is not None and split_of.setdefault(value, split) != split:
            problems.append(f"{key}: {what} {value} is in both {split_of[value]} and {split}")
    return problems


def _fold_problems(key: str, meta: dict, split: str) -> list[str]:
    """A sample of split fold-i says fold i in its json; any other sample says null (or, packed before
    folds existed, nothing)."""
    fold, recorded = fold_of_split(split), meta.get("fold")
    if fold is None:
        return [] if recorded is None else [f"{key}: json fold is {recorded!r} but {split} is not a fold"]
    if type(recorded) is not int or recorded != fold:
        return [f"{key}: json fold is {recorded!r} but the sample is in {split}"]
    return []


def _report(problems: list[str], num_samples: int, num_shards: int, max_listed: int = 20) -> None:
    """Each problem on a line of its own (the first `max_listed`), then the verdict."""
    if not problems:
        print(f"OK: {num_samples} samples in {num_shards} shards")
        return
    for problem in problems[:max_listed]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    more = f" ({len(problems) - max_listed} more not shown)" if len(problems) > max_listed else ""
    print(f"{len(problems)} problem(s) found in {num_samples} samples of {num_shards} shards{more}", file=sys.stderr)
