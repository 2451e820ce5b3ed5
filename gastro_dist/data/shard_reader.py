"""The one tar reader that training, evaluation, prediction and `verify` share, and the check of
shard files against their index: only regular files are opened (or URLs streamed, with retries), only
our members (`SHARD_MEMBERS`) below a size cap are read, sample keys must be plain names, nothing is
unpickled."""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, NamedTuple

from gastro_dist import RunFailure
from gastro_dist.data.locations import Location, RemoteFetchError, open_location
from gastro_dist.data.shard_index import INDEX_FILE, ShardFile, ShardIndex
from gastro_dist.files import NotRegularFile

SHARD_MEMBERS = frozenset({"jpg", "png", "cls", "json"})
_PLAIN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")


def is_plain_key(key: str) -> bool:
    """Sample keys are plain names (letters, digits, '_' and '-'): pack writes no other, and a key can
    become a file name (Grad-CAM images), so '../x' or '/abs' must never get that far."""
    return bool(_PLAIN_KEY.fullmatch(key))


def parse_label(cls_member: bytes, num_classes: int) -> int:
    """A sample's class index from its `.cls` member, which must be a whole number in [0, num_classes):
    -100 would be silently ignored by the loss (PyTorch's ignore_index), a larger one crash it."""
    text = cls_member.decode("ascii").strip()
    if not text.isdigit() or int(text) >= num_classes:
        raise ValueError(f"label {text[:20]!r} is not a class index in 0..{num_classes - 1}")
    return int(text)


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
        if isinstance(err, RemoteFetchError):  # the download failed, not the tar data
            raise ShardReadError(str(err)) from None
        raise ShardReadError(f"unreadable tar data: {type(err).__name__}: {err}") from None
    if ours:
        yield TarSample(key, found, problem)


def iter_shard_samples(path: Location, max_member_bytes: int,
                       members: frozenset[str] = SHARD_MEMBERS) -> Iterator[TarSample]:
    """`iter_tar_samples` of a shard file (opened only if it is a regular file) or URL."""
    with _open_shard(path) as stream:
        yield from iter_tar_samples(stream, max_member_bytes, members)


def _open_shard(path: Location) -> BinaryIO:
    """The one place shards are opened: a local regular file, or a URL streamed with retries
    (`locations.open_location`); a shard that cannot be opened or fetched is a `ShardReadError`."""
    try:
        return open_location(path)
    except RemoteFetchError as err:
        raise ShardReadError(str(err)) from None
    except OSError as err:
        raise ShardReadError(err.strerror if isinstance(err, NotRegularFile) else f"cannot open: {err.strerror or err}") from None


# ---------------------------------------------------------------- checking the files against the index
class _HashingReader:
    """A read-only stream that hashes what passes through it (one read both counts and hashes)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.digest, self.num_bytes = stream, hashlib.sha256(), 0
        self.fetch_error: RemoteFetchError | None = None  # a shard at a URL whose download failed midway

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except RemoteFetchError as err:
            self.fetch_error = err
            raise
        self.digest.update(data)
        self.num_bytes += len(data)
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
    num_bytes: int = 0  # bytes read (a download, for a shard at a URL)

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


def scan_shard(shard: ShardFile, max_member_bytes: int,
               on_sample: Callable[[TarSample], None] | None = None) -> ShardScan:
    """Read one shard once: count its samples and hash its bytes; `on_sample` sees each sample on the
    way (what `verify` checks, without a second read of the file)."""
    num_samples, problem, matches, num_bytes = 0, None, None, 0
    try:
        with _open_shard(shard.path) as raw:
            stream = _HashingReader(raw)
            try:
                for sample in iter_tar_samples(stream, max_member_bytes):
                    num_samples += 1
                    if on_sample is not None:
                        on_sample(sample)
            except ShardReadError as err:
                problem = str(err)
            if stream.fetch_error is None:
                try:
                    stream.drain()
                except RemoteFetchError as err:
                    problem = problem or str(err)
            if shard.sha256 and stream.fetch_error is None:  # a download that failed says nothing of the file
                matches = stream.digest.hexdigest() == shard.sha256
            num_bytes = stream.num_bytes
    except ShardReadError as err:
        problem = str(err)
    return ShardScan(shard, num_samples, matches, problem, num_bytes)


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
