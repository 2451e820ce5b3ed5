"""`evaluate` and `cam`: a trained run measured the way clinicians read it (predictions.csv,
metrics.json, the report and MODEL_CARD.md; what each holds: README "Evaluation"), per image and per
patient, with the run's temperature scaling applied, every sample the metrics cannot use left out
and listed, and every file name built from shard content kept inside --out."""

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
from gastro_dist.evaluation.inference import for_inference, full_precision
from gastro_dist.evaluation.metrics import (PATIENT_AGGREGATIONS, dummy_baselines, evaluate_predictions,
                                            operating_point, patient_level)
from gastro_dist.evaluation.model_card import model_card_blocks
# The reader of the predictions.csv written here, where callers have imported it from.
from gastro_dist.evaluation.report import headline_lines, write_markdown, write_report
from gastro_dist.files import csv_text, distinct_names, safe_name
from gastro_dist.progress import progress
from gastro_dist.run_dir import RunDir, write_run_json
from gastro_dist.tracking import RunLog, accelerator_tracking_kwargs, check_trackers_installed, tracking_of_run
from gastro_dist.training.distributed import checked_shard_index, forgets_accelerator_settings
from gastro_dist.training.calibration import calibrated_probabilities
from gastro_dist.training.predict import predict_split

POSITIVE_CLASS = "gastric_cancer"  # the cancer-versus-benign view's class, when the model has it


