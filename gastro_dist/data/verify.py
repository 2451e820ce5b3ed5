"""Re-reading a finished pack and checking every shard and sample against its index.json.

Owns the rules a pack must satisfy (shards/README.md): every listed shard exists with the recorded
sha256 and sample count, every sample has jpg/cls/json, the jpg decodes at its recorded size, cls
equals the index of the json label, per-class counts match, keys are unique, no patient id or
image sha256 appears in two splits, and there are no unlisted .tar files. Shards are read with
`tarfile` so that damage is reported as a problem, never as a traceback.
"""

from __future__ import annotations

import json
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gastro_dist import UserError
from gastro_dist.data.images import BadImage, decode_rgb, open_image
from gastro_dist.data.pack import INDEX_FILE, file_sha256

SAMPLE_MEMBERS = ("cls", "jpg", "json")
SAMPLE_JSON_FIELDS = ("label", "patient_id", "source", "sha256", "orig_size", "stored_size")


@dataclass
class _Seen:
    """What earlier shards contained, for the checks that span shards and splits."""

    keys: set[str] = field(default_factory=set)
    split_of_patient: dict[str, str] = field(default_factory=dict)
    split_of_sha256: dict[str, str] = field(default_factory=dict)


def verify_shards(shard_dir: str | Path) -> list[str]:
    """Check a pack folder; returns the problems found (empty: all good) and prints a one-line verdict."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / INDEX_FILE
    if not index_path.is_file():
        raise UserError(f"{index_path} not found: not a finished pack; pass the --out folder of a completed `pack`")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        classes = list(index["classes"])
        splits = dict(index["splits"])
        num_listed_samples = sum(shard["count"] for info in splits.values() for shard in info["shards"])
    except (ValueError, KeyError, TypeError) as err:
        problems = [f"{INDEX_FILE} is malformed ({type(err).__name__}: {err})"]
        _report(problems, 0, 0)
        return problems

    problems: list[str] = []
    seen = _Seen()
    num_samples = num_shards = 0
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("verifying", total=num_listed_samples)
        for split, info in splits.items():
            per_class: Counter = Counter()
            for shard in info["shards"]:
                num_shard_samples = _check_shard(shard_dir, shard, split, classes, per_class, seen, problems)
                progress.advance(task, num_shard_samples)
                num_samples += num_shard_samples
                num_shards += 1
            num_split_samples = sum(per_class.values())
            if num_split_samples != info["count"]:
                problems.append(f"{split}: index.json says {info['count']} samples, shards hold {num_split_samples}")
            listed_per_class = {cls: n for cls, n in info["per_class"].items() if n}
            if dict(per_class) != listed_per_class:
                problems.append(f"{split}: per-class counts {dict(sorted(per_class.items()))} differ from index.json "
                                f"{listed_per_class}")
    listed_files = {shard["file"] for info in splits.values() for shard in info["shards"]}
    for stray in sorted(path.name for path in shard_dir.glob("*.tar") if path.name not in listed_files):
        problems.append(f"{stray}: not listed in index.json")
    packed = index.get("totals", {}).get("packed")
    if packed is not None and packed != num_listed_samples:
        problems.append(f"index.json totals say {packed} packed, its shard list says {num_listed_samples}")
    _report(problems, num_samples, num_shards)
    return problems


def _check_shard(shard_dir: Path, shard: dict, split: str, classes: list[str], per_class: Counter,
                 seen: _Seen, problems: list[str]) -> int:
    """Append this shard's problems; returns how many complete samples it yielded."""
    name = shard["file"]
    path = shard_dir / name
    if not path.is_file():
        problems.append(f"{name}: missing")
        return 0
    if file_sha256(path) != shard["sha256"]:
        problems.append(f"{name}: sha256 differs from index.json (file changed or truncated)")
    num_samples = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, members in _samples(tar):
                sample_problems = _check_sample(key, members, split, classes, per_class, seen)
                problems.extend(f"{name}: {problem}" for problem in sample_problems)
                num_samples += 1
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{name}: unreadable tar after {num_samples} samples ({type(err).__name__}: {err})")
    if num_samples != shard["count"]:
        problems.append(f"{name}: index.json says {shard['count']} samples, the tar holds {num_samples}")
    return num_samples


def _samples(tar: tarfile.TarFile):
    """(key, {extension: bytes}) per sample, grouping consecutive members the way webdataset does:
    the key is the member name up to the first dot of its file name."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, file_name = member.name.rpartition("/")
        stem, _, extension = file_name.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key and key is not None:
            yield key, members
            members = {}
        key = member_key
        members[extension] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


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


def _report(problems: list[str], num_samples: int, num_shards: int) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"PROBLEM: {problems[0]}{more}", file=sys.stderr)
    else:
        print(f"OK: {num_samples} samples in {num_shards} shards")
