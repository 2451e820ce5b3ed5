"""`evaluate`, `cam` and `compare`: a trained run measured the way clinicians read it.

`evaluate_run` predicts every sample of a split exactly once across all ranks (it runs under
`accelerate launch` too), then on the main process writes predictions.csv, metrics.json
(per-class accuracy as in the study, sensitivity/specificity/PPV/NPV/F1/AUC per class,
cancer-versus-benign, patient-level bootstrap CIs, calibration, dummy baselines, an optional
cancer operating point chosen on the validation split), and the report (Markdown, HTML, PNGs).
`compare_configs` trains and evaluates several configs on the same shards and writes the
study's table (model x per-class accuracy) beside our extra metrics.
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from gastro_dist import UserError
from gastro_dist.data import pipeline
from gastro_dist.data.images import load_rgb
from gastro_dist.evaluation import cam as gradcam
from gastro_dist.evaluation.inference import TrainedModel, default_device, load_trained_model
from gastro_dist.evaluation.metrics import dummy_baselines, evaluate_predictions, operating_point
from gastro_dist.evaluation.report import write_report
from gastro_dist.tracking import write_json_atomic
from gastro_dist.training.trainer import predict_split

POSITIVE_CLASS = "gastric_cancer"


def evaluate_run(run_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, split: str = "test",
                 checkpoint: str = "best", num_bootstrap: int = 1000, seed: int = 0,
                 cancer_sensitivity: float | None = None, positive_class: str = POSITIVE_CLASS,
                 cam_misclassified: int = 0, batch_size: int = 64, num_workers: int = 2) -> dict:
    """Evaluate RUN on a split of the shards; returns metrics.json's content (on every rank)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if cancer_sensitivity is not None and not 0 < cancer_sensitivity <= 1:
        raise UserError("--cancer-sensitivity must be a fraction in (0, 1], e.g. 0.95")
    trained = load_trained_model(run_dir, checkpoint)
    index = pipeline.load_shard_index(shards_dir)
    if index.classes != trained.classes:
        raise UserError(f"the shards' classes {index.classes} differ from the model's {trained.classes}; "
                        "evaluate on shards packed from the same class folders")
    if index.count(split) == 0:
        raise UserError(f"the {split} split of {shards_dir} is empty; pack with --test-per-class N, or pass --split val")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = trained.model.to(accelerator.device)
    data_cfg = trained.data_config(batch_size=batch_size, num_workers=num_workers)
    predictions = predict_split(accelerator, model, index, data_cfg, split, with_meta=True)
    selection = None
    if cancer_sensitivity is not None and positive_class in index.classes and index.count("val") > 0:
        selection = predict_split(accelerator, model, index, data_cfg, "val")
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}

    classes = index.classes
    metas = [json.loads(m) for m in predictions["meta"]]
    groups = np.array([m.get("patient_id") or key for m, key in zip(metas, predictions["keys"])], dtype=object)
    labels, probs = predictions["labels"], predictions["probs"]
    metrics = evaluate_predictions(labels, probs, classes, groups=groups, num_bootstrap=num_bootstrap,
                                   seed=seed, positive_class=positive_class)
    train_counts = index.per_class("train") if "train" in index.splits else {}
    train_labels = np.repeat(np.arange(len(classes)), [int(train_counts.get(c, 0)) for c in classes]) if train_counts else None
    baselines = dummy_baselines(labels, classes, groups=groups, seed=seed, train_labels=train_labels,
                                positive_class=positive_class)
    op = None
    if selection is not None:
        op = operating_point(selection["labels"], selection["probs"], labels, probs, classes,
                             target_sensitivity=cancer_sensitivity, positive_class=positive_class, selected_on="val")

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_predictions_csv(out_dir / "predictions.csv", predictions["keys"], metas, labels, probs, classes)
    cam_images = _misclassified_cams(trained, index, split, predictions, cam_misclassified, out_dir) if cam_misclassified else []
    details = {"run": str(run_dir), "model": trained.architecture, "checkpoint": trained.checkpoint,
               "shards": str(shards_dir), "split": split, "images": len(labels),
               "patients": len(set(groups.tolist())), "input size": trained.image_size}
    result = {**metrics, "details": details, "baselines": baselines, "operating_point": op,
              "mcc_definition": "scikit-learn matthews_corrcoef (multiclass R_K)",
              "skipped_samples": {"missing": predictions["missing"], "reasons": predictions["skipped"]}}
    if predictions["missing"]:
        print(f"warning: {predictions['missing']} samples of the {split} split could not be read and are not "
              "in the metrics (see skipped_samples in metrics.json)")
    write_json_atomic(out_dir / "metrics.json", result)
    paths = write_report(out_dir, metrics, labels, probs, classes, title=f"{trained.architecture} on {split}",
                         details=details, baselines=baselines, operating_point=op, cam_images=cam_images)
    print(f"report: {paths['markdown']}  (html: {paths['html']})")
    accelerator.wait_for_everyone()
    return result


def _write_predictions_csv(path: Path, keys: list[str], metas: list[dict], labels: np.ndarray, probs: np.ndarray,
                           classes: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "source", "patient_id", "true_label", "predicted_label", *[f"prob_{c}" for c in classes]])
        for key, meta, label, p in zip(keys, metas, labels, probs):
            writer.writerow([key, meta.get("source", ""), meta.get("patient_id") or "", classes[label],
                             classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])


