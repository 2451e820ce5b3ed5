"""Experiment tracking for real on the CPU: W&B (offline), MLflow (a local file store) and TensorBoard
(event files), one and two processes, read back with each tracker's own reader; evaluation added to
the training run; plain progress lines in logs; the precision rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from wandb_offline import wandb_offline_records

pytestmark = pytest.mark.slow  # end to end: trains, packs or launches processes

SMOKE = str(REPO / "configs" / "smoke.yaml")
ALL_TRACKERS = "tracking.tracker=[wandb,mlflow,tensorboard]"


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *TINY_TRAIN_OVERRIDES,
            "finetune.epochs=0", *extra]


def _tracker_env(tmp_path: Path) -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
            "MLFLOW_ALLOW_FILE_STORE": "true"}


def _mlflow_runs(project: str) -> list:
    import mlflow

    return mlflow.search_runs(experiment_names=[project], output_format="list")


def _tensorboard(run: Path, project: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard" / project), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def _check_training_logged(run: Path, project: str) -> None:
    run_id = json.loads((run / "tracking.json").read_text())["wandb_run_id"]
    folders, records = wandb_offline_records(run)
    assert folders and all(folder.name.endswith(run_id) for folder in folders), "one W&B run for the job"
    for key in (b"val/loss", b"val/per_class_accuracy/gastric_cancer", b"val/macro_auc", b"train/loss"):
        assert key in records, f"{key!r} was not logged to W&B"

    (mlflow_run,) = _mlflow_runs(project)
    for key in ("val/loss", "val/per_class_accuracy/gastric_cancer", "val/macro_auc", "val/images_per_s",
                "train/loss"):
        assert key in mlflow_run.data.metrics, f"{key} was not logged to MLflow"
    assert any(key.startswith("val/lr/head") for key in mlflow_run.data.metrics), "no learning rate per group"
    assert mlflow_run.data.params["model.name"] == "shufflenet_v2_x0_5"  # conftest.TINY_TRAIN_OVERRIDES
    assert "system.versions.torch" in mlflow_run.data.tags

    scalars = _tensorboard(run, project).Tags()["scalars"]
    assert {"val/loss", "val/per_class_accuracy/gastric_cancer", "train/loss"} <= set(scalars)


def test_one_process_logs_to_every_tracker_and_evaluate_adds_to_the_same_run(synthetic_shards, tmp_path,
                                                                             monkeypatch, capsys):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    for name, value in _tracker_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, ALL_TRACKERS, "tracking.project=one")) == 0
    _check_training_logged(run, "one")

    assert main(["evaluate", "--run", str(run), "--shards", str(synthetic_shards), "--out", str(run / "eval"),
                 "--bootstrap", "0", "--workers", "0", "--cam-misclassified", "1"]) == 0
    assert "logged to the training run's trackers" in capsys.readouterr().out
    (mlflow_run,) = _mlflow_runs("one")  # still the one run
    assert {"test/accuracy", "test/macro_auc"} <= set(mlflow_run.data.metrics)
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(mlflow_run.info.run_id, "images/test")}
    assert {"images/test/confusion_matrix.png", "images/test/roc.png", "images/test/calibration.png"} <= artifacts
    evaluation = {a.path for a in MlflowClient().list_artifacts(mlflow_run.info.run_id, "evaluation-run-test")}
    assert "evaluation-run-test/report.html" in evaluation
    model = {a.path for a in MlflowClient().list_artifacts(mlflow_run.info.run_id, "model-run")}
    assert model == {"model-run/model.safetensors", "model-run/model.json"}
    assert {"test/confusion_matrix", "test/roc"} <= set(_tensorboard(run, "one").Tags()["images"])
    folders, records = wandb_offline_records(run)
    assert len(folders) == 2 and b"test/accuracy" in records  # the training run, continued by evaluate


def test_two_processes_log_one_run_per_tracker(synthetic_shards, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--dynamo_backend", "no", "-m", "gastro_dist",
           *_train_args(synthetic_shards, run, "data.batch_size=4", ALL_TRACKERS, "tracking.project=two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **_tracker_env(tmp_path)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, value in _tracker_env(tmp_path).items():
        os.environ[name] = value  # for the readers in this process
    try:
        _check_training_logged(run, "two")
        assert len(list((run / "tensorboard" / "two").glob("events.out.tfevents.*"))) == 1
    finally:
        for name in _tracker_env(tmp_path):
            os.environ.pop(name, None)


def test_a_missing_tracker_package_is_one_line_naming_the_extra(synthetic_shards, tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))
    assert main(_train_args(synthetic_shards, tmp_path / "run", "tracking.tracker=[mlflow]")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'gastro-dist[mlflow]'" in err


def test_logs_get_plain_progress_lines(synthetic_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GASTRO_DIST_LOG_EVERY_S", "0")
    assert main(_train_args(synthetic_shards, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "head epoch 1/1 step 1/" in out and " img/s" in out


def test_a_launcher_precision_that_contradicts_the_config_is_refused(synthetic_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert main(_train_args(synthetic_shards, tmp_path / "run")) == 2  # the tiny config says mixed_precision=no
    err = capsys.readouterr().err
    assert "the run config decides" in err and "mixed_precision=bf16" in err


def test_compare_groups_its_runs_under_one_mlflow_parent(synthetic_shards, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    for name, value in _tracker_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    configs = []
    for name in ("first", "second"):  # two configs, as compare takes them
        path = tmp_path / f"{name}.yaml"
        path.write_text(Path(SMOKE).read_text())
        configs.append(str(path))
    out = tmp_path / "study"
    overrides = [*TINY_TRAIN_OVERRIDES, "finetune.epochs=0", "tracking.tracker=[mlflow]", "tracking.project=grouped"]
    assert main(["compare", "--configs", *configs, "--shards", str(synthetic_shards), "--out", str(out),
                 "--bootstrap", "0", *overrides]) == 0
    runs = {run.info.run_name: run for run in _mlflow_runs("grouped")}
    assert set(runs) == {"study", "first", "second"}
    parent = runs["study"].info.run_id
    for child in ("first", "second"):
        assert runs[child].data.tags.get("mlflow.parentRunId") == parent
        assert runs[child].data.tags.get("gastro_dist.group") == "study"
        assert "test/accuracy" in runs[child].data.metrics  # each model's evaluation, in its own run
