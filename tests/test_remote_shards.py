"""Shards at a URL: a copy of the session's pack served by python's http.server on 127.0.0.1 (a thread of
the test), and, where moto and s3fs are installed, by moto's S3 server on 127.0.0.1. verify, train,
evaluate and bench loader read it; lost connections are retried, a missing shard is a reported problem,
and credentials in the URL never reach a file of the run."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import hostile
from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data import locations
from gastro_dist.data.shard_index import load_shard_index
from gastro_dist.data.shard_reader import checked_index

SMOKE = str(REPO / "configs" / "smoke.yaml")
USER, PASSWORD = "gd-reader", "pw-7f1c9e2a-not-for-files"


class ShardServer:
    """http.server in a thread serving `root` under /shards/. Optional: Basic credentials required;
    `drops[name]` connections for file `name` dropped, before answering or after half the body
    (`drop_midway`); Range requests answered (`ranges`, python's own handler ignores them)."""

    def __init__(self, root: Path, *, credentials: bool = False, drops: dict[str, int] | None = None,
                 drop_midway: bool = False, ranges: bool = False):
        self.root, self.credentials, self.drops = root, credentials, dict(drops or {})
        self.drop_midway, self.ranges = drop_midway, ranges
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, credentials: bool = False) -> str:
        userinfo = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.httpd.server_address[1]}/shards"

    def requests_for(self, name: str) -> list[str | None]:
        return [range_header for file_name, range_header in self.requests if file_name == name]

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type:
        server = self
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.removeprefix("/shards/")
                server.requests.append((name, self.headers.get("Range")))
                if server.credentials and self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="shards"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / name
                if "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                drop = server.drops.get(name, 0) > 0
                if drop:
                    server.drops[name] -= 1
                    if not server.drop_midway:  # closed without an answer
                        self.close_connection = True
                        return
                start = 0
                requested = self.headers.get("Range")
                if server.ranges and requested and requested.startswith("bytes=") and requested.endswith("-"):
                    start = int(requested[len("bytes="):-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:16]}"')
                self.end_headers()
                body = data[start:]
                if drop:  # half the body, then the connection is gone
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(locations, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture
def pack(synthetic_shards, tmp_path) -> Path:
    return hostile.copy_pack(synthetic_shards, tmp_path / "served")


def _train_args(shards: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", shards, "--out", str(out), *TINY_TRAIN_OVERRIDES,
            "finetune.epochs=0", *extra]


def _files_holding(folder: Path, text: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


# ---------------------------------------------------------------- verify, bench loader
def test_verify_over_http_reads_each_shard_once(pack, capsys):
    with ShardServer(pack) as server:
        assert main(["verify", server.url()]) == 0
    out = capsys.readouterr().out
    assert "OK: " in out and f"MB from {server.url()} in " in out
    shard_names = [name for name, _ in server.requests if name.endswith(".tar")]
    assert sorted(shard_names) == sorted(path.name for path in pack.glob("*.tar"))  # one download each


def test_bench_loader_over_http_records_the_url_without_credentials(pack, tmp_path):
    out = tmp_path / "loader.json"
    with ShardServer(pack, credentials=True) as server:
        assert main(["bench", "loader", "--shards", server.url(credentials=True), "--workers", "0", "--batches", "2",
                     "--image-size", "48", "--batch-size", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shards"]["dir"] == server.url() and result["shards"]["batches"] >= 2
    assert PASSWORD not in out.read_text()


def test_urls_print_without_credentials_and_join_file_names():
    url = locations.shard_location(f"https://{USER}:{PASSWORD}@host.example:8443/data/pack/?sig=abc#x")
    shard = url / "train-000000.tar"
    assert str(url) == "https://host.example:8443/data/pack/" and repr(url) == "ShardURL('https://host.example:8443/data/pack/')"
    assert str(shard) == "https://host.example:8443/data/pack/train-000000.tar" and shard.name == "train-000000.tar"
    assert shard.url == f"https://{USER}:{PASSWORD}@host.example:8443/data/pack/train-000000.tar?sig=abc"
    assert str(locations.ShardURL("s3://bucket") / "index.json") == "s3://bucket/index.json"
    assert locations.redact_argv(["gastro-dist", "train", "--shards", url.url, f"--shards={url.url}", "/local/dir",
                                  "https://plain.example/pack"]) == [
        "gastro-dist", "train", "--shards", str(url), f"--shards={url}", "/local/dir", "https://plain.example/pack"]


def test_a_store_whose_library_is_missing_is_one_line_naming_the_extra(monkeypatch):
    real_find_spec = locations.importlib.util.find_spec
    monkeypatch.setattr(locations.importlib.util, "find_spec",
                        lambda name, *a: None if name == "s3fs" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"s3fs, which is not installed: pip install 'gastro-dist\[remote\]'"):
        locations.shard_location("s3://bucket/pack")


# ---------------------------------------------------------------- failures
def test_missing_shard_is_a_reported_problem_not_a_traceback(pack, capsys, tmp_path):
    missing = hostile.shard_path(pack, "train", 1)
    missing.unlink()
    with ShardServer(pack, credentials=True) as server:
        assert main(["verify", server.url(credentials=True)]) == 1
        err = capsys.readouterr().err
        assert f"PROBLEM: {missing.name}: cannot fetch {server.url()}/{missing.name}: HTTP 404" in err
        assert "Traceback" not in err and PASSWORD not in err
        assert len(server.requests_for(missing.name)) == 1  # "not found" is not retried

        # training plans around it (the shard holds nothing) and reports it ...
        index = load_shard_index(server.url(credentials=True))
        checked, problems = checked_index(index, ["train"], 1 << 20)
        assert checked.count("train") == index.count("train") - hostile.shard_entry(pack, "train", 1)["count"]
        assert any(f"cannot fetch {server.url()}/{missing.name}: HTTP 404" in problem for problem in problems)

        # ... or, under data.strict, stops with one line naming the URL, before any training
        assert main(_train_args(server.url(credentials=True), tmp_path / "run", "data.strict=true")) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"{server.url()}/{missing.name}: HTTP 404" in lines[0], err
    assert "Traceback" not in err and PASSWORD not in err


def test_missing_index_and_wrong_credentials_are_one_line(pack, capsys):
    with ShardServer(pack, credentials=True) as server:
        assert main(["verify", server.url(credentials=True) + "/nothing-here"]) == 2
        assert "index.json not found" in capsys.readouterr().err
        assert main(["verify", server.url().replace("http://", f"http://{USER}:wrong@")]) == 1
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "wrong" not in err and "Traceback" not in err
        assert len(server.requests_for("index.json")) == 1  # refused credentials are not retried
    assert main(["verify", "ftp://127.0.0.1/shards"]) == 2
    assert "not a supported shard location" in capsys.readouterr().err


@pytest.mark.parametrize("drop_midway, ranges", [(False, False), (True, False), (True, True)],
                         ids=["before-answering", "midway-resent-whole", "midway-resumed-by-range"])
def test_dropped_connections_are_retried(pack, capsys, drop_midway, ranges):
    shard = hostile.shard_path(pack, "train", 0).name
    with ShardServer(pack, drops={shard: 2, "index.json": 2}, drop_midway=drop_midway, ranges=ranges) as server:
        assert main(["verify", server.url()]) == 0, capsys.readouterr().err
    assert "OK: " in capsys.readouterr().out
    size = (pack / shard).stat().st_size
    half, three_quarters = size // 2, size // 2 + (size - size // 2) // 2
    # each retry asks for the rest from the byte reached; a server without ranges sends it all again
    expected = {(False, False): [None, None, None],
                (True, False): [None, f"bytes={half}-", f"bytes={half}-"],
                (True, True): [None, f"bytes={half}-", f"bytes={three_quarters}-"]}[drop_midway, ranges]
    assert server.requests_for(shard) == expected
    assert len(server.requests_for("index.json")) == 3  # verify reads it once (the index and its totals)


def test_a_server_that_keeps_dropping_is_reported_after_the_retries(pack, capsys):
    shard = hostile.shard_path(pack, "val", 0).name
    with ShardServer(pack, drops={shard: 100}) as server:
        assert main(["verify", server.url()]) == 1
    err = capsys.readouterr().err
    assert f"PROBLEM: {shard}: cannot fetch {server.url()}/{shard}: " in err
    assert f"({locations.FETCH_ATTEMPTS} attempts)" in err and "Traceback" not in err
    assert len(server.requests_for(shard)) == locations.FETCH_ATTEMPTS


# ---------------------------------------------------------------- train and evaluate
@pytest.mark.slow
def test_train_and_evaluate_from_a_url_with_credentials(pack, tmp_path, capsys):
    """Training runs as a command of its own, so the URL is on its real command line, which W&B (offline
    here) records with the run: the credentials must not reach the run folder that way either."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    with ShardServer(pack, credentials=True) as server:
        trained = subprocess.run([sys.executable, "-m", "gastro_dist", *_train_args(
            server.url(credentials=True), run, "tracking.tracker=wandb")], env=env, capture_output=True, text=True,
            timeout=600)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert f"MB from {server.url()} in " in trained.stdout  # the start-of-run scan says what it downloaded
        assert PASSWORD not in trained.stdout + trained.stderr
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["shards"] == server.url()
        assert summary["shards_index_sha256"] == hashlib.sha256((pack / "index.json").read_bytes()).hexdigest()
        # W&B recorded the command line (in its run file), with the URL in its public form
        assert any("/wandb/" in path and path.endswith(".wandb") for path in _files_holding(run, server.url()))

        assert main(["evaluate", "--run", str(run), "--shards", server.url(credentials=True), "--split", "test",
                     "--out", str(run / "eval"), "--bootstrap", "0", "--workers", "1", "--no-track"]) == 0
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert metrics["details"]["shards"] == server.url()
        assert metrics["details"]["images"] == hostile.read_index(pack)["splits"]["test"]["count"]
    output = capsys.readouterr()
    assert PASSWORD not in output.out + output.err
    assert _files_holding(run, PASSWORD) == [] and _files_holding(run, f"{USER}:") == []

    # the same shard set on local disk (same index.json) is the same run: nothing left to do, not refused
    assert main(_train_args(str(pack), run)) == 0
    assert "already fully trained" in capsys.readouterr().out


# ---------------------------------------------------------------- s3:// (moto's S3 server)
@pytest.fixture
def s3_pack(pack, monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    client = boto3.client("s3")
    client.create_bucket(Bucket="gastro")
    for path in pack.iterdir():
        client.upload_file(str(path), "gastro", f"packs/tiny/{path.name}")
    yield "s3://gastro/packs/tiny"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.slow
def test_verify_and_train_from_s3(s3_pack, tmp_path, capsys):
    assert main(["verify", s3_pack]) == 0
    assert "OK: " in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(_train_args(s3_pack, run)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["shards"] == s3_pack
    assert _files_holding(run, "testing-secret-key") == []
    assert main(["verify", s3_pack + "-missing"]) == 2
    assert "index.json not found" in capsys.readouterr().err
