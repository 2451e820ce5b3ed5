"""`evaluate` and `cam`: a trained run measured the way clinicians read it (predictions.csv,
metrics.json, the report; what each holds: README "Evaluation"), with every sample the metrics
cannot use left out and listed, and every file name built from shard content kept inside --out."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from accelerate import Accelerator

from gastro_dist import RunFailure, UserError
from gastro_dist.config import DataConfig, TrackingConfig
from gastro_dist.data.augmentation import eval_transform
from gastro_dist.data.locations import location_record
from gastro_dist.data.shard_index import ShardIndex, load_shard_index
from gastro_dist.data.shard_reader import ShardReadError, iter_shard_samples
from gastro_dist.data.images import BadImage, load_rgb
from gastro_dist.evaluation import cam as gradcam
from gastro_dist.evaluation.inference import (TrainedModel, check_output_folder, default_device, file_identities,
                                              load_trained_model)
from gastro_dist.evaluation.metrics import dummy_baselines, evaluate_predictions, operating_point
from gastro_dist.evaluation.report import write_report
from gastro_dist.files import csv_text, distinct_names, safe_name
from gastro_dist.progress import progress
from gastro_dist.run_dir import RunDir, write_run_json
from gastro_dist.tracking import RunLog, accelerator_tracking_kwargs, check_trackers_installed, tracking_of_run
from gastro_dist.training.distributed import checked_shard_index
from gastro_dist.training.predict import predict_split

POSITIVE_CLASS = "gastric_cancer"  # the cancer-versus-benign view's class, when the model has it


def evaluate_run(run_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, split: str = "test",
                 checkpoint: str = "best", num_bootstrap: int = 1000, seed: int = 0,
                 cancer_sensitivity: float | None = None, positive_class: str | None = None,
                 cam_misclassified: int = 0, batch_size: int = 64, num_workers: int = 2, track: bool = True) -> dict:
    """Evaluate RUN on a split of the shards; returns metrics.json's content (on every rank).

    `positive_class` None means gastric_cancer if the model has that class, else no cancer view.
    With `track`, the metrics, figures and report also go to the training run's trackers (RUN/tracking.json).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if cancer_sensitivity is not None and not 0 < cancer_sensitivity <= 1:
        raise UserError("--cancer-sensitivity must be a fraction in (0, 1], e.g. 0.95")
    for option, value, minimum in (("--bootstrap", num_bootstrap, 0), ("--cam-misclassified", cam_misclassified, 0),
                                   ("--batch-size", batch_size, 1), ("--workers", num_workers, 0)):
        _check_at_least(option, value, minimum)
    trained = load_trained_model(run_dir, checkpoint)
    positive_class = _positive_class(positive_class, trained.classes, cancer_sensitivity)
    index = load_shard_index(shards_dir)
    if index.classes != trained.classes:
        raise UserError(f"the shards' classes {index.classes} differ from the model's {trained.classes}; "
                        "evaluate on shards packed from the same class folders")
    if index.count(split) == 0:
        raise UserError(f"the {split} split of {index.root} is empty; pack with --test-per-class N, or pass --split val")
    if cancer_sensitivity is not None and index.count("val") == 0:
        raise UserError(f"--cancer-sensitivity picks its threshold on the val split, which is empty in {index.root}; "
                        "re-pack with --val-fraction above 0, or leave the option out")
    tracking = tracking_of_run(RunDir(run_dir)) if track else None
    if tracking is not None:
        check_trackers_installed(tracking)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              **(accelerator_tracking_kwargs(tracking, RunDir(run_dir)) if tracking else {}))
    model = trained.model.to(accelerator.device)
    data_cfg = trained.data_config(batch_size=batch_size, num_workers=num_workers)
    classes = index.classes
    num_listed = index.count(split)
    # counts and sha256 of the shards read first: the plan asks only for samples that are there
    scanned_splits = sorted({split, "val"} if cancer_sensitivity is not None else {split})
    index, shard_problems = checked_shard_index(accelerator, index, scanned_splits, data_cfg.max_member_mb)
    predicted = predict_split(accelerator, model, index, data_cfg, split, with_meta=True,
                              progress_label=f"predicting the {split} split")
    predicted["missing"] += num_listed - index.count(split)
    predictions, rejected = _usable_predictions(predicted, len(classes))
    if not predictions["keys"]:
        raise _nothing_usable(index, split, predictions["skipped"] + rejected)
    selection = None
    if cancer_sensitivity is not None:
        selection, _ = _usable_predictions(predict_split(accelerator, model, index, data_cfg, "val"), len(classes))
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}
    for problem in shard_problems[:10]:
        print(f"warning: {problem}")

    metas, meta_problems = _sample_metadata(predictions["meta"], predictions["keys"])
    groups = np.array([m.get("patient_id") or key for m, key in zip(metas, predictions["keys"])], dtype=object)
    labels, probs = predictions["labels"], predictions["probs"]
    with progress(Console(stderr=True), unit="resamples", transient=True) as bar:
        task = bar.add_task("bootstrap", total=num_bootstrap)
        metrics = evaluate_predictions(labels, probs, classes, groups=groups, num_bootstrap=num_bootstrap, seed=seed,
                                       positive_class=positive_class, on_resamples=lambda n: bar.advance(task, n))
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
               "shards": location_record(index.root), "split": split, "images": len(labels),
               "patients": len(set(groups.tolist())), "input size": trained.image_size}
    num_skipped = predictions["missing"] + len(rejected)
    result = {**metrics, "details": details, "baselines": baselines, "operating_point": op,
              "mcc_definition": "scikit-learn matthews_corrcoef (multiclass R_K)",
              # count: samples of the split left out of the metrics; missing: those that could not be read
              "skipped_samples": {"count": num_skipped, "missing": predictions["missing"],
                                  "reasons": predictions["skipped"] + rejected, "shard_problems": shard_problems},
              "metadata_problems": {"count": len(meta_problems), "reasons": meta_problems}}
    if num_skipped or meta_problems:
        print(f"warning: {num_skipped} of the {num_listed} samples of the {split} split are not in the metrics "
              f"and {len(meta_problems)} were evaluated without their metadata "
              "(see skipped_samples and metadata_problems in metrics.json)")
    write_run_json(out_dir / "metrics.json", result)
    paths = write_report(out_dir, metrics, labels, probs, classes, title=f"{trained.architecture} on {split}",
                         details=details, baselines=baselines, operating_point=op, cam_images=cam_images)
    print(f"report: {paths['markdown']}  (html: {paths['html']})")
    if tracking is not None:
        _log_to_training_run(accelerator, RunDir(run_dir), tracking, split, result, paths, out_dir, cam_images)
    accelerator.wait_for_everyone()
    return result


