"""File-system names, files and CSV cells derived from untrusted input, and the one atomic JSON writer.

Shard keys, the classes in model.json and the paths given to `predict`/`cam` come from whoever
made them. A name built from such text must stay one file inside its output folder ('../x' or
'/etc/x' as a key must not write elsewhere), and text written into a CSV must not become a
formula when a clinician opens the file in a spreadsheet (OWASP "CSV injection").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

MAX_NAME_CHARS = 100  # leaves room for suffixes within the usual 255-byte file name limit
DIGEST_CHARS = 16  # 64 bits of sha256: distinct texts do not meet by chance
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
_DIGEST_SUFFIX = re.compile(rf"-[0-9a-f]{{{DIGEST_CHARS}}}$")
# Names Windows maps to devices whatever their extension (CON.png is the console).
_RESERVED_STEMS = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                             *(f"LPT{i}" for i in range(1, 10))})
# A cell starting with one of these is read as a formula by Excel, LibreOffice or Google Sheets.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def digest(text: str) -> str:
    """A short, stable fingerprint of `text` for telling names apart."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]


def safe_name(text: str) -> str:
    """`text` as one path component that stays inside its folder on any OS.

    Characters other than [A-Za-z0-9._-] become '_', leading dots and dashes and trailing dots go
    (no '..', no hidden files, no names read as options), a Windows device name (CON, NUL.txt)
    gets a leading '_', the length is capped. When anything was changed, or the result is empty
    or itself ends like a digest, the digest of the original text is appended: only names made
    here end in a digest, so distinct texts give distinct names.
    """
    name = _UNSAFE_CHARACTERS.sub("_", text).lstrip(".-").rstrip(".")[:MAX_NAME_CHARS]
    if name.split(".")[0].upper() in _RESERVED_STEMS:
        name = "_" + name
    if name != text or not name or _DIGEST_SUFFIX.search(name):
        return f"{name or 'unnamed'}-{digest(text)}"
    return name


def distinct_names(names: Sequence[str], sources: Sequence[str]) -> list[str]:
    """`names` (already safe), with `-digest(source)` added to every name another one shares.

    Names are compared case-insensitively, as macOS and Windows file systems do; e.g. the overlays
    of a/x.jpg and b/x.jpg become x-<digest of a/x.jpg> and x-<digest of b/x.jpg>.
    """
    uses = Counter(name.casefold() for name in names)
    return [name if uses[name.casefold()] == 1 else f"{name}-{digest(source)}"
            for name, source in zip(names, sources, strict=True)]


def csv_text(text: str) -> str:
    """A CSV cell for text that came from input (a path, key, label, patient id).

    A leading single quote, as OWASP recommends, keeps a spreadsheet from running '=HYPERLINK(...)'
    or '@SUM(...)'. Only text cells go through here: numbers we format ourselves are never
    prefixed, so a probability or a negative score stays a number.
    """
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


class NotRegularFile(OSError):
    """A path that names a FIFO, a device, a folder or a socket where a file was expected."""


def file_type(mode: int) -> str:
    """What a stat mode is, in words: 'file' for a regular file, else 'folder', 'FIFO', 'character device' ..."""
    if stat.S_ISREG(mode):
        return "file"
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "special file")


def open_regular_file(path: str | Path) -> BinaryIO:
    """Open for reading (unbuffered) only if it is a regular file, links followed: a FIFO would block
    until a writer comes and a device (a link to /dev/zero) never end. O_NONBLOCK makes opening a
    FIFO return at once; the check is on what was opened, not on what the path named a moment ago.
    Raises `NotRegularFile` (its strerror names the kind) or the OSError of the open."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    kind = file_type(os.fstat(fd).st_mode)
    if kind != "file":
        os.close(fd)
        raise NotRegularFile(0, f"not a regular file: {kind}", str(path))
    return open(fd, "rb", buffering=0)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new one, never half of one:
    written to a temporary file of its own in the same folder (so concurrent writers, e.g. the tasks of
    a SLURM array, never share one; created with the usual permissions), then renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("x", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """`write_text_atomic` of `data` as JSON. Non-finite numbers are refused: JSON has none."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
