"""A shard set's index.json, read as the untrusted input it is: every field a reader relies on is
checked (plain shard file names inside the folder, whole counts, distinct printable class names)."""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gastro_dist import RunFailure, UserError
from gastro_dist.data.locations import Location, RemoteFetchError, RemoteNotFound, ShardURL, fetch_bytes, shard_location
from gastro_dist.files import load_json_untrusted

INDEX_FILE = "index.json"
SPLITS = ("train", "val", "test")  # a pack's splits; one made with --folds has fold-0 .. fold-(K-1) and test
FOLD_PREFIX = "fold-"  # a pack made with --folds K has splits fold-0 .. fold-(K-1) instead of train and val
_PLAIN_SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# index.json, local or at a URL (the name is older), is read whole, once: pack writes ~120 bytes per
# shard (file, count, sha256), so 16 MB lists 130,000 shards, 10^8 samples at pack's default 1,000 per
# shard; a larger one (or a stream that never ends) is refused before it is parsed, and one announced
# larger is never downloaded.
MAX_REMOTE_INDEX_BYTES = 16 << 20


class BadIndex(RunFailure):
    """index.json is not a shard index gastro-dist can trust."""


@dataclass(frozen=True)
class ShardFile:
    path: Location  # a local file, or a URL (see data/locations.py)
    count: int
    sha256: str = ""
    num_bytes: int | None = None  # the file's size as pack wrote it (packs before it was listed: None)


@dataclass(frozen=True)
class ShardIndex:
    root: Location
    classes: list[str]
    splits: dict[str, tuple[ShardFile, ...]]
    per_class_counts: dict[str, dict[str, int]]
    stored_short_side: int = 0  # pack's --resize-short: no stored image has a longer short side (0: originals kept)
    index_sha256: str = ""  # of index.json's bytes: identifies the shard set wherever it is copied
    num_folds: int = 0  # pack's --folds: splits fold-0 .. fold-(K-1) replace train and val (0: no folds)
    synthetic: dict | None = None  # what `gastro-dist synth` recorded when it made the packed images, else None

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


def load_shard_index(shard_dir: str | Location) -> ShardIndex:
    """The index of a local shard folder or of one at a URL (https://, s3://, gs://)."""
    root = shard_location(shard_dir)
    return parse_shard_index(root, read_index_bytes(root))


def parse_shard_index(root: Location, raw: bytes) -> ShardIndex:
    """The index from index.json's bytes (`read_index_bytes`): a caller that needs the bytes too reads them once."""
    path = root / INDEX_FILE
    try:
        data = load_json_untrusted(raw.decode("utf-8"), INDEX_FILE, max_bytes=MAX_REMOTE_INDEX_BYTES)
        return _parse_index(root, data, hashlib.sha256(raw).hexdigest())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise BadIndex(f"{path} is not a valid gastro-dist shard index ({detail}); "
                       f"run `gastro-dist verify {root}` or re-pack the data") from None


def read_index_bytes(root: Location) -> bytes:
    """index.json's bytes, from a local shard folder or fetched from a URL (a RunFailure above
    `MAX_REMOTE_INDEX_BYTES`)."""
    if isinstance(root, ShardURL):
        try:
            return fetch_bytes(root / INDEX_FILE, MAX_REMOTE_INDEX_BYTES, f"an {INDEX_FILE}")
        except RemoteNotFound:
            raise UserError(f"{root / INDEX_FILE} not found: {root} is not a finished pack (or not a shard folder)") from None
        except RemoteFetchError as err:
            raise RunFailure(str(err)) from None
    if not root.is_dir():
        raise UserError(f"shard directory {root} not found; create it with `gastro-dist pack SRC --out {root}`")
    path = root / INDEX_FILE
    if not path.is_file():
        if _holds_inputs(root):
            raise UserError(f"{root} holds images, not shards: pack them into a new folder first, e.g. `gastro-dist pack "
                            f"{root} --out {root.parent / (root.name + '-shards')}`, and pass that folder as --shards")
        raise UserError(f"{root} has no {INDEX_FILE} (not a finished pack); pack your images into it with "
                        f"`gastro-dist pack IMAGES --out {root}`")
    with open(path, "rb") as file:
        raw = file.read(MAX_REMOTE_INDEX_BYTES + 1)
    if len(raw) > MAX_REMOTE_INDEX_BYTES:
        raise BadIndex(f"{path} is larger than the {MAX_REMOTE_INDEX_BYTES:,} bytes an {INDEX_FILE} may hold: "
                       "not one pack wrote; re-pack the data")
    return raw


def _holds_inputs(folder: Path, limit: int = 2000) -> bool:
    """Whether an image, video or DICOM file lies in FOLDER or one level down (the first `limit` entries looked at)."""
    from gastro_dist.data.discovery import RECORDED_EXTENSIONS

    looked = 0
    try:
        for entry in itertools.chain([folder], (child for child in folder.iterdir() if child.is_dir())):
            for child in entry.iterdir():
                looked += 1
                if looked > limit:
                    return False
                if child.suffix.lower() in RECORDED_EXTENSIONS - {".csv"} and child.is_file():
                    return True
    except OSError:  # an unreadable folder: the plain message is the one to give
        return False
    return False


