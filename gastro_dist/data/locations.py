"""Where a shard set lives, a local folder or a URL (https://, http://, s3://, gs://), and the one way
bytes come from there: a local file opened only if it is a regular file, a remote one streamed front to
back with retries. Credentials stay out of every message and record: `str()` of a URL drops them.

A remote read has deadlines, not only retries, so that no server can hold a command without end:
- silence: a connection that brings nothing for `SOCKET_TIMEOUT_S` is dropped and retried;
- trickle: one that brings less than `REMOTE_MIN_BYTES_PER_S` over `SOCKET_TIMEOUT_S` of waiting too;
- a file's total wait (every attempt, backoff included) is at most `REMOTE_TIMEOUT_S` plus the time its
  bytes need at the minimum rate, so retries that keep making a little progress end too;
- size: no more than `max_bytes` (index.json: 16 MB; a shard: its size in index.json, else
  `MAX_REMOTE_SHARD_BYTES`; the tar reader stops reading a shard at its end) is read, whatever the server
  sends or announces.
A file given up for any of these is a `RemoteServerFault`: the command stops (the server, not the file,
is at fault, and planning around it would only wait on the next file). After one such fault every further
file of that server (scheme, host and port) fails at once in the process, naming the fault: a loader
worker that skips broken shards cannot multiply the wait by the number of shards, so a command waits on a
misbehaving server for one file's bound at most per process (FETCH_ATTEMPTS x SOCKET_TIMEOUT_S, about
2.5 min; or REMOTE_TIMEOUT_S plus the file's bytes at the minimum rate)."""

from __future__ import annotations

import base64
import http.client
import importlib.util
import math
import netrc
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from gastro_dist import UserError, __version__
from gastro_dist.files import open_regular_file

HTTP_SCHEMES = frozenset({"http", "https"})
# scheme -> the fsspec implementation it needs (the `remote` extra)
FSSPEC_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
FETCH_ATTEMPTS = 5  # attempts in a row that make no progress before a file counts as unfetchable
RETRY_BACKOFF_S = 0.5  # wait before the 2nd attempt, doubled for each further one (0.5 + 1 + 2 + 4 s)
# A connection silent this long is dropped and retried, and the window over which the rate below is
# measured: long enough for the first byte of cold object storage or a congested VPN, short enough that a
# dead server costs FETCH_ATTEMPTS x 30 s (2.5 min) per file, not hours.
SOCKET_TIMEOUT_S = 30.0
# 16 KiB/s (128 kbit/s): below any link one would read training data over (a 100 MB shard would take
# 1.7 h), far above a trickle (a byte every few seconds); measured only while waiting on the server, so a
# consumer that pauses between reads (a training step) never counts against it.
REMOTE_MIN_BYTES_PER_S = 16 << 10
# The fixed part of a file's total wait (connecting, retries and backoff, slow first bytes), on top of
# the time its bytes need at REMOTE_MIN_BYTES_PER_S: an honest slow link never reaches it.
REMOTE_TIMEOUT_S = 300.0
# A shard at a URL is read no further than the size index.json lists for it (`bytes`), and no further than
# this when it lists none (packs made before sizes were listed): pack's shards hold shard_size (default
# 1,000) samples of 0.05-1 MB, so a few hundred MB to 1 GB.
MAX_REMOTE_SHARD_BYTES = 16 << 30
# The three deadlines above may be set from the environment rather than the config: shards are read by
# train, evaluate, predict, verify and the loader workers, most of which see no training config, and every
# process of a run (SLURM tasks included) inherits the environment.
DEADLINE_VARIABLES = {"GASTRO_DIST_REMOTE_SILENCE_S": "SOCKET_TIMEOUT_S",
                      "GASTRO_DIST_REMOTE_MIN_BYTES_PER_S": "REMOTE_MIN_BYTES_PER_S",
                      "GASTRO_DIST_REMOTE_TIMEOUT_S": "REMOTE_TIMEOUT_S"}


