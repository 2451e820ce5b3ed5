"""What the start-of-run shard check already verified, so that a requeue or a second run on an unchanged
pack reads nothing again (at the scale of 10^6 frames on object storage, every start would otherwise
download the whole pack).

Each shard that was read to its end with the sample count index.json lists and the sha256 it records is
remembered with its fingerprint: size, modification time, inode and device of a local file; size and
ETag (or Last-Modified) of a file at a URL, from the headers of a request whose body is not read. A shard
whose fingerprint is the same is not read again; any change (a rewrite, a copy to another disk, another
ETag) makes it read and checked as before, and a shard with a problem is never remembered, so every
run reports it. A URL that gives no ETag or Last-Modified is always read.

The record lives next to index.json (`.verified-shards.json`) when that folder is local and writable,
else in the run folder, and belongs to one index.json (its sha256) and one member size cap. It is read as
the untrusted file it is: a record copied with a pack from elsewhere does not match (inodes differ), and
one that does not parse is ignored. Whoever can write the pack folder could forge it, but could as well
rewrite index.json's counts and digests, which are the trust root of the check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gastro_dist.data.locations import Location, ShardURL, location_fingerprint
from gastro_dist.data.shard_index import ShardFile, ShardIndex
from gastro_dist.data.shard_reader import ShardScan
from gastro_dist.files import write_json_atomic

RECORD_FILE = ".verified-shards.json"
FORMAT = 1
MAX_RECORD_BYTES = 64 << 20  # a record for 10^6 shards is about 200 MB; packs that size have 10^4 shards


@dataclass
class VerifiedShards:
    """The shards of one index.json verified so far, by file name, each with its fingerprint."""
    index_sha256: str
    max_member_bytes: int
    places: list[Path]  # where the record is read from; the first writable one is where it is written
    shards: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, index: ShardIndex, max_member_bytes: int, run_dir: Path | None = None) -> VerifiedShards:
        places = ([] if isinstance(index.root, ShardURL) else [Path(index.root) / RECORD_FILE]) \
            + ([Path(run_dir) / RECORD_FILE] if run_dir is not None else [])
        record = cls(index.index_sha256, max_member_bytes, places)
        for place in places:
            record.shards.update(record._read(place))
        return record

    def recall(self, shard: ShardFile, fingerprint: dict | None) -> ShardScan | None:
        """The clean scan remembered for this shard, if its file is the one that was verified."""
        known = self.shards.get(shard.path.name)
        if fingerprint is None or not isinstance(known, dict) or known.get("fingerprint") != fingerprint \
                or known.get("num_samples") != shard.count or known.get("sha256") != shard.sha256:
            return None
        return ShardScan(shard, shard.count, True if shard.sha256 else None, None, 0)

    def remember(self, scan: ShardScan, fingerprint: dict | None) -> None:
        """Keep a scan that found the shard as index.json describes it; forget one that did not."""
        name = scan.shard.path.name
        if fingerprint is not None and not scan.problems() and scan.sha256_matches is not False:
            self.shards[name] = {"fingerprint": fingerprint, "num_samples": scan.num_samples,
                                 "sha256": scan.shard.sha256}
        else:
            self.shards.pop(name, None)

    def save(self) -> Path | None:
        """Written to the first place that takes it; None when none does (a read-only pack and no run folder)."""
        record = {"format": FORMAT, "index_sha256": self.index_sha256, "max_member_bytes": self.max_member_bytes,
                  "shards": self.shards}
        for place in self.places:
            try:
                place.parent.mkdir(parents=True, exist_ok=True)  # a run folder about to be made
                write_json_atomic(place, record)
                return place
            except OSError:
                continue
        return None

    def _read(self, place: Path) -> dict[str, dict]:
        try:
            if not place.is_file() or place.stat().st_size > MAX_RECORD_BYTES:
                return {}
            record = json.loads(place.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(record, dict) or record.get("format") != FORMAT \
                or record.get("index_sha256") != self.index_sha256 \
                or record.get("max_member_bytes") != self.max_member_bytes or not isinstance(record.get("shards"), dict):
            return {}
        return {name: entry for name, entry in record["shards"].items() if isinstance(entry, dict)}


def fingerprint_of(location: Location) -> dict | None:
    """`locations.location_fingerprint`, None when it cannot be taken (the shard is then read)."""
    try:
        return location_fingerprint(location)
    except OSError:
        return None
