"""`cv`: K-fold cross-validation on shards packed with --folds K. One training run per fold (OUT/fold-i,
`data.fold=i`), each evaluated on its own validation fold (out-of-fold predictions for every train+val
image) and on the common test split; OUT/cv.json and OUT/cv.md hold the per-fold metrics, their spread
across folds, the pooled out-of-fold metrics and the fold ensemble's test metrics (README, "Cross-validation").
The same numbers and files go to the trackers as a run of their own (OUT-summary, in the folds' group).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState

from gastro_dist import UserError
from gastro_dist.compare import reference_study_note
from gastro_dist.config import TrainConfig, load_config, to_dict
from gastro_dist.data.shard_index import ShardIndex, fold_split, load_shard_index
from gastro_dist.evaluation.evaluate import evaluate_run
from gastro_dist.evaluation.inference import full_precision
from gastro_dist.evaluation.metrics import evaluate_predictions
from gastro_dist.evaluation.prediction_files import read_predictions_csv
from gastro_dist.evaluation.report import display_name
from gastro_dist.files import (csv_text, file_sha256, read_json_file, write_json_atomic,
                               write_text_atomic)
from gastro_dist.run_dir import RunDir, redact
from gastro_dist.tracking import RunLog, accelerator_tracking_kwargs, group_run
from gastro_dist.training.distributed import forgets_accelerator_settings
from gastro_dist.training.trainer import check_inputs, train

CV_JSON, CV_MARKDOWN = "cv.json", "cv.md"
OOF_PREDICTIONS, ENSEMBLE_PREDICTIONS = "oof_predictions.csv", "test_ensemble_predictions.csv"
EVALUATED = "cv-fold.json"  # in OUT/fold-i, written once both of the fold's evaluations are complete
OOF_DIR, TEST_DIR = "oof", "test"  # evaluate_run's output folders inside OUT/fold-i
# The numbers whose spread across folds is reported (besides each class's accuracy), with their range.
SPREAD_METRICS = {"accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "macro_auc": (0.0, 1.0),
                  "mcc": (-1.0, 1.0), "macro_f1": (0.0, 1.0)}
_FOLD_METRICS = ("num_samples", "num_groups", "accuracy", "balanced_accuracy", "per_class_accuracy", "macro_f1",
                 "macro_auc", "mcc", "ece", "confusion_matrix")


def cross_validate(config_path: str | Path, shards_dir: str | Path, out_dir: str | Path,
                   overrides: list[str] | None = None, folds: str = "all", collect: bool = False,
                   num_bootstrap: int = 1000, seed: int = 0, track: bool = True) -> dict | None:
    """Train (unless `collect`) and evaluate the chosen folds; once every fold of the pack is trained and
    evaluated, write cv.json and cv.md. Returns cv.json's content, or None while folds remain (and on
    processes other than the main one).

    Each fold is an ordinary run folder: re-running resumes an unfinished fold, skips a finished one,
    and evaluates only what is not evaluated yet (for the model and shards now there)."""
    out_dir = Path(out_dir)
    if num_bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {num_bootstrap}")
    index = load_shard_index(shards_dir)
    if not index.num_folds:
        raise UserError(f"{shards_dir} was packed without --folds; re-pack with `gastro-dist pack ... --folds K` "
                        "(the test split stays the same)")
    chosen = parse_folds(folds, index.num_folds)
    overrides = list(overrides or [])
    if any(override.split("=", 1)[0].strip() == "data.fold" for override in overrides):
        raise UserError("cv sets data.fold for each fold itself: choose the folds with --folds, not data.fold=")
    runs = {fold: RunDir(out_dir / fold_split(fold)) for fold in range(index.num_folds)}
    # Every fold's config and folder checked before anything is trained or written: a fold folder holding a
    # run of another config, fold or shard set is refused with the changed keys named, so that no summary
    # mixes two configs' folds (the chosen folds' and those the summary adds).
    configs = {fold: load_config(config_path, [*overrides, f"data.fold={fold}"]) for fold in runs}
    for fold, run in runs.items():
        check_inputs(configs[fold], shards_dir, run)
    for config in configs.values():
        config.tracking.group = config.tracking.group or out_dir.resolve().name
    if collect:
        untrained = [fold for fold in chosen if not _trained(runs[fold])]
        if untrained:
            raise UserError(f"--collect trains nothing, and fold(s) {_fold_list(untrained)} have no finished run in "
                            f"{out_dir}; train them with `gastro-dist cv ... --folds {_fold_list(untrained)}` (or wait "
                            "for their jobs)")
    is_main = PartialState().is_main_process
    with group_run(configs[chosen[0]].tracking, is_main):
        for fold in chosen:
            _train_and_evaluate_fold(fold, configs[fold], runs[fold], index, shards_dir, num_bootstrap, seed, track,
                                     is_main)
        if not is_main:
            return None
        remaining = [fold for fold in range(index.num_folds) if _evaluation(runs[fold], index) is None]
        if remaining:
            print(f"cv: fold(s) {_fold_list(remaining)} of {index.num_folds} not trained and evaluated yet; {CV_JSON} "
                  f"is written once every fold is (gastro-dist cv ... --folds {_fold_list(remaining)})")
            return None
        result = summarise(out_dir, index, runs, config_path, overrides, num_bootstrap, seed)
        if track and configs[chosen[0]].tracking.tracker:
            log_summary(out_dir, configs[chosen[0]], result)
    return result


def parse_folds(text: str, num_folds: int) -> list[int]:
    """`all` or a comma-separated list of fold numbers (`0,2`), each in 0..num_folds-1."""
    if text.strip() == "all":
        return list(range(num_folds))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--folds takes `all` or fold numbers like 0,2; got {text!r}") from None
    wrong = [fold for fold in chosen if not 0 <= fold < num_folds]
    if not chosen or wrong:
        raise UserError(f"--folds {text}: the shards have {num_folds} folds, numbered 0..{num_folds - 1}")
    return chosen


def _fold_list(folds: list[int]) -> str:
    return ",".join(map(str, folds))


# ---------------------------------------------------------------- one fold
def _trained(run: RunDir) -> bool:
    return run.model_weights.is_file() and run.read_summary().get("status") == "completed"


def _train_and_evaluate_fold(fold: int, config: TrainConfig, run: RunDir, index: ShardIndex, shards_dir: str | Path,
                             num_bootstrap: int, seed: int, track: bool, is_main: bool) -> None:
    if not _trained(run):
        print(f"cv: training fold {fold} of {index.num_folds} into {run}")
        train(config, shards_dir, run)
    summary = run.read_summary()
    if summary.get("fold") != fold or summary.get("shards_index_sha256") != index.index_sha256:
        raise UserError(f"{run} holds a run trained with data.fold={summary.get('fold')!r} on shards "
                        f"{summary.get('shards')}, not fold {fold} of {index.root}; use a new --out folder")
    if _evaluation(run, index) is not None:
        print(f"cv: fold {fold} already trained and evaluated: {run}")
        return
    model_sha256 = file_sha256(run.model_weights)
    splits = {OOF_DIR: fold_split(fold), **({TEST_DIR: "test"} if index.count("test") else {})}
    for folder, split in splits.items():
        evaluate_run(run.path, shards_dir, run.path / folder, split=split, num_bootstrap=num_bootstrap, seed=seed,
                     batch_size=config.data.eval_batch_size, num_workers=config.data.num_workers, track=track)
    if is_main:
        write_json_atomic(run.path / EVALUATED, {
            "fold": fold, "model_sha256": model_sha256, "shards_index_sha256": index.index_sha256,
            "predictions": {folder: f"{folder}/predictions.csv" for folder in splits},
            "predictions_sha256": {folder: file_sha256(run.path / folder / "predictions.csv") for folder in splits}})


def _read_record(run: RunDir) -> dict | None:
    """The fold's cv-fold.json, None when there is none or it is not a JSON object."""
    try:
        record = read_json_file(run.path / EVALUATED, EVALUATED)
    except (OSError, ValueError):  # UntrustedDocument too: a record that is not ours means evaluate again
        return None
    return record if isinstance(record, dict) else None