def _deadlines_from_environment() -> str | None:
    """Set the deadlines named in DEADLINE_VARIABLES from the environment; the one-line error for a value
    that is not a positive number (raised where a URL is first used, so that it is a usage error there)."""
    for variable, constant in DEADLINE_VARIABLES.items():
        raw = os.environ.get(variable)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            return f"{variable}={raw[:40]!r} must be a positive number (default {globals()[constant]:g})"
        globals()[constant] = value
    return None


_DEADLINE_ERROR = _deadlines_from_environment()
STREAM_BLOCK_BYTES = 8 << 20  # read-ahead of s3:// and gs:// streams (ranged GETs of this size)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# errors of these libraries (the fsspec stores) are transport failures worth another attempt
_REMOTE_LIBRARIES = frozenset({"aiohttp", "botocore", "aiobotocore", "s3fs", "gcsfs", "google", "fsspec", "urllib3"})


class RemoteFetchError(OSError):
    """A file at a URL that could not be fetched (after the retries, where retrying can help)."""


class RemoteNotFound(RemoteFetchError):
    """The store answered that there is no such file (HTTP 404, no such key)."""


class RemoteServerFault(RemoteFetchError):
    """The server stalled, trickled or sent more than the file may hold: not a file to plan around but a
    source that would hold the command without end; commands stop on it (a `RunFailure` at their level)."""


class _TooSlow(TimeoutError):
    """An attempt that brought less than `REMOTE_MIN_BYTES_PER_S` over a window (retried like silence)."""


_server_faults: dict[str, str] = {}  # server -> its first RemoteServerFault in this process: nothing more fetched


@dataclass(frozen=True, repr=False)
class ShardURL:
    """A shard folder or file at a URL, used where a local one is a Path: `/ name`, `.name`, and a
    `str()` without credentials (no user:password@, no query), so that messages and run records never
    hold them. Only the openers here read `url` itself."""

    url: str

    def __truediv__(self, name: str) -> ShardURL:
        parts = urlsplit(self.url)
        return ShardURL(urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}", fragment="")))

    @property
    def name(self) -> str:
        return urlsplit(self.url).path.rstrip("/").rpartition("/")[2]

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, _host(parts.netloc), parts.path, "", ""))

    def __repr__(self) -> str:
        return f"ShardURL({str(self)!r})"


Location = Path | ShardURL


def shard_location(value: str | Location) -> Location:
    """A --shards argument: a URL of a supported store, else a local path. Raises UserError for a URL
    of another scheme, or of a store whose fsspec implementation is not installed."""
    if isinstance(value, (Path, ShardURL)):
        return value
    if not _URL.match(value):
        return Path(value)
    location = ShardURL(value)
    parts = urlsplit(value)
    if _DEADLINE_ERROR:
        raise UserError(_DEADLINE_ERROR)
    if location.scheme not in HTTP_SCHEMES and location.scheme not in FSSPEC_SCHEMES:
        raise UserError(f"{location.scheme}:// is not a supported shard location: use a local folder, or an "
                        "https://, http://, s3:// or gs:// URL of a shard folder")
    if not _names_host(parts):  # http://:80/x would only be retried against a host that is not there
        raise UserError(f"{location} names no {'host' if location.scheme in HTTP_SCHEMES else 'bucket'} "
                        "(or its port is not a number)")
    module = FSSPEC_SCHEMES.get(location.scheme)
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"{location.scheme}:// shards are read through {module}, which is not installed: "
                        "pip install 'gastro-dist[remote]'")
    return location


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with every URL that holds credentials (user:password@, a query) in its public form:
    what W&B records as the run's arguments, and any later reader of sys.argv, sees no secret."""

    def public(arg: str) -> str:
        option, equals, value = arg.partition("=") if not _URL.match(arg) else ("", "", arg)
        if not _URL.match(value):
            return arg
        parts = urlsplit(value)
        if "@" not in parts.netloc and not parts.query:
            return arg
        return f"{option}{equals}{ShardURL(value)}"

    return [public(arg) for arg in argv]


