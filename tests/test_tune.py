"""`gastro-dist tune`: the search space checked before anything runs, seeded TPE proposals, a search end to
end on a pack whose test shards are unreadable (reports, best.yaml), pruning from the trainer's epoch hook,
continuing a study and refusing a changed one, two local workers sharing one journal study, a worker of two
processes under accelerate launch. The 2-task SLURM array (slurm/tune.sbatch) is in tests/test_slurm.py, on its
cluster."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, TINY_TRAIN_OVERRIDES
from hostile import copy_pack, read_index, replace_shard_bytes

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.config import load_config
from gastro_dist.tune import load_space, make_sampler, suggest, worker_devices

SMALL_SPACE = {"head.lr": {"float": [1e-3, 1e-2], "log": True}, "label_smoothing": {"float": [0.0, 0.2]},
               "finetune.unfreeze": {"choices": ["1", "all"]}}


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def run_tune(shards: Path, out: Path, space: Path, trials: int, *extra: str) -> int:
    return main(["tune", "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", str(shards), "--out", str(out),
                 "--trials", str(trials), "--space", str(space), *TINY_TRAIN_OVERRIDES, *extra])


def load_results(out: Path) -> dict:
    return json.loads((out / "tune.json").read_text())


@pytest.mark.parametrize("spec, message", [
    ({"head.learning_rate": {"float": [1e-4, 1e-2]}}, "unknown config key"),
    ({"head.lr": {"float": [1e-2, 1e-4]}}, "lo < hi"),
    ({"head.lr": {"float": [0.0, 1e-2], "log": True}}, "lo > 0"),
    ({"head.epochs": {"float": [0.5, 3.0]}}, "whole number"),
    ({"data.hflip": {"int": [0, 1]}}, "true or false"),
    ({"label_smoothing": {"float": [0.0, 1.0]}}, "label_smoothing must be in [0, 1)"),
    ({"head.lr": {"choices": []}}, "non-empty list"),
    ({"head.lr": {"float": [1e-4, 1e-2], "int": [1, 2]}}, "exactly one of"),
    ({"model.drop_path": {"float": [0.0, 0.2], "when": {"model.kind": "timm"}}}, "unknown config key"),
])
def test_space_mistakes_are_one_line_errors(tmp_path, spec, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")) as err:
        load_space(write_space(tmp_path / "space.yaml", spec), load_config(None))
    assert "\n" not in str(err.value)


def test_space_mistake_stops_the_command_before_anything_runs(tmp_path, synthetic_shards, capsys):
    space = write_space(tmp_path / "space.yaml", {"head.lrr": {"float": [1e-4, 1e-2]}})
    assert run_tune(synthetic_shards, tmp_path / "study", space, 2) == 2
    assert "head.lrr" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_shipped_space_loads_and_conditional_keys_follow_their_condition():
    base = load_config(REPO / "configs" / "smoke.yaml")
    space = load_space(REPO / "configs" / "search" / "tune_space.yaml", base)
    study = optuna.create_study(sampler=make_sampler(0))
    for _ in range(8):
        trial = study.ask()
        params = suggest(trial, space, base)
        assert ("data.auto_augment_magnitude" in params) == (params["data.auto_augment"] == "randaugment")
        study.tell(trial, 0.5)


def test_the_same_seed_proposes_the_same_first_trials():
    base, space = load_config(None), SMALL_SPACE

    def first_params(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(seed))
        proposed = []
        for value in (0.3, 0.6, 0.4):
            trial = study.ask()
            proposed.append(suggest(trial, space, base))
            study.tell(trial, value)
        return proposed

    assert first_params(7) == first_params(7)
    assert first_params(7) != first_params(8)


def test_search_end_to_end_never_reads_the_test_split(tmp_path, synthetic_shards, capsys):
    """Every test shard is garbage (its index.json entry unchanged): a search must not notice."""
    shards = copy_pack(synthetic_shards, tmp_path / "shards")
    for position in range(len(read_index(shards)["splits"]["test"]["shards"])):
        replace_shard_bytes(shards, "test", b"not a tar" * 10, position=position, update_sha256=False)
    out = tmp_path / "study"
    assert run_tune(shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 3, "--seed", "1") == 0
    results = load_results(out)
    assert [t["number"] for t in results["trials"]] == [0, 1, 2]
    assert all(t["state"] in ("complete", "pruned") for t in results["trials"])
    completed = [t for t in results["trials"] if t["state"] == "complete"]
    assert results["best"]["value"] == max(t["value"] for t in completed)
    for trial in completed:
        summary = json.loads((Path(trial["run_dir"]) / "summary.json").read_text())
        assert trial["value"] == summary["phases"]["finetune"]["val_macro_accuracy"]
        assert trial["epochs_run"] == 2
    markdown = (out / "tune.md").read_text()
    assert "| 2 |" in markdown and "optimistic" in markdown
    html = (out / "tune.html").read_text()
    assert html.count("data:image/png;base64,") == (2 if len(completed) >= 2 else 1)
    best = load_config(out / "best.yaml")
    assert best.head.lr == pytest.approx(results["best"]["params"]["head.lr"])
    assert main(["config", "check", str(out / "best.yaml")]) == 0


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_stops_after_its_first_epoch_and_its_run_folder_says_so(tmp_path, synthetic_shards,
                                                                               monkeypatch):
    monkeypatch.setattr("gastro_dist.tune.make_pruner", lambda name: AlwaysPrune())
    out = tmp_path / "study"
    assert run_tune(synthetic_shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 1) == 0
    (trial,) = load_results(out)["trials"]
    assert trial["state"] == "pruned" and trial["epochs_run"] == 1
    summary = json.loads((Path(trial["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "pruned" and "finetune" not in summary["phases"]
    assert load_results(out)["best"] is None and not (out / "best.yaml").exists()


def test_rerun_continues_the_study_and_refuses_a_changed_space_or_config(tmp_path, synthetic_shards, capsys):
    out, space = tmp_path / "study", write_space(tmp_path / "space.yaml", SMALL_SPACE)
    assert run_tune(synthetic_shards, out, space, 1) == 0
    assert run_tune(synthetic_shards, out, space, 2) == 0
    assert [t["number"] for t in load_results(out)["trials"]] == [0, 1]
    capsys.readouterr()
    changed = write_space(tmp_path / "other.yaml", {**SMALL_SPACE, "head.lr": {"float": [1e-4, 1e-2], "log": True}})
    assert run_tune(synthetic_shards, out, changed, 3) == 2
    assert "space head.lr was" in capsys.readouterr().err
    assert run_tune(synthetic_shards, out, space, 3, "finetune.lr=0.05") == 2
    assert "finetune.lr was" in capsys.readouterr().err
    assert len(load_results(out)["trials"]) == 2


def test_local_workers_share_the_gpus_out():
    assert worker_devices(["0", "1", "2", "3"], 2) == ["0,2", "1,3"]
    assert worker_devices(["0", "1"], 2) == ["0", "1"]
    assert worker_devices(["3"], 2) == ["3", "3"]
    assert worker_devices([], 2) == [None, None]


def test_two_local_workers_share_one_study(tmp_path, synthetic_shards):
    out = tmp_path / "study"
    assert run_tune(synthetic_shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 4,
                    "--workers-here", "2") == 0
    trials = load_results(out)["trials"]
    numbers = [t["number"] for t in trials]
    assert sorted(numbers) == sorted(set(numbers))
    assert sum(t["state"] in ("complete", "pruned") for t in trials) == 4
    assert len({t["run_dir"] for t in trials}) == len(trials)
    workers = {json.loads((Path(t["run_dir"]) / "summary.json").read_text())["status"] for t in trials}
    assert workers <= {"completed", "pruned"}


def test_final_test_trains_the_best_config_once_and_reports_test_apart(tmp_path, synthetic_shards):
    out = tmp_path / "study"
    assert run_tune(synthetic_shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 1, "--final-test") == 0
    final = load_results(out)["final_test"]
    assert final["split"] == "test" and 0 <= final["accuracy"] <= 1
    assert json.loads((out / "final" / "summary.json").read_text())["status"] == "completed"
    assert (out / "final" / "test" / "metrics.json").is_file()
    markdown = (out / "tune.md").read_text()
    assert markdown.index("optimistic") < markdown.index("## Final test")


def test_a_preempted_trial_is_retried_once_from_its_checkpoint(tmp_path, synthetic_shards, monkeypatch):
    """SIGUSR1 mid-trial (here: the first epoch's report) stops the worker with exit 75; the next run of the
    worker retrains the same parameters in the same folder, resuming after the saved epoch, counted once."""
    from gastro_dist import Preempted

    calls = {"count": 0}
    should_prune = optuna.trial.Trial.should_prune

    def preempt_once(trial):
        calls["count"] += 1
        if calls["count"] == 1:
            raise Preempted()
        return should_prune(trial)

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", preempt_once)
    out, space = tmp_path / "study", write_space(tmp_path / "space.yaml", SMALL_SPACE)
    assert run_tune(synthetic_shards, out, space, 1, "--pruner", "none") == 75
    assert run_tune(synthetic_shards, out, space, 1, "--pruner", "none") == 0
    failed, retried = load_results(out)["trials"]
    assert failed["state"] == "fail" and retried["state"] == "complete" and retried["retry_of"] == 0
    assert retried["params"] == failed["params"] and retried["run_dir"] == failed["run_dir"]
    summary = json.loads((Path(retried["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumes"][0]["phase"] == "head"


def test_cv_scores_a_trial_by_its_mean_over_folds(tmp_path, fold_shards):
    out = tmp_path / "study"
    assert run_tune(fold_shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 1, "--cv",
                    "--pruner", "none") == 0
    (trial,) = load_results(out)["trials"]
    scores = [json.loads((Path(trial["run_dir"]) / f"fold-{fold}" / "summary.json").read_text())
              ["phases"]["finetune"]["val_macro_accuracy"] for fold in (0, 1)]
    assert trial["fold_scores"] == scores and trial["value"] == pytest.approx(sum(scores) / 2)
    assert trial["epochs_run"] == 4


def test_trials_are_runs_of_one_mlflow_group(tmp_path, synthetic_shards, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    out = tmp_path / "search"
    assert run_tune(synthetic_shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 2,
                    "tracking.tracker=mlflow", "tracking.project=tunetrack") == 0
    runs = {run.info.run_name: run for run in mlflow.search_runs(experiment_names=["tunetrack"], output_format="list")}
    assert set(runs) == {"search", "search-trial-0000", "search-trial-0001"}
    assert {runs[f"search-trial-000{n}"].data.tags["mlflow.parentRunId"] for n in (0, 1)} == {runs["search"].info.run_id}


PRUNE_EVERY_TRIAL = '''
import sys
import optuna
import gastro_dist.tune
from gastro_dist.cli import main

class PruneEveryTrial(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True

gastro_dist.tune.make_pruner = lambda name: PruneEveryTrial()
sys.exit(main(sys.argv[1:]))
'''


def test_a_worker_of_two_processes_trains_each_trial_with_both_and_prunes_them_together(synthetic_shards, tmp_path):
    """`accelerate launch --num_processes 2 ... tune` with W&B (offline), the tracker of the shipped configs: the
    main process alone talks to the study; both processes train each trial (world size 2) and stop at the epoch
    the pruner chose (Optuna's pruner replaced by one that prunes every trial at its first report), then go on to
    the next trial together; each trial is one W&B run, written by the main process."""
    pytest.importorskip("wandb")
    from wandb_offline import wandb_offline_records

    import os
    import subprocess
    import sys

    script, out = tmp_path / "prune_every_trial.py", tmp_path / "study"
    script.write_text(PRUNE_EVERY_TRIAL)
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "tune", "--config",
                             str(REPO / "configs" / "smoke.yaml"), "--shards", str(synthetic_shards), "--out", str(out),
                             "--trials", "2", "--space", str(write_space(tmp_path / "space.yaml", SMALL_SPACE)),
                             *TINY_TRAIN_OVERRIDES, "data.batch_size=4", "finetune.epochs=2", "tracking.tracker=wandb"],
                            env={**{k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load_results(out)["trials"]
    assert [(t["number"], t["state"], t["epochs_run"]) for t in trials] == [(0, "pruned", 1), (1, "pruned", 1)]
    for trial in trials:
        summary = json.loads((Path(trial["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == "pruned" and summary["world_size"] == 2
        folders, records = wandb_offline_records(Path(trial["run_dir"]))
        assert len(folders) == 1 and b"val/macro_auc" in records and b"train/loss" in records  # one run, by main
    assert result.stdout.count("tune: trial") == 2 and result.stdout.count("trials in") == 1  # the main process only


def test_under_accelerate_launch_workers_here_and_final_test_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("gastro_dist.tune._is_multi_process", lambda: True)
    from gastro_dist.tune import tune

    for option in ({"workers_here": 2}, {"final_test": True}):
        with pytest.raises(UserError, match="under accelerate launch"):
            tune(REPO / "configs" / "smoke.yaml", str(tmp_path), tmp_path / "out", 2, **option)


def test_an_rdb_storage_with_heartbeat(tmp_path, synthetic_shards):
    """--storage sqlite:///...: Optuna's RDB storage with its heartbeat on (the retry of a dead worker's trial)."""
    out, url = tmp_path / "study", f"sqlite:///{tmp_path / 'study.db'}"
    assert run_tune(synthetic_shards, out, write_space(tmp_path / "space.yaml", SMALL_SPACE), 1, "--storage", url) == 0
    assert [t["state"] for t in load_results(out)["trials"]] == ["complete"]
    import sqlite3

    with sqlite3.connect(tmp_path / "study.db") as db:
        assert db.execute("select count(*) from trial_heartbeats").fetchone()[0] == 1  # the trial's worker beat
    assert not (out / "study.journal").exists()
