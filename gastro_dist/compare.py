"""`compare`: the study's experiment. Trains several configs on the same shards, evaluates each on
the same split, and writes the study's table (model x per-class accuracy) beside our other metrics,
and a paired comparison of every two models on the same images (McNemar, DeLong, paired bootstrap,
Holm: `evaluation.paired`) with a forest plot, in comparison.json, comparison.md and comparison.html."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from accelerate import PartialState

from gastro_dist import UserError
from gastro_dist.config import load_config
from gastro_dist.data.shard_index import load_shard_index
from gastro_dist.evaluation.evaluate import POSITIVE_CLASS, evaluate_run
from gastro_dist.evaluation.paired import compare_models, significance_sentences
from gastro_dist.evaluation.prediction_files import read_predictions_csv
from gastro_dist.evaluation.report import (Heading, Images, Paragraph, Table, display_name, render_html, render_markdown,
                                          save_forest_plot)
from gastro_dist.run_dir import write_run_json
from gastro_dist.tracking import group_run
from gastro_dist.training.trainer import train

# The reference study's classes: its published figures are quoted only next to a model of these classes.
STUDY_CLASSES = frozenset({"gastric_cancer", "gastric_ulcer", "chronic_gastritis"})


def reference_study_note(classes: list[str]) -> str:
    """The reference study's figures, for tables of its own three classes only."""
    if set(classes) != STUDY_CLASSES:
        return ""
    return " Reference study (ResNet50, one split): gastric cancer 93%, gastric ulcer 92%, chronic gastritis 88%."


FOREST_PLOT = "comparison_forest.png"


def compare_configs(config_paths: list[str | Path], shards_dir: str | Path, out_dir: str | Path,
                    overrides: list[str] | None = None, split: str = "test", num_bootstrap: int = 1000,
                    track: bool = True, seed: int = 0) -> dict:
    """Train and evaluate each config on the same shards; write comparison.md, .html and .json.
    The runs are one group in the trackers (W&B group, MLflow parent run) named after --out."""
    out_dir = Path(out_dir)
    if num_bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {num_bootstrap}")
    configs = [(Path(p).stem, load_config(p, overrides)) for p in config_paths]  # every config checked before training
    for _, config in configs:
        config.tracking.group = config.tracking.group or out_dir.resolve().name
    with group_run(configs[0][1].tracking, PartialState().is_main_process):
        return _train_and_evaluate(configs, shards_dir, out_dir, split, num_bootstrap, track, seed)


def _train_and_evaluate(configs: list, shards_dir: str | Path, out_dir: Path, split: str, num_bootstrap: int,
                        track: bool, seed: int) -> dict:
    index = load_shard_index(shards_dir)
    if split not in index.splits or index.count(split) == 0:
        print(f"{shards_dir} has no {split} split: comparing on the val split")
        split = "val"
    rows, eval_dirs = [], {}
    for name, config in configs:
        run_dir = out_dir / name
        summary = train(config, shards_dir, run_dir)
        train_time = sum(phase.get("time_s", 0.0) for phase in summary.get("phases", {}).values())
        metrics = evaluate_run(run_dir, shards_dir, run_dir / "eval", split=split, num_bootstrap=num_bootstrap,
                               seed=seed, track=track)
        if metrics:
            rows.append(_comparison_row(name, config, summary, metrics, train_time))
            eval_dirs[name] = run_dir / "eval"
    result = {"split": split, "shards": str(shards_dir), "classes": index.classes, "models": rows, "paired": None}
    if rows:
        if len(eval_dirs) > 1:
            result["paired"] = paired_comparison_of_runs(eval_dirs, index.classes, num_bootstrap=num_bootstrap,
                                                         seed=seed)
        write_comparison(out_dir, result)
        print(f"comparison: {out_dir / 'comparison.md'}  (html: {out_dir / 'comparison.html'})")
    return result


def paired_comparison_of_runs(eval_dirs: dict[str, Path], classes: list[str] | None, num_bootstrap: int = 1000,
                              seed: int = 0, positive_class: str | None = None) -> dict:
    """`paired.compare_models` on the predictions of several models (name -> an `evaluate` folder, or a
    predictions CSV such as cv's oof_predictions.csv), each file checked whole first (`prediction_files`):
    the images all of them scored (matched by key; those only some scored are left out, with a warning),
    resampled by the patients (bootstrap units) the first one records. `classes` None: the first file's
    (every file must have the same). `positive_class` None: gastric_cancer when present."""
    files = {name: Path(path) / "predictions.csv" if Path(path).is_dir() else Path(path)
             for name, path in eval_dirs.items()}
    predictions, origin = {}, "the shards' classes are"
    for name, path in files.items():
        predictions[name] = read_predictions_csv(path, classes, origin)
        if classes is None:
            classes, origin = predictions[name]["classes"], f"those of {path} are"
    keys, left_out = _keys_scored_by_all(files, predictions)
    aligned = {}
    for name, scored in predictions.items():
        position = {key: k for k, key in enumerate(scored["keys"])}
        aligned[name] = np.array([position[key] for key in keys], dtype=np.int64)
    first = next(iter(predictions))
    labels = predictions[first]["labels"][aligned[first]]
    for name, rows in aligned.items():
        if not np.array_equal(predictions[name]["labels"][rows], labels):
            raise UserError(f"{files[name]} gives other true labels for the same images than {files[first]}: they "
                            "were not evaluated on the same shards")
    if positive_class is None:
        positive_class = POSITIVE_CLASS if POSITIVE_CLASS in classes else None
    comparison = compare_models(labels, {name: predictions[name]["probs"][rows] for name, rows in aligned.items()},
                                classes, groups=predictions[first]["groups"][aligned[first]],
                                positive_class=positive_class, num_bootstrap=num_bootstrap, seed=seed)
    comparison["classes"] = classes
    comparison["num_images_per_model"] = {name: len(scored["keys"]) for name, scored in predictions.items()}
    comparison["num_images_not_in_all"] = left_out
    return comparison