def _evaluation(run: RunDir, index: ShardIndex) -> dict | None:
    """The fold's evaluation record when it is complete and belongs to the model and shards there now."""
    record = _read_record(run)
    wanted = {OOF_DIR, TEST_DIR} if index.count("test") else {OOF_DIR}
    if (record is None or record.get("shards_index_sha256") != index.index_sha256
            or set(record.get("predictions") or {}) != wanted
            or not all((run.path / folder / "predictions.csv").is_file() for folder in wanted)
            or not run.model_weights.is_file() or record.get("model_sha256") != file_sha256(run.model_weights)):
        return None
    return record


# ---------------------------------------------------------------- all folds together
def _fold_predictions(run: RunDir, folder: str, classes: list[str]) -> dict:
    """A fold's predictions.csv (`prediction_files.read_predictions_csv`: checked whole), refused when it is
    damaged or differs from the file the fold's evaluation wrote (cv-fold.json keeps its sha256)."""
    path = run.path / folder / "predictions.csv"
    again = f"delete {run.path / EVALUATED} to evaluate the fold again"
    recorded = (_read_record(run) or {}).get("predictions_sha256")
    if isinstance(recorded, dict) and folder in recorded and recorded[folder] != file_sha256(path):
        raise UserError(f"{path} changed after cv wrote it (its sha256 is not the one in {EVALUATED}); {again}")
    try:
        return read_predictions_csv(path, classes, "the shards' classes are")
    except UserError as err:
        raise UserError(f"{err}; {again}") from None


