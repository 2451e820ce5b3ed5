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

from scipy.special import softmax
from sklearn import metrics as skm

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.evaluation.prediction_files import read_predictions_csv
from gastro_dist.evaluation.metrics import evaluate_predictions, patient_level
from gastro_dist.training.calibration import calibrated_probabilities

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("evaluate-cli")]  # end to end; its run is trained once

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
    assert {"key", "source", "patient_id", "group", "true_label", "predicted_label", *[f"prob_{c}" for c in classes],
            *[f"logit_{c}" for c in classes]} <= set(rows[0])
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in classes) - 1) < 1e-4 for r in rows)
    # Temperature scaling: fitted at the end of training, stored in model.json, applied here.
    temperature = json.loads((trained_run / "model.json").read_text())["temperature"]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == temperature > 0
    assert summary["calibration"]["nll_after"] <= summary["calibration"]["nll_before"]
    assert metrics["temperature_scaling"]["temperature"] == temperature
    # The synthetic patients have several images: patient-level metrics beside the per-image ones.
    patients = metrics["patient_level"]
    assert patients["aggregation"] == "mean" and patients["metrics"]["num_samples"] == patients["num_cases"]
    assert patients["num_patients"] == metrics["num_groups"] < metrics["num_samples"]
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card") and "NOT FOR DIAGNOSIS" in card and "## Caveats and recommendations" in card
    assert "Model card" in (out / "report.html").read_text()
    report = (out / "report.md").read_text()
    assert "matthews_corrcoef" in report and "## Per image and per patient" in report and "## Calibration" in report
    for png in ("confusion_matrix.png", "roc.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 200 and image.size[1] > 200
    # --cam 1: per class, its most confident correct image and its most confident mistake, where it has them
    classes_with_mistakes = {r["true_label"] for r in rows if r["true_label"] != r["predicted_label"]}
    classes_right = {r["true_label"] for r in rows if r["true_label"] == r["predicted_label"]}
    cams = list((out / "cam").glob("*.png"))
    assert len(cams) == len(classes_with_mistakes) + len(classes_right) > 0
    assert report.count("](cam/") == len(cams) and report.count("*correct: ") == len(classes_right)
    sources = {r["source"] for r in rows}
    assert sum(any(f"{verdict}: {source}: true" in report for source in sources)
               for verdict in ("correct", "mistake")) >= 1  # captions name the source file, not the shard key
    for cam in cams:
        assert f"cam/{cam.name}" in report
        with Image.open(cam) as panel:  # frames enlarged to 360 px tall for reading, two of them, a colour scale
            assert panel.width >= 2 * 360 and panel.height > 360 + 20
    assert "<div class='gallery'>" in (out / "report.html").read_text()


def test_metrics_json_is_recomputed_exactly_from_predictions_csv(trained_run, synthetic_shards, tmp_path):
    """predictions.csv holds every probability at full precision: scikit-learn recomputes metrics.json from it,
    and so does the bootstrap, interval for interval."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(trained_run), "--shards", str(synthetic_shards), "--split", "val",
                 "--out", str(out), "--bootstrap", "100", "--workers", "0", "--no-track"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    classes = metrics["classes"]
    table = read_predictions_csv(out / "predictions.csv", classes)
    y, probs, logits = table["labels"], table["probs"], table["logits"]
    temperature = metrics["temperature_scaling"]["temperature"]
    assert np.array_equal(calibrated_probabilities(logits, temperature), probs)  # bit for bit
    predicted = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    exact = dict(rel=0, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted), **exact)
    assert metrics["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predicted), **exact)
    assert metrics["confusion_matrix"] == skm.confusion_matrix(y, predicted, labels=labels).tolist()
    assert metrics["macro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"), **exact)
    assert metrics["mcc"] == pytest.approx(skm.matthews_corrcoef(y, predicted), **exact)
    for k, name in enumerate(classes):
        assert metrics["per_class"][name]["auc"] == pytest.approx(skm.roc_auc_score(y == k, probs[:, k]), **exact)
    assert metrics["macro_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), **exact)
    assert metrics["brier"] == pytest.approx(skm.brier_score_loss(y, probs, labels=labels, scale_by_half=False), **exact)
    assert metrics["nll"] == pytest.approx(skm.log_loss(y, probs, labels=labels), **exact)
    before = metrics["temperature_scaling"]["before"]
    assert before["brier"] == pytest.approx(
        skm.brier_score_loss(y, softmax(logits, axis=1), labels=labels, scale_by_half=False), **exact)
    # The CIs too: the same units (the group column) and seed give the same resamples.
    again = evaluate_predictions(y, probs, classes, groups=table["groups"], num_bootstrap=100, seed=0)
    assert again["ci"] == metrics["ci"] and again["ece"] == metrics["ece"]
    cases = patient_level(y, probs, table["groups"])
    patient = evaluate_predictions(cases["labels"], cases["probs"], classes, cases["groups"], num_bootstrap=100)
    assert patient["accuracy"] == metrics["patient_level"]["metrics"]["accuracy"]
    assert patient["ci"] == metrics["patient_level"]["metrics"]["ci"]


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
    with Image.open(image) as frame, Image.open(out / f"{image.stem}_cam.png") as panel:
        # the frame at its own resolution (not the 48 px input) beside the overlay, a caption below
        assert panel.width >= 2 * frame.width and panel.height > frame.height and panel.mode == "RGB"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip_through_the_cli(trained_run, tmp_path, fmt, capsys):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--run", str(trained_run), "--format", fmt, "--out", str(out)]) == 0
    sidecar = json.loads(Path(f"{out}.json").read_text())
    model_json = json.loads((trained_run / "model.json").read_text())
    assert sidecar["classes"] == model_json["classes"] and sidecar["temperature"] == model_json["temperature"]
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
    assert "| smoke |" in table and "| Gastric cancer |" in table
    for row in comparison["models"]:
        assert set(row["per_class_accuracy"]) == set(comparison["classes"])
        assert row["train_time_s"] > 0
    (pair,) = comparison["paired"]["pairs"]
    assert (pair["a"], pair["b"]) == ("smoke", "mobilenet")
    for test in ("accuracy_test", "mcnemar", "macro_auc_test", "delong"):
        assert {"p_value", "p_holm", "significant"} <= set(pair[test])
    assert "Accuracy of smoke and mobilenet is" in table and "clustered McNemar (Durkalski et al. 2003)" in table
    assert comparison["paired"]["unit"] == "patient"
    assert "## Paired comparison" in table and "significantly different" in table
    assert "| bootstrap p (Holm) |" in table and "Macro AUC of smoke and mobilenet is" in table
    assert "Reference study (ResNet50, one split)" in table  # the study's three classes
    assert (out / "comparison_forest.png").is_file()
    assert "data:image/png;base64," in (out / "comparison.html").read_text()