# ---------------------------------------------------------------- Grad-CAM
def read_shard_images(index: pipeline.ShardIndex, split: str, keys: set[str]) -> dict[str, bytes]:
    """Image bytes of the given sample keys, read with plain tarfile (nothing is decoded or unpickled)."""
    found: dict[str, bytes] = {}
    for shard in index.shards(split):
        with tarfile.open(shard.path) as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if stem in keys and ext in ("jpg", "png"):
                    found[stem] = tar.extractfile(member).read()
        if len(found) == len(keys):
            break
    return found


def cam_overlays(trained: TrainedModel, images: list, class_index: list[int] | None = None,
                 device: torch.device | None = None) -> list:
    """Grad-CAM overlays (PIL images) on the center crop the model saw, for the predicted or given classes."""
    device = device or default_device()
    model = trained.model.to(device)
    data_cfg = trained.data_config()
    transform = pipeline.eval_transform(data_cfg)
    batch = torch.stack([transform(img) for img in images]).to(device)
    cams, logits = gradcam.grad_cam(model, batch, class_index=class_index)
    mean = torch.tensor(data_cfg.mean, device=device).view(3, 1, 1)
    std = torch.tensor(data_cfg.std, device=device).view(3, 1, 1)
    overlays = []
    for tensor, cam in zip(batch, cams):
        pixels = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        overlays.append(gradcam.overlay_heatmap(pixels, cam.detach().cpu().numpy()))
    return overlays


def _misclassified_cams(trained: TrainedModel, index: pipeline.ShardIndex, split: str, predictions: dict,
                        per_class: int, out_dir: Path) -> list[tuple[str, str]]:
    """Overlays of the `per_class` most confident mistakes of each true class."""
    labels, probs, keys = predictions["labels"], predictions["probs"], predictions["keys"]
    predicted = probs.argmax(1)
    chosen = []
    for k in range(len(trained.classes)):
        wrong = np.flatnonzero((labels == k) & (predicted != k))
        wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:per_class]
        chosen.extend(int(i) for i in wrong)
    if not chosen:
        return []
    images = read_shard_images(index, split, {keys[i] for i in chosen})
    cam_dir = out_dir / "cam"
    cam_dir.mkdir(exist_ok=True)
    classes = trained.classes
    overlays = cam_overlays(trained, [load_rgb(images[keys[i]]) for i in chosen], [int(predicted[i]) for i in chosen])
    result = []
    for i, overlay in zip(chosen, overlays):
        name = f"{keys[i]}.png"
        overlay.save(cam_dir / name)
        caption = (f"{keys[i]}: true {classes[labels[i]]}, predicted {classes[predicted[i]]} "
                   f"({probs[i, predicted[i]]:.2f}); heatmap for the predicted class")
        result.append((f"cam/{name}", caption))
    return result


def cam_files(run_dir: str | Path, images: list[str | Path], out_dir: str | Path, checkpoint: str = "best",
              class_name: str | None = None) -> list[Path]:
    """`gastro-dist cam`: one overlay PNG per image file, for the predicted class or `class_name`."""
    trained = load_trained_model(run_dir, checkpoint)
    if class_name is not None and class_name not in trained.classes:
        raise UserError(f"--class {class_name!r} is not one of the model's classes {trained.classes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = load_rgb(Path(path))
        target = None if class_name is None else [trained.classes.index(class_name)]
        overlay = cam_overlays(trained, [image], target)[0]
        out = out_dir / f"{Path(path).stem}_cam.png"
        overlay.save(out)
        written.append(out)
        print(out)
    return written


# ---------------------------------------------------------------- compare
def compare_configs(config_paths: list[str | Path], shards_dir: str | Path, out_dir: str | Path,
                    overrides: list[str] | None = None, split: str = "test", num_bootstrap: int = 1000) -> dict:
    """Train and evaluate each config on the same shards; write comparison.md and comparison.json."""
    from accelerate.state import AcceleratorState

    from gastro_dist.config import load_config
    from gastro_dist.training.trainer import train

    out_dir = Path(out_dir)
    configs = [(Path(p).stem, load_config(p, overrides)) for p in config_paths]  # every config checked before training
    index = pipeline.load_shard_index(shards_dir)
    if split not in index.splits or index.count(split) == 0:
        print(f"{shards_dir} has no {split} split: comparing on the val split")
        split = "val"
    rows = []
    for name, config in configs:
        run_dir = out_dir / name
        summary = train(config, shards_dir, run_dir)
        train_time = sum(phase.get("time_s", 0.0) for phase in summary.get("phases", {}).values())
        AcceleratorState._reset_state()  # each run builds its own Accelerator (precision and trackers may differ)
        metrics = evaluate_run(run_dir, shards_dir, run_dir / "eval", split=split, num_bootstrap=num_bootstrap)
        AcceleratorState._reset_state()
        if metrics:
            rows.append(_comparison_row(name, config, summary, metrics, train_time))
    result = {"split": split, "shards": str(shards_dir), "classes": index.classes, "models": rows}
    if rows:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "comparison.json", result)
        (out_dir / "comparison.md").write_text(comparison_markdown(result))
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