def _keys_scored_by_all(files: dict[str, Path], predictions: dict[str, dict]) -> tuple[list[str], int]:
    """The keys every file holds, in the first file's order, and how many keys only some hold. None shared is
    an error: the files were made on other images. Some not shared is a warning: the comparison is then on
    the images all models scored."""
    counts = ", ".join(f"{name}: {len(scored['keys'])} in {files[name]}" for name, scored in predictions.items())
    tables = list(predictions.values())
    common = set(tables[0]["keys"]).intersection(*(scored["keys"] for scored in tables[1:]))
    if not common:
        raise UserError(f"the prediction files share no image key ({counts}): they were not scored on the same "
                        "images")
    keys = [key for key in tables[0]["keys"] if key in common]
    left_out = len(set().union(*(scored["keys"] for scored in tables))) - len(keys)
    if left_out:
        print(f"warning: {left_out} images are not in every prediction file ({counts}); the paired comparison uses "
              f"the {len(keys)} images all of them scored, and comparison.md says so")
    return keys, left_out


def compare_predictions(named_paths: dict[str, Path], out_dir: str | Path, num_bootstrap: int = 1000,
                        seed: int = 0) -> dict:
    """The paired comparison of models evaluated already (name -> an `evaluate` folder or a predictions CSV,
    e.g. each config's cv oof_predictions.csv), nothing trained; classes from the first file's columns.
    Every file is read and checked before anything is written."""
    if len(named_paths) < 2:
        raise UserError("--predictions needs two models or more, as NAME=PATH")
    paired = paired_comparison_of_runs(named_paths, None, num_bootstrap=num_bootstrap, seed=seed)
    result = {"split": "given predictions", "predictions": {name: str(path) for name, path in named_paths.items()},
              "classes": paired["classes"], "models": [], "paired": paired}
    write_comparison(Path(out_dir), result)
    print(f"comparison: {Path(out_dir) / 'comparison.md'}  (html: {Path(out_dir) / 'comparison.html'})")
    return result


def _comparison_row(name: str, config, summary: dict, metrics: dict, train_time_s: float) -> dict:
    ci = metrics.get("ci") or {}
    phases = summary.get("phases", {})
    return {
        "name": name, "model": config.model.name, "image_size": config.data.image_size,
        "per_class_accuracy": metrics["per_class_accuracy"], "per_class_accuracy_ci": ci.get("per_class_accuracy"),
        "accuracy": metrics["accuracy"], "accuracy_ci": ci.get("accuracy"), "macro_f1": metrics["macro_f1"],
        "mcc": metrics["mcc"], "macro_auc": metrics["macro_auc"], "ece": metrics["ece"],
        "ece_debiased": metrics.get("ece_debiased"), "brier": metrics.get("brier"),
        "temperature": (metrics.get("temperature_scaling") or {}).get("temperature"),
        "cancer_vs_benign": metrics.get("cancer_vs_benign"),
        "train_time_s": round(train_time_s, 1),
        "train_images_per_s": {p: phases[p].get("images_per_s") for p in phases},
        "world_size": summary.get("world_size"),
    }