@forgets_accelerator_settings
def evaluate_run(run_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, split: str = "test",
                 checkpoint: str = "best", num_bootstrap: int = 1000, seed: int = 0,
                 cancer_sensitivity: float | None = None, positive_class: str | None = None,
                 cam_misclassified: int = 0, batch_size: int = 64, num_workers: int = 2, track: bool = True,
                 patient_aggregation: str = "mean") -> dict:
    """Evaluate RUN on a split of the shards; returns metrics.json's content (on every rank).

    `positive_class` None means gastric_cancer if the model has that class, else no cancer view.
    Probabilities are softmax(logits / T) with the run's temperature T; ECE, Brier and NLL are also
    reported at T = 1. Where samples have patient ids (or come from one video), the metrics are also
    given per patient (`patient_aggregation`: "mean" of the frames' probabilities, or "max" for the
    positive class). With `track`, the metrics, figures and report also go to the training run's
    trackers (RUN/tracking.json).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_options(cancer_sensitivity, num_bootstrap, cam_misclassified, batch_size, num_workers, patient_aggregation)
    trained = load_trained_model(run_dir, checkpoint)
    positive_class = _positive_class(positive_class, trained.classes, cancer_sensitivity)
    if patient_aggregation == "max" and positive_class is None:
        raise UserError(f"--patient-aggregation max takes the largest probability of the positive class, and the "
                        f"model has no {POSITIVE_CLASS!r}; pass --positive-class, one of: {', '.join(trained.classes)}")
    index = _checked_shards(shards_dir, trained, split, cancer_sensitivity)
    tracking = tracking_of_run(RunDir(run_dir)) if track else None
    if tracking is not None:
        check_trackers_installed(tracking)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              **(accelerator_tracking_kwargs(tracking, RunDir(run_dir)) if tracking else {}))
    data_cfg = trained.data_config(batch_size=batch_size, num_workers=num_workers)
    num_listed = index.count(split)
    # counts and sha256 of the shards read first: the plan asks only for samples that are there
    scanned_splits = sorted({split, "val"} if cancer_sensitivity is not None else {split})
    index, shard_problems = checked_shard_index(accelerator, index, scanned_splits, data_cfg.max_member_mb,
                                                run_dir=Path(run_dir))
    predictions, rejected = _predict(accelerator, trained, index, data_cfg, split, num_listed)
    selection = _predict(accelerator, trained, index, data_cfg, "val")[0] if cancer_sensitivity is not None else None
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}
    for problem in shard_problems[:10]:
        print(f"warning: {problem}")

    classes = index.classes
    metas, meta_problems = _sample_metadata(predictions["meta"], predictions["keys"])
    groups = np.array([bootstrap_unit(meta, key) for meta, key in zip(metas, predictions["keys"])], dtype=object)
    labels, probs = predictions["labels"], predictions["probs"]
    metrics, temperature_scaling, patients, cases = _metrics_with_cis(
        RunDir(run_dir), trained.temperature, predictions, groups, classes, positive_class, patient_aggregation,
        num_bootstrap, seed)
    train_counts = index.per_class("train") if "train" in index.splits else {}
    train_labels = np.repeat(np.arange(len(classes)), [int(train_counts.get(c, 0)) for c in classes]) if train_counts else None
    baselines = dummy_baselines(labels, classes, groups=groups, seed=seed, train_labels=train_labels,
                                positive_class=positive_class)
    op = None
    if selection is not None:
        op = operating_point(selection["labels"], selection["probs"], labels, probs, classes,
                             target_sensitivity=cancer_sensitivity, positive_class=positive_class, selected_on="val",
                             groups_report=groups)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_predictions_csv(out_dir / "predictions.csv", predictions["keys"], metas, groups, labels, probs,
                           predictions["logits"], classes)
    if cases is not None:
        _write_patient_csv(out_dir / "patient_predictions.csv", cases, classes)
    names = [meta.get("source") or key for meta, key in zip(metas, predictions["keys"])]
    cam_images = _cam_gallery(trained, index, split, predictions, names, cam_misclassified, out_dir) \
        if cam_misclassified else []
    details = {"run": str(run_dir), "model": trained.architecture, "checkpoint": trained.checkpoint,
               "shards": location_record(index.root), "split": split, "images": len(labels),
               "patients": len(set(groups.tolist())), "input size": trained.image_size,
               "temperature": round(trained.temperature, 4)}
    num_skipped = predictions["missing"] + len(rejected)
    result = {**metrics, "details": details, "temperature_scaling": temperature_scaling, "patient_level": patients,
              "baselines": baselines, "operating_point": op,
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
    card = model_card_blocks(trained.meta, RunDir(run_dir), index, result)
    write_markdown(out_dir / "MODEL_CARD.md", card)
    with_ids = sum(not unit.startswith("image:") for unit in groups)
    provenance = {"synthetic": index.synthetic,
                  "patient_ids": "all" if with_ids == len(groups) else "none" if with_ids == 0 else "some"}
    paths = write_report(out_dir, metrics, labels, probs, classes, title=f"{trained.architecture} on the {split} split",
                         details=details, baselines=baselines, operating_point=op, cam_images=cam_images,
                         temperature_scaling=temperature_scaling, patient_level=patients, model_card=card,
                         provenance=provenance)
    print("\n".join(headline_lines(metrics, classes, details, op)))
    print(f"report: {paths['markdown']}  (html: {paths['html']}; model card: {out_dir / 'MODEL_CARD.md'})")
    if tracking is not None:
        _log_to_training_run(accelerator, RunDir(run_dir), tracking, split, result, paths, out_dir, cam_images)
    accelerator.wait_for_everyone()
    return result


def _check_options(cancer_sensitivity: float | None, num_bootstrap: int, cam_misclassified: int, batch_size: int,
                   num_workers: int, patient_aggregation: str) -> None:
    if cancer_sensitivity is not None and not 0 < cancer_sensitivity <= 1:
        raise UserError("--cancer-sensitivity must be a fraction in (0, 1], e.g. 0.95")
    for option, value, minimum in (("--bootstrap", num_bootstrap, 0), ("--cam-misclassified", cam_misclassified, 0),
                                   ("--batch-size", batch_size, 1), ("--workers", num_workers, 0)):
        _check_at_least(option, value, minimum)
    if patient_aggregation not in PATIENT_AGGREGATIONS:
        raise UserError(f"--patient-aggregation must be one of {', '.join(PATIENT_AGGREGATIONS)}, "
                        f"not {patient_aggregation!r}")


def _checked_shards(shards_dir: str | Path, trained: TrainedModel, split: str,
                    cancer_sensitivity: float | None) -> ShardIndex:
    """The shard index, refused when it cannot serve this evaluation."""
    index = load_shard_index(shards_dir)
    if index.classes != trained.classes:
        raise UserError(f"the shards' classes {index.classes} differ from the model's {trained.classes}; "
                        "evaluate on shards packed from the same class folders")
    if index.count(split) == 0:
        raise UserError(f"the {split} split of {index.root} is empty; pack with --test-per-class N, or pass --split val")
    if cancer_sensitivity is not None and index.count("val") == 0:
        raise UserError(f"--cancer-sensitivity picks its threshold on the val split, which is empty in {index.root}; "
                        "re-pack with --val-fraction above 0, or leave the option out")
    return index


def _predict(accelerator: Accelerator, trained: TrainedModel, index: ShardIndex, data_cfg: DataConfig, split: str,
             num_listed: int | None = None) -> tuple[dict, list[str]]:
    """Calibrated predictions of every usable sample of `split` (all ranks), and why others were left out.
    With `num_listed` (the index's count before the shard scan), the evaluated split: a split with no
    usable sample is an error, and samples the shards lack count as missing."""
    predicted = predict_split(accelerator, for_inference(trained.model, accelerator.device), index, data_cfg, split,
                              channels_last=True,
                              with_meta=num_listed is not None,
                              progress_label=f"predicting the {split} split" if num_listed is not None else None)
    if num_listed is not None:
        predicted["missing"] += num_listed - index.count(split)
    predictions, rejected = _usable_predictions(_calibrated(predicted, trained.temperature), len(index.classes))
    if num_listed is not None and not predictions["keys"]:
        raise _nothing_usable(index, split, predictions["skipped"] + rejected)
    return predictions, rejected


def _metrics_with_cis(run_dir: RunDir, temperature: float, predictions: dict, groups: np.ndarray, classes: list[str],
                      positive_class: str | None, patient_aggregation: str, num_bootstrap: int,
                      seed: int) -> tuple[dict, dict, dict | None, dict | None]:
    """(metrics, temperature scaling before/after, patient-level metrics or None, patient cases or None),
    every set with its bootstrap CIs, the bootstrap's progress shown."""
    labels, probs, logits = predictions["labels"], predictions["probs"], predictions["logits"]
    has_patients = any(not unit.startswith("image:") for unit in groups)
    with progress(Console(stderr=True), unit="resamples", transient=True) as bar:
        task = bar.add_task("bootstrap", total=num_bootstrap * (1 + has_patients + (temperature != 1.0)))

        def metrics_of(y, p, units, positive):
            return evaluate_predictions(y, p, classes, groups=units, num_bootstrap=num_bootstrap, seed=seed,
                                        positive_class=positive, on_resamples=lambda n: bar.advance(task, n))

        metrics = metrics_of(labels, probs, groups, positive_class)
        uncalibrated = metrics if temperature == 1.0 else metrics_of(labels, calibrated_probabilities(logits), groups,
                                                                     None)
        temperature_scaling = _temperature_scaling(temperature, run_dir, uncalibrated, metrics)
        if not has_patients:
            return metrics, temperature_scaling, None, None
        cases = patient_level(labels, probs, groups, patient_aggregation,
                              classes.index(positive_class) if positive_class else None)
        patients = {"aggregation": patient_aggregation, "num_patients": len(set(cases["groups"].tolist())),
                    "num_cases": len(cases["labels"]),
                    "frames_per_case": {"min": int(cases["num_frames"].min()),
                                        "median": float(np.median(cases["num_frames"])),
                                        "max": int(cases["num_frames"].max())},
                    "metrics": metrics_of(cases["labels"], cases["probs"], cases["groups"], positive_class)}
    return metrics, temperature_scaling, patients, cases


def _log_to_training_run(accelerator: Accelerator, run_dir: RunDir, tracking: TrackingConfig, split: str,
                         result: dict, report_paths: dict[str, Path], out_dir: Path,
                         cam_images: list[tuple[str, str]]) -> None:
    """The evaluation's numbers, figures and files, added to the run that trained the model."""
    run_log = RunLog(accelerator, run_dir, tracking)
    numbers = {key: value for key, value in result.items()
               if key not in ("details", "skipped_samples", "metadata_problems", "confusion_matrix", "calibration")}
    if numbers.get("patient_level"):
        numbers["patient_level"] = {key: value for key, value in numbers["patient_level"]["metrics"].items()
                                    if key not in ("confusion_matrix", "calibration")}
    run_log.log(split, numbers)
    figures = {f"{split}/{name}": report_paths[name] for name in ("confusion_matrix", "roc", "calibration")}
    figures.update({f"{split}/cam/{Path(path).stem}": out_dir / path for path, _ in cam_images})
    run_log.log_images(figures)
    run_log.log_files(f"evaluation-{run_dir.path.name}-{split}", "evaluation",
                      [report_paths["html"], report_paths["markdown"], out_dir / "metrics.json",
                       out_dir / "predictions.csv", out_dir / "MODEL_CARD.md"])
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


def _calibrated(predictions: dict, temperature: float) -> dict:
    """`predict_split`'s result with probs = softmax(logits / temperature) in float64 (`calibrated_probabilities`).

    Without logits (a caller that has only probabilities), log(probs) stands for them: it differs
    from the logits by a constant per row, which the softmax removes.
    """
    logits = predictions.get("logits")
    if logits is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            logits = np.log(np.asarray(predictions["probs"], dtype=np.float64))
    logits = np.asarray(logits, dtype=np.float64).reshape(len(predictions["keys"]), np.shape(predictions["probs"])[-1])
    return {**predictions, "logits": logits, "probs": calibrated_probabilities(logits, temperature)}


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
              "logits": predictions["logits"][keep], "meta": [predictions["meta"][i] for i in keep]}
    return usable, reasons


