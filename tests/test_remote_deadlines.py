"""Remote reads against servers that misbehave on purpose (http.server threads of the test on 127.0.0.1):
an index.json trickled a byte at a time, a shard that is an endless stream of members not ours, a shard
followed by endless zeros, every shard stalled halfway, an oversized index.json, and a URL with no host.
The deadlines are made small here (`small_deadlines`); every command must end within seconds with one
line naming the URL and what the server did. Each server loop stops when its test ends, or after
`SERVER_LIMIT_S`, whichever comes first."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import io
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Iterator

import pytest

import hostile
from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.data import locations, shard_reader
from gastro_dist.data.locations import ShardURL
from gastro_dist.data.shard_index import MAX_REMOTE_INDEX_BYTES
from gastro_dist.data.shard_reader import ShardSourceFault, iter_shard_samples, iter_tar_samples

SERVER_LIMIT_S = 30.0  # no server loop outlives this, even if its test hangs
STALL_S = 0.4  # the socket timeout and rate window of these tests (30 s outside them)
FOREIGN_CAP = 200  # MAX_FOREIGN_MEMBERS of these tests (10,000 outside them)
Behaviour = Callable[[http.server.BaseHTTPRequestHandler, bytes, Callable[[], bool]], None]


@pytest.fixture(autouse=True)
def small_deadlines(monkeypatch):
    monkeypatch.setattr(locations, "SOCKET_TIMEOUT_S", STALL_S)
    monkeypatch.setattr(locations, "RETRY_BACKOFF_S", 0.01)
    monkeypatch.setattr(locations, "REMOTE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(locations, "_server_faults", {})
    monkeypatch.setattr(shard_reader, "MAX_FOREIGN_MEMBERS", FOREIGN_CAP)


@pytest.fixture
def pack(synthetic_shards, tmp_path) -> Path:
    return hostile.copy_pack(synthetic_shards, tmp_path / "served")


class HostileServer:
    """Serves `root` under /shards/ (HTTP/1.0: a body without Content-Length ends when the connection
    closes); a file named in `behaviours` is answered by its behaviour instead, which gets the handler,
    the file's bytes and `over()`: true once the test has ended or SERVER_LIMIT_S has passed."""

    def __init__(self, root: Path, behaviours: dict[str, Behaviour]):
        self.root, self.behaviours = root, behaviours
        self.requests: list[str] = []
        self.done = threading.Event()
        self.started = time.monotonic()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/shards"

    def over(self) -> bool:
        return self.done.is_set() or time.monotonic() - self.started > SERVER_LIMIT_S

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.removeprefix("/shards/")
                server.requests.append(name)
                path = server.root / name
                if "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                default = server.behaviours.get("*.tar") if name.endswith(".tar") else None
                behaviour = server.behaviours.get(name, default)
                try:
                    if behaviour is None:
                        _send(self, path.read_bytes())
                    else:
                        behaviour(self, path.read_bytes(), server.over)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    pass

        return Handler


def _send(handler: http.server.BaseHTTPRequestHandler, body: bytes, length: int | None = None) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def _stream(handler: http.server.BaseHTTPRequestHandler, chunks: Iterator[bytes], over: Callable[[], bool],
            length: int | None = None, pause_s: float = 0.0) -> None:
    """Headers (with `length` as Content-Length, if given), then `chunks` until they or the test end."""
    handler.send_response(200)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    for chunk in chunks:
        if over():
            return
        handler.wfile.write(chunk)
        handler.wfile.flush()
        time.sleep(pause_s)


def _trickle(handler, body, over) -> None:
    _stream(handler, (body[i:i + 1] for i in range(len(body))), over, length=len(body), pause_s=0.05)


