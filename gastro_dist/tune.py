"""`tune`: hyperparameter search over training configs with Optuna (README, "Hyperparameter search").

Optuna is the engine: its study in a shared storage (a journal file in OUT by default, or an RDB URL) hands
trials to any number of workers (`--workers-here K` processes here, or SLURM array tasks), its TPE sampler
proposes, its pruner stops weak trials from each epoch's validation score. What is ours: the search space
file checked against the config before anything runs, each trial an ordinary run folder (OUT/trial-NNNN)
trained by `train` with the trainer's own model-selection metric (best val macro accuracy) as the objective,
the refusal to continue a study with another space or base config, and the reports (tune.json, tune.md,
best.yaml, tune.html). The test split is never read by a trial: `train` reads train and val only; only
`--final-test` evaluates test, once, on a run of the best config trained after the search.

A worker is one process, or, started under `accelerate launch`, several that train each trial together (see
"a worker of several processes" below): the study is only ever touched by a worker's main process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from gastro_dist import PREEMPT_EXIT_CODE, Preempted, RunFailure, UserError
from gastro_dist.config import TrainConfig, changed_training_keys, load_config, save_config, to_dict
from gastro_dist.files import excerpt, read_yaml_file, write_json_atomic, write_text_atomic
from gastro_dist.tracking import group_run

# Not in configs/ itself: every configs/*.yaml is a training config (tests/test_configs.py loads each as one).
DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "configs" / "search" / "tune_space.yaml"
SPACE_FILE, BASE_CONFIG_FILE, STUDY_FILE = "space.yaml", "base_config.yaml", "study.json"
JOURNAL_FILE = "study.journal"
STUDY_NAME = "tune"
PRUNERS = ("median", "hyperband", "none")
HONEST_SELECTION = ("The best trial's validation score is optimistic: it is the highest of many noisy scores on the "
                    "same validation images the search chose by. Only a test split the search never saw (`--final-test`) "
                    "estimates how the chosen config does on new images.")
HEARTBEAT_INTERVAL_S = 60  # RDB storages: a trial whose worker stops beating for 2 intervals is failed and retried once


# ---------------------------------------------------------------- the search space
def load_space(path: str | Path, base: TrainConfig) -> dict[str, dict]:
    """Read and check a search space YAML: each key a config key with `{float: [lo, hi], log: bool}`,
    `{int: [lo, hi]}` or `{choices: [...]}`, and optionally `when: {config key: value}`. Every bound and
    choice is loaded into the base config, so a key that does not exist or a value the key cannot take
    is a one-line UserError before any trial runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space {path} not found; pass a YAML like configs/search/tune_space.yaml")
    space = read_yaml_file(path, f"search space {path}")
    if not isinstance(space, dict) or not space:
        raise UserError(f"search space {path} must map config keys to ranges, e.g. `head.lr: {{float: [1e-4, 1e-2], log: true}}`")
    for key, spec in space.items():
        _check_dimension(str(key), spec, base, path)
    return {str(key): spec for key, spec in space.items()}


def _check_dimension(key: str, spec: Any, base: TrainConfig, path: Path) -> None:
    where = f"search space {path}, {excerpt(key)}"
    kinds = [kind for kind in ("float", "int", "choices") if isinstance(spec, dict) and kind in spec]
    if len(kinds) != 1:
        raise UserError(f"{where}: give exactly one of float: [lo, hi], int: [lo, hi] or choices: [...]")
    unknown = set(spec) - {"float", "int", "choices", "log", "when"}
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; use float/int/choices, log, when")
    kind, values = kinds[0], spec[kinds[0]]
    if kind == "choices":
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: choices needs a non-empty list")
        if "log" in spec:
            raise UserError(f"{where}: log applies to float and int ranges, not choices")
    else:
        number = float if kind == "float" else int
        if (not isinstance(values, list) or len(values) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                or (number is int and not all(isinstance(v, int) for v in values))
                or not all(math.isfinite(v) for v in values) or not values[0] < values[1]):
            raise UserError(f"{where}: {kind} needs [lo, hi], two {'whole ' if number is int else ''}numbers with lo < hi, "
                            f"got {excerpt(values)}")
        if not isinstance(spec.get("log", False), bool):
            raise UserError(f"{where}: log must be true or false")
        if spec.get("log") and values[0] <= 0:
            raise UserError(f"{where}: a log range needs lo > 0, got {values[0]}")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise UserError(f"{where}: when must map config keys to values, e.g. when: {{model.name: timm:convnext_tiny}}")
    try:
        for condition_key in when:
            _value_at(to_dict(base), str(condition_key))
        for value in values:
            load_config_with(base, {key: value})
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def _value_at(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"unknown config key {excerpt(key)} (see `gastro-dist config show`)")
        node = node[part]
    return node