def _nothing_usable(index: ShardIndex, split: str, reasons: list[str]) -> RunFailure:
    names = [shard.path.name for shard in index.shards(split)]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    first = f"; first problem: {' '.join(reasons[0].split())[:300]}" if reasons else ""
    return RunFailure(f"no usable sample in the {split} split of {index.root} ({shown}){first}; "
                     f"check it with `gastro-dist verify {index.root}` or re-pack the data")


def _sample_metadata(texts: list[str], keys: list[str]) -> tuple[list[dict], list[str]]:
    """Each sample's .json member as {source, patient_id, source_kind} strings and frame_index (an int),
    and the problems met on the way.

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
        wrong = [field for field in ("source", "patient_id", "source_kind")
                 if not isinstance(meta.get(field, ""), (str, type(None)))]
        frame_index = meta.get("frame_index")
        if frame_index is not None and (not isinstance(frame_index, int) or isinstance(frame_index, bool)):
            wrong.append("frame_index")
        if wrong:
            problems.append(f"{key}: {' and '.join(wrong)} in sample .json is not "
                            f"{'a whole number' if wrong == ['frame_index'] else 'text'}; left empty")
        metas.append({field: meta.get(field) for field in ("source", "patient_id", "source_kind", "frame_index")
                      if field not in wrong})
    return metas, problems


def bootstrap_unit(meta: dict, key: str) -> str:
    """The unit a sample is resampled with: its patient; without a patient id, the video (or
    multi-frame DICOM) it is a frame of, so that one video's frames never count as independent
    patients; else the image itself. Prefixed (patient:, source:, image:) so that the kinds never meet."""
    if meta.get("patient_id"):
        return f"patient:{meta['patient_id']}"
    if meta.get("source") and (meta.get("frame_index") is not None or meta.get("source_kind") == "video"):
        return f"source:{meta['source']}"
    return f"image:{key}"


def _temperature_scaling(temperature: float, run_dir: RunDir, before: dict, after: dict) -> dict:
    """metrics.json's temperature_scaling: T, how it was fitted (summary.json), calibration at T = 1 and at T."""
    fit = run_dir.read_summary().get("calibration")

    def calibration(metrics: dict) -> dict:
        ci = metrics.get("ci") or {}
        return {"ece": metrics["ece"], "ece_debiased": metrics["ece_debiased"],
                "ece_debiased_ci": ci.get("ece_debiased"), "brier": metrics["brier"], "brier_ci": ci.get("brier"),
                "nll": metrics["nll"]}

    return {"temperature": temperature, "fit": fit if isinstance(fit, dict) else None,
            "before": calibration(before), "after": calibration(after)}


