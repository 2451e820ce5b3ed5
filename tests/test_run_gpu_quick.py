"""`benchmarks/run_gpu.sh --quick`, the GPU proof for a short lease, as a dry run on the CPU
(`--device cpu --tiny`): the same rows through the same code, tiny data and a few steps each, so
that the script cannot rot while no GPU is lent. ~90 s of CPU time, 96 s or more of wall time on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gpu-dry-run")]  # its module fixture runs once

SCRIPT = REPO / "benchmarks" / "run_gpu.sh"
BENCH_ROWS = ["resnet50-224-bf16-cl", "resnet50-224-bf16-cl-decode-on-device", "vgg19-224-bf16-cl",
              "inception_v3-299-bf16-cl", "resnet50-224-bf16-cl-compile"]
PROBE = "gastro_probe-0.0.0-py3-none-any.whl"


def _probe_wheel(house: Path) -> None:
    """A one-module wheel, standing for the packages the GPU machine lacks."""
    house.mkdir(parents=True)
    with zipfile.ZipFile(house / PROBE, "w") as wheel:
        wheel.writestr("gastro_probe/__init__.py", "")
        wheel.writestr("gastro_probe-0.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gastro-probe\nVersion: 0.0.0\n")
        wheel.writestr("gastro_probe-0.0.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("gastro_probe-0.0.0.dist-info/RECORD", "")


def _quick(tmp: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    settings = ("OUT", "QUICK_ROWS", "QUICK_BUDGET_S", "WORKERS", "COMPILE_BACKEND", "OMP_NUM_THREADS")
    environment = {name: value for name, value in os.environ.items() if name not in settings}
    environment.update(PYTHON=sys.executable, WORK_DIR=str(tmp / "work"), WHEELHOUSE=str(tmp / "house"),
                       WHEELHOUSE_TARGET=str(tmp / "site"), **env)
    return subprocess.run(["bash", str(SCRIPT), "--quick", str(out), *args], env=environment, cwd=tmp,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("quick")
    _probe_wheel(tmp / "house")
    out = tmp / "out"
    return tmp, out, _quick(tmp, out, "--device", "cpu", "--tiny")


def test_dry_run_writes_every_row_and_the_summary(dry_run):
    tmp, out, result = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((out / "quick-summary.json").read_text())
    assert summary["run"] == {"mode": "quick", "device": "cpu", "tiny": True, "budget_s": 450, "finished": True}
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["gpu"] is None
    assert summary["data"]["ok"] and summary["data"]["frames"] > 0 and summary["data"]["image_size"] == 64

    # The wheelhouse: what the interpreter lacked was installed with pip --no-index, into the target.
    assert summary["wheelhouse"] == {"ok": True, "installed": [PROBE], "into": str(tmp / "site")}
    assert (tmp / "site" / "gastro_probe" / "__init__.py").is_file()

    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == ["pytest-gpu", *BENCH_ROWS]
    assert all(row["status"] == "ok" and row["exit_code"] == 0 for row in rows.values()), summary["rows"]
    # With the GPU hidden every gpu test is collected and skipped cleanly.
    tests = rows["pytest-gpu"]["tests"]
    assert tests["tests"] >= 7 and tests["skipped"] == tests["tests"] and rows["pytest-gpu"]["not_passed"] == []

    for name in BENCH_ROWS:
        assert rows[name]["json"] == f"{name}.json"
        result = json.loads((out / f"{name}.json").read_text())
        assert result["images_per_s"] > 0 and result["model_flops_per_image"] > 0
        assert result["precision"] == "bf16" and result["channels_last"] and result["device"].startswith("cpu")
        assert result["mfu"] is None and result["peak_memory_gib"] is None  # on CUDA only
        assert result["model"] == name.split("-")[0]
        assert result["image_size"] == (299 if name.startswith("inception") else 64)
        from_shards = name.startswith("resnet50")
        assert (result["end_to_end_images_per_s"] or 0) > 0 if from_shards else result["end_to_end_images_per_s"] is None
    assert json.loads((out / "resnet50-224-bf16-cl-decode-on-device.json").read_text())["decode_on"] == "device"
    compiled = json.loads((out / "resnet50-224-bf16-cl-compile.json").read_text())
    assert compiled["compile"] and compiled["compile_backend"] == "eager"

    # The device tool brings back at most 8 files, plainly named.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files
    assert "== resnet50-224-bf16-cl-compile: ok" in (out / "run_gpu.log").read_text()


def test_rows_that_do_not_fit_the_budget_are_skipped_and_noted(dry_run):
    tmp, _, first = dry_run
    assert first.returncode == 0
    out = tmp / "out-budget"  # the same data (WORK_DIR), no time left for the two rows asked for
    result = _quick(tmp, out, "--device", "cpu", "--tiny", QUICK_BUDGET_S="0",
                    QUICK_ROWS="pytest-gpu resnet50-224-bf16-cl-compile")
    assert result.returncode == 0, result.stdout[-4000:]
    rows = json.loads((out / "quick-summary.json").read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [("pytest-gpu", "skipped"),
                                                       ("resnet50-224-bf16-cl-compile", "skipped")]
    assert "needs 150 s" in rows[1]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_the_quick_run_says_how_to_dry_run(tmp_path):
    result = _quick(tmp_path, tmp_path / "out")
    assert result.returncode != 0 and "--device cpu --tiny" in result.stdout + result.stderr