def load_config_with(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The base config with `params` (dotted keys) set, checked as a config file is."""
    from gastro_dist.config import apply_overrides, from_dict

    data = to_dict(base)
    for key in params:
        _value_at(data, key)  # an unknown key is named, not added
    return from_dict(TrainConfig, apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in params.items()]))


def suggest(trial, space: dict[str, dict], base: TrainConfig) -> dict[str, Any]:
    """The trial's parameters; a key whose `when` does not hold (in the base config with the parameters
    suggested so far) is left out, so Optuna's sampler sees a conditional space."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        current = to_dict(load_config_with(base, params))
        if any(_value_at(current, k) != v for k, v in spec.get("when", {}).items()):
            continue
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif "float" in spec:
            params[key] = trial.suggest_float(key, *spec["float"], log=spec.get("log", False))
        else:
            params[key] = trial.suggest_int(key, *spec["int"], log=spec.get("log", False))
    return params


# ---------------------------------------------------------------- the study
def make_sampler(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str):
    import optuna

    if name not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, not {excerpt(name)}")
    return {"median": optuna.pruners.MedianPruner(n_warmup_steps=2),  # steps are epochs from 1: never after the first alone
            "hyperband": optuna.pruners.HyperbandPruner(),
            "none": optuna.pruners.NopPruner()}[name]


def make_storage(url: str | None, out_dir: Path):
    """A journal file (default OUT/study.journal; any path not a URL) works on a shared file system with no
    server; an RDB URL (sqlite:///, postgresql://) gets Optuna's heartbeat, so a worker killed mid-trial has
    that trial failed and retried once, into the same run folder (the retry copies its user attributes).
    Optuna's journal storage has no heartbeat: there a preempted trial is retried by us (`_train_trial`) and
    a SIGKILLed one stays RUNNING."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url and "://" in url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat is "experimental"
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9 renamed the retry
                retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL_S, **retry)
    path = Path(url) if url else out_dir / JOURNAL_FILE
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(out_dir: Path, storage_url: str | None, seed: int, pruner: str):
    import optuna

    # Optuna logs every failed trial with a traceback; the worker prints its own line for each (`_train_trial`).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(study_name=STUDY_NAME, storage=make_storage(storage_url, out_dir), direction="maximize",
                               sampler=make_sampler(seed), pruner=make_pruner(pruner), load_if_exists=True)


def _prepare_out(out_dir: Path, base: TrainConfig, space: dict, cv: bool, shards_index_sha256: str) -> None:
    """Store the base config, space and settings in OUT; a study continued with other ones is refused,
    naming what changed (two searches in one study would rank trials of different questions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"cv": cv, "shards_index_sha256": shards_index_sha256}  # the pack itself, wherever it is mounted
    space_file, base_file, study_file = out_dir / SPACE_FILE, out_dir / BASE_CONFIG_FILE, out_dir / STUDY_FILE
    if base_file.is_file():
        saved_base = read_yaml_file(base_file) or {}
        saved_space = read_yaml_file(space_file) or {}
        saved_settings = json.loads(study_file.read_text()) if study_file.is_file() else {}
        changes = changed_training_keys(saved_base, base)
        changes += [f"space {key} was {saved_space.get(key)}, now {space.get(key)}"
                    for key in sorted(set(saved_space) | set(space)) if saved_space.get(key) != space.get(key)]
        changes += [f"{'--cv' if key == 'cv' else 'the shards (index.json)'} was {saved_settings[key]}, now {value}"
                    for key, value in settings.items() if key in saved_settings and saved_settings[key] != value]
        if changes:
            raise UserError(f"{out_dir} holds a study with other settings ({'; '.join(changes)[:600]}); use a new --out, "
                            f"or the config and space it was started with ({base_file}, {space_file})")
        return
    write_text_atomic(space_file, yaml.safe_dump(space, sort_keys=False))
    write_json_atomic(study_file, settings)
    save_config(base, base_file)