def _log_to_training_run(accelerator: Accelerator, run_dir: RunDir, tracking: TrackingConfig, split: str,
                         result: dict, report_paths: dict[str, Path], out_dir: Path,
                         cam_images: list[tuple[str, str]]) -> None:
    """The evaluation's numbers, figures and files, added to the run that trained the model."""
    run_log = RunLog(accelerator, run_dir, tracking)
    numbers = {key: value for key, value in result.items()
               if key not in ("details", "skipped_samples", "metadata_problems", "confusion_matrix", "calibration")}
    run_log.log(split, numbers)
    figures = {f"{split}/{name}": report_paths[name] for name in ("confusion_matrix", "roc", "calibration")}
    figures.update({f"{split}/cam/{Path(path).stem}": out_dir / path for path, _ in cam_images})
    run_log.log_images(figures)
    run_log.log_files(f"evaluation-{run_dir.path.name}-{split}", "evaluation",
                      [report_paths["html"], report_paths["markdown"], out_dir / "metrics.json",
                       out_dir / "predictions.csv"])
    run_log.close()
    print(f"logged to the training run's trackers: {', '.join(tracking.tracker)}")


def _check_at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{option} must be {minimum} or more, got {value}")


def _positive_class(requested: str | None, classes: list[str], cancer_sensitivity: float | None) -> str | None:
    """The class of the cancer-versus-benign view: the one asked for, which must exist, else gastric_cancer
    when present (datasets without it simply get no such view, unless an operating point is asked for)."""
    if requested is None:
        if POSITIVE_CLASS in classes:
            return POSITIVE_CLASS
        if cancer_sensitivity is not None:
            raise UserError(f"--cancer-sensitivity needs a positive class and the model has no {POSITIVE_CLASS!r}; "
                            f"pass --positive-class, one of: {', '.join(classes)}")
        return None
    if requested not in classes:
        raise UserError(f"--positive-class {requested!r} is not one of the model's classes: {', '.join(classes)}")
    return requested