def location_record(location: Location) -> str:
    """What a run records as its shards: the absolute folder, or the URL without credentials."""
    return str(location) if isinstance(location, ShardURL) else str(location.resolve())


def open_location(location: Location, listed_bytes: int | None = None) -> BinaryIO:
    """A binary stream of the file: `files.open_regular_file` for a local path, a `_RemoteStream` for a
    URL, read to at most the size index.json lists for it (`listed_bytes`), else `MAX_REMOTE_SHARD_BYTES`.
    Raises OSError (`RemoteFetchError` for a URL: its message names the URL without credentials)."""
    if isinstance(location, ShardURL):
        if listed_bytes is None:
            return _RemoteStream(location)
        return _RemoteStream(location, min(listed_bytes, MAX_REMOTE_SHARD_BYTES), "this shard (its size in index.json)")
    return open_regular_file(location)


def location_fingerprint(location: Location) -> dict | None:
    """What identifies the file's present content without reading it: size, modification time, inode
    and device of a local file; size and ETag (or Last-Modified) of a file at a URL, from the headers of
    a request whose body is not read (None when the store gives neither). Raises OSError."""
    if isinstance(location, ShardURL):
        with _RemoteStream(location) as stream:
            return None if stream.version is None else {"size": stream.size, "version": stream.version}
    status = os.stat(location)
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino, "device": status.st_dev}


def fetch_bytes(location: ShardURL, max_bytes: int, what: str) -> bytes:
    """The whole file at a URL (index.json), fetched once; `RemoteServerFault` when the server announces
    or sends more than `max_bytes` (`what` names the limit in that message)."""
    with _RemoteStream(location, max_bytes, what) as stream:
        data = bytearray()
        while chunk := stream.read(1 << 20):
            data += chunk
        return bytes(data)