# ---------------------------------------------------------------- one trial
def _trial_dir(out_dir: Path, number: int) -> Path:
    return out_dir / f"trial-{number:04d}"


class _Surplus(Exception):
    """A trial asked in a race past --trials: told FAIL untrained."""


def _train_trial(trial, study, out_dir: Path, shards_dir: str, base: TrainConfig, space: dict, cv: bool) -> float:
    """Train the trial's config (each fold with --cv); returns its value, or raises optuna.TrialPruned."""
    import optuna

    from gastro_dist.data.shard_index import load_shard_index
    from gastro_dist.training.trainer import Stopped, train

    run_dir = Path(trial.user_attrs.get("run_dir") or _trial_dir(out_dir, trial.number))  # a retry resumes its folder
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    params = suggest(trial, space, base)
    config = load_config_with(base, {**params, "tracking.group": base.tracking.group or out_dir.name,
                                     "tracking.run_name": f"{out_dir.name}-{run_dir.name}"})
    epochs_per_run = config.head.epochs + config.finetune.epochs
    folds = list(range(load_shard_index(shards_dir).num_folds)) if cv else [None]
    fold_scores = []
    for position, fold in enumerate(folds):
        fold_config = load_config_with(config, {"data.fold": fold}) if cv else config
        step_before = position * epochs_per_run

        def on_epoch_end(phase: str, epoch: int, macro_accuracy: float) -> bool:
            trial.report(macro_accuracy, step_before + epoch)
            trial.set_user_attr("epochs_run", step_before + epoch)
            return trial.should_prune()

        fold_dir = run_dir / f"fold-{fold}" if cv else run_dir
        _tell_followers((fold_config, str(fold_dir)))
        try:
            summary = train(fold_config, shards_dir, fold_dir, on_epoch_end)
        except Stopped:
            print(f"tune: trial {trial.number} pruned after {trial.user_attrs.get('epochs_run')} epochs ({run_dir})")
            raise optuna.TrialPruned() from None
        except Preempted:
            # Queued again once, into the same run folder: it resumes from the checkpoint the trainer saved.
            if "retry_of" not in trial.user_attrs:
                study.enqueue_trial(trial.params, user_attrs={"run_dir": str(run_dir), "retry_of": trial.number})
            raise
        except (RunFailure, UserError) as err:
            print(f"tune: trial {trial.number} failed ({run_dir}): {err}")
            trial.set_user_attr("error", str(err)[:500])
            raise
        final_phase = "finetune" if fold_config.finetune.epochs else "head"
        fold_scores.append(summary["phases"][final_phase]["val_macro_accuracy"])
    if cv:
        trial.set_user_attr("fold_scores", fold_scores)
    return sum(fold_scores) / len(fold_scores)


# ---------------------------------------------------------------- a worker of several processes
# Under `accelerate launch` a worker is N processes that train each trial together (DDP, as `train` under the
# same launch). Only the main process talks to the study: it asks for a trial, suggests its parameters, reports
# each epoch and decides pruning (the trainer hands that decision to every process, which then stop at the
# same epoch). Before each training run it broadcasts the config and run folder; the other processes follow.

