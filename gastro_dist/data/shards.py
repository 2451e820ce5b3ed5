"""A shard set on disk: its index.json, checked as the untrusted input it is, and the one tar reader
that training, evaluation, prediction and `verify` share.

Shards travel between sites, so nothing in them is trusted: index.json is validated field by field
(file names must be plain names inside the shard folder, counts whole numbers, classes distinct
printable names), a shard file is opened only if it is a regular file, a tar member is read only if
it is one of ours (`SHARD_MEMBERS`), a regular file, and below `max_member_bytes` (a few-KB tar can
declare a multi-GB sparse member), and a sample key must be a plain name (it may become a file name).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

from gastro_dist import RunFailure, UserError
from gastro_dist.files import NotRegularFile, open_regular_file

INDEX_FILE = "index.json"
SHARD_MEMBERS = frozenset({"jpg", "png", "cls", "json"})
_PLAIN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")
_PLAIN_SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BadIndex(RunFailure):
    """index.json is not a shard index gastro-dist can trust."""


@dataclass(frozen=True)
class ShardFile:
    path: Path
    count: int
    sha256: str = ""


@dataclass(frozen=True)
class ShardIndex:
    root: Path
    classes: list[str]
    splits: dict[str, tuple[ShardFile, ...]]
    per_class_counts: dict[str, dict[str, int]]
    stored_short_side: int = 0  # pack's --resize-short: no stored image has a longer short side (0: originals kept)
    index_sha256: str = ""  # of index.json's bytes: identifies the shard set wherever it is copied

    def shards(self, split: str) -> list[ShardFile]:
        if split not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"split {split!r} is not in {self.root}/index.json (it has: {have}); re-pack with a {split} split")
        return list(self.splits[split])

    def count(self, split: str) -> int:
        return sum(s.count for s in self.shards(split))

    def per_class(self, split: str) -> dict[str, int]:
        self.shards(split)  # the same error for an unknown split
        return dict(self.per_class_counts[split])

    def with_counts(self, split: str, counts: list[int]) -> ShardIndex:
        """The same index with the shards of `split` holding `counts` samples (what the files really hold)."""
        shards = tuple(replace(shard, count=n) for shard, n in zip(self.shards(split), counts, strict=True))
        return replace(self, splits={**self.splits, split: shards})


def load_shard_index(shard_dir: str | Path) -> ShardIndex:
    root = Path(shard_dir)
    if not root.is_dir():
        raise UserError(f"shard directory {root} not found; create it with `gastro-dist pack SRC --out {root}`")
    path = root / INDEX_FILE
    if not path.is_file():
        raise UserError(f"{root} has no {INDEX_FILE} (not a finished pack); run `gastro-dist pack SRC --out {root}`")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
        return _parse_index(root, data, hashlib.sha256(raw).hexdigest())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise BadIndex(f"{path} is not a valid gastro-dist shard index ({detail}); "
                       f"run `gastro-dist verify {root}` or re-pack the data") from None


def _parse_index(root: Path, data: Any, index_sha256: str) -> ShardIndex:
    """Every field a reader relies on, checked: a ValueError/TypeError/KeyError names what is wrong."""
    if not isinstance(data, dict):
        raise TypeError("index.json must hold a JSON object")
    classes = data["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError("'classes' must be a list of at least 2 class names")
    for name in classes:
        check_class_name(name)
    if len(set(classes)) != len(classes):
        raise ValueError("'classes' has a name twice")
    if not isinstance(data["splits"], dict):
        raise TypeError("'splits' must be an object")
    splits, per_class_counts, seen_files = {}, {}, set()
    for split, info in data["splits"].items():
        shards = []
        for entry in info["shards"]:
            name, count, digest = entry["file"], entry["count"], entry.get("sha256", "")
            if not isinstance(name, str) or not _PLAIN_SHARD_FILE.fullmatch(name):
                raise ValueError(f"{split} shard file {name!r} is not a plain .tar file name in the shard folder")
            if name in seen_files:
                raise ValueError(f"shard file {name} is listed twice")
            seen_files.add(name)
            if not _is_count(count):
                raise ValueError(f"{name}: count {count!r} is not a whole number >= 0")
            if not isinstance(digest, str) or (digest and not _SHA256.fullmatch(digest)):
                raise ValueError(f"{name}: sha256 {digest!r} is not a hex digest")
            shards.append(ShardFile(root / name, count, digest))
        per_class = info["per_class"]
        if not isinstance(per_class, dict) or not set(per_class) <= set(classes):
            raise ValueError(f"{split}: 'per_class' must map class names to counts")
        if not all(_is_count(n) for n in per_class.values()):
            raise ValueError(f"{split}: a per-class count is not a whole number >= 0")
        splits[str(split)] = tuple(shards)
        per_class_counts[str(split)] = {c: int(per_class.get(c, 0)) for c in classes}
    stored_short_side = (data.get("settings") or {}).get("resize_short") or 0
    if not _is_count(stored_short_side):
        raise ValueError(f"settings.resize_short {stored_short_side!r} is not a whole number >= 0")
    return ShardIndex(root=root, classes=list(classes), splits=splits, per_class_counts=per_class_counts,
                      stored_short_side=stored_short_side, index_sha256=index_sha256)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_class_name(name: Any) -> None:
    """A class name becomes a CSV header, a tracker key and part of file names: printable text only."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name {name!r} is not a non-empty string")
    if any(unicodedata.category(ch).startswith("C") for ch in name) or "/" in name or "\\" in name:
        raise ValueError(f"class name {name!r} holds a control character or a path separator")