class _RemoteStream:
    """A file at a URL read front to back. A failed open, or a connection lost midway (an error, or the
    data ending before the size the store announced), is retried from the byte reached after a backoff,
    until `FETCH_ATTEMPTS` attempts in a row have brought nothing. A store that answers "no such file"
    or "access denied" is not retried. A file that changes between attempts (another ETag) is an error:
    its two halves would not belong together. The deadlines of the module docstring bound every read:
    HTTP bodies are read one receive at a time (`read1`), so a read returns what has come instead of
    waiting for a trickle to fill it, and the time and rate are checked between receives."""

    def __init__(self, location: ShardURL, max_bytes: int = MAX_REMOTE_SHARD_BYTES, what: str = "a shard"):
        self.location, self.max_bytes, self.what = location, max_bytes, what
        self.opener = _open_http if location.scheme in HTTP_SCHEMES else _open_fsspec
        self.stream: Any = None
        self.offset, self.size, self.version = 0, None, None
        self.skip = 0  # bytes of the present response before `offset` (a server that ignored Range sends them again)
        self.waited_s = 0.0  # time spent waiting on the server, every attempt and backoff included
        self.window_s, self.window_bytes = 0.0, 0  # the present window of the rate check
        if self._server() in _server_faults:
            raise RemoteServerFault(f"cannot fetch {location}: not tried after an earlier fault of this server "
                                    f"({_server_faults[self._server()]})")
        self._with_retries(lambda: b"")  # opened now: a file that cannot be fetched fails here, not in the tar reader

    def read(self, size: int = -1) -> bytes:
        return self._with_retries(lambda: self._read_once(size))

    def _read_once(self, size: int) -> bytes:
        while self.skip:
            dropped = self._receive(min(self.skip, 1 << 20))
            if not dropped:
                raise ConnectionError(f"the connection ended {self.skip:,} bytes before byte {self.offset:,}")
            self.skip -= len(dropped)
        data = self._receive(size)
        if not data and size != 0 and self.size is not None and self.offset < self.size:
            raise ConnectionError(f"the connection ended after {self.offset:,} of {self.size:,} bytes")
        if self.offset + len(data) > self.max_bytes:
            raise self._fault(f"sent more than the {self.max_bytes:,} bytes {self.what} may hold")
        self.offset += len(data)
        return data

    def _receive(self, size: int) -> bytes:
        """One read of the response (one receive, for HTTP), timed for the rate check."""
        started = time.monotonic()
        data = self.stream.read1(size) if self.opener is _open_http else self.stream.read(size)
        self.window_s += time.monotonic() - started
        self.window_bytes += len(data)
        if self.window_s >= SOCKET_TIMEOUT_S:
            if self.window_bytes < REMOTE_MIN_BYTES_PER_S * self.window_s:
                raise _TooSlow(f"sent {self.window_bytes:,} bytes in {self.window_s:,.1f} s, below the minimum "
                               f"of {REMOTE_MIN_BYTES_PER_S:,} bytes/s")
            self.window_s, self.window_bytes = 0.0, 0
        return data

    def _with_retries(self, action: Callable[[], bytes]) -> bytes:
        started = time.monotonic()
        try:
            for attempt in range(1, FETCH_ATTEMPTS + 1):
                self._check_deadline(self.waited_s + time.monotonic() - started)
                try:
                    if self.stream is None:
                        self._open()
                    return action()
                except RemoteFetchError:
                    self._drop_stream()
                    raise
                except Exception as err:  # noqa: BLE001 - sorted by _failure: transport errors retried, others raised
                    self._drop_stream()
                    reason, retry = _failure(err)
                    stalled = isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)
                    if stalled and not isinstance(err, _TooSlow):
                        reason = f"sent nothing for {SOCKET_TIMEOUT_S:g} s after {self.offset:,} bytes"
                    if not retry or attempt == FETCH_ATTEMPTS:
                        tries = f" ({attempt} attempts)" if attempt > 1 else ""
                        if stalled:
                            raise self._fault(f"{self._public(reason)}{tries}") from None
                        error = RemoteNotFound if _is_not_found(err) else RemoteFetchError
                        raise error(f"cannot fetch {self.location}: {self._public(reason)}{tries}") from None
                    time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            raise AssertionError("unreachable")
        finally:
            self.waited_s += time.monotonic() - started

    def _check_deadline(self, waited_s: float) -> None:
        """The total wait so far against the file's deadline, which grows with the bytes already received."""
        if waited_s > REMOTE_TIMEOUT_S + self.offset / REMOTE_MIN_BYTES_PER_S:
            raise self._fault(f"sent {self.offset:,} bytes in {waited_s:,.0f} s, more than the {REMOTE_TIMEOUT_S:g} s "
                              f"(plus {REMOTE_MIN_BYTES_PER_S:,} bytes/s) a file may take")

    def _fault(self, what_it_did: str) -> RemoteServerFault:
        message = f"cannot fetch {self.location}: {what_it_did}"
        _server_faults.setdefault(self._server(), message)
        self._drop_stream()
        return RemoteServerFault(message)

    def _server(self) -> str:
        parts = urlsplit(self.location.url)
        return f"{parts.scheme.lower()}://{_host(parts.netloc).lower()}"

    def _open(self) -> None:
        self.stream, size, version, start = self.opener(self.location.url, self.offset)
        self.skip, self.window_s, self.window_bytes = self.offset - start, 0.0, 0
        if self.offset and None not in (version, self.version) and version != self.version:
            raise RemoteFetchError(f"{self.location} changed while it was being read; read it again")
        if size is not None and size > self.max_bytes:
            raise self._fault(f"is {size:,} bytes, more than the {self.max_bytes:,} bytes {self.what} may hold")
        self.size, self.version = size, version

    def _drop_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail again; it is dropped either way
                pass

    def _public(self, text: str) -> str:
        """An error text with the URL as given (credentials and all) replaced by its public form."""
        return text.replace(self.location.url, str(self.location))

    def close(self) -> None:
        self._drop_stream()

    def __enter__(self) -> _RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _failure(err: BaseException) -> tuple[str, bool]:
    """(reason in words, whether another attempt may help); errors that are neither transport nor store
    errors (a bug) are raised as they are."""
    if isinstance(err, urllib.error.HTTPError):
        err.close()  # its body is not read
        return f"HTTP {err.code} {err.reason}", err.code in _TRANSIENT_HTTP_STATUS
    if isinstance(err, urllib.error.URLError):
        return str(err.reason), True
    if isinstance(err, _TooSlow):
        return str(err), True
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{'not found' if isinstance(err, FileNotFoundError) else 'access denied'} ({err})", False
    if isinstance(err, (OSError, http.client.HTTPException, EOFError)):
        return f"{type(err).__name__}: {err}", True
    if type(err).__module__.split(".")[0] in _REMOTE_LIBRARIES:
        return f"{type(err).__name__}: {err}", True
    raise err