def _usable_predictions(predictions: dict, num_classes: int) -> tuple[dict, list[str]]:
    """`predict_split`'s result without the rows metrics cannot use, and why each was left out.

    A label outside the classes (the shard reader should already skip it; this keeps the metrics
    safe whatever fed them) or non-finite probabilities (weights that diverged) would otherwise
    stop the whole evaluation.
    """
    keys, labels, probs = predictions["keys"], predictions["labels"], predictions["probs"]
    label_ok = (labels >= 0) & (labels < num_classes)
    finite = np.isfinite(probs).all(axis=1)
    reasons = [f"{key}: label {label} is not a class index in 0..{num_classes - 1}" if not in_range
               else f"{key}: the model gave non-finite probabilities"
               for key, label, in_range, ok in zip(keys, labels, label_ok, finite) if not (in_range and ok)]
    keep = np.flatnonzero(label_ok & finite)
    usable = {**predictions, "keys": [keys[i] for i in keep], "labels": labels[keep], "probs": probs[keep],
              "meta": [predictions["meta"][i] for i in keep]}
    return usable, reasons


def _nothing_usable(index: ShardIndex, split: str, reasons: list[str]) -> RunFailure:
    names = [shard.path.name for shard in index.shards(split)]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    first = f"; first problem: {' '.join(reasons[0].split())[:300]}" if reasons else ""
    return RunFailure(f"no usable sample in the {split} split of {index.root} ({shown}){first}; "
                     f"check it with `gastro-dist verify {index.root}` or re-pack the data")


def _sample_metadata(texts: list[str], keys: list[str]) -> tuple[list[dict], list[str]]:
    """Each sample's .json member as {source, patient_id} strings, and the problems met on the way.

    A sample with broken metadata is still evaluated, with the broken fields empty: its image and
    label are intact, and leaving it out would change the measured accuracy for a fault that does
    not touch it. What is lost is its patient id, so the bootstrap counts it as a patient of its
    own; every such sample is listed in metrics.json (metadata_problems) so that this is visible.
    """
    metas, problems = [], []
    for text, key in zip(texts, keys):
        try:
            meta = json.loads(text)
        except (TypeError, ValueError, RecursionError) as err:
            problems.append(f"{key}: sample .json is not JSON ({err})")
            meta = {}
        if not isinstance(meta, dict):
            problems.append(f"{key}: sample .json is not an object")
            meta = {}
        wrong = [field for field in ("source", "patient_id") if not isinstance(meta.get(field, ""), (str, type(None)))]
        if wrong:
            problems.append(f"{key}: {' and '.join(wrong)} in sample .json is not text; left empty")
        metas.append({field: meta.get(field) for field in ("source", "patient_id") if field not in wrong})
    return metas, problems


