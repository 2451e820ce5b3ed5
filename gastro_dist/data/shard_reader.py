"""The one tar reader that training, evaluation, prediction and `verify` share, and the check of
shard files against their index: only regular files are opened (or URLs streamed, with retries), only
our members (`SHARD_MEMBERS`) below a size cap are read, sample keys must be plain names, nothing is
unpickled. A stream that never ends cannot hold a reader: members not ours are counted and capped, none
is kept in memory, and a shard at a URL is read no further than its tar's end padding (the byte and time
limits of `locations` bound the rest)."""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, NamedTuple

from gastro_dist import RunFailure
from gastro_dist.data.locations import Location, RemoteFetchError, RemoteServerFault, ShardURL, open_location
from gastro_dist.data.shard_index import INDEX_FILE, ShardFile, ShardIndex
from gastro_dist.files import NotRegularFile

SHARD_MEMBERS = frozenset({"jpg", "png", "cls", "json"})
_PLAIN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")
# Members that are not ours (another extension, a folder, a link) a shard may hold: pack writes none, and
# a webdataset shard of another tool with a few extra members per sample stays below it at pack's 1,000
# samples per shard; an endless stream of them ends here.
MAX_FOREIGN_MEMBERS = 10_000
# Bytes a shard at a URL may hold after the end of its tar archive: tar writers pad to a record (10,240
# bytes for python's tarfile, webdataset and GNU tar); more is a server sending without end.
MAX_TAR_TRAILER_BYTES = 64 << 10


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


class ShardSourceFault(ShardReadError):
    """Not a damaged shard to plan around but a source that would hold the reader without end: a server
    that stalls, trickles or sends too much (`RemoteServerFault`), or a stream of members none of ours."""


def iter_tar_samples(stream: BinaryIO, max_member_bytes: int,
                     members: frozenset[str] = SHARD_MEMBERS) -> Iterator[TarSample]:
    """Samples of a tar stream, grouping consecutive members by key as webdataset does (the key is
    the member name up to the first dot of its file name).

    Written by hand rather than with webdataset's `tarfile_to_samples` because that reads every
    member whole, whatever its declared size. Only regular members with an extension in `members`
    are read; a sample whose member is too large, repeated or whose key is not plain is returned
    with its `problem` set; a group of members none of which is ours is no sample and is passed over.
    Raises `ShardReadError` when the tar data itself is broken, `ShardSourceFault` after
    `MAX_FOREIGN_MEMBERS` members not ours or when the download fails as `RemoteServerFault`.
    """
    key, found, problem, ours, num_foreign = None, {}, None, False, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every member it has seen: an endless stream would fill memory
                folder, _, file_name = member.name.rpartition("/")
                stem, _, extension = file_name.partition(".")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if ours:
                        yield TarSample(key, found, problem)
                    key, found, ours = member_key, {}, False
                    problem = None if is_plain_key(member_key) else "sample key is not a plain name"
                if extension not in members:
                    if extension not in SHARD_MEMBERS:
                        num_foreign += 1
                        if num_foreign > MAX_FOREIGN_MEMBERS:
                            raise ShardSourceFault(f"more than {MAX_FOREIGN_MEMBERS:,} members that are not samples "
                                                   "(.jpg/.png/.cls/.json files): not a gastro-dist shard")
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
        if isinstance(err, RemoteServerFault):
            raise ShardSourceFault(str(err)) from None
        if isinstance(err, RemoteFetchError):  # the download failed, not the tar data
            raise ShardReadError(str(err)) from None
        raise ShardReadError(f"unreadable tar data: {type(err).__name__}: {err}") from None
    if ours:
        yield TarSample(key, found, problem)


def iter_shard_samples(path: Location, max_member_bytes: int, members: frozenset[str] = SHARD_MEMBERS,
                       listed_bytes: int | None = None) -> Iterator[TarSample]:
    """`iter_tar_samples` of a shard file (opened only if it is a regular file) or URL (read to at most
    `listed_bytes`, its size in index.json, when known)."""
    with _open_shard(path, listed_bytes) as stream:
        yield from iter_tar_samples(stream, max_member_bytes, members)