def write_comparison(out_dir: Path, result: dict) -> None:
    """comparison.json, the forest plot (with a paired comparison), comparison.md and comparison.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_json(out_dir / "comparison.json", result)
    if result.get("paired"):
        save_forest_plot(result["paired"], out_dir / FOREST_PLOT)
    blocks = comparison_blocks(result)
    (out_dir / "comparison.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out_dir / "comparison.html").write_text(render_html(blocks, comparison_title(result),
                                                         out_dir), encoding="utf-8")


def comparison_markdown(result: dict) -> str:
    return render_markdown(comparison_blocks(result))


def comparison_title(result: dict) -> str:
    if result.get("predictions"):
        return "Model comparison from prediction files"
    return f"Backbone comparison on the {result['split']} split"


def comparison_blocks(result: dict) -> list:
    classes = result["classes"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    accuracy_rows = []
    for row in result["models"]:
        cells = []
        for c in classes:
            ci = (row.get("per_class_accuracy_ci") or {}).get(c)
            interval = f" ({pct(ci['lower'])}–{pct(ci['upper'])})" if ci and ci.get("lower") is not None else ""
            cells.append(pct(row["per_class_accuracy"].get(c)) + interval)
        accuracy_rows.append([row["name"], *cells, pct(row["accuracy"])])
    other_rows = []
    for row in result["models"]:
        cvb = row.get("cancer_vs_benign") or {}
        ips = row["train_images_per_s"].get("finetune") or row["train_images_per_s"].get("head")
        other_rows.append([row["name"], num(row["macro_f1"]), num(row["mcc"]), num(row["macro_auc"]),
                           num(row.get("ece_debiased")), num(row.get("brier")), pct(cvb.get("sensitivity")),
                           pct(cvb.get("specificity")), num(cvb.get("auc")), str(row["train_time_s"]),
                           "n/a" if ips is None else f"{ips:.0f}"])
    notes = "MCC is scikit-learn's multiclass matthews_corrcoef; ECE is the debiased expected calibration error."
    notes += reference_study_note(classes)
    blocks = [Heading(comparison_title(result), level=1)]
    if result["models"]:
        blocks += [Paragraph("Share of each class's images recognised correctly (the study's table), with exact "
                             "95% CIs counting patients as the units."),
                   Table(["model", *[display_name(c) for c in classes], "overall"], accuracy_rows),
                   Table(["model", "macro F1", "MCC", "macro AUC", "ECE", "Brier", "cancer sens.", "cancer spec.",
                          "cancer AUC", "train time (s)", "train images/s"], other_rows),
                   Paragraph(notes)]
    else:
        blocks.append(Paragraph("Models compared from their prediction files: "
                                + ", ".join(f"{name} (`{path}`)" for name, path in result["predictions"].items())
                                + "."))
    if result.get("paired"):
        blocks += paired_blocks(result["paired"])
    return blocks


def paired_blocks(paired: dict) -> list:
    """The paired comparison: its table, the forest plot and a sentence per difference."""
    level = f"{paired['level']:.0%}"
    signed = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    points = lambda v: "n/a" if v is None else f"{100 * v:+.1f}"  # noqa: E731
    p = lambda v: "n/a" if v is None else ("<0.001" if v < 0.001 else f"{v:.3f}")  # noqa: E731

    def tested(test: dict | None) -> str:
        return "n/a" if not test else f"{p(test['p_value'])} ({p(test.get('p_holm'))})"

    def interval(entry: dict, fmt) -> str:
        ci = entry["ci"]
        bounds = "n/a" if ci is None else f"{fmt(ci['lower'])} to {fmt(ci['upper'])}"
        return f"{fmt(entry['difference'])} ({bounds})"

    rows = []
    for pair in paired["pairs"]:
        rows.append([f"{pair['a']} − {pair['b']}", interval(pair["accuracy_difference"], points),
                     tested(pair["accuracy_test"]), tested(pair["mcnemar"]), interval(pair["macro_auc_difference"], signed),
                     tested(pair["macro_auc_test"]), interval(pair["cancer_auc_difference"], signed),
                     tested(pair["delong"])])
    unit = "patients" if paired["unit"] == "patient" else "images"
    method = (f"All {paired['num_images']} images every model scored"
              + (f" ({paired['num_images_not_in_all']} scored by only some were left out; images per model: "
                 + ", ".join(f"{name} {count}" for name, count in paired["num_images_per_model"].items()) + ")"
                 if paired.get("num_images_not_in_all") else "")
              + ", compared pairwise (a − b). Accuracy is tested on which images each model gets right by "
              + ("the clustered McNemar test (Durkalski et al. 2003), which counts patients, not frames, as the "
                 "independent units; McNemar's exact test, which treats every image as independent, is shown beside "
                 "it" if paired["unit"] == "patient" else "McNemar's test (the images are the independent units), "
                 "asymptotic and exact")
              + "; DeLong's test compares the "
              f"{paired['positive_class'] or 'binary'}-vs-rest AUCs"
              + (", its variance clustered by patient (Obuchowski 1997)" if paired["unit"] == "patient" else "")
              + ". The macro AUC test is the paired bootstrap test (the difference over the SD of its "
              "bootstrap replicates, as pROC's roc.test does)"
              + f". Each test's p-values are Holm-adjusted across the {len(paired['pairs'])} pairs (in brackets) "
              f"and read at {paired['alpha']}. The {level} CIs of the differences come from {paired['num_resamples']} "
              f"paired bootstrap resamples of the {paired['num_units']} {unit} (seed {paired['seed']}).")
    return [Heading("Paired comparison"), *[Paragraph(sentence) for sentence in significance_sentences(paired)],
            Paragraph(method),
            Table(["pair (a − b)", f"accuracy, points ({level} CI)", "accuracy test p (Holm)",
                   "McNemar exact, images independent p (Holm)",
                   f"macro AUC ({level} CI)", "bootstrap p (Holm)", f"cancer AUC ({level} CI)",
                   "DeLong p (Holm)"], rows),
            Images([(FOREST_PLOT, "Differences between the models with their CIs; the dashed line is no "
                                  "difference")])]