def _write_predictions_csv(path: Path, keys: list[str], metas: list[dict], labels: np.ndarray, probs: np.ndarray,
                           classes: list[str]) -> None:
    """One row per sample; text from the shards and model.json goes through `csv_text`, numbers do not."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "source", "patient_id", "true_label", "predicted_label", *[f"prob_{c}" for c in classes]])
        for key, meta, label, p in zip(keys, metas, labels, probs):
            text = [key, meta.get("source") or "", meta.get("patient_id") or "", classes[label],
                    classes[int(p.argmax())]]
            writer.writerow([*map(csv_text, text), *[f"{v:.6f}" for v in p]])


# ---------------------------------------------------------------- Grad-CAM
def read_shard_images(index: ShardIndex, split: str, keys: set[str], max_member_bytes: int) -> dict[str, bytes]:
    """Image bytes of the given sample keys, through the shards' reader (members of ours only,
    size-capped, nothing decoded or unpickled). A shard that cannot be read is passed over: its
    samples were reported as skipped already."""
    found: dict[str, bytes] = {}
    for shard in index.shards(split):
        try:
            for sample in iter_shard_samples(shard.path, max_member_bytes, members=frozenset({"jpg", "png"})):
                image_bytes = sample.members.get("jpg") or sample.members.get("png")
                if sample.key in keys and image_bytes and not sample.problem:
                    found[sample.key] = image_bytes
        except ShardReadError:
            continue
        if len(found) == len(keys):
            break
    return found


def cam_overlays(trained: TrainedModel, images: list, class_index: list[int] | None = None,
                 device: torch.device | None = None) -> list:
    """Grad-CAM overlays (PIL images) on the center crop the model saw, for the predicted or given classes."""
    device = device or default_device()
    model = trained.model.to(device)
    data_cfg = trained.data_config()
    transform = eval_transform(data_cfg)
    batch = torch.stack([transform(img) for img in images]).to(device)
    cams, logits = gradcam.grad_cam(model, batch, class_index=class_index)
    mean = torch.tensor(data_cfg.mean, device=device).view(3, 1, 1)
    std = torch.tensor(data_cfg.std, device=device).view(3, 1, 1)
    overlays = []
    for tensor, cam in zip(batch, cams):
        pixels = ((tensor * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        overlays.append(gradcam.overlay_heatmap(pixels, cam.detach().cpu().numpy()))
    return overlays


def _misclassified_cams(trained: TrainedModel, index: ShardIndex, split: str, predictions: dict,
                        per_class: int, out_dir: Path) -> list[tuple[str, str]]:
    """Overlays of the `per_class` most confident mistakes of each true class, in out_dir/cam.

    File names come from sample keys, which the shards chose: `safe_name` keeps them inside cam/.
    """
    labels, probs, keys = predictions["labels"], predictions["probs"], predictions["keys"]
    predicted = probs.argmax(1)
    chosen = []
    for k in range(len(trained.classes)):
        wrong = np.flatnonzero((labels == k) & (predicted != k))
        wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:per_class]
        chosen.extend(int(i) for i in wrong)
    if not chosen:
        return []
    stored = read_shard_images(index, split, {keys[i] for i in chosen}, DataConfig.max_member_mb << 20)
    readable, images = [], []
    for i in chosen:
        try:
            images.append(load_rgb(stored[keys[i]]))
        except (KeyError, BadImage):  # gone from the shard since, or beyond PIL though the reader decoded it
            continue
        readable.append(i)
    if len(readable) < len(chosen):
        print(f"warning: {len(chosen) - len(readable)} misclassified images could not be read again: no Grad-CAM "
              "for them")
    if not readable:
        return []
    cam_dir = out_dir / "cam"
    cam_dir.mkdir(exist_ok=True)
    classes = trained.classes
    names = distinct_names([safe_name(keys[i]) for i in readable], [keys[i] for i in readable])
    overlays = cam_overlays(trained, images, [int(predicted[i]) for i in readable])
    result = []
    for i, name, overlay in zip(readable, names, overlays):
        overlay.save(cam_dir / f"{name}.png")
        caption = (f"{keys[i]}: true {classes[labels[i]]}, predicted {classes[predicted[i]]} "
                   f"({probs[i, predicted[i]]:.2f}); heatmap for the predicted class")
        result.append((f"cam/{name}.png", caption))
    return result


def cam_files(trained: TrainedModel, images: list[str | Path], out_dir: str | Path,
              class_name: str | None = None) -> tuple[list[Path], list[str]]:
    """`gastro-dist cam`: one overlay PNG per image file, for the predicted class or `class_name`.

    Overlays are named STEM_cam.png; inputs that share a stem (a/x.jpg, b/x.jpg) get a digest of
    their path in the name instead of overwriting each other. An image that cannot be read gets one
    line on stderr and the others go on. Returns the overlays written and the inputs that failed.
    """
    if class_name is not None and class_name not in trained.classes:
        raise UserError(f"--class {class_name!r} is not one of the model's classes {trained.classes}")
    out_dir = Path(out_dir)
    paths = [Path(p) for p in images]
    check_output_folder(out_dir, paths)
    stems = distinct_names([safe_name(p.stem) for p in paths], [str(p) for p in paths])
    outputs = [out_dir / f"{stem}_cam.png" for stem in stems]
    inputs = file_identities(paths)
    for out in outputs:
        if file_identities([out]) & inputs:
            raise UserError(f"--out {out_dir}: writing {out.name} would overwrite an input image before it is read; "
                            "choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = None if class_name is None else [trained.classes.index(class_name)]
    written, failed = [], []
    for path, out in zip(paths, outputs):
        try:
            image = load_rgb(path)
        except BadImage as bad:
            print(f"error: {path}: {bad.reason}", file=sys.stderr)
            failed.append(str(path))
            continue
        cam_overlays(trained, [image], target)[0].save(out)
        written.append(out)
        print(out)
    return written, failed