def _is_not_found(err: BaseException) -> bool:
    return isinstance(err, FileNotFoundError) or (isinstance(err, urllib.error.HTTPError) and err.code in (404, 410))


def _host(netloc: str) -> str:
    return netloc.rpartition("@")[2]


def _names_host(parts: SplitResult) -> bool:
    """Whether a URL names a host (or bucket), with a port that is a number if it has one."""
    try:
        return bool(parts.hostname) and (parts.port is None or parts.port >= 0)
    except ValueError:  # a port that is no number
        return False


# ---------------------------------------------------------------- the stores
def _open_http(url: str, offset: int) -> tuple[BinaryIO, int | None, str | None, int]:
    """(response, file size, ETag or Last-Modified, the byte the response starts at) of a GET from
    `offset` on. A server that ignores the Range header sends the whole file again, from byte 0."""
    parts = urlsplit(url)
    request = urllib.request.Request(urlunsplit((parts.scheme, _host(parts.netloc), parts.path, parts.query, "")),
                                     headers={"User-Agent": f"gastro-dist/{__version__}"})
    credentials = _http_credentials(parts.username, parts.password, parts.hostname)
    if credentials:  # never sent on to where a redirect points
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    response = urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT_S)
    version = response.headers.get("ETag") or response.headers.get("Last-Modified")
    if response.status == 206:
        start, _, total = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")
        if start != str(offset):
            response.close()
            raise ConnectionError(f"asked for the bytes from {offset:,}, the server sent a range from {start}")
        total = total.rpartition("/")[2]
        return response, int(total) if total.isdigit() else None, version, offset
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None, version, 0


def _http_credentials(user: str | None, password: str | None, host: str | None) -> str | None:
    """'user:password' from the URL, else from ~/.netrc (or $NETRC), as curl and requests take them."""
    if user is not None:
        return f"{unquote(user)}:{unquote(password or '')}"
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{found[0]}:{found[2]}" if found else None


def _open_fsspec(url: str, offset: int) -> tuple[BinaryIO, int | None, str | None, int]:
    """An s3:// or gs:// object through fsspec (s3fs, gcsfs: credentials from their usual environment:
    AWS_* variables, ~/.aws, instance roles; GOOGLE_APPLICATION_CREDENTIALS, gcloud)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    stream = fs.open(path, "rb", block_size=STREAM_BLOCK_BYTES, cache_type="readahead")
    if offset:
        stream.seek(offset)
    details = getattr(stream, "details", None) or {}
    version = details.get("ETag") or details.get("etag") or details.get("generation")
    return stream, stream.size, None if version is None else str(version), offset