def _open_shard(path: Location, listed_bytes: int | None = None) -> BinaryIO:
    """The one place shards are opened: a local regular file, or a URL streamed with retries
    (`locations.open_location`); a shard that cannot be opened or fetched is a `ShardReadError`."""
    try:
        return open_location(path, listed_bytes)
    except RemoteServerFault as err:
        raise ShardSourceFault(str(err)) from None
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

    def drain(self, max_bytes: int | None = None) -> bool:
        """Read to the end (at most `max_bytes` more); False when more than that was left."""
        left = max_bytes
        while data := self.read(1 << 20 if left is None else min(1 << 20, left + 1)):
            if left is not None:
                left -= len(data)
                if left < 0:
                    return False
        return True


@dataclass(frozen=True)
class ShardScan:
    """What one shard file really holds, next to what index.json says of it."""
    shard: ShardFile
    num_samples: int  # samples the reader yields, broken ones included: each takes a position in the shard
    sha256_matches: bool | None  # None: index.json records no sha256
    problem: str | None  # the file could not be read to its end
    num_bytes: int = 0  # bytes read (a download, for a shard at a URL)
    stops_run: bool = False  # `problem` is a source that would hold every reader (ShardSourceFault), not damage

    def stop_message(self) -> str:
        """The one line a command stops with when `stops_run`: the problem, naming the shard."""
        where = str(self.shard.path)
        return self.problem if where in (self.problem or "") else f"{where}: {self.problem}"

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
    way (what `verify` checks, without a second read of the file). A shard at a URL is read no further
    than `MAX_TAR_TRAILER_BYTES` past its tar's end, and not at all past a tar error (whose file cannot
    match its sha256 anyway)."""
    num_samples, problem, matches, num_bytes, stops_run = 0, None, None, 0, False
    remote = isinstance(shard.path, ShardURL)
    try:
        with _open_shard(shard.path, shard.num_bytes) as raw:
            stream = _HashingReader(raw)
            try:
                for sample in iter_tar_samples(stream, max_member_bytes):
                    num_samples += 1
                    if on_sample is not None:
                        on_sample(sample)
            except ShardReadError as err:
                problem, stops_run = str(err), isinstance(err, ShardSourceFault)
            drained = False
            if stream.fetch_error is None and not (remote and problem):
                try:
                    drained = stream.drain(MAX_TAR_TRAILER_BYTES if remote else None)
                    if not drained:
                        problem, stops_run = (f"cannot fetch {shard.path}: sent more than {MAX_TAR_TRAILER_BYTES:,} "
                                              "bytes after the end of its tar archive"), True
                except RemoteServerFault as err:
                    problem, stops_run = problem or str(err), True
                except RemoteFetchError as err:
                    problem = problem or str(err)
            if shard.sha256 and drained:  # a download that failed, or was cut, says nothing of the file
                matches = stream.digest.hexdigest() == shard.sha256
            num_bytes = stream.num_bytes
    except ShardReadError as err:
        problem, stops_run = str(err), isinstance(err, ShardSourceFault)
    return ShardScan(shard, num_samples, matches, problem, num_bytes, stops_run)


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
            if scan.stops_run:  # after the gather: every process stops on the same line
                raise RunFailure(scan.stop_message())
            problems.extend(scan.problems())
            if scan.num_samples > scan.shard.count:
                raise RunFailure(f"{scan.shard.path.name} holds {scan.num_samples} samples but "
                                 f"{index.root / INDEX_FILE} lists {scan.shard.count}: the shard and the index do not "
                                 f"belong together; run `gastro-dist verify {index.root}` and re-pack")
        index = index.with_counts(split, [scan.num_samples for scan in scans])
    return index, problems