def _write_predictions_csv(path: Path, keys: list[str], metas: list[dict], groups: np.ndarray, labels: np.ndarray,
                           probs: np.ndarray, logits: np.ndarray, classes: list[str]) -> None:
    """One row per sample: the probabilities metrics.json was computed from and the logits, at full
    precision (`full_precision`), so that every metric can be recomputed from this file exactly; the
    bootstrap unit as `group`. Text from the shards and model.json goes through `csv_text`, numbers do not."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "source", "patient_id", "group", "true_label", "predicted_label",
                         *[f"prob_{c}" for c in classes], *[f"logit_{c}" for c in classes]])
        for key, meta, group, label, p, z in zip(keys, metas, groups, labels, probs, logits):
            text = [key, meta.get("source") or "", meta.get("patient_id") or "", group, classes[label],
                    classes[int(p.argmax())]]
            writer.writerow([*map(csv_text, text), *map(full_precision, p), *map(full_precision, z)])


def _write_patient_csv(path: Path, cases: dict, classes: list[str]) -> None:
    """One row per (patient, true class) case of the patient-level metrics, probabilities at full precision."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "true_label", "predicted_label", "num_frames", *[f"prob_{c}" for c in classes]])
        for group, label, p, count in zip(cases["groups"], cases["labels"], cases["probs"], cases["num_frames"]):
            writer.writerow([*map(csv_text, [str(group), classes[label], classes[int(p.argmax())]]), int(count),
                             *map(full_precision, p)])


