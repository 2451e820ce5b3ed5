"""File-system names, files, CSV cells and JSON/YAML documents derived from untrusted input, and the one
atomic writer.

Shard keys, the classes in model.json and the paths given to `predict`/`cam` come from whoever
made them. A name built from such text must stay one file inside its output folder ('../x' or
'/etc/x' as a key must not write elsewhere), and text written into a CSV must not become a
formula when a clinician opens the file in a spreadsheet (OWASP "CSV injection"). Configs,
model.json, index.json and sidecars are parsed with bounded size, nesting and (YAML) no aliases,
so that a 1 KB file can neither expand to gigabytes nor overflow the parser's stack, and an error
line echoes at most `ECHO_CHARS` of a value (`excerpt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import stat
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import yaml

MAX_NAME_CHARS = 100  # leaves room for suffixes within the usual 255-byte file name limit
DIGEST_CHARS = 16  # 64 bits of sha256: distinct texts do not meet by chance
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
_DIGEST_SUFFIX = re.compile(rf"-[0-9a-f]{{{DIGEST_CHARS}}}$")
# Names Windows maps to devices whatever their extension (CON.png is the console).
_RESERVED_STEMS = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                             *(f"LPT{i}" for i in range(1, 10))})
# A cell starting with one of these is read as a formula by Excel, LibreOffice or Google Sheets.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MAX_NESTING = 32  # configs, model.json, index.json and sidecars nest 5 levels at most
MAX_DOCUMENT_BYTES = 16 << 20  # configs, model.json and sidecars are kilobytes
ECHO_CHARS = 80  # of a value an error line quotes
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = ECHO_CHARS


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


def excerpt(value: Any, limit: int = ECHO_CHARS) -> str:
    """repr(value), at most `limit` characters: an error line quoting an input's value stays one short
    line however large the value (and reprlib does bounded work on a huge list)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, never half of one:
    written to a temporary file of its own in the same folder (so concurrent writers, e.g. the tasks of
    a SLURM array, never share one; created with the usual permissions), then renamed into place.
    An OSError names `path`, the file asked for, not its temporary."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("xb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`write_bytes_atomic` of `text` as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


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


# ---------------------------------------------------------------- JSON and YAML from others
class UntrustedDocument(ValueError):
    """A JSON or YAML document refused as a whole: too large, too deeply nested, with YAML aliases, or not
    parseable. Its message is one line that starts with the `what` it was given."""


class UnparsableDocument(UntrustedDocument):
    """Text that is not JSON or YAML at all (an override's value is then taken as the text itself)."""


def read_limited(path: Path, what: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """A regular file's bytes, refused above `max_bytes` without reading the rest (a 10 GB model.json, or
    one that links to /dev/zero, never fills memory)."""
    blocks, size = [], 0
    with open_regular_file(path) as handle:
        while size <= max_bytes and (block := handle.read(1 << 20)):
            blocks.append(block)
            size += len(block)
    data = b"".join(blocks)
    _check_size(data, what, max_bytes)
    return data


def load_json_untrusted(data: str | bytes, what: str, max_bytes: int = MAX_DOCUMENT_BYTES,
                        max_depth: int = MAX_NESTING) -> Any:
    """JSON someone else wrote (model.json, index.json, a sidecar), refused with `UntrustedDocument` when
    larger than `max_bytes`, nested deeper than `max_depth` (json.loads recurses once per level: 100 KB
    of '[' is a RecursionError) or not JSON at all."""
    _check_size(data, what, max_bytes)
    try:
        value = json.loads(data)
    except RecursionError:
        raise _too_deep(what, max_depth) from None
    except ValueError as err:  # not JSON, not UTF-8, or a number of more than 4300 digits
        raise UnparsableDocument(f"{what} is not valid JSON ({str(err)[:ECHO_CHARS]})") from None
    if _deeper_than(value, max_depth):
        raise _too_deep(what, max_depth)
    return value


def load_yaml_untrusted(text: str | bytes, what: str, max_bytes: int = MAX_DOCUMENT_BYTES,
                        max_depth: int = MAX_NESTING) -> Any:
    """YAML someone else wrote (a config, an override's value), parsed safely (yaml.SafeLoader), refused
    with `UntrustedDocument` when larger than `max_bytes`, nested deeper than `max_depth`, holding an alias
    (*name: a 1 KB 'billion laughs' tree of aliases expands to gigabytes) or not YAML at all."""
    _check_size(text, what, max_bytes)
    loader = _StrictYAMLLoader(text, what, max_depth)
    try:
        return loader.get_single_data()
    except UntrustedDocument:
        raise
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UnparsableDocument(f"{what} is not valid YAML ({problem[:ECHO_CHARS]}{where})") from None
    except ValueError as err:  # a number of more than 4300 digits
        raise UnparsableDocument(f"{what} is not valid YAML ({str(err)[:ECHO_CHARS]})") from None
    finally:
        loader.dispose()


def read_json_file(path: Path, what: str | None = None, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """`load_json_untrusted` of a regular file read with `read_limited`; `what` (default: the path) names it."""
    what = str(path) if what is None else what
    return load_json_untrusted(read_limited(path, what, max_bytes), what, max_bytes)


def read_yaml_file(path: Path, what: str | None = None) -> Any:
    """`load_yaml_untrusted` of a regular file read with `read_limited`; `what` (default: the path) names it."""
    what = str(path) if what is None else what
    return load_yaml_untrusted(read_limited(path, what), what)


class _StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting while composing, before anything is built (the
    composer, too, recurses once per level)."""

    def __init__(self, stream: str | bytes, what: str, max_depth: int):
        super().__init__(stream)
        self.what, self.max_depth, self.depth = what, max_depth, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UntrustedDocument(f"{self.what} uses the YAML alias *{event.anchor[:ECHO_CHARS]} (line "
                                    f"{event.start_mark.line + 1}): aliases are not accepted (write the value "
                                    "out, or quote text that starts with *)")
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > self.max_depth:
            raise _too_deep(self.what, self.max_depth)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_size(data: str | bytes, what: str, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise UntrustedDocument(f"{what} is larger than {max_bytes / 2**20:g} MiB")


def _too_deep(what: str, max_depth: int) -> UntrustedDocument:
    return UntrustedDocument(f"{what} is nested deeper than {max_depth} levels")


def _deeper_than(value: Any, max_depth: int) -> bool:
    """Whether lists and dicts nest more than `max_depth` levels, found without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False
