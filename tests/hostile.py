"""Builders of hostile shard sets for the reliability tests: a copy of a good pack with one thing
broken (a member name, a label, a count, a whole shard file), so that each new attack is a line.

Every builder works on a copy made by `copy_pack`; `rewrite_shard` keeps index.json's sha256 of
the rewritten shard correct unless told otherwise, so a test can tell "the index lies" apart from
"the file changed after packing".
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Callable

from PIL import Image

Member = tuple[str, bytes]


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_index(shards: Path) -> dict:
    return json.loads((shards / "index.json").read_text())


def write_index(shards: Path, index: dict) -> None:
    (shards / "index.json").write_text(json.dumps(index, indent=2))


def edit_index(shards: Path, edit: Callable[[dict], None]) -> dict:
    """Apply `edit` to index.json in place; returns the edited index."""
    index = read_index(shards)
    edit(index)
    write_index(shards, index)
    return index


def shard_entry(shards: Path, split: str, position: int = 0) -> dict:
    return read_index(shards)["splits"][split]["shards"][position]


def shard_path(shards: Path, split: str, position: int = 0) -> Path:
    return shards / shard_entry(shards, split, position)["file"]


def read_members(path: Path) -> list[Member]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_tar(path: Path, members: list[Member]) -> Path:
    """A plain tar with exactly these member names and contents (no checks on the names)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_shard(shards: Path, split: str, edit: Callable[[list[Member]], list[Member]], position: int = 0,
                  update_sha256: bool = True) -> Path:
    """Replace one shard's members with `edit(members)`; index.json's sha256 and size follow unless told not to."""
    path = shard_path(shards, split, position)
    write_tar(path, edit(read_members(path)))
    if update_sha256:
        _list_file(shards, split, position, path)
    return path


def _list_file(shards: Path, split: str, position: int, path: Path) -> None:
    """index.json's sha256 and size of the shard at `position`, made those of the file now there."""
    def fix(index: dict) -> None:
        entry = index["splits"][split]["shards"][position]
        entry["sha256"] = sha256(path)
        if "bytes" in entry:
            entry["bytes"] = path.stat().st_size
    edit_index(shards, fix)


def replace_shard_bytes(shards: Path, split: str, data: bytes, position: int = 0, update_sha256: bool = True) -> Path:
    """Overwrite one shard file with arbitrary bytes (random, empty, truncated)."""
    path = shard_path(shards, split, position)
    path.write_bytes(data)
    if update_sha256:
        _list_file(shards, split, position, path)
    return path


def rename_keys(members: list[Member], rename: Callable[[str], str]) -> list[Member]:
    """Members with each sample key (name up to the first dot) passed through `rename`."""
    out = []
    for name, data in members:
        key, dot, extension = name.partition(".")
        out.append((rename(key) + dot + extension, data))
    return out


def set_labels(members: list[Member], cls: bytes, count: int | None = None) -> list[Member]:
    """Replace the `.cls` payload of the first `count` samples (all when None)."""
    out, changed = [], 0
    for name, data in members:
        if name.endswith(".cls") and (count is None or changed < count):
            data, changed = cls, changed + 1
        out.append((name, data))
    return out


def set_sample_json(members: list[Member], payload: bytes, count: int | None = None) -> list[Member]:
    """Replace the `.json` payload of the first `count` samples (all when None)."""
    out, changed = [], 0
    for name, data in members:
        if name.endswith(".json") and (count is None or changed < count):
            data, changed = payload, changed + 1
        out.append((name, data))
    return out


def jpeg_bytes(size: tuple[int, int] = (64, 56), color: tuple[int, int, int] = (120, 60, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_sparse_member_tar(path: Path, members: list[Member], sparse_name: str, size_bytes: int) -> Path:
    """A tar of `members` in which `sparse_name` is replaced by a member that reads as `size_bytes`
    zeros but takes no room: a GNU sparse member with no data blocks (tarfile reads such members but
    cannot write them, so the header is built here)."""
    with path.open("wb") as f:
        for name, data in members:
            if name == sparse_name:
                f.write(_sparse_header(name, size_bytes))
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))  # end-of-archive
    return path


def _sparse_header(name: str, size_bytes: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0  # data blocks stored: none
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:410] = _octal(0, 12) + _octal(0, 12)  # one sparse entry: offset 0, 0 bytes of data
    header[482:483] = b"\0"  # no extended sparse headers
    header[483:495] = _octal(size_bytes, 12)  # the size a reader sees
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header[:512])


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def set_images(members: list[Member], data: bytes) -> list[Member]:
    """Every sample's image replaced by the same `data`: with the labels kept, the model must get some wrong."""
    return [(name, data if name.endswith((".jpg", ".png")) else payload) for name, payload in members]


def set_each_sample_json(members: list[Member], payloads: list[bytes]) -> list[Member]:
    """The i-th sample's `.json` payload replaced by `payloads[i]`, for the first len(payloads) samples."""
    out, remaining = [], iter(payloads)
    for name, data in members:
        if name.endswith(".json"):
            data = next(remaining, data)
        out.append((name, data))
    return out