# ---------------------------------------------------------------- Grad-CAM
def read_shard_images(index: ShardIndex, split: str, keys: set[str], max_member_bytes: int) -> dict[str, bytes]:
    """Image bytes of the given sample keys, through the shards' reader (members of ours only,
    size-capped, nothing decoded or unpickled). A shard that cannot be read is passed over: its
    samples were reported as skipped already."""
    found: dict[str, bytes] = {}
    for shard in index.shards(split):
        try:
            for sample in iter_shard_samples(shard.path, max_member_bytes, members=frozenset({"jpg", "png"}),
                                             listed_bytes=shard.num_bytes):
                image_bytes = sample.members.get("jpg") or sample.members.get("png")
                if sample.key in keys and image_bytes and not sample.problem:
                    found[sample.key] = image_bytes
        except ShardReadError:
            continue
        if len(found) == len(keys):
            break
    return found


def cam_panels(trained: TrainedModel, images: list, class_index: list[int] | None = None,
               true_labels: list[int] | None = None, device: torch.device | None = None,
               names: list[str] | None = None) -> list:
    """Grad-CAM panels (`cam.cam_panel`, PIL images) of frames: each frame beside the heatmap laid on the
    part the network saw, captioned with its name (when given: the source file or its pseudonym), the true
    class (when given), the predicted class and its probability (temperature-scaled, as evaluate and
    predict report it) and the class the heatmap explains: the predicted one, or `class_index` (one for
    all, or one per image)."""
    device = device or default_device()
    model = trained.model.to(device)
    data_cfg = trained.data_config()
    transform = eval_transform(data_cfg)
    batch = torch.stack([transform(img) for img in images]).to(device)
    cams, logits = gradcam.grad_cam(model, batch, class_index=class_index)
    probs = torch.softmax(logits.float() / trained.temperature, dim=1).numpy()
    classes, size = trained.classes, trained.image_size
    panels = []
    for n, (image, cam, p) in enumerate(zip(images, cams, probs)):
        predicted = int(p.argmax())
        explained = predicted if class_index is None else int(class_index[0 if len(class_index) == 1 else n])
        truth = "" if true_labels is None else f"true: {classes[true_labels[n]]} · "
        caption = ([names[n]] if names else []) + [f"{truth}predicted: {classes[predicted]} ({p[predicted]:.1%})",
                   f"heatmap: evidence for {classes[explained]}"
                   + ("" if explained == predicted else f" ({p[explained]:.1%})")
                   + f"; outlined: the {size}x{size} px network input"]
        box = gradcam.eval_crop_box(*image.size, size, data_cfg.eval_crop_ratio)
        panels.append(gradcam.cam_panel(image, cam.numpy(), box, caption))
    return panels


