"""`gastro-dist cv` end to end on CPU: two folds of tiny synthetic shards trained fold by fold through the
real CLI, out-of-fold predictions for every train+val image, the fold ensemble on the test split, the
spread across folds, and re-running that trains and evaluates only what is missing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from imagefactory import read_split

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.evaluation.prediction_files import read_predictions_csv
from gastro_dist.evaluation.metrics import evaluate_predictions
from wandb_offline import wandb_offline_records

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cv")]  # end to end; its cv run is made once

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _cv(shards: Path, out: Path, *extra: str, changes: tuple[str, ...] = ()) -> int:
    """`gastro-dist cv` with the tiny overrides, then `changes` to them."""
    return main(["cv", "--config", SMOKE, "--shards", str(shards), "--out", str(out), "--bootstrap", "20",
                 "--no-track", *extra, *TINY_TRAIN_OVERRIDES, *changes])


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _probs(row: dict, classes: list[str]) -> np.ndarray:
    return np.array([float(row[f"prob_{c}"]) for c in classes])


def test_cv_fold_by_fold_then_the_summary(fold_shards, synthetic_source, tmp_path, capsys):
    from gastro_dist.data.pack import PackSettings, pack_dataset

    out = tmp_path / "cv"
    assert _cv(fold_shards, out, "data.fold=1") == 2  # cv sets data.fold itself
    assert _cv(fold_shards, out, "--folds", "2") == 2  # folds 0 and 1 only
    assert "data.fold" in capsys.readouterr().err

    # One fold now (as one SLURM array task does): no summary while fold 1 is missing, and --collect trains nothing.
    assert _cv(fold_shards, out, "--folds", "0") == 0
    assert (out / "fold-0" / "cv-fold.json").is_file() and not (out / "cv.json").exists()
    assert "fold(s) 1 of 2 not trained and evaluated yet" in capsys.readouterr().out
    assert _cv(fold_shards, out, "--collect") == 2
    assert "fold(s) 1 have no finished run" in capsys.readouterr().err

    # Then all folds: fold 0 is neither trained nor evaluated again, fold 1 is, and the summary is written.
    fold0_events = (out / "fold-0" / "metrics.jsonl").read_text()
    fold0_predictions = (out / "fold-0" / "oof" / "predictions.csv").stat().st_mtime_ns
    assert _cv(fold_shards, out) == 0
    assert (out / "fold-0" / "metrics.jsonl").read_text() == fold0_events
    assert (out / "fold-0" / "oof" / "predictions.csv").stat().st_mtime_ns == fold0_predictions
    assert "fold 0 already trained and evaluated" in capsys.readouterr().out

    result = json.loads((out / "cv.json").read_text())
    classes = result["classes"]
    assert result["num_folds"] == 2 and [row["fold"] for row in result["folds"]] == [0, 1]
    for fold in (0, 1):
        summary = json.loads((out / f"fold-{fold}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["fold"] == fold

    # Out of fold: every train+val sample exactly once, predicted by the model of the fold it is in.
    oof = _rows(out / "oof_predictions.csv")
    fold_of_key = {s["key"]: fold for fold in (0, 1) for s in read_split(fold_shards, f"fold-{fold}")}
    assert sorted(row["key"] for row in oof) == sorted(fold_of_key)
    assert all(int(row["fold"]) == fold_of_key[row["key"]] for row in oof)
    assert result["out_of_fold"]["num_samples"] == result["out_of_fold"]["num_listed"] == len(fold_of_key)
    labels = np.array([classes.index(row["true_label"]) for row in oof])
    probs = np.array([_probs(row, classes) for row in oof])
    pooled = evaluate_predictions(y_true=labels, probs=probs, classes=classes, num_bootstrap=0)
    assert result["out_of_fold"]["mcc"] == pytest.approx(pooled["mcc"], abs=1e-9)
    assert result["out_of_fold"]["ci"] is not None and result["out_of_fold"]["bootstrap"]["unit"] == "patient"
    # The pooled file holds what cv.json was computed from: the bootstrap unit and the exact probabilities.
    pooled_file = read_predictions_csv(out / "oof_predictions.csv", classes)
    boot = result["out_of_fold"]["bootstrap"]
    again = evaluate_predictions(pooled_file["labels"], pooled_file["probs"], classes, pooled_file["groups"],
                                 num_bootstrap=boot["num_resamples"], seed=boot["seed"])
    assert again["ci"] == result["out_of_fold"]["ci"] and again["brier"] == result["out_of_fold"]["brier"]
    assert again["num_groups"] == result["out_of_fold"]["num_groups"]

    # The ensemble: the mean of the two fold models' test probabilities, sample by sample.
    per_fold = [{row["key"]: _probs(row, classes) for row in _rows(out / f"fold-{fold}" / "test" / "predictions.csv")}
                for fold in (0, 1)]
    ensemble = _rows(out / "test_ensemble_predictions.csv")
    assert len(ensemble) == len(read_split(fold_shards, "test")) == result["ensemble_test"]["num_samples"] == 9
    for row in ensemble:
        assert list(_probs(row, classes)) == list((per_fold[0][row["key"]] + per_fold[1][row["key"]]) / 2)
        assert row["group"]
    correct = [classes.index(row["true_label"]) == int(_probs(row, classes).argmax()) for row in ensemble]
    assert result["ensemble_test"]["accuracy"] == pytest.approx(np.mean(correct))

    # Across folds: each fold's own numbers, their mean, SD and the t-interval around the mean.
    for where in ("val", "test"):
        for name in ("mcc", "accuracy"):
            values = [row[where][name] for row in result["folds"]]
            spread = result["across_folds"][where][name]
            assert spread["values"] == values and spread["mean"] == pytest.approx(np.mean(values))
            assert spread["sd"] == pytest.approx(np.std(values, ddof=1))
            assert spread["ci_lower"] <= spread["mean"] <= spread["ci_upper"]
        assert set(result["across_folds"][where]["per_class_accuracy"]) == set(classes)
    markdown = (out / "cv.md").read_text()
    assert "| metric | fold 0 | fold 1 | mean ± SD | 95% interval |" in markdown
    assert "## Pooled out-of-fold predictions" in markdown and "## Fold ensemble on the test split" in markdown

    # A fold whose model changed since its evaluation is evaluated again (and only that fold).
    record = json.loads((out / "fold-1" / "cv-fold.json").read_text())
    (out / "fold-1" / "cv-fold.json").write_text(json.dumps({**record, "model_sha256": "0" * 64}))
    fold1_predictions = (out / "fold-1" / "test" / "predictions.csv").stat().st_mtime_ns
    assert _cv(fold_shards, out) == 0
    assert (out / "fold-1" / "test" / "predictions.csv").stat().st_mtime_ns != fold1_predictions
    assert (out / "fold-0" / "oof" / "predictions.csv").stat().st_mtime_ns == fold0_predictions
    assert json.loads((out / "cv.json").read_text())["folds"] == result["folds"]

    # Re-running the finished folder with another config or pack is refused before anything is trained or
    # written, naming what changed: the summary would otherwise mix two configs' (or packs') folds.
    summary_bytes = (out / "cv.json").read_bytes()
    other_pack = tmp_path / "other-shards"
    pack_dataset(synthetic_source, other_pack, PackSettings(folds=2, test_per_class=3, input_size=48, resize_short=56,
                                                            shard_size=8, workers=1, seed=1),
                 manifest=synthetic_source / "manifest.csv")
    capsys.readouterr()
    for shards, changes, named in (
            (fold_shards, ("model.name=resnet18",), "model was 'shufflenet_v2_x0_5', now 'resnet18'"),
            (fold_shards, ("data.image_size=64",), "image_size was 48, now 64"),
            (fold_shards, ("finetune.lr=0.01", "head.epochs=2"), "finetune.lr was 0.002, now 0.01; head.epochs was 1, "
                                                               "now 2"),
            (other_pack, (), "the shards' index.json differs from the one it was trained on")):
        for extra in ([], ["--collect"], ["--folds", "1"]):
            assert _cv(shards, out, *extra, changes=changes) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and f"{out / 'fold-0'} holds a" in err, err
            assert named in err and "new --out" in err, err
    assert (out / "cv.json").read_bytes() == summary_bytes
    assert (out / "fold-0" / "metrics.jsonl").read_text() == fold0_events

    # A fold's predictions edited after cv wrote them (a row added): --collect names the file, summarises nothing.
    edited = out / "fold-0" / "oof" / "predictions.csv"
    edited.write_text(edited.read_text() + edited.read_text().splitlines()[1] + "\n")
    assert _cv(fold_shards, out, "--collect") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{edited} changed after cv wrote it" in err, err
    assert f"delete {out / 'fold-0' / 'cv-fold.json'}" in err
    assert (out / "cv.json").read_bytes() == summary_bytes


def test_cv_summary_goes_to_every_tracker(fold_shards, tmp_path, monkeypatch):
    """The folds' runs, and the cross-fold summary as a run of its own in their group: the numbers of
    cv.json and its files, read back with each tracker's own reader."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true",
                        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "study"
    assert main(["cv", "--config", SMOKE, "--shards", str(fold_shards), "--out", str(out), "--bootstrap", "0",
                 *TINY_TRAIN_OVERRIDES, "finetune.epochs=0", "tracking.tracker=[wandb,mlflow,tensorboard]",
                 "tracking.project=cvtrack"]) == 0
    result = json.loads((out / "cv.json").read_text())
    mean_accuracy = result["across_folds"]["val"]["accuracy"]["mean"]

    runs = {run.info.run_name: run for run in mlflow.search_runs(experiment_names=["cvtrack"], output_format="list")}
    assert set(runs) == {"study", "fold-0", "fold-1", "study-summary"}
    summary = runs["study-summary"]
    assert summary.data.tags["mlflow.parentRunId"] == runs["study"].info.run_id
    assert summary.data.tags["gastro_dist.group"] == "study"
    assert summary.data.metrics["cv/across_folds/val/accuracy/mean"] == pytest.approx(mean_accuracy)
    assert summary.data.metrics["cv/out_of_fold/mcc"] == pytest.approx(result["out_of_fold"]["mcc"])
    assert summary.data.metrics["cv/ensemble_test/accuracy"] == pytest.approx(result["ensemble_test"]["accuracy"])
    assert summary.data.params["cv.num_folds"] == "2" and "data.fold" not in summary.data.params
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.info.run_id, "cv-study")}
    assert {"cv-study/cv.json", "cv-study/cv.md", "cv-study/oof_predictions.csv"} <= files
    for fold in ("fold-0", "fold-1"):  # each fold's own evaluations stay in the fold's run
        assert "test/accuracy" in runs[fold].data.metrics

    events = EventAccumulator(str(out / "tensorboard" / "cvtrack"))
    events.Reload()
    (scalar,) = events.Scalars("cv/across_folds/val/accuracy/mean")
    assert scalar.value == pytest.approx(mean_accuracy, abs=1e-6)
    folders, records = wandb_offline_records(out)
    assert len(folders) == 1 and folders[0].name.endswith(json.loads((out / "tracking.json").read_text())["wandb_run_id"])
    assert b"cv/across_folds/val/accuracy/mean" in records and b"cv-summary" in records