def _worker_state():
    """This worker's processes (accelerate's PartialState; on CPU over gloo, as the trainer's Accelerator)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _is_multi_process() -> bool:
    return _worker_state().num_processes > 1


def _tell_followers(message: tuple[TrainConfig, str] | None) -> None:
    """The next training run (config, run folder) for the other processes of this worker; None: no more."""
    if _is_multi_process():
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([message])


def _follow_main_process(shards_dir: str) -> None:
    """A non-main process of a worker: train what the main process broadcasts until it says there is no more.
    A pruned, diverged or refused run ends the same way on every process (the decisions are shared), so the
    followers go on to the next message as the main process goes on to the next trial."""
    from accelerate.utils import broadcast_object_list

    from gastro_dist.training.trainer import Stopped, train

    while True:
        message = [None]
        broadcast_object_list(message)
        if message[0] is None:
            return
        config, run_dir = message[0]
        try:
            train(config, shards_dir, run_dir, on_epoch_end=lambda phase, epoch, score: False)  # called on main only
        except (Stopped, RunFailure, UserError):
            continue


def _shared_from_main(compute):
    """`compute()` on the main process; its result, or its UserError, reaches every process of the worker
    (so that a mistake found while setting up ends all of them with the same one line, not a hang)."""
    from accelerate.utils import broadcast_object_list

    state = _worker_state()
    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome = [("ok", compute())]
        except UserError as err:
            outcome = [("error", RunFailure if isinstance(err, RunFailure) else UserError, str(err))]  # its exit status
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[0][0] == "error":
        raise outcome[0][1](outcome[0][2])
    return outcome[0][1]


def _trials_to_ask(study, num_trials: int) -> bool:
    """Whether a worker should ask for another trial: one is queued (a retry), or fewer than --trials are
    finished, pruned, running or queued."""
    from optuna.trial import TrialState

    counted = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                       TrialState.WAITING))
    return len(counted) < num_trials or any(t.state == TrialState.WAITING for t in counted)


def run_worker(study, out_dir: Path, shards_dir: str, base: TrainConfig, space: dict, num_trials: int, cv: bool) -> None:
    """Optuna's optimize loop (which keeps an RDB storage's heartbeat and fails its stale trials) until the
    study has `num_trials` finished, pruned or running trials. Trial numbers come from the storage, so workers
    never share one; a trial asked in a race past the target is told FAIL untrained (marked `surplus`), so
    that no more than `num_trials` are ever trained. A trial that fails (diverged, a config its model
    refuses) does not count; the worker gives up after `num_trials` failures."""
    from optuna.trial import TrialState

    def objective(trial) -> float:
        ahead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                     TrialState.RUNNING, TrialState.WAITING))
                 if t.number < trial.number]
        if len(ahead) >= num_trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise _Surplus()
        return _train_trial(trial, study, out_dir, shards_dir, base, space, cv)

    def stop_when_done(study, trial) -> None:
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if not t.user_attrs.get("surplus")]
        if not _trials_to_ask(study, num_trials) or len(failed) > num_trials:
            study.stop()

    if _trials_to_ask(study, num_trials):
        study.optimize(objective, callbacks=[stop_when_done], catch=(RunFailure, UserError, _Surplus))


def worker_devices(visible_gpus: list[str], workers: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each of `workers` workers: the GPUs dealt out in turn (workers share a GPU only
    when there are fewer GPUs than workers); None without GPUs."""
    if not visible_gpus:
        return [None] * workers
    if len(visible_gpus) < workers:
        return [visible_gpus[i % len(visible_gpus)] for i in range(workers)]
    return [",".join(visible_gpus[i::workers]) for i in range(workers)]


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def _spawn_workers(argv: list[str], workers: int) -> None:
    """K worker processes of this command on this machine, each with its share of the CPU cores (one
    torch/OpenMP thread pool per worker, not K pools each the size of the machine) and of the GPUs."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GASTRO_DIST_TUNE_WORKER": "1"}
    children = [subprocess.Popen([sys.executable, "-m", "gastro_dist", *argv],
                                 env={**env, **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {})})
                for gpus in worker_devices(_visible_gpus(), workers)]
    codes = [child.wait() for child in children]
    if PREEMPT_EXIT_CODE in codes:
        raise Preempted()
    if any(codes):
        raise RunFailure(f"tune: worker exit codes {codes}; see their output above")


# ---------------------------------------------------------------- the command
def tune(config_path: str | Path, shards_dir: str, out_dir: str | Path, num_trials: int, space_path: str | Path | None = None,
         storage: str | None = None, workers_here: int = 1, seed: int = 0, pruner: str = "median", cv: bool = False,
         final_test: bool = False, overrides: list[str] | None = None, worker_argv: list[str] | None = None) -> dict:
    """Run this machine's workers until the study has `num_trials` trials, then write the reports (and with
    `final_test`, train the best config into OUT/final and evaluate it on test). Returns tune.json's content."""
    from gastro_dist.data.shard_index import load_shard_index
    from gastro_dist.run_dir import RunDir
    from gastro_dist.training.distributed import listen_for_preemption
    from gastro_dist.training.trainer import check_inputs

    listen_for_preemption()  # a SIGUSR1 before the first trial, or between two, is served by the next trial
    out_dir = Path(out_dir)
    if num_trials < 1:
        raise UserError(f"--trials must be 1 or more, got {num_trials}")
    if workers_here < 1:
        raise UserError(f"--workers-here must be 1 or more, got {workers_here}")
    multi_process = _is_multi_process()
    if multi_process and (workers_here > 1 or final_test):
        raise UserError("under accelerate launch this worker's processes train each trial together: drop "
                        f"{'--workers-here' if workers_here > 1 else '--final-test'} (run --final-test after the search, "
                        "without accelerate launch)")
    opened: dict[str, Any] = {}

    def open_search() -> None:
        base = load_config(config_path, overrides)
        space = load_space(space_path or DEFAULT_SPACE, base)
        index = load_shard_index(shards_dir)
        if cv and not index.num_folds:
            raise UserError(f"--cv needs shards packed with --folds K; {shards_dir} has none")
        # The base config against the shards, as `train --check` does; a folder no trial uses, so none is compared.
        check_inputs(load_config_with(base, {"data.fold": 0}) if cv else base, shards_dir, RunDir(out_dir / "base-check"))
        _prepare_out(out_dir, base, space, cv, index.index_sha256)
        # What every worker trains from, whatever its --config.
        opened.update(study=open_study(out_dir, storage, seed, pruner), base=load_config(out_dir / BASE_CONFIG_FILE),
                      space=space)

    _shared_from_main(open_search)
    if not opened:  # a process of a multi-process worker other than the main one
        _follow_main_process(str(shards_dir))
        return {}
    study, base, space = opened["study"], opened["base"], opened["space"]
    if workers_here > 1:
        _spawn_workers([*(worker_argv or []), "--workers-here", "1"], workers_here)
    else:
        # Trials are runs of one tracker group (W&B group; with MLflow nested under a parent run per worker).
        tracking = dataclasses.replace(base.tracking, group=base.tracking.group or out_dir.name)
        with group_run(tracking, is_main=True):
            run_worker(study, out_dir, str(shards_dir), base, space, num_trials, cv)
        _tell_followers(None)
    if os.environ.get("GASTRO_DIST_TUNE_WORKER"):
        return {}
    results = write_reports(study, out_dir, base, num_trials)
    if final_test:
        results["final_test"] = run_final_test(out_dir, str(shards_dir), results)
        write_json_atomic(out_dir / "tune.json", results)
        write_text_atomic(out_dir / "tune.md", tune_markdown(results))
    return results