def _cam_gallery(trained: TrainedModel, index: ShardIndex, split: str, predictions: dict, names: list[str],
                 per_class: int, out_dir: Path) -> list[tuple[str, str]]:
    """Grad-CAM panels in out_dir/cam for each true class: its `per_class` most confident correct images and its
    `per_class` most confident mistakes, side by side in the report. ``names`` (the source file, or its
    pseudonym, else the key) caption them.

    File names come from sample keys, which the shards chose: `safe_name` keeps them inside cam/.
    """
    labels, probs, keys = predictions["labels"], predictions["probs"], predictions["keys"]
    predicted = probs.argmax(1)
    chosen = []
    for k in range(len(trained.classes)):
        for wanted in ((labels == k) & (predicted == k), (labels == k) & (predicted != k)):
            found = np.flatnonzero(wanted)
            chosen.extend(int(i) for i in found[np.argsort(-probs[found, predicted[found]], kind="stable")][:per_class])
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
        print(f"warning: {len(chosen) - len(readable)} images chosen for Grad-CAM could not be read again: no panel "
              "for them")
    if not readable:
        return []
    cam_dir = out_dir / "cam"
    cam_dir.mkdir(exist_ok=True)
    classes = trained.classes
    files = distinct_names([safe_name(keys[i]) for i in readable], [keys[i] for i in readable])
    panels = cam_panels(trained, images, [int(predicted[i]) for i in readable], [int(labels[i]) for i in readable],
                        names=[names[i] for i in readable])
    result = []
    for i, file, panel in zip(readable, files, panels):
        panel.save(cam_dir / f"{file}.png")
        verdict = "correct" if predicted[i] == labels[i] else "mistake"
        caption = (f"{verdict}: {names[i]}: true {classes[labels[i]]}, predicted {classes[predicted[i]]} "
                   f"({probs[i, predicted[i]]:.2f}); heatmap for the predicted class")
        result.append((f"cam/{file}.png", caption))
    return result


def cam_files(trained: TrainedModel, images: list[str | Path], out_dir: str | Path,
              class_name: str | None = None) -> tuple[list[Path], list[str]]:
    """`gastro-dist cam`: one Grad-CAM panel PNG per image file (`cam_panels`), for the predicted class or
    `class_name`.

    Overlays are named STEM_cam.png; inputs that share a stem (a/x.jpg, b/x.jpg) get a digest of
    their path in the name instead of overwriting each other. An image that cannot be read gets one
    line on stderr and the others go on. Returns the overlays written and the inputs that failed.
    """
    if class_name is not None and class_name not in trained.classes:
        raise UserError(f"--class {class_name!r} is not one of the model's classes {trained.classes}")
    out_dir = Path(out_dir)
    paths = [Path(p) for p in images]
    folder = next((path for path in paths if path.is_dir()), None)
    if folder is not None:
        raise UserError(f"{folder} is a folder and cam takes image files: pass them ({folder}/*.jpg), or use "
                        f"`gastro-dist predict --run RUN {folder}` for the folder's predictions and `gastro-dist evaluate "
                        "... --cam N` for a report with Grad-CAM panels of each class")
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
        cam_panels(trained, [image], target)[0].save(out)
        written.append(out)
        print(out)
    return written, failed