def summarise(out_dir: Path, index: ShardIndex, runs: dict[int, RunDir], config_path: str | Path,
              overrides: list[str], num_bootstrap: int, seed: int) -> dict:
    """cv.json, cv.md and the pooled prediction files from the folds' predictions.csv files."""
    classes = index.classes
    oof = {fold: _fold_predictions(run, OOF_DIR, classes) for fold, run in runs.items()}
    has_test = index.count("test") > 0
    test = {fold: _fold_predictions(run, TEST_DIR, classes) for fold, run in runs.items()} if has_test else {}

    def metrics_of(labels, probs, groups=None, bootstrap=0) -> dict:
        return evaluate_predictions(y_true=labels, probs=probs, classes=classes,
                                    groups=None if groups is None else np.array(groups, dtype=object),
                                    num_bootstrap=bootstrap, seed=seed)

    per_fold = []
    for fold, run in runs.items():
        row = {"fold": fold, "run": str(run.path), "val_split": fold_split(fold),
               "val_listed": index.count(fold_split(fold)),
               "val": _fold_metrics(metrics_of(oof[fold]["labels"], oof[fold]["probs"]))}
        if has_test:
            row["test"] = _fold_metrics(metrics_of(test[fold]["labels"], test[fold]["probs"]))
        per_fold.append(row)

    pooled_keys = [key for fold in runs for key in oof[fold]["keys"]]
    pooled = metrics_of(np.concatenate([oof[fold]["labels"] for fold in runs]),
                        np.concatenate([oof[fold]["probs"] for fold in runs]),
                        [group for fold in runs for group in oof[fold]["groups"]], num_bootstrap)
    _write_oof_csv(out_dir / OOF_PREDICTIONS, runs, oof, classes)
    result = {
        "config": str(config_path), "overrides": overrides, "shards": str(index.root),
        "shards_index_sha256": index.index_sha256, "classes": classes, "num_folds": index.num_folds,
        "synthetic": index.synthetic,
        "folds": per_fold,
        "across_folds": {"val": _spread([row["val"] for row in per_fold], classes)},
        "out_of_fold": {**pooled, "num_listed": sum(index.count(fold_split(fold)) for fold in runs),
                        "num_distinct_keys": len(set(pooled_keys))},
        "ensemble_test": None,
        "interval": "mean ± t(0.975, K-1) x SD / sqrt(K) over the folds, cut to the metric's range; the folds "
                    "share training images, so this understates the uncertainty: read it as how much the result "
                    "moves with the split",
    }
    if has_test:
        result["across_folds"]["test"] = _spread([row["test"] for row in per_fold], classes)
        keys, labels, probs, groups = _ensemble(test)
        result["ensemble_test"] = {**metrics_of(labels, probs, groups, num_bootstrap),
                                   "num_listed": index.count("test"), "num_models": len(test)}
        _write_ensemble_csv(out_dir / ENSEMBLE_PREDICTIONS, keys, groups, labels, probs, classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Several SLURM array tasks may finish together and each write these: the same content, each
    # through a file of its own renamed into place (files.write_text_atomic).
    write_json_atomic(out_dir / CV_JSON, redact(result))
    write_text_atomic(out_dir / CV_MARKDOWN, cv_markdown(result))
    print(f"cross-validation: {out_dir / CV_MARKDOWN}")
    return result


@forgets_accelerator_settings
def log_summary(out_dir: Path, config: TrainConfig, result: dict) -> None:
    """cv.json's numbers (`cv/across_folds/val/accuracy/mean`, `cv/out_of_fold/macro_auc`, ...) and the
    summary files as a tracker run of their own: OUT is its run folder (OUT/tracking.json, so a later
    collect adds to the same run), named OUT-summary, in the folds' group, tagged cv-summary. Main
    process only: it follows the folds' runs, and the other processes have returned."""
    name = out_dir.resolve().name
    tracking = dataclasses.replace(config.tracking, run_name=f"{name}-summary",
                                   tags=[*config.tracking.tags, "cv-summary"])
    run = RunDir(out_dir)
    params = to_dict(config)
    params["data"].pop("fold")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **accelerator_tracking_kwargs(tracking, run))
    run_log = RunLog(accelerator, run, tracking, {**params, "cv": {"num_folds": result["num_folds"]}})
    values = {"across_folds": result["across_folds"]}
    for where in ("out_of_fold", "ensemble_test"):
        metrics = result[where]
        if metrics is not None:
            values[where] = {**_fold_metrics(metrics), "ci": metrics.get("ci")}
            del values[where]["confusion_matrix"]  # a table, not a number a tracker plots
    run_log.log("cv", values)
    files = [out_dir / name for name in (CV_JSON, CV_MARKDOWN, OOF_PREDICTIONS, ENSEMBLE_PREDICTIONS)]
    run_log.log_files(f"cv-{name}", "cv-summary", [path for path in files if path.is_file()])
    run_log.close()
    print(f"cv: summary logged to {', '.join(tracking.tracker)}")


