"""Evaluation reports for clinicians: one list of blocks rendered to Markdown (images linked) and to
self-contained HTML (images inlined), so the two never disagree; figures on matplotlib's Agg canvas.
The model card (`model_card`) and the comparison (`compare`) are written with the same blocks."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from gastro_dist.evaluation.intervals import exact_interval
from gastro_dist.evaluation.metrics import roc_curve

FIGURE_DPI = 120


def write_report(
    out_dir,
    metrics: dict,
    y_true,
    probs,
    classes: list[str],
    title: str,
    details: dict | None = None,
    baselines: dict | None = None,
    operating_point: dict | None = None,
    cam_images: list[tuple[str, str]] | None = None,
    temperature_scaling: dict | None = None,
    patient_level: dict | None = None,
    model_card: list | None = None,
    provenance: dict | None = None,
) -> dict[str, Path]:
    """Write confusion_matrix.png, roc.png, calibration.png, report.md and report.html into ``out_dir``.

    ``metrics`` comes from ``evaluate_predictions(y_true, probs, classes, ...)``; ``details`` holds
    rows for the header table (model, checkpoint, split, ...), in order; ``baselines`` is
    ``dummy_baselines(...)``; ``operating_point`` is ``metrics.operating_point(...)``;
    ``cam_images`` are (path relative to ``out_dir``, caption) pairs of Grad-CAM panels, shown as a
    gallery; ``temperature_scaling`` and ``patient_level`` are metrics.json's entries of those names;
    ``model_card`` the blocks of `model_card.model_card_blocks`, added as the report's last section;
    ``provenance`` what the data are: {"synthetic": index.json's synthetic record or None, "patient_ids":
    "all", "some" or "none"}, shown as banners at the top.
    Returns the paths keyed confusion_matrix, roc, calibration, markdown, html.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    if len(y_true) != metrics["num_samples"] or list(classes) != metrics["classes"]:
        raise ValueError("y_true/classes do not belong to these metrics")

    paths = {
        "confusion_matrix": out_dir / "confusion_matrix.png",
        "roc": out_dir / "roc.png",
        "calibration": out_dir / "calibration.png",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    _save(_confusion_figure(np.array(metrics["confusion_matrix"]), classes), paths["confusion_matrix"])
    _save(_roc_figure(metrics, y_true, probs, classes, operating_point), paths["roc"])
    _save(_calibration_figure(metrics), paths["calibration"])

    blocks = _report_blocks(metrics, classes, title, details, baselines, operating_point, cam_images,
                            temperature_scaling, patient_level, provenance or {})
    if model_card:
        blocks += [Heading(block.text, block.level + 1) if isinstance(block, Heading) else block
                   for block in model_card]
    paths["markdown"].write_text(render_markdown(blocks), encoding="utf-8")
    paths["html"].write_text(render_html(blocks, title, out_dir), encoding="utf-8")
    return paths


def write_markdown(path: Path, blocks: list) -> None:
    """Blocks as a Markdown file (images linked relative to its folder)."""
    Path(path).write_text(render_markdown(blocks), encoding="utf-8")


# ----------------------------------------------------------------------------- report content


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str  # `code` spans are the only markup


@dataclass
class Banner:
    text: str  # a warning the reader must see before the numbers


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Images:
    items: list[tuple[str, str]]  # (path relative to the report, caption)
    gallery: bool = False  # in HTML, a grid of thumbnails at the page's width instead of one per line


def _report_blocks(metrics, classes, title, details, baselines, operating_point, cam_images,
                   temperature_scaling=None, patient_level=None, provenance=None) -> list:
    ci = metrics["ci"] or {}
    details = details or {}
    blocks: list = [Heading(title, level=1), *_banners(metrics, provenance or {})]
    blocks += _headline_blocks(metrics, classes, details, operating_point)

    detail_rows = [[str(key), str(value)] for key, value in details.items()]
    given = {key.lower() for key, _ in detail_rows}
    if "images" not in given:
        detail_rows.append(["Images", str(metrics["num_samples"])])
    if "patients" not in given and metrics["num_groups"] is not None:
        detail_rows.append(["Patients", str(metrics["num_groups"])])
    blocks += [Heading("Run details"), Table(["Detail", "Value"], detail_rows)]

    notes = _FlagNotes()
    blocks += [
        Heading("Per-class metrics (one class vs the rest)"),
        Paragraph("Sensitivity is the share of a class's images the model assigns to it, the per-class accuracy the "
                  "reference study reports; specificity, PPV and NPV treat the class as the positive finding and "
                  "every other class as negative."),
        Table(["Class", "Recognised", "Sensitivity (95% CI)", "Specificity (95% CI)", "PPV (95% CI)", "NPV (95% CI)",
               "F1", "AUC (95% CI)"], [
            [display_name(name), f"{metrics['confusion_matrix'][k][k]}/{row['support']}",
             *[notes.cell(row[key], ci.get(f"per_class_{ci_key}", {}).get(name), _percent)
               for key, ci_key in (("sensitivity", "accuracy"), ("specificity", "specificity"), ("ppv", "ppv"),
                                   ("npv", "npv"))],
             _decimal(row["f1"]), notes.cell(row["auc"], ci.get("per_class_auc", {}).get(name), _decimal)]
            for k, (name, row) in enumerate((name, metrics["per_class"][name]) for name in classes)
        ]),
        *notes.flush(),
        Heading("Overall"),
        Table(["Metric", "Value (95% CI)"], [
            ["Accuracy", notes.cell(metrics["accuracy"], ci.get("accuracy"), _percent)],
            ["Balanced accuracy", notes.cell(metrics["balanced_accuracy"], ci.get("balanced_accuracy"), _percent)],
            ["Macro-F1", notes.cell(metrics["macro_f1"], ci.get("macro_f1"), _decimal)],
            ["Macro AUC (one-vs-rest)", notes.cell(metrics["macro_auc"], ci.get("macro_auc"), _decimal)],
            ["MCC", notes.cell(metrics["mcc"], ci.get("mcc"), _decimal)],
            [ECE_NAME, notes.cell(metrics["ece_debiased"], ci.get("ece_debiased"), _decimal)],
            ["Brier score (0 best, 2 worst)", notes.cell(metrics["brier"], ci.get("brier"), _decimal)],
        ]),
        *notes.flush(),
    ]
    blocks += _calibration_blocks(metrics, temperature_scaling)
    if patient_level is not None:
        blocks += _patient_blocks(metrics, patient_level, classes)

    if metrics["cancer_vs_benign"] is not None:
        blocks += _positive_vs_rest_blocks(metrics["cancer_vs_benign"], ci.get("cancer_vs_benign") or {})

    if operating_point is not None:
        blocks += _operating_point_blocks(operating_point, str(details.get("split", "this split")))

    if baselines:
        blocks += _baseline_blocks(metrics, baselines)

    blocks += [Heading("Methods"), Paragraph(_methods_text(metrics))]
    blocks += [
        Heading("Figures"),
        Images([("confusion_matrix.png", "Confusion matrix: counts and share of each true class"),
                 ("roc.png", "ROC curves"),
                 ("calibration.png", "Reliability diagram: accuracy per confidence bin with its 95% CI and count")]),
    ]
    if cam_images:
        blocks += [Heading("Grad-CAM: correct examples and the most confident mistakes"),
                   Paragraph("For each true class, a few images the model got right and its most confident "
                             "mistakes. Left: the image as stored; right: the heatmap of the evidence for the "
                             "predicted class on the square the network saw (outlined; the rest dimmed), red where "
                             "that evidence is strongest (colour scale beside it). The map shows where the model "
                             "looked, not why it was right or wrong. Click a panel for its full size."),
                   Images([(str(path), caption) for path, caption in cam_images], gallery=True)]
    return blocks


ECE_NAME = "ECE (debiased, 15 bins)"
# The reference study: white-light gastroscopy, three classes, ResNet50 the best of its three backbones, one split
# of 150 test images per class, per-class accuracy without intervals.
REFERENCE_STUDY = {"gastric_cancer": 0.93, "gastric_ulcer": 0.92, "chronic_gastritis": 0.88}
REFERENCE_CITATION = ("the reference study (transfer-learning gastroscopic image recognition, Jinan University, "
                      "Academic Journal of Naval Medical University 2019: VGG19, ResNet50 and Inception-V3 adapted "
                      "in two steps; the best, ResNet50, recognised 93% of gastric cancer, 92% of gastric ulcer and "
                      "88% of chronic gastritis images, on one split of 150 test images per class, no intervals)")


def display_name(name: str) -> str:
    """A class name as a reader writes it: 'gastric_cancer' -> 'Gastric cancer'. Files keep the names."""
    text = " ".join(str(name).replace("_", " ").replace("-", " ").split())
    return text[:1].upper() + text[1:] if text else str(name)


def _banners(metrics: dict, provenance: dict) -> list:
    banners = []
    synthetic = provenance.get("synthetic")
    if synthetic:
        banners.append(Banner(f"Synthetic data: these images were rendered by `{synthetic.get('generator', 'synth')}` "
                              f"(seed {synthetic.get('seed', '?')}), not taken by an endoscope. The figures show the "
                              "pipeline works, not how a model would do on patients."))
    patient_ids = provenance.get("patient_ids")
    if patient_ids is None:
        patient_ids = "all" if metrics["num_groups"] is not None and metrics["num_groups"] < metrics["num_samples"] \
            else None
    if patient_ids == "none":
        banners.append(Banner("No patient ids: intervals and tests treat every image as independent. If patients "
                              "contributed several images, they are too narrow; pack with a manifest that has a "
                              "patient_id column."))
    elif patient_ids == "some":
        banners.append(Banner("Some images have no patient id: each of them counts as a patient of its own in the "
                              "intervals (frames of one video stay together)."))
    return banners


def headline_lines(metrics: dict, classes: list[str], details: dict, operating_point: dict | None) -> list[str]:
    """The report's first paragraph and one line per class (sensitivity and specificity with their intervals),
    as plain text: what `evaluate` prints when it is done."""
    ci = metrics["ci"] or {}
    lines = [_headline_text(metrics, details, operating_point).replace("`", "")]
    for name in classes:
        row = metrics["per_class"][name]
        lines.append(f"  {display_name(name)}: sensitivity "
                     f"{_with_ci(row['sensitivity'], ci.get('per_class_accuracy', {}).get(name), _percent)}, specificity "
                     f"{_with_ci(row['specificity'], ci.get('per_class_specificity', {}).get(name), _percent)} "
                     f"({row['support']} images)")
    return lines


def _headline_text(metrics: dict, details: dict, operating_point: dict | None) -> str:
    ci = metrics["ci"] or {}
    model = f"`{details['model']}`" if details.get("model") else "The model"
    split = f"the `{details['split']}` split" if details.get("split") else "these predictions"
    patients = metrics["num_groups"]
    counted = f"{metrics['num_samples']} images" + (f" of {patients} patients" if patients is not None else "")
    text = (f"{model} recognised {_with_ci(metrics['accuracy'], ci.get('accuracy'), _percent)} of the {counted} in "
            f"{split}; balanced accuracy {_with_ci(metrics['balanced_accuracy'], ci.get('balanced_accuracy'), _percent)}"
            f", macro AUC {_decimal(metrics['macro_auc'])}.")
    view = metrics["cancer_vs_benign"]
    if view is not None:
        view_ci = ci.get("cancer_vs_benign") or {}
        text += (f" {display_name(view['positive_class'])} versus the rest, read as the most probable class: "
                 f"sensitivity {_with_ci(view['sensitivity'], view_ci.get('sensitivity'), _percent)}, "
                 f"specificity {_with_ci(view['specificity'], view_ci.get('specificity'), _percent)}.")
    if operating_point is not None:
        text += " " + _operating_point_sentence(operating_point, split)
    return text


def _headline_blocks(metrics: dict, classes: list[str], details: dict, operating_point: dict | None) -> list:
    """The answer first: how good, for which class, how sure, on how many images and patients."""
    ci = metrics["ci"] or {}
    text = _headline_text(metrics, details, operating_point)
    reference = set(classes) == set(REFERENCE_STUDY)
    header = ["Class", "Images", "Patients", "Sensitivity (95% CI)", "Specificity (95% CI)"]
    if reference:
        header.append("Reference study, ResNet50")
    notes = _FlagNotes()
    rows = []
    for name in classes:
        row = metrics["per_class"][name]
        cells = [display_name(name), str(row["support"]), "—" if row.get("patients") is None else str(row["patients"]),
                 notes.cell(row["sensitivity"], ci.get("per_class_accuracy", {}).get(name), _percent),
                 notes.cell(row["specificity"], ci.get("per_class_specificity", {}).get(name), _percent)]
        if reference:
            cells.append(f"{REFERENCE_STUDY[name]:.0%}")
        rows.append(cells)
    cited = [Paragraph(f"The last column is {REFERENCE_CITATION}.")] if reference else []
    return [Paragraph(text), Table(header, rows), *notes.flush(), *cited]


def _operating_point_sentence(operating_point: dict, split: str) -> str:
    """What the threshold chosen on one split does on the evaluated one, and whether it kept its target."""
    reported = operating_point["metrics"]
    target = operating_point["target_sensitivity"]
    positive = display_name(operating_point["positive_class"])
    intervals = operating_point.get("intervals") or {}
    text = (f"At the threshold chosen on `{operating_point['selected_on']}` for a {positive.lower()} sensitivity of at "
            f"least {_percent(target)} (P = {operating_point['threshold']:.3f}), sensitivity is "
            f"{_with_ci(reported['sensitivity'], intervals.get('sensitivity'), _percent)} and specificity "
            f"{_with_ci(reported['specificity'], intervals.get('specificity'), _percent)} on {split}")
    if reported["sensitivity"] is not None and reported["sensitivity"] < target:
        return text + f": the target of {_percent(target)} was not reached on this split."
    return text + "."


class _FlagNotes:
    """Table cells 'value (lower – upper)', a † after an interval the simulation flags as approximate, and the
    footnote that says why (once per reason, under the table)."""

    def __init__(self):
        self.reasons: list[str] = []

    def cell(self, value, interval: dict | None, fmt) -> str:
        text = fmt(value)
        if interval is None:
            return text
        text += f" ({_bounds(interval, fmt)})"
        if interval.get("flag"):
            if interval["flag"] not in self.reasons:
                self.reasons.append(interval["flag"])
            text += " " + "†" * (self.reasons.index(interval["flag"]) + 1)
        return text

    def flush(self) -> list:
        blocks = [Paragraph(" ".join(f"{'†' * (k + 1)} {reason}." for k, reason in enumerate(self.reasons)))] \
            if self.reasons else []
        self.reasons = []
        return blocks


def _positive_vs_rest_blocks(view: dict, view_ci: dict) -> list:
    notes = _FlagNotes()
    positive = display_name(view["positive_class"])
    return [
        Heading(f"{positive} vs the rest"),
        Paragraph(f"Positive: {positive}; negative: " + ", ".join(display_name(name) for name in view["negative_classes"])
                  + f". An image counts as positive when {positive.lower()} is its most probable class; the AUC "
                  f"ranks images by P({positive.lower()})."),
        Table(["Metric", "Value (95% CI)"], [
            [label, notes.cell(view[key], view_ci.get(key), fmt)]
            for label, key, fmt in (("Sensitivity", "sensitivity", _percent), ("Specificity", "specificity", _percent),
                                    ("PPV", "ppv", _percent), ("NPV", "npv", _percent), ("AUC", "auc", _decimal))
        ]),
        *notes.flush(),
        Paragraph(f"TP {view['tp']}, FN {view['fn']}, FP {view['fp']}, TN {view['tn']}."),
    ]


def _operating_point_blocks(operating_point: dict, reported_split: str) -> list:
    intervals = operating_point.get("intervals") or {}
    notes = _FlagNotes()

    def row(split: str, values: dict, with_intervals: dict) -> list[str]:
        return ([split] + [notes.cell(values[key], with_intervals.get(key), _percent)
                           for key in ("sensitivity", "specificity")]
                + [_percent(values[key]) for key in ("ppv", "npv")] + [str(values[key]) for key in ("tp", "fn", "fp", "tn")])

    return [
        Heading("Operating point"),
        Paragraph(f"Threshold on P({display_name(operating_point['positive_class']).lower()}) = "
                  f"{operating_point['threshold']:.4f}: the highest threshold reaching sensitivity "
                  f"≥ {_percent(operating_point['target_sensitivity'])} on the `{operating_point['selected_on']}` "
                  f"split, then applied unchanged to `{reported_split}`. "
                  + _operating_point_sentence(operating_point, f"`{reported_split}`")),
        Table(["Split", "Sensitivity (95% CI)", "Specificity (95% CI)", "PPV", "NPV", "TP", "FN", "FP", "TN"], [
            row(f"{operating_point['selected_on']} (chosen)", operating_point["selection"], {}),
            row(reported_split, operating_point["metrics"], intervals),
        ]),
        *notes.flush(),
    ]


def _baseline_blocks(metrics: dict, baselines: dict) -> list:
    compared = {"this model": metrics, **{f"{name} (dummy)": m for name, m in baselines.items()}}
    return [
        Heading("Baselines"),
        Paragraph("Classifiers that ignore the image: `majority` always predicts the most frequent "
                   "class, `stratified` draws a random class with the class frequencies."),
        Table(["Classifier", "Accuracy", "Balanced accuracy", "Macro-F1", "MCC", "Macro AUC"], [
            [name, _percent(m["accuracy"]), _percent(m["balanced_accuracy"]), _decimal(m["macro_f1"]),
             _decimal(m["mcc"]), _decimal(m["macro_auc"])]
            for name, m in compared.items()
        ]),
    ]


def _calibration_blocks(metrics: dict, scaling: dict | None) -> list:
    """Calibration told once: the debiased ECE (the same name and number in table and figure), with and
    without the run's temperature, and a sentence when the temperature made this split worse."""
    ece = (f"The {ECE_NAME} is the expected calibration error of the top probability with each bin's sampling noise "
           f"removed (Kumar, Liang & Ma 2019); the plug-in ECE, which that noise inflates, is "
           f"{_decimal(metrics['ece'])}. The reliability diagram (Figures) shows each bin's accuracy with its 95% CI "
           "and the number of images in it.")
    if scaling is None:
        return [Heading("Calibration"), Paragraph(ece)]
    temperature = scaling["temperature"]
    before, after = scaling["before"], scaling["after"]
    if scaling.get("fit"):
        fit = scaling["fit"]
        how = (f"Temperature scaling: probabilities are softmax(logits / T) with T = {temperature:.3f}, fitted at "
               f"the end of training on the {fit.get('num_samples', '?')} images of the validation split "
               "(one parameter, LBFGS on the negative log-likelihood). It changes no prediction, only how "
               "confident each one is.")
    else:
        how = (f"No temperature was fitted for this run (T = {temperature:.3f}): its probabilities are the "
               "network's softmax.")
    notes = _FlagNotes()

    def row(name, key, fmt, ci_key=None):
        return [name] + [notes.cell(values[key], values.get(ci_key) if ci_key else None, fmt) for values in (before, after)]

    blocks = [Heading("Calibration"), Paragraph(how + " " + ece),
              Table(["Measure", "Before (T = 1)", f"After (T = {temperature:.3f})"], [
                  row(ECE_NAME + " (95% CI)", "ece_debiased", _decimal, "ece_debiased_ci"),
                  row("Brier score (95% CI)", "brier", _decimal, "brier_ci"),
                  row("Negative log-likelihood", "nll", _decimal),
              ]), *notes.flush()]
    worse = [f"{name} {_decimal(before[key])} → {_decimal(after[key])}" for name, key in
             (("the ECE", "ece_debiased"), ("the negative log-likelihood", "nll"))
             if temperature != 1.0 and after[key] is not None and before[key] is not None and after[key] > before[key]]
    if worse:
        blocks.append(Paragraph(f"On this split the temperature made calibration worse ({' and '.join(worse)}): T was "
                                "fitted on the validation split, which may be small or unlike this one. The "
                                "predictions are the same either way; for probabilities, prefer T = 1 here or refit "
                                "T on a larger validation split."))
    return blocks


def _patient_blocks(image_metrics: dict, patient: dict, classes: list[str]) -> list:
    """The per-image and per-patient figures side by side."""
    metrics = patient["metrics"]
    aggregation = patient["aggregation"]
    view = metrics["cancer_vs_benign"]
    positive = display_name(view["positive_class"]) if view else "the positive class"
    how = ("the mean of its frames' probabilities" if aggregation == "mean" else
           f"for {positive.lower()} the largest probability over its frames, the other classes sharing the rest in "
           "proportion to their means")
    frames = patient["frames_per_case"]
    text = (f"{patient['num_patients']} patients (videos count as patients when no patient id was given), "
            f"{patient['num_cases']} cases: a patient with images of two classes is one case per class. A case's "
            f"probability is {how}; it has {frames['min']} to {frames['max']} images (median {frames['median']:g}). "
            "Both columns count patients, not images, as the independent units of their CIs.")
    notes = _FlagNotes()

    def cell(values: dict, key, fmt, ci_path) -> str:
        value = values
        for part in key:
            value = (value or {}).get(part)
        interval = values.get("ci") or {}
        for part in ci_path:
            interval = (interval or {}).get(part)
        return notes.cell(value, interval, fmt)

    rows = [["Accuracy", ("accuracy",), _percent, ("accuracy",)],
            ["Balanced accuracy", ("balanced_accuracy",), _percent, ("balanced_accuracy",)],
            *[[f"Sensitivity: {display_name(name)}", ("per_class_accuracy", name), _percent, ("per_class_accuracy", name)]
              for name in classes],
            ["Macro AUC", ("macro_auc",), _decimal, ("macro_auc",)],
            ["MCC", ("mcc",), _decimal, ("mcc",)]]
    if view is not None:
        rows += [[f"{label} ({positive} vs the rest)", ("cancer_vs_benign", key), fmt, ("cancer_vs_benign", key)]
                 for label, key, fmt in (("Sensitivity", "sensitivity", _percent),
                                         ("Specificity", "specificity", _percent), ("AUC", "auc", _decimal))]
    rows += [[ECE_NAME, ("ece_debiased",), _decimal, ("ece_debiased",)],
             ["Brier score", ("brier",), _decimal, ("brier",)]]
    table = Table(["Metric", "Per image (95% CI)", "Per patient (95% CI)"],
                  [[name, cell(image_metrics, key, fmt, ci), cell(metrics, key, fmt, ci)] for name, key, fmt, ci in rows])
    return [Heading("Per image and per patient"), Paragraph(text), table, *notes.flush()]


def _methods_text(metrics: dict) -> str:
    text = ("MCC is the multiclass Matthews correlation coefficient, identical to scikit-learn's "
            "`matthews_corrcoef` (Gorodkin's R_K). AUCs are one-vs-rest, rank-based (ties count one half). "
            "ECE is the expected calibration error of the top probability over "
            f"{metrics['calibration']['num_bins']} equal-width bins. Its plug-in value is biased upwards (each "
            "bin's sampling noise only adds to |accuracy - confidence|), so it is reported debiased: each bin's "
            "gap is corrected by its expected bias under the normal approximation (Kumar, Liang & Ma 2019), "
            "floored at 0. The Brier score is Brier's multiclass score, the squared distance between the "
            "probabilities and the one-hot truth summed over the classes (0 to 2). ")
    boot = metrics["bootstrap"]
    if boot is None:
        return text + "No confidence intervals were computed."
    level = f"{boot['level']:.0%}"
    units = (f"the {boot['num_units']} patients (frames of one video without a patient id count as one patient)"
             if boot["unit"] == "patient" else
             f"the {boot['num_units']} images (no patient ids were given, so images of one patient count as "
             "independent and every interval is too narrow when patients contribute several images)")
    return text + (
        f"{level} CIs count as independent units {units}. Proportions (accuracy, sensitivity, specificity, PPV, "
        "NPV) have Clopper-Pearson's exact interval, on the effective sample size when a patient has several images "
        "(Korn & Graubard 1998), so that 0/n and n/n get honest intervals; balanced accuracy combines the classes' "
        "intervals by MOVER (Zou & Donner 2008). AUCs, macro-F1, MCC and the Brier score have the expanded percentile "
        f"interval (Hesterberg 2015) of {boot['num_resamples']} bootstrap resamples of the units with replacement "
        f"(seed {boot['seed']}). The ECE's interval joins the basic and the median-centred bootstrap intervals and "
        "reaches 0 when a model calibrated by definition gives an ECE as large in at least 2.5% of label draws. "
        "Each kind of interval was checked by simulation at 10 to 300 patients, mid-range and near-perfect, with and "
        "without clustered frames (benchmarks/statistics.md); † marks an interval in a setting where intervals of "
        "its kind covered less than 92% of the time.")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _decimal(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_ci(value, interval: dict | None, fmt) -> str:
    """'87.5% (82.2% – 91.7%)', or the value alone without an interval."""
    return fmt(value) + (f" ({_bounds(interval, fmt)})" if interval else "")


def _bounds(interval: dict | None, fmt) -> str:
    return "95% CI n/a" if interval is None else f"{fmt(interval['lower'])} – {fmt(interval['upper'])}"


# ----------------------------------------------------------------------------- rendering


def render_markdown(blocks: list) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _markdown_line(block.text), ""]
        elif isinstance(block, Paragraph):
            lines += [_markdown_line(block.text), ""]
        elif isinstance(block, Banner):
            lines += ["> **" + _markdown_line(block.text) + "**", ""]
        elif isinstance(block, Table):
            def row(cells):
                return "| " + " | ".join(_markdown_line(cell).replace("|", "\\|") for cell in cells) + " |"
            lines += [row(block.header), "|" + "---|" * len(block.header)]
            lines += [row(cells) for cells in block.rows] + [""]
        elif isinstance(block, Images):
            for path, caption in block.items:
                caption = re.sub(r"([\\\[\]*])", r"\\\1", _markdown_line(caption))  # stays alt text
                lines += [f"![{caption}]({path})", f"*{caption}*", ""]
    return "\n".join(lines)


def _markdown_line(text: str) -> str:
    """Text as one line of Markdown that shows it literally: class names, sample keys and paths come
    from shards and model.json, and Markdown viewers render raw HTML and line structure."""
    return " ".join(html.escape(text, quote=False).splitlines())


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.93em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: left; }
th { background: #f0f3f7; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f0f0f0; padding: 0 0.2em; }
.banner { background: #fff4d6; border-left: 6px solid #e0a100; padding: 0.7em 1em; margin: 0.8em 0; font-weight: 600; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.95em; color: #444; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 1.2em; }
.gallery figure { margin: 0; cursor: zoom-in; }
.gallery figure.zoomed { position: fixed; inset: 0; z-index: 10; margin: 0; padding: 1em; background: rgba(0,0,0,0.85);
                         overflow: auto; cursor: zoom-out; }
.gallery figure.zoomed img { max-width: none; display: block; margin: 0 auto; }
.gallery figure.zoomed figcaption { color: #eee; text-align: center; }
"""


def render_html(blocks: list, title: str, out_dir: Path) -> str:
    def inline(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{inline(block.text)}</p>")
        elif isinstance(block, Banner):
            parts.append(f"<div class='banner'>{inline(block.text)}</div>")
        elif isinstance(block, Table):
            header = "".join(f"<th>{html.escape(cell)}</th>" for cell in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in cells) + "</tr>"
                           for cells in block.rows)
            parts.append(f"<table><tr>{header}</tr>{rows}</table>")
        elif isinstance(block, Images):
            # a gallery panel opens at its full size on a click (and closes on the next): no script beyond that
            zoom = " onclick=\"this.classList.toggle('zoomed')\"" if block.gallery else ""
            figures = [f"<figure{zoom}><img src='{_data_uri(out_dir / path)}' alt='{html.escape(caption)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>" for path, caption in block.items]
            parts.append("<div class='gallery'>" + "".join(figures) + "</div>" if block.gallery else "\n".join(figures))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _data_uri(path: Path) -> str:
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- figures


def _save(figure: Figure, path: Path) -> None:
    """PNG at FIGURE_DPI, cropped to what is drawn: a long class name or axis label is never cut off."""
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight", pad_inches=0.15)


def _confusion_figure(confusion: np.ndarray, classes: list[str]) -> Figure:
    """Cells coloured by the share of the true class, labelled with the count and that share."""
    num_classes = len(classes)
    support = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    side = max(3.0, 0.6 * num_classes + 1.0)  # inches of matrix
    classes = [display_name(name) for name in classes]
    label_inches = 0.09 * max(len(name) for name in classes) + 0.6  # y labels carry "(n=...)"
    figure = Figure(figsize=(side + label_inches + 1.5, side + 0.6 * label_inches + 0.8), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8, format=PercentFormatter(1.0))
    colorbar.set_label("share of the true class")

    font_size = max(7.5, 11 - 0.2 * num_classes)
    for true_index in range(num_classes):
        for predicted_index in range(num_classes):
            count = confusion[true_index, predicted_index]
            text = f"{count}\n{share[true_index, predicted_index]:.0%}" if support[true_index, 0] else "0"
            axes.text(predicted_index, true_index, text, ha="center", va="center", fontsize=font_size,
                      color="white" if share[true_index, predicted_index] > 0.5 else "black")
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, classes, rotation=45 if num_classes > 2 else 0,
                    ha="right" if num_classes > 2 else "center", fontsize=font_size + 1)
    axes.set_yticks(ticks, [f"{name} (n={n})" for name, n in zip(classes, support[:, 0])],
                    fontsize=font_size + 1)
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    figure.suptitle("Confusion matrix: count and % of the true class")
    return figure


def _roc_figure(metrics: dict, y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                operating_point: dict | None) -> Figure:
    view = metrics["cancer_vs_benign"]
    num_panels = 1 if view is None else 2
    many_classes = len(classes) > 10  # legend beside the axes, not over the curves
    figure = Figure(figsize=(6.4 * num_panels + 3.5 * many_classes, 6.4), layout="constrained")
    colors = matplotlib.colormaps["tab20" if many_classes else "tab10"]

    axes = figure.add_subplot(1, num_panels, 1)
    for k, name in enumerate(classes):
        auc = metrics["per_class"][name]["auc"]
        if auc is None:
            continue  # the class, or every other class, is absent: no curve
        fpr, tpr = roc_curve(y_true == k, probs[:, k])
        axes.plot(fpr, tpr, color=colors(k % colors.N), lw=1.8, label=f"{display_name(name)} (AUC {auc:.3f})")
    _roc_axes(axes, "One class vs the rest", legend_outside=many_classes)

    if view is not None:
        axes = figure.add_subplot(1, 2, 2)
        k = classes.index(view["positive_class"])
        if view["auc"] is not None:
            fpr, tpr = roc_curve(y_true == k, probs[:, k])
            axes.plot(fpr, tpr, color="firebrick", lw=2,
                      label=f"P({display_name(view['positive_class']).lower()}) (AUC {view['auc']:.3f})")
            axes.plot(1 - view["specificity"], view["sensitivity"], "o", color="black", ms=8,
                      label="most probable class")
        if operating_point is not None:
            at_threshold = operating_point["metrics"]
            if at_threshold["sensitivity"] is not None and at_threshold["specificity"] is not None:
                axes.plot(1 - at_threshold["specificity"], at_threshold["sensitivity"], "D", color="darkorange",
                          ms=8, label=f"threshold {operating_point['threshold']:.3f} "
                                      f"(chosen on {operating_point['selected_on']})")
        _roc_axes(axes, f"{display_name(view['positive_class'])} vs the rest", legend_outside=False)
    return figure


def _roc_axes(axes, title: str, legend_outside: bool) -> None:
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title,
             xlabel="1 − specificity (false positive rate)", ylabel="Sensitivity (true positive rate)")
    axes.grid(alpha=0.3)
    if legend_outside:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        axes.legend(loc="lower right", fontsize="small")


def _calibration_figure(metrics: dict) -> Figure:
    """Accuracy per confidence bin with its exact 95% interval (images of a bin counted as independent) and the
    bin's count, against the diagonal; titled with the same ECE the tables give."""
    bins = metrics["calibration"]["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = bins[0]["upper"] - bins[0]["lower"]
    counts = np.array([b["count"] for b in bins])
    filled = counts > 0
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    low, high = exact_interval(np.rint(accuracy * counts), counts)
    centres = lower + width / 2

    figure = Figure(figsize=(7, 7.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(lower, accuracy, width=width, align="edge", color="steelblue", edgecolor="white", alpha=0.8,
            label="accuracy in bin")
    top.errorbar(centres[filled], accuracy[filled], yerr=[accuracy[filled] - low[filled], high[filled] - accuracy[filled]],
                 fmt="none", ecolor="black", elinewidth=1, capsize=3, label="95% CI (exact)")
    top.plot(centres[filled], confidence[filled], "o", color="darkorange", ms=4, label="mean confidence in bin")
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    interval = (metrics.get("ci") or {}).get("ece_debiased")
    title = f"Reliability diagram: {ECE_NAME} {_decimal(metrics['ece_debiased'])}"
    if interval:
        title += f" ({_bounds(interval, _decimal)})"
    top.set(xlim=(0, 1), ylim=(0, 1.05), ylabel="Accuracy")
    top.set_title(title, fontsize=11)
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.bar(lower, counts, width=width, align="edge", color="grey", edgecolor="white")
    for x, count in zip(centres[filled], counts[filled]):
        bottom.annotate(str(count), (x, count), ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="Confidence (top probability)", ylabel="Images")
    bottom.margins(y=0.25)
    return figure


def save_forest_plot(comparison: dict, path: Path) -> Path:
    """Forest plot of `paired.compare_models`'s differences (model a minus model b) with their CIs:
    one panel per measure, one row per pair, a line at no difference."""
    pairs = comparison["pairs"]
    measures = [("accuracy_difference", "Accuracy difference (points)", 100.0),
                ("macro_auc_difference", "Macro AUC difference", 1.0)]
    if comparison.get("positive_class"):
        measures.append(("cancer_auc_difference", f"{display_name(comparison['positive_class'])} AUC difference", 1.0))
    labels = [f"{pair['a']} − {pair['b']}" for pair in pairs]
    figure = Figure(figsize=(4.2 * len(measures) + 0.12 * max(map(len, labels)), 2.0 + 0.55 * len(pairs)),
                    layout="constrained")
    axes_row = figure.subplots(1, len(measures), sharey=True, squeeze=False)[0]
    rows = np.arange(len(pairs))[::-1]
    for axes, (key, title, scale) in zip(axes_row, measures):
        for row, pair in zip(rows, pairs):
            entry = pair[key]
            if entry["difference"] is None:
                continue
            interval = entry["ci"]
            if interval is not None:
                axes.plot([scale * interval["lower"], scale * interval["upper"]], [row, row], color="steelblue", lw=2)
            axes.plot(scale * entry["difference"], row, "s", color="black", ms=6)
        axes.axvline(0, color="grey", ls="--", lw=1)
        axes.set(title=title, yticks=rows, yticklabels=labels)
        axes.grid(axis="x", alpha=0.3)
    figure.suptitle(f"Paired differences with {comparison['level']:.0%} bootstrap CIs "
                    f"({'patients' if comparison['unit'] == 'patient' else 'images'} resampled)")
    _save(figure, Path(path))
    return Path(path)
