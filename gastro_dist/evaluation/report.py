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
) -> dict[str, Path]:
    """Write confusion_matrix.png, roc.png, calibration.png, report.md and report.html into ``out_dir``.

    ``metrics`` comes from ``evaluate_predictions(y_true, probs, classes, ...)``; ``details`` holds
    rows for the header table (model, checkpoint, split, ...), in order; ``baselines`` is
    ``dummy_baselines(...)``; ``operating_point`` is ``metrics.operating_point(...)``;
    ``cam_images`` are (path relative to ``out_dir``, caption) pairs of Grad-CAM panels, shown as a
    gallery; ``temperature_scaling`` and ``patient_level`` are metrics.json's entries of those names;
    ``model_card`` the blocks of `model_card.model_card_blocks`, added as the report's last section.
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
                            temperature_scaling, patient_level)
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
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Images:
    items: list[tuple[str, str]]  # (path relative to the report, caption)
    gallery: bool = False  # in HTML, a grid of thumbnails at the page's width instead of one per line


def _report_blocks(metrics, classes, title, details, baselines, operating_point, cam_images,
                   temperature_scaling=None, patient_level=None) -> list:
    ci = metrics["ci"] or {}
    blocks: list = [Heading(title, level=1)]

    detail_rows = [[str(key), str(value)] for key, value in (details or {}).items()]
    given = {key.lower() for key, _ in detail_rows}
    if "images" not in given:
        detail_rows.append(["Images", str(metrics["num_samples"])])
    if "patients" not in given and metrics["num_groups"] is not None:
        detail_rows.append(["Patients", str(metrics["num_groups"])])
    blocks.append(Table(["Detail", "Value"], detail_rows))

    blocks += [
        Heading("Per-class accuracy"),
        Paragraph("Share of each class's images that the model assigns to that class "
                   "(= sensitivity/recall), as reported per disease in the reference study."),
        Table(["Class", "Recognised", "Accuracy", "95% CI"], [
            [name, f"{metrics['confusion_matrix'][k][k]}/{metrics['per_class'][name]['support']}",
             _percent(metrics["per_class_accuracy"][name]),
             _interval(ci.get("per_class_accuracy", {}).get(name), _percent)]
            for k, name in enumerate(classes)
        ]),
    ]

    blocks += [
        Heading("Per-class clinical metrics (one class vs the rest)"),
        Table(["Class", "Images", "Sensitivity", "Specificity", "PPV", "NPV", "F1", "AUC", "AUC 95% CI"], [
            [name, str(row["support"]), _percent(row["sensitivity"]), _percent(row["specificity"]),
             _percent(row["ppv"]), _percent(row["npv"]), _decimal(row["f1"]), _decimal(row["auc"]),
             _interval(ci.get("per_class_auc", {}).get(name), _decimal)]
            for name, row in ((name, metrics["per_class"][name]) for name in classes)
        ]),
        Heading("Overall"),
        Table(["Metric", "Value", "95% CI"], [
            ["Accuracy", _percent(metrics["accuracy"]), _interval(ci.get("accuracy"), _percent)],
            ["Balanced accuracy", _percent(metrics["balanced_accuracy"]),
             _interval(ci.get("balanced_accuracy"), _percent)],
            ["Macro-F1", _decimal(metrics["macro_f1"]), _interval(ci.get("macro_f1"), _decimal)],
            ["Macro AUC (one-vs-rest)", _decimal(metrics["macro_auc"]), _interval(ci.get("macro_auc"), _decimal)],
            ["MCC", _decimal(metrics["mcc"]), _interval(ci.get("mcc"), _decimal)],
            [f"ECE ({metrics['calibration']['num_bins']} bins, debiased)", _decimal(metrics["ece_debiased"]),
             _interval(ci.get("ece_debiased"), _decimal)],
            ["Brier score (0 best, 2 worst)", _decimal(metrics["brier"]), _interval(ci.get("brier"), _decimal)],
        ]),
    ]
    if temperature_scaling is not None:
        blocks += _calibration_blocks(temperature_scaling)
    if patient_level is not None:
        blocks += _patient_blocks(metrics, patient_level, classes)

    if metrics["cancer_vs_benign"] is not None:
        blocks += _positive_vs_rest_blocks(metrics["cancer_vs_benign"], ci.get("cancer_vs_benign") or {})

    if operating_point is not None:
        blocks += _operating_point_blocks(operating_point, str((details or {}).get("split", "this split")))

    if baselines:
        blocks += _baseline_blocks(metrics, baselines)

    blocks += [Heading("Methods"), Paragraph(_methods_text(metrics))]
    blocks += [
        Heading("Figures"),
        Images([("confusion_matrix.png", "Confusion matrix: counts and share of each true class"),
                 ("roc.png", "ROC curves"),
                 ("calibration.png", "Reliability diagram")]),
    ]
    if cam_images:
        blocks += [Heading("Grad-CAM of misclassified images"),
                   Paragraph("The most confident mistakes of each true class. Left: the image as stored; right: "
                             "the heatmap of the evidence for the predicted class, on the square the network "
                             "saw (outlined; the rest dimmed). Red marks the regions that raised that class's "
                             "score most; the map shows where the model looked, not why it was wrong."),
                   Images([(str(path), caption) for path, caption in cam_images], gallery=True)]
    return blocks


def _positive_vs_rest_blocks(view: dict, view_ci: dict) -> list:
    return [
        Heading("Cancer vs benign"),
        Paragraph(f"Positive: `{view['positive_class']}`; benign: "
                   + ", ".join(f"`{name}`" for name in view["negative_classes"])
                   + ". An image counts as cancer when that is its most probable class; the AUC "
                   f"ranks images by P({view['positive_class']})."),
        Table(["Metric", "Value", "95% CI"], [
            ["Sensitivity", _percent(view["sensitivity"]), _interval(view_ci.get("sensitivity"), _percent)],
            ["Specificity", _percent(view["specificity"]), _interval(view_ci.get("specificity"), _percent)],
            ["PPV", _percent(view["ppv"]), "—"],
            ["NPV", _percent(view["npv"]), "—"],
            ["AUC", _decimal(view["auc"]), _interval(view_ci.get("auc"), _decimal)],
        ]),
        Paragraph(f"TP {view['tp']}, FN {view['fn']}, FP {view['fp']}, TN {view['tn']}."),
    ]


def _operating_point_blocks(operating_point: dict, reported_split: str) -> list:
    return [
        Heading("Operating point"),
        Paragraph(f"Threshold on P({operating_point['positive_class']}) = "
                   f"{operating_point['threshold']:.4f}: the highest threshold reaching sensitivity "
                   f"≥ {_percent(operating_point['target_sensitivity'])} on the "
                   f"`{operating_point['selected_on']}` split, then applied unchanged to "
                   f"`{reported_split}`."),
        Table(["Split", "Sensitivity", "Specificity", "PPV", "NPV", "TP", "FN", "FP", "TN"], [
            [split] + [_percent(row[key]) for key in ("sensitivity", "specificity", "ppv", "npv")]
            + [str(row[key]) for key in ("tp", "fn", "fp", "tn")]
            for split, row in ((f"{operating_point['selected_on']} (chosen)", operating_point["selection"]),
                               (reported_split, operating_point["metrics"]))
        ]),
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


def _calibration_blocks(scaling: dict) -> list:
    """Calibration before (T = 1) and after temperature scaling."""
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

    def row(name, key, fmt, ci_key=None):
        cells = [name]
        for values in (before, after):
            interval = values.get(ci_key) if ci_key else None
            cells.append(fmt(values[key]) + (f" ({_interval(interval, fmt)})" if interval else ""))
        return cells

    return [Heading("Calibration"), Paragraph(how),
            Table(["Measure", "Before (T = 1)", f"After (T = {temperature:.3f})"], [
                row("ECE, debiased (95% CI)", "ece_debiased", _decimal, "ece_debiased_ci"),
                row("ECE, plug-in", "ece", _decimal),
                row("Brier score (95% CI)", "brier", _decimal, "brier_ci"),
                row("Negative log-likelihood", "nll", _decimal),
            ])]


def _patient_blocks(image_metrics: dict, patient: dict, classes: list[str]) -> list:
    """The per-image and per-patient figures side by side."""
    metrics = patient["metrics"]
    aggregation = patient["aggregation"]
    view = metrics["cancer_vs_benign"]
    how = ("the mean of its frames' probabilities" if aggregation == "mean" else
           f"for `{view['positive_class'] if view else 'the positive class'}` the largest probability over its "
           "frames, the other classes sharing the rest in proportion to their means")
    frames = patient["frames_per_case"]
    text = (f"{patient['num_patients']} patients (videos count as patients when no patient id was given), "
            f"{patient['num_cases']} cases: a patient with images of two classes is one case per class. A case's "
            f"probability is {how}; it has {frames['min']} to {frames['max']} images (median {frames['median']:g}). "
            "Both columns resample patients for their CIs.")

    def cell(values: dict, key, fmt, ci_path) -> str:
        value = values
        for part in key:
            value = (value or {}).get(part)
        interval = values.get("ci") or {}
        for part in ci_path:
            interval = (interval or {}).get(part)
        return fmt(value) + (f" ({_interval(interval, fmt)})" if interval else "")

    rows = [["Accuracy", ("accuracy",), _percent, ("accuracy",)],
            ["Balanced accuracy", ("balanced_accuracy",), _percent, ("balanced_accuracy",)],
            *[[f"Accuracy: {name}", ("per_class_accuracy", name), _percent, ("per_class_accuracy", name)]
              for name in classes],
            ["Macro AUC", ("macro_auc",), _decimal, ("macro_auc",)],
            ["MCC", ("mcc",), _decimal, ("mcc",)]]
    if view is not None:
        rows += [[f"{name.capitalize()} ({view['positive_class']} vs rest)", ("cancer_vs_benign", name), fmt,
                  ("cancer_vs_benign", name)]
                 for name, fmt in (("sensitivity", _percent), ("specificity", _percent), ("auc", _decimal))]
    rows += [["ECE, debiased", ("ece_debiased",), _decimal, ("ece_debiased",)],
             ["Brier score", ("brier",), _decimal, ("brier",)]]
    return [Heading("Per image and per patient"), Paragraph(text),
            Table(["Metric", "Per image (95% CI)", "Per patient (95% CI)"],
                  [[name, cell(image_metrics, key, fmt, ci), cell(metrics, key, fmt, ci)]
                   for name, key, fmt, ci in rows])]


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
    ece = ("The debiased ECE's interval is the basic bootstrap interval of the same resamples, centred on "
           "the estimate (its replicates' median standing for the value they estimate), so it always "
           "contains it; a percentile interval of the plug-in ECE can lie wholly above its own estimate.")
    if boot["unit"] == "patient":
        return text + (f"CIs are patient-level bootstrap percentile intervals ({level}): "
                       f"{boot['num_resamples']} resamples of the {boot['num_units']} patients with "
                       f"replacement, seed {boot['seed']} (frames of one video without a patient id count as "
                       f"one patient). {ece}")
    return text + (f"CIs are image-level bootstrap percentile intervals ({level}): {boot['num_resamples']} "
                   f"resamples of the images with replacement, seed {boot['seed']}. No patient ids were "
                   "given, so images of one patient count as independent and the intervals are too "
                   f"narrow when patients contribute several images. {ece}")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _decimal(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(interval: dict | None, fmt) -> str:
    return "—" if interval is None else f"{fmt(interval['lower'])} – {fmt(interval['upper'])}"


# ----------------------------------------------------------------------------- rendering


def render_markdown(blocks: list) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _markdown_line(block.text), ""]
        elif isinstance(block, Paragraph):
            lines += [_markdown_line(block.text), ""]
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
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f0f3f7; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f0f0f0; padding: 0 0.2em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1em; }
.gallery figure { margin: 0; }
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
        elif isinstance(block, Table):
            header = "".join(f"<th>{html.escape(cell)}</th>" for cell in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in cells) + "</tr>"
                           for cells in block.rows)
            parts.append(f"<table><tr>{header}</tr>{rows}</table>")
        elif isinstance(block, Images):
            figures = [f"<figure><img src='{_data_uri(out_dir / path)}' alt='{html.escape(caption)}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>" for path, caption in block.items]
            parts.append("<div class='gallery'>" + "".join(figures) + "</div>" if block.gallery else "\n".join(figures))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _data_uri(path: Path) -> str:
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- figures


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FIGURE_DPI)


def _confusion_figure(confusion: np.ndarray, classes: list[str]) -> Figure:
    """Cells coloured by the share of the true class, labelled with the count and that share."""
    num_classes = len(classes)
    support = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    side = max(3.0, 0.6 * num_classes + 1.0)  # inches of matrix
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
        axes.plot(fpr, tpr, color=colors(k % colors.N), lw=1.8, label=f"{name} (AUC {auc:.3f})")
    _roc_axes(axes, "One class vs the rest", legend_outside=many_classes)

    if view is not None:
        axes = figure.add_subplot(1, 2, 2)
        k = classes.index(view["positive_class"])
        if view["auc"] is not None:
            fpr, tpr = roc_curve(y_true == k, probs[:, k])
            axes.plot(fpr, tpr, color="firebrick", lw=2, label=f"P({view['positive_class']}) (AUC {view['auc']:.3f})")
            axes.plot(1 - view["specificity"], view["sensitivity"], "o", color="black", ms=8,
                      label="most probable class")
        if operating_point is not None:
            at_threshold = operating_point["metrics"]
            if at_threshold["sensitivity"] is not None and at_threshold["specificity"] is not None:
                axes.plot(1 - at_threshold["specificity"], at_threshold["sensitivity"], "D", color="darkorange",
                          ms=8, label=f"threshold {operating_point['threshold']:.3f} "
                                      f"(chosen on {operating_point['selected_on']})")
        _roc_axes(axes, "Cancer vs benign", legend_outside=False)
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
    bins = metrics["calibration"]["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b["count"] > 0 for b in bins]
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in bins])

    figure = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(lower, accuracy, width=width, align="edge", color="steelblue", edgecolor="white",
            label="accuracy in bin")
    top.plot(lower[filled] + width / 2, confidence[filled], "o", color="darkorange", ms=4,
             label="mean confidence in bin")
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy",
            title=f"Reliability diagram (plug-in ECE {_decimal(metrics['ece'])})")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.bar(lower, [b["count"] for b in bins], width=width, align="edge", color="grey", edgecolor="white")
    bottom.set(xlabel="Confidence (top probability)", ylabel="Images")
    return figure


def save_forest_plot(comparison: dict, path: Path) -> Path:
    """Forest plot of `paired.compare_models`'s differences (model a minus model b) with their CIs:
    one panel per measure, one row per pair, a line at no difference."""
    pairs = comparison["pairs"]
    measures = [("accuracy_difference", "Accuracy difference (points)", 100.0),
                ("macro_auc_difference", "Macro AUC difference", 1.0)]
    if comparison.get("positive_class"):
        measures.append(("cancer_auc_difference", f"{comparison['positive_class']} AUC difference", 1.0))
    labels = [f"{pair['a']} − {pair['b']}" for pair in pairs]
    figure = Figure(figsize=(4.2 * len(measures) + 0.12 * max(map(len, labels)), 1.2 + 0.55 * len(pairs)),
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