def _fold_metrics(metrics: dict) -> dict:
    return {name: metrics[name] for name in _FOLD_METRICS}


def _spread(rows: list[dict], classes: list[str]) -> dict:
    """Per metric: the folds' values, mean, SD and the 95% t-interval of the mean (values that are
    undefined in a fold, e.g. the accuracy of a class it lacks, are left out)."""
    spread = {name: _summary([row[name] for row in rows], bounds) for name, bounds in SPREAD_METRICS.items()}
    spread["per_class_accuracy"] = {c: _summary([row["per_class_accuracy"][c] for row in rows], (0.0, 1.0))
                                    for c in classes}
    return spread


def _summary(values: list[float | None], bounds: tuple[float, float]) -> dict:
    """mean ± t(0.975, n-1) x SD / sqrt(n), cut to the metric's range `bounds`."""
    from scipy.stats import t as student_t

    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    result = {"values": values, "n": int(len(defined)), "mean": None, "sd": None, "ci_lower": None, "ci_upper": None,
              "min": None, "max": None}
    if len(defined):
        result.update(mean=float(defined.mean()), min=float(defined.min()), max=float(defined.max()))
    if len(defined) >= 2:
        sd = float(defined.std(ddof=1))
        half_width = float(student_t.ppf(0.975, len(defined) - 1)) * sd / np.sqrt(len(defined))
        result.update(sd=sd, ci_lower=max(bounds[0], result["mean"] - half_width),
                      ci_upper=min(bounds[1], result["mean"] + half_width))
    return result


