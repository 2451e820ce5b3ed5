"""`compare`: the study's experiment. Trains several configs on the same shards, evaluates each on
the same split, and writes the study's table (model x per-class accuracy) beside our other metrics."""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from accelerate.state import AcceleratorState

from gastro_dist import UserError
from gastro_dist.config import load_config
from gastro_dist.data.shard_index import load_shard_index
from gastro_dist.evaluation.evaluate import evaluate_run
from gastro_dist.run_dir import write_run_json
from gastro_dist.tracking import group_run
from gastro_dist.training.trainer import train


def compare_configs(config_paths: list[str | Path], shards_dir: str | Path, out_dir: str | Path,
                    overrides: list[str] | None = None, split: str = "test", num_bootstrap: int = 1000,
                    track: bool = True) -> dict:
    """Train and evaluate each config on the same shards; write comparison.md and comparison.json.
    The runs are one group in the trackers (W&B group, MLflow parent run) named after --out."""
    out_dir = Path(out_dir)
    if num_bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {num_bootstrap}")
    configs = [(Path(p).stem, load_config(p, overrides)) for p in config_paths]  # every config checked before training
    for _, config in configs:
        config.tracking.group = config.tracking.group or out_dir.resolve().name
    with group_run(configs[0][1].tracking, PartialState().is_main_process):
        return _train_and_evaluate(configs, shards_dir, out_dir, split, num_bootstrap, track)


def _train_and_evaluate(configs: list, shards_dir: str | Path, out_dir: Path, split: str, num_bootstrap: int,
                        track: bool) -> dict:
    index = load_shard_index(shards_dir)
    if split not in index.splits or index.count(split) == 0:
        print(f"{shards_dir} has no {split} split: comparing on the val split")
        split = "val"
    rows = []
    for name, config in configs:
        run_dir = out_dir / name
        summary = train(config, shards_dir, run_dir)
        train_time = sum(phase.get("time_s", 0.0) for phase in summary.get("phases", {}).values())
        # Each run builds its own Accelerator (precision and trackers may differ); accelerate has no public
        # way to forget the previous one's settings, so its private reset is used (accelerate's own tests do).
        AcceleratorState._reset_state()
        metrics = evaluate_run(run_dir, shards_dir, run_dir / "eval", split=split, num_bootstrap=num_bootstrap,
                               track=track)
        AcceleratorState._reset_state()
        if metrics:
            rows.append(_comparison_row(name, config, summary, metrics, train_time))
    result = {"split": split, "shards": str(shards_dir), "classes": index.classes, "models": rows}
    if rows:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_json(out_dir / "comparison.json", result)
        (out_dir / "comparison.md").write_text(comparison_markdown(result), encoding="utf-8")
        print(f"comparison: {out_dir / 'comparison.md'}")
    return result


def _comparison_row(name: str, config, summary: dict, metrics: dict, train_time_s: float) -> dict:
    ci = metrics.get("ci") or {}
    phases = summary.get("phases", {})
    return {
        "name": name, "model": config.model.name, "image_size": config.data.image_size,
        "per_class_accuracy": metrics["per_class_accuracy"], "per_class_accuracy_ci": ci.get("per_class_accuracy"),
        "accuracy": metrics["accuracy"], "accuracy_ci": ci.get("accuracy"), "macro_f1": metrics["macro_f1"],
        "mcc": metrics["mcc"], "macro_auc": metrics["macro_auc"], "ece": metrics["ece"],
        "cancer_vs_benign": metrics.get("cancer_vs_benign"),
        "train_time_s": round(train_time_s, 1),
        "train_images_per_s": {p: phases[p].get("images_per_s") for p in phases},
        "world_size": summary.get("world_size"),
    }


def comparison_markdown(result: dict) -> str:
    classes = result["classes"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"# Backbone comparison ({result['split']} split)", "",
             "Share of each class's images recognised correctly (the study's table), with 95% patient-level bootstrap CIs.", "",
             "| model | " + " | ".join(classes) + " | overall |", "|---|" + "---:|" * (len(classes) + 1)]
    for row in result["models"]:
        cells = []
        for c in classes:
            ci = (row.get("per_class_accuracy_ci") or {}).get(c)
            interval = f" ({pct(ci['lower'])}–{pct(ci['upper'])})" if ci and ci.get("lower") is not None else ""
            cells.append(pct(row["per_class_accuracy"].get(c)) + interval)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {pct(row['accuracy'])} |")
    lines += ["", "| model | macro F1 | MCC | macro AUC | ECE | cancer sens. | cancer spec. | cancer AUC | train time (s) | train images/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["models"]:
        cvb = row.get("cancer_vs_benign") or {}
        ips = row["train_images_per_s"].get("finetune") or row["train_images_per_s"].get("head")
        num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {row['name']} | {num(row['macro_f1'])} | {num(row['mcc'])} | {num(row['macro_auc'])} | "
                     f"{num(row['ece'])} | {pct(cvb.get('sensitivity'))} | {pct(cvb.get('specificity'))} | "
                     f"{num(cvb.get('auc'))} | {row['train_time_s']} | {'n/a' if ips is None else f'{ips:.0f}'} |")
    lines += ["", "MCC is scikit-learn's multiclass matthews_corrcoef. Reference study (ResNet50): "
              "gastric cancer 93%, gastric ulcer 92%, chronic gastritis 88%.", ""]
    return "\n".join(lines)