def _half_then_silence(handler, body, over) -> None:
    _stream(handler, iter([body[:len(body) // 2]]), over, length=len(body))
    while not over():
        time.sleep(0.05)


def _then_endless_zeros(handler, body, over) -> None:
    _stream(handler, _endless(body, b"\0" * 65536), over)


def _endless(first: bytes, then: bytes) -> Iterator[bytes]:
    yield first
    while True:
        yield then


def _foreign_member(number: int) -> bytes:
    info = tarfile.TarInfo(f"junk-{number}.txt")
    info.size = 1
    return info.tobuf() + b"x" + b"\0" * 511


def _without_tar_end(body: bytes) -> bytes:
    """A tar's members without its end-of-archive blocks (member data is padded to 512 bytes with zeros)."""
    kept = len(body.rstrip(b"\0"))
    return body[:-(-kept // 512) * 512]


def _endless_foreign_members(handler, body, over) -> None:
    members = (_foreign_member(number) for number in range(10 ** 9))
    _stream(handler, _prefixed(_without_tar_end(body), members), over)


def _prefixed(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error:" in line]


def _timed(argv: list[str]) -> tuple[int, float]:
    started = time.monotonic()
    status = main(argv)
    return status, time.monotonic() - started


# ---------------------------------------------------------------- the cases
def test_a_trickled_index_json_ends_the_command(pack, capsys):
    with HostileServer(pack, {"index.json": _trickle}) as server:
        status, seconds = _timed(["verify", server.url()])
    lines = _error_lines(capsys.readouterr().err)
    assert status == 1 and len(lines) == 1, lines
    assert f"cannot fetch {server.url()}/index.json: sent " in lines[0] and " bytes in " in lines[0], lines[0]
    assert seconds < 10
    assert not any(name.endswith(".tar") for name in server.requests)


def _unlisted_sizes(pack: Path) -> None:
    """index.json as packs made before shard sizes were listed: no `bytes`, so only the other caps hold."""
    def drop(index: dict) -> None:
        for split in index["splits"].values():
            for entry in split["shards"]:
                del entry["bytes"]
    hostile.edit_index(pack, drop)


def _over_the_listed_size(server: HostileServer, shard: str, pack: Path) -> str:
    size = hostile.shard_path(pack, shard.split("-")[0], 0).stat().st_size
    return (f"cannot fetch {server.url()}/{shard}: sent more than the {size:,} bytes this shard (its size in "
            "index.json) may hold")


@pytest.mark.parametrize("sizes", ["listed", "unlisted"])
def test_an_endless_stream_of_foreign_members_stops_training(sizes, pack, tmp_path, capsys):
    if sizes == "unlisted":
        _unlisted_sizes(pack)
    shard = hostile.shard_path(pack, "train", 0).name
    with HostileServer(pack, {shard: _endless_foreign_members}) as server:
        status, seconds = _timed(["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", server.url(),
                                  "--out", str(tmp_path / "run"), *TINY_TRAIN_OVERRIDES, "finetune.epochs=0"])
    lines = _error_lines(capsys.readouterr().err)
    assert status == 1 and len(lines) == 1, lines
    expected = (_over_the_listed_size(server, shard, pack) if sizes == "listed" else
                f"{server.url()}/{shard}: more than {FOREIGN_CAP:,} members that are not samples")
    assert expected in lines[0], lines[0]
    assert seconds < 30


def test_foreign_members_are_not_kept_in_memory(monkeypatch):
    """tarfile keeps every member it has read; the reader drops them, so memory stays flat up to the cap."""

    class Endless(io.RawIOBase):
        def __init__(self):
            self.number, self.buffer = 0, b""

        def readable(self) -> bool:
            return True

        def readinto(self, target) -> int:
            while len(self.buffer) < len(target):
                self.buffer += _foreign_member(self.number)
                self.number += 1
            target[:len(target)] = self.buffer[:len(target)]
            self.buffer = self.buffer[len(target):]
            return len(target)

    cap = 5_000
    monkeypatch.setattr(shard_reader, "MAX_FOREIGN_MEMBERS", cap)
    tracemalloc.start()
    try:
        with pytest.raises(ShardSourceFault, match=f"more than {cap:,} members that are not samples"):
            list(iter_tar_samples(io.BufferedReader(Endless()), 1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak:,} bytes for {cap:,} foreign members"  # kept, they would take 2.3 MB


@pytest.mark.parametrize("sizes", ["listed", "unlisted"])
def test_a_shard_followed_by_endless_zeros_is_read_no_further(sizes, pack, capsys):
    if sizes == "unlisted":
        _unlisted_sizes(pack)
    shard = hostile.shard_path(pack, "val", 0).name
    with HostileServer(pack, {shard: _then_endless_zeros}) as server:
        status, seconds = _timed(["verify", server.url()])
    lines = _error_lines(capsys.readouterr().err)
    assert status == 1 and len(lines) == 1, lines
    expected = (_over_the_listed_size(server, shard, pack) if sizes == "listed" else
                f"cannot fetch {server.url()}/{shard}: sent more than {shard_reader.MAX_TAR_TRAILER_BYTES:,} bytes "
                "after the end of its tar archive")
    assert expected in lines[0], lines[0]
    assert seconds < 10


def test_shards_stalled_halfway_cost_one_shard_not_every_shard(pack, capsys):
    first = hostile.shard_path(pack, "train", 0).name
    with HostileServer(pack, {"*.tar": _half_then_silence}) as server:
        status, seconds = _timed(["verify", server.url()])
        lines = _error_lines(capsys.readouterr().err)
        assert status == 1 and len(lines) == 1, lines
        assert f"cannot fetch {server.url()}/{first}: sent nothing for {STALL_S:g} s after " in lines[0], lines[0]
        assert f"({locations.FETCH_ATTEMPTS} attempts)" in lines[0]
        assert seconds < 10
        assert {name for name in server.requests if name.endswith(".tar")} == {first}  # verify stopped there

        # a loader skips a broken shard and goes on: after the server's first fault in its process every
        # further file of that server fails at once, instead of waiting on it again
        other = hostile.shard_path(pack, "val", 0).name
        started = time.monotonic()
        earlier = rf"{other}: not tried after an earlier fault of this server \(cannot fetch {server.url()}/{first}:"
        with pytest.raises(ShardSourceFault, match=earlier):
            list(iter_shard_samples(ShardURL(f"{server.url()}/{other}"), 1 << 20))
        assert time.monotonic() - started < 0.5 and other not in server.requests


@pytest.mark.parametrize("url", ["http://:80/x", "https://user:pw@:443/pack", "http://host.example:port/pack"])
def test_a_url_without_a_host_is_a_usage_error(url, capsys):
    status, seconds = _timed(["verify", url])
    lines = _error_lines(capsys.readouterr().err)
    assert status == 2 and len(lines) == 1 and "names no host" in lines[0] and "pw" not in lines[0], lines
    assert seconds < 1  # refused, not retried


def test_an_oversized_index_json_is_refused_unread(pack, capsys):
    padding = b" " * (MAX_REMOTE_INDEX_BYTES + 1)  # still valid JSON: whitespace
    index = (pack / "index.json").read_bytes()

    def announced(handler, body, over) -> None:  # Content-Length says it all: nothing is downloaded
        _stream(handler, iter([body, padding]), over, length=len(body) + len(padding))

    def endless(handler, body, over) -> None:  # no Content-Length: read up to the limit, no further
        _stream(handler, _endless(body, b" " * 65536), over)

    for behaviour, said in ((announced, f"is {len(index) + len(padding):,} bytes, more than"),
                            (endless, "sent more than")):
        with HostileServer(pack, {"index.json": behaviour}) as server:
            status, seconds = _timed(["verify", server.url()])
        lines = _error_lines(capsys.readouterr().err)
        assert status == 1 and len(lines) == 1, lines
        assert (f"cannot fetch {server.url()}/index.json: {said} the {MAX_REMOTE_INDEX_BYTES:,} bytes an index.json "
                "may hold") in lines[0], lines[0]
        assert server.requests == ["index.json"] and seconds < 10  # one download, not two

    (pack / "index.json").write_bytes(index + padding)  # a local one is refused too, unparsed
    assert main(["verify", str(pack)]) == 1
    assert f"is larger than the {MAX_REMOTE_INDEX_BYTES:,} bytes an index.json may hold" in capsys.readouterr().err


def _python(code: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **environment})


def test_the_deadlines_are_taken_from_the_environment_and_a_bad_one_is_a_usage_error():
    shown = _python("from gastro_dist.data import locations as l; "
                    "print(l.SOCKET_TIMEOUT_S, l.REMOTE_MIN_BYTES_PER_S, l.REMOTE_TIMEOUT_S)",
                    GASTRO_DIST_REMOTE_SILENCE_S="90", GASTRO_DIST_REMOTE_MIN_BYTES_PER_S="1024",
                    GASTRO_DIST_REMOTE_TIMEOUT_S="1800")
    assert shown.stdout.split() == ["90.0", "1024.0", "1800.0"], shown.stderr
    for bad in ("0", "-5", "soon", "nan", "inf"):
        result = _python("import sys; from gastro_dist.cli import main; "
                         "sys.exit(main(['verify', 'http://127.0.0.1:9/shards']))", GASTRO_DIST_REMOTE_TIMEOUT_S=bad)
        assert result.returncode == 2, (bad, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "GASTRO_DIST_REMOTE_TIMEOUT_S" in lines[0] and "positive number" in lines[0], lines