def _ensemble(test: dict[int, dict]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """The test samples every fold model predicted, with the mean of their probabilities."""
    first = next(iter(test.values()))
    common = set(first["keys"]).intersection(*(set(p["keys"]) for p in test.values()))
    keys = [key for key in first["keys"] if key in common]
    rows = [{key: i for i, key in enumerate(p["keys"])} for p in test.values()]
    probs = np.mean([p["probs"][[row[key] for key in keys]] for p, row in zip(test.values(), rows)], axis=0)
    where = [rows[0][key] for key in keys]
    return keys, first["labels"][where], probs, [first["groups"][i] for i in where]


def _write_oof_csv(path: Path, runs: dict[int, RunDir], oof: dict[int, dict], classes: list[str]) -> None:
    """Every fold's validation predictions, with the bootstrap unit (`group`) and the probabilities at full
    precision, as evaluate's predictions.csv: `compare --predictions` and `evaluate`'s readers take it."""
    rows = [[key, str(fold), patient, group, csv_text(classes[label]), csv_text(classes[int(p.argmax())]),
             *map(full_precision, p)]
            for fold in runs for key, patient, group, label, p in zip(oof[fold]["keys"], oof[fold]["patient_ids"],
                                                                         oof[fold]["groups"], oof[fold]["labels"],
                                                                         oof[fold]["probs"])]
    _write_csv(path, ["key", "fold", "patient_id", "group", "true_label", "predicted_label",
                      *[f"prob_{c}" for c in classes]], rows)


def _write_ensemble_csv(path: Path, keys: list[str], groups: list[str], labels: np.ndarray, probs: np.ndarray,
                        classes: list[str]) -> None:
    rows = [[key, group, csv_text(classes[label]), csv_text(classes[int(p.argmax())]), *map(full_precision, p)]
            for key, group, label, p in zip(keys, groups, labels, probs)]
    _write_csv(path, ["key", "group", "true_label", "predicted_label", *[f"prob_{c}" for c in classes]], rows)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Cells that came from the shards were made safe by `evaluate` already (csv_text)."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())



# ---------------------------------------------------------------- cv.md
def cv_markdown(result: dict) -> str:
    classes, num_folds = result["classes"], result["num_folds"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    folds = [row["fold"] for row in result["folds"]]
    rows_of = [(f"sensitivity: {display_name(c)}", ("per_class_accuracy", c), pct) for c in classes] + [
        ("overall accuracy", ("accuracy",), pct), ("balanced accuracy", ("balanced_accuracy",), pct),
        ("macro AUC", ("macro_auc",), num), ("MCC", ("mcc",), num), ("macro F1", ("macro_f1",), num)]

    def spread_table(where: str) -> list[str]:
        lines = ["| metric | " + " | ".join(f"fold {f}" for f in folds) + " | mean ± SD | 95% interval |",
                 "|---|" + "---:|" * (len(folds) + 2)]
        for title, path, fmt in rows_of:
            spread = result["across_folds"][where][path[0]]
            spread = spread[path[1]] if len(path) > 1 else spread
            values = [fmt(v) for v in spread["values"]]
            mean_sd = "n/a" if spread["mean"] is None else (
                fmt(spread["mean"]) + ("" if spread["sd"] is None else f" ± {fmt(spread['sd'])}"))
            interval = "n/a" if spread["ci_lower"] is None else f"{fmt(spread['ci_lower'])} – {fmt(spread['ci_upper'])}"
            lines.append(f"| {title} | " + " | ".join(values) + f" | {mean_sd} | {interval} |")
        return lines

    def pooled_table(metrics: dict) -> list[str]:
        ci = metrics.get("ci") or {}

        def cell(value, interval, fmt) -> str:
            if not interval:
                return fmt(value)
            return (fmt(value) + f" ({fmt(interval['lower'])} – {fmt(interval['upper'])})"
                    + (" †" if interval.get("flag") else ""))

        lines = ["| metric | value (95% CI, patients as the units) |", "|---|---:|"]
        for c in classes:
            lines.append(f"| sensitivity: {display_name(c)} | "
                         f"{cell(metrics['per_class_accuracy'][c], (ci.get('per_class_accuracy') or {}).get(c), pct)} |")
        for title, name, fmt in (("overall accuracy", "accuracy", pct), ("balanced accuracy", "balanced_accuracy", pct),
                                 ("macro AUC", "macro_auc", num), ("MCC", "mcc", num), ("macro F1", "macro_f1", num)):
            lines.append(f"| {title} | {cell(metrics[name], ci.get(name), fmt)} |")
        return lines

    oof = result["out_of_fold"]
    synthetic = result.get("synthetic")
    banner = [f"> **Synthetic data: the images were rendered by `{synthetic.get('generator', 'synth')}`, not taken by an "
              "endoscope; the figures show the pipeline works, not how a model would do on patients.**", ""] \
        if synthetic else []
    lines = [f"# Cross-validation: {num_folds} folds", "", *banner,
             f"Config `{result['config']}`{' with ' + ' '.join(result['overrides']) if result['overrides'] else ''}; "
             f"shards `{result['shards']}`. Each fold's model trained on the other "
             f"{'fold' if num_folds == 2 else f'{num_folds - 1} folds'} "
             "(patient-grouped, stratified by class) and validated on its own; the test split is never trained on.",
             "", "## Each fold's model on its own validation fold", "", *spread_table("val"), "",
             f"95% interval: {result['interval']}.", "",
             "## Pooled out-of-fold predictions", "",
             f"Every train+val image predicted by the one model that did not train on it: {oof['num_samples']} of "
             f"{oof['num_listed']} images. The folds' models differ, so this pools {num_folds} models' outputs.", "",
             *pooled_table(oof), ""]
    if result["ensemble_test"] is not None:
        ensemble = result["ensemble_test"]
        lines += ["## Each fold's model on the test split", "", *spread_table("test"), "",
                  "## Fold ensemble on the test split", "",
                  f"Mean of the {ensemble['num_models']} fold models' probabilities, {ensemble['num_samples']} of "
                  f"{ensemble['num_listed']} test images.", "", *pooled_table(ensemble), ""]
    lines += ["Intervals as in `evaluate`'s report: exact for the proportions, the bootstrap for the others, † where "
              "simulation finds intervals of that kind covering less than 92% (fewer than 200 patients, or a value near "
              "its bound). MCC is scikit-learn's multiclass matthews_corrcoef." + reference_study_note(classes), ""]
    return "\n".join(lines)