def is_plain_key(key: str) -> bool:
    """Sample keys are plain names (letters, digits, '_' and '-'): pack writes no other, and a key can
    become a file name (Grad-CAM images), so '../x' or '/abs' must never get that far."""
    return bool(_PLAIN_KEY.fullmatch(key))


# ---------------------------------------------------------------- the tar reader
class TarSample(NamedTuple):
    """One sample: its key, its members by extension, and why it cannot be used (None: intact)."""
    key: str
    members: dict[str, bytes]
    problem: str | None


class ShardReadError(Exception):
    """The shard cannot be read from this point on (not a tar, truncated, not a regular file)."""


def iter_tar_samples(stream: BinaryIO, max_member_bytes: int,
                     members: frozenset[str] = SHARD_MEMBERS) -> Iterator[TarSample]:
    """Samples of a tar stream, grouping consecutive members by key as webdataset does (the key is
    the member name up to the first dot of its file name).

    Written by hand rather than with webdataset's `tarfile_to_samples` because that reads every
    member whole, whatever its declared size. Only regular members with an extension in `members`
    are read; a sample whose member is too large, repeated or whose key is not plain is returned
    with its `problem` set; a group of members none of which is ours is no sample and is passed over.
    Raises `ShardReadError` when the tar data itself is broken.
    """
    key, found, problem, ours = None, {}, None, False
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                folder, _, file_name = member.name.rpartition("/")
                stem, _, extension = file_name.partition(".")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if ours:
                        yield TarSample(key, found, problem)
                    key, found, ours = member_key, {}, False
                    problem = None if is_plain_key(member_key) else "sample key is not a plain name"
                if extension not in members:
                    continue  # not a sample member of ours (a group of only such members is no sample at all)
                ours = True
                if not member.isreg() or problem is not None:
                    continue
                if member.size > max_member_bytes:
                    problem = (f"member .{extension} declares {member.size:,} bytes, above the "
                               f"{max_member_bytes:,}-byte limit (data.max_member_mb)")
                elif extension in found:
                    problem = f"two .{extension} members"
                else:
                    found[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        if ours:
            yield TarSample(key, found, problem or f"cut short: {err}")
        raise ShardReadError(f"unreadable tar data: {type(err).__name__}: {err}") from None
    if ours:
        yield TarSample(key, found, problem)


def iter_shard_samples(path: Path, max_member_bytes: int,
                       members: frozenset[str] = SHARD_MEMBERS) -> Iterator[TarSample]:
    """`iter_tar_samples` of a shard file, opened only if it is a regular file."""
    with _open_shard(path) as stream:
        yield from iter_tar_samples(stream, max_member_bytes, members)


def _open_shard(path: Path) -> BinaryIO:
    try:
        return open_regular_file(path)
    except OSError as err:
        raise ShardReadError(err.strerror if isinstance(err, NotRegularFile) else f"cannot open: {err.strerror or err}") from None


# ---------------------------------------------------------------- checking the files against the index
class _HashingReader:
    """A read-only stream that hashes what passes through it (one read both counts and hashes)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass(frozen=True)
class ShardScan:
    """What one shard file really holds, next to what index.json says of it."""
    shard: ShardFile
    num_samples: int  # samples the reader yields, broken ones included: each takes a position in the shard
    sha256_matches: bool | None  # None: index.json records no sha256
    problem: str | None  # the file could not be read to its end

    def problems(self) -> list[str]:
        name = self.shard.path.name
        found = []
        if self.problem:
            found.append(f"{name}: {self.problem}")
        if self.sha256_matches is False:
            found.append(f"{name}: sha256 differs from index.json (the file changed after packing)")
        if self.num_samples != self.shard.count:
            found.append(f"{name}: holds {self.num_samples} samples, index.json lists {self.shard.count}")
        return found


def scan_shard(shard: ShardFile, max_member_bytes: int) -> ShardScan:
    """Read one shard once: count its samples and hash its bytes."""
    num_samples, problem, matches = 0, None, None
    try:
        with _open_shard(shard.path) as raw:
            stream = _HashingReader(raw)
            try:
                for _ in iter_tar_samples(stream, max_member_bytes):
                    num_samples += 1
            except ShardReadError as err:
                problem = str(err)
            stream.drain()
            if shard.sha256:
                matches = stream.digest.hexdigest() == shard.sha256
    except ShardReadError as err:
        problem = str(err)
    return ShardScan(shard, num_samples, matches, problem)


def checked_index(index: ShardIndex, splits: list[str], max_member_bytes: int,
                  scan_all: Callable[[list[ShardFile]], list[ShardScan]] | None = None) -> tuple[ShardIndex, list[str]]:
    """Scan every shard of `splits`; returns the index planned on what the files really hold, and the
    problems found. A shard holding more samples than listed is refused: its extra samples could be
    anything (index.json and the shard no longer belong together); fewer (damage, truncation) are
    planned around and reported, so that an epoch never asks for samples that are not there.
    `scan_all` scans a list of shards (default: one after the other, here; the trainer shares the
    work between its processes).
    """
    scan_all = scan_all or (lambda shards: [scan_shard(shard, max_member_bytes) for shard in shards])
    problems: list[str] = []
    for split in splits:
        scans = scan_all(index.shards(split))
        for scan in scans:
            problems.extend(scan.problems())
            if scan.num_samples > scan.shard.count:
                raise RunFailure(f"{scan.shard.path.name} holds {scan.num_samples} samples but "
                                 f"{index.root / INDEX_FILE} lists {scan.shard.count}: the shard and the index do not "
                                 f"belong together; run `gastro-dist verify {index.root}` and re-pack")
        index = index.with_counts(split, [scan.num_samples for scan in scans])
    return index, problems
