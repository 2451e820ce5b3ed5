"""evaluate / predict / cam / export / compare through the real CLI on a tiny trained run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main

pytestmark = pytest.mark.slow  # end to end: trains, packs or launches processes

SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--config", SMOKE, "--shards", str(synthetic_shards), "--out", str(run),
                 *TINY_TRAIN_OVERRIDES]) == 0
    return run


def test_evaluate_writes_metrics_predictions_and_report(trained_run, synthetic_shards, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(trained_run), "--shards", str(synthetic_shards), "--split", "test",
                 "--out", str(out), "--bootstrap", "200", "--cancer-sensitivity", "0.9",
                 "--cam-misclassified", "1", "--workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    index = json.loads((synthetic_shards / "index.json").read_text())
    classes = index["classes"]
    assert metrics["num_samples"] == index["splits"]["test"]["count"]
    assert set(metrics["per_class_accuracy"]) == set(classes)
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["num_samples"]
    for name in classes:
        assert {"sensitivity", "specificity", "ppv", "npv", "f1", "auc"} <= set(metrics["per_class"][name])
    assert metrics["cancer_vs_benign"]["positive_class"] == "gastric_cancer"
    assert metrics["ci"]["accuracy"]["lower"] <= metrics["accuracy"] <= metrics["ci"]["accuracy"]["upper"]
    assert {"majority", "stratified"} <= set(metrics["baselines"])
    assert metrics["operating_point"]["target_sensitivity"] == 0.9
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_samples"]
    assert {"key", "source", "patient_id", "true_label", "predicted_label", *[f"prob_{c}" for c in classes]} <= set(rows[0])
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in classes) - 1) < 1e-4 for r in rows)
    report = (out / "report.md").read_text()
    assert "matthews_corrcoef" in report
    for png in ("confusion_matrix.png", "roc.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 200 and image.size[1] > 200
    classes_with_mistakes = {r["true_label"] for r in rows if r["true_label"] != r["predicted_label"]}
    cams = list((out / "cam").glob("*.png")) if (out / "cam").is_dir() else []
    assert len(cams) == len(classes_with_mistakes)  # --cam-misclassified 1: one per class that has mistakes
    for cam in cams:
        assert f"cam/{cam.name}" in report


def test_evaluate_under_two_processes_counts_every_sample_once(trained_run, synthetic_shards, tmp_path):
    out = tmp_path / "eval2"
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gastro_dist", "evaluate",
         "--run", str(trained_run), "--shards", str(synthetic_shards), "--split", "val", "--out", str(out),
         "--bootstrap", "50", "--workers", "0", "--batch-size", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    index = json.loads((synthetic_shards / "index.json").read_text())
    assert metrics["num_samples"] == index["splits"]["val"]["count"]
    with (out / "predictions.csv").open() as f:
        keys = [r["key"] for r in csv.DictReader(f)]
    assert len(keys) == len(set(keys)) == index["splits"]["val"]["count"]


def test_predict_files_folders_shards_and_a_bad_file(trained_run, synthetic_source, synthetic_shards, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    folder = synthetic_source / "gastric_ulcer"
    shard = next(synthetic_shards.glob("val-*.tar"))
    grayscale = tmp_path / "gray.png"
    Image.new("L", (90, 70), 120).save(grayscale)
    out = tmp_path / "preds.csv"
    # exit status 1: one input was unreadable; every other one is still predicted
    assert main(["predict", "--run", str(trained_run), str(bad), str(folder), str(shard), str(grayscale),
                 "--out", str(out), "--tta", "--batch-size", "4"]) == 1
    with out.open() as f:
        rows = list(csv.DictReader(f))
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(bad)]["error"] and not by_path[str(bad)]["predicted_label"]
    assert by_path[str(grayscale)]["predicted_label"] and not by_path[str(grayscale)]["error"]
    assert sum(r["path"].startswith(str(folder)) for r in rows) == len(list(folder.glob("*.jpg")))
    assert any("#" in r["path"] for r in rows)
    classes = json.loads((trained_run / "model.json").read_text())["classes"]
    good = [r for r in rows if not r["error"]]
    assert all(r["predicted_label"] in classes for r in good)


def test_cam_overlays(trained_run, synthetic_source, tmp_path):
    image = next((synthetic_source / "gastric_cancer").glob("*.jpg"))
    out = tmp_path / "cams"
    assert main(["cam", "--run", str(trained_run), str(image), "--out", str(out), "--class", "gastric_ulcer"]) == 0
    with Image.open(out / f"{image.stem}_cam.png") as overlay:
        assert overlay.size == (48, 48) and overlay.mode == "RGB"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip_through_the_cli(trained_run, tmp_path, fmt, capsys):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--run", str(trained_run), "--format", fmt, "--out", str(out)]) == 0
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["classes"] == json.loads((trained_run / "model.json").read_text())["classes"]
    assert "max difference" in capsys.readouterr().out


def test_compare_writes_the_study_table(synthetic_shards, tmp_path):
    out = tmp_path / "cmp"
    second = tmp_path / "mobilenet.yaml"
    second.write_text((REPO / "configs" / "smoke.yaml").read_text().replace("resnet18", "mobilenet_v3_small"))
    overrides = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith("model.name")]
    assert main(["compare", "--configs", SMOKE, str(second), "--shards", str(synthetic_shards),
                 "--out", str(out), "--bootstrap", "50", *overrides]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in comparison["models"]] == ["smoke", "mobilenet"]
    assert comparison["models"][1]["model"] == "mobilenet_v3_small"
    table = (out / "comparison.md").read_text()
    assert "| smoke |" in table and "gastric_cancer" in table
    for row in comparison["models"]:
        assert set(row["per_class_accuracy"]) == set(comparison["classes"])
        assert row["train_time_s"] > 0