def run_final_test(out_dir: Path, shards_dir: str, results: dict) -> dict:
    """Train best.yaml once into OUT/final (resumed if there) and evaluate it on the test split."""
    from gastro_dist.evaluation.evaluate import evaluate_run
    from gastro_dist.training.trainer import train

    if results.get("best") is None:
        raise UserError("--final-test: no trial has finished yet, so there is no best config to test")
    final = out_dir / "final"
    train(load_config(out_dir / "best.yaml"), shards_dir, final)
    metrics = evaluate_run(final, shards_dir, final / "test", split="test", track=False)
    return {"run": str(final), "split": "test", "accuracy": metrics.get("accuracy"),
            "balanced_accuracy": metrics.get("balanced_accuracy"), "macro_f1": metrics.get("macro_f1"),
            "metrics": str(final / "test")}


# ---------------------------------------------------------------- reports
def write_reports(study, out_dir: Path, base: TrainConfig, num_trials: int) -> dict:
    """tune.json, tune.md, best.yaml (the base config with the best parameters) and tune.html."""
    from optuna.trial import TrialState

    trials = [{"number": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value,
               "epochs_run": t.user_attrs.get("epochs_run"), "run_dir": t.user_attrs.get("run_dir"),
               **{key: t.user_attrs[key] for key in ("error", "retry_of") if key in t.user_attrs},
               **({"fold_scores": t.user_attrs["fold_scores"]} if "fold_scores" in t.user_attrs else {})}
              for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(completed, key=lambda t: t.value) if completed else None
    results = {"objective": "val macro accuracy of the best epoch (mean over folds with --cv)", "direction": "maximize",
               "num_trials_target": num_trials, "trials": trials,
               "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                                  "run_dir": best.user_attrs.get("run_dir")},
               "note": HONEST_SELECTION}
    if best is not None:
        save_config(load_config_with(base, best.params), out_dir / "best.yaml")
    write_json_atomic(out_dir / "tune.json", results)
    write_text_atomic(out_dir / "tune.md", tune_markdown(results))
    write_text_atomic(out_dir / "tune.html", tune_html(study, completed))
    print(f"tune: {len(trials)} trials in {out_dir}; best: "
          + (f"trial {best.number}, val macro accuracy {best.value:.4f} -> {out_dir / 'best.yaml'}" if best else "none yet"))
    return results


def tune_markdown(results: dict) -> str:
    lines = ["# Hyperparameter search", "", f"Objective: {results['objective']}, maximised.", ""]
    best = results["best"]
    if best:
        lines += [f"Best: trial {best['number']}, {best['value']:.4f} ({best['run_dir']}); its config: best.yaml.", ""]
    lines += ["| trial | state | value | epochs run | params | run folder |", "|---|---|---|---|---|---|"]
    for t in results["trials"]:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        lines.append(f"| {t['number']} | {t['state']} | {value} | {t['epochs_run'] or ''} | {params} | {t['run_dir'] or ''} |")
    lines += ["", results["note"]]
    if "final_test" in results:
        final = results["final_test"]
        lines += ["", "## Final test (reported apart)", "",
                  f"best.yaml trained once into {final['run']}, evaluated on the test split: accuracy "
                  f"{final['accuracy']:.4f}, balanced accuracy {final['balanced_accuracy']:.4f}, macro F1 "
                  f"{final['macro_f1']:.4f} (all metrics: {final['metrics']})."]
    return "\n".join(lines) + "\n"


def tune_html(study, completed: list) -> str:
    """The optimisation history and the parameter importances (optuna.importance, its default evaluator), as embedded PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    parts = ["<!doctype html><meta charset='utf-8'><title>tune</title><h1>Hyperparameter search</h1>"]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    numbers, values = [t.number for t in completed], [t.value for t in completed]
    axes.plot(numbers, values, "o", label="trial")
    axes.step(numbers, [max(values[:i + 1]) for i in range(len(values))], where="post", label="best so far")
    axes.set(xlabel="trial", ylabel="val macro accuracy", title="Optimisation history")
    axes.legend()
    parts += ["<h2>Optimisation history</h2>", _png(figure, plt)]
    parts.append("<h2>Parameter importances</h2>")
    if len(completed) < 2:
        parts.append(f"<p>Importances need at least 2 completed trials; this study has {len(completed)}.</p>")
    else:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as err:
            parts.append(f"<p>Importances could not be computed: {err}</p>")
        else:
            figure, axes = plt.subplots(figsize=(6, 0.4 * len(importances) + 1.5))
            axes.barh(list(importances)[::-1], list(importances.values())[::-1])
            axes.set(xlabel="importance (optuna.importance)", title="Parameter importances")
            parts.append(_png(figure, plt))
    parts.append(f"<p>{HONEST_SELECTION}</p>")
    return "\n".join(parts) + "\n"


def _png(figure, plt) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"