def _parse_index(root: Location, data: Any, index_sha256: str) -> ShardIndex:
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
            name, count, digest, num_bytes = entry["file"], entry["count"], entry.get("sha256", ""), entry.get("bytes")
            if not isinstance(name, str) or not _PLAIN_SHARD_FILE.fullmatch(name):
                raise ValueError(f"{split} shard file {name!r} is not a plain .tar file name in the shard folder")
            if name in seen_files:
                raise ValueError(f"shard file {name} is listed twice")
            seen_files.add(name)
            if not _is_count(count):
                raise ValueError(f"{name}: count {count!r} is not a whole number >= 0")
            if not isinstance(digest, str) or (digest and not _SHA256.fullmatch(digest)):
                raise ValueError(f"{name}: sha256 {digest!r} is not a hex digest")
            if num_bytes is not None and not _is_count(num_bytes):
                raise ValueError(f"{name}: bytes {num_bytes!r} is not a whole number >= 0")
            shards.append(ShardFile(root / name, count, digest, num_bytes))
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
                      stored_short_side=stored_short_side, index_sha256=index_sha256,
                      num_folds=_parse_folds(data, splits), synthetic=_parse_synthetic(data.get("synthetic")))


def _parse_synthetic(record: Any) -> dict | None:
    """index.json's `synthetic` (pack's copy of synth's marker) as a few short strings, for the report's banner."""
    if record is None:
        return None
    if not isinstance(record, dict):
        raise TypeError("'synthetic' must be an object or null")
    return {str(key)[:40]: str(value)[:200] for key, value in list(record.items())[:10]
            if isinstance(value, (str, int)) and not isinstance(value, bool)}


# ---------------------------------------------------------------- cross-validation folds
def fold_split(fold: int) -> str:
    """The split name of fold `fold` in a pack made with --folds (also its shard files' prefix)."""
    return f"{FOLD_PREFIX}{fold}"


def fold_of_split(split: str) -> int | None:
    """The fold number of a split name (`fold-3` -> 3), None for any other split."""
    number = split.removeprefix(FOLD_PREFIX)
    if number == split or not number.isdigit() or number != str(int(number)):
        return None
    return int(number)


def _parse_folds(data: dict, splits: dict[str, tuple[ShardFile, ...]]) -> int:
    """settings.folds, checked against the splits: K folds means exactly fold-0 .. fold-(K-1), no train or val."""
    num_folds = (data.get("settings") or {}).get("folds") or 0
    if not _is_count(num_folds) or num_folds == 1:
        raise ValueError(f"settings.folds {num_folds!r} is not a number of folds >= 2 (or null)")
    present = sorted(split for split in splits if fold_of_split(split) is not None)
    expected = sorted(fold_split(fold) for fold in range(num_folds))
    if present != expected:
        raise ValueError(f"settings.folds is {num_folds or 'null'} but the fold splits are {present or 'none'}")
    if num_folds and {"train", "val"} & set(splits):
        raise ValueError("a pack with folds has fold splits instead of train and val, yet lists train or val")
    return num_folds


def select_fold(index: ShardIndex, fold: int | None) -> ShardIndex:
    """The splits a training run reads (`data.fold`): the pack's own train and val; or, for a pack made
    with --folds K and fold i, "val" = fold i and "train" = the other folds, one after the other (the
    fold splits themselves are left out of this view; test stays)."""
    if fold is None:
        if index.num_folds:
            raise UserError(f"{index.root} was packed with --folds {index.num_folds}, so it has no train and val "
                            f"splits: pass data.fold=N (0..{index.num_folds - 1}) to validate on fold N and train on "
                            "the others, or run every fold with `gastro-dist cv`")
        return index
    if not index.num_folds:
        raise UserError(f"data.fold={fold} but {index.root} was packed without --folds; re-pack with --folds K, or "
                        "leave data.fold unset")
    if not 0 <= fold < index.num_folds:
        raise UserError(f"data.fold={fold} but {index.root} has {index.num_folds} folds: choose 0..{index.num_folds - 1}")
    training = [fold_split(other) for other in range(index.num_folds) if other != fold]
    splits = {split: shards for split, shards in index.splits.items() if fold_of_split(split) is None}
    splits["train"] = tuple(shard for split in training for shard in index.splits[split])
    splits["val"] = index.splits[fold_split(fold)]
    per_class = {split: counts for split, counts in index.per_class_counts.items() if split in splits}
    per_class["train"] = {cls: sum(index.per_class_counts[split][cls] for split in training) for cls in index.classes}
    per_class["val"] = dict(index.per_class_counts[fold_split(fold)])
    return replace(index, splits=splits, per_class_counts=per_class)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_class_name(name: Any) -> None:
    """A class name becomes a CSV header, a tracker key and part of file names: printable text only."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name {name!r} is not a non-empty string")
    if any(unicodedata.category(ch).startswith("C") for ch in name) or "/" in name or "\\" in name:
        raise ValueError(f"class name {name!r} holds a control character or a path separator")
