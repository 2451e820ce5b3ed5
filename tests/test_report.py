"""Reports: every file is written, figures open as images, the tables and notes are in the text."""

import numpy as np
import pytest
from PIL import Image

from gastro_dist.evaluation.metrics import dummy_baselines, evaluate_predictions, operating_point, patient_level
from gastro_dist.evaluation.report import Heading, Paragraph, write_report

STUDY_CLASSES = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis"]


def random_predictions(seed, num_samples, num_classes):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes))
    logits[np.arange(num_samples), y_true] += 2.0
    probs = np.exp(logits)
    return y_true, probs / probs.sum(axis=1, keepdims=True)


def test_full_report_for_the_study_classes(tmp_path):
    y_true, probs = random_predictions(0, 240, 3)
    y_val, probs_val = random_predictions(1, 120, 3)
    groups = np.arange(240) // 3
    metrics = evaluate_predictions(y_true, probs, STUDY_CLASSES, groups, num_bootstrap=100)
    Image.new("RGB", (96, 96), (180, 40, 40)).save(tmp_path / "cam_0.png")

    paths = write_report(
        tmp_path, metrics, y_true, probs, STUDY_CLASSES, "resnet50 on test",
        details={"model": "resnet50", "checkpoint": "runs/a/best.safetensors", "split": "test"},
        baselines=dummy_baselines(y_true, STUDY_CLASSES, groups),
        operating_point=operating_point(y_val, probs_val, y_true, probs, STUDY_CLASSES, 0.95),
        cam_images=[("cam_0.png", "gastric_cancer, predicted gastric_cancer")],
    )

    assert set(paths) == {"confusion_matrix", "roc", "calibration", "markdown", "html"}
    for key in ("confusion_matrix", "roc", "calibration"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG"
            assert 400 <= image.width <= 3000 and 400 <= image.height <= 3000, image.size

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# resnet50 on test")
    # The answer first: model, split, images and patients, accuracy with its interval, per-class sensitivity and
    # specificity with theirs, the operating point, and the reference study's figures beside them.
    headline = markdown[:markdown.index("## Run details")]
    ci = metrics["ci"]
    assert (f"`resnet50` recognised {100 * metrics['accuracy']:.1f}% ({100 * ci['accuracy']['lower']:.1f}% – "
            f"{100 * ci['accuracy']['upper']:.1f}%) of the 240 images of 80 patients in the `test` split") in headline
    assert ("| Class | Images | Patients | Sensitivity (95% CI) | Specificity (95% CI) | Reference study, ResNet50 |"
            in headline)
    for name in STUDY_CLASSES:
        row = metrics["per_class"][name]
        sensitivity, specificity = ci["per_class_accuracy"][name], ci["per_class_specificity"][name]
        assert (f"| {name.replace('_', ' ').capitalize()} | {row['support']} | {row['patients']} | "
                f"{100 * row['sensitivity']:.1f}% ({100 * sensitivity['lower']:.1f}% – {100 * sensitivity['upper']:.1f}%)"
                f" | {100 * row['specificity']:.1f}% ({100 * specificity['lower']:.1f}% – "
                f"{100 * specificity['upper']:.1f}%) |") in headline
    assert "| 93% |" in headline and "| 88% |" in headline and "VGG19, ResNet50 and Inception-V3" in headline
    assert "At the threshold chosen on `val`" in headline and "gastric_cancer" not in headline
    for section in ("## Per-class metrics (one class vs the rest)", "## Gastric cancer vs the rest",
                    "## Operating point", "## Baselines", "## Grad-CAM: correct examples and the most confident mistakes",
                    "| Class | Recognised | Sensitivity (95% CI) | Specificity (95% CI) | PPV (95% CI) | NPV (95% CI) | "
                    "F1 | AUC (95% CI) |", "runs/a/best.safetensors", "matthews_corrcoef", "80 patients"):
        assert section in markdown, section
    for k, name in enumerate(STUDY_CLASSES):
        interval = ci["per_class_ppv"][name]
        assert (f"| {metrics['confusion_matrix'][k][k]}/{metrics['per_class'][name]['support']} | "
                f"{100 * metrics['per_class_accuracy'][name]:.1f}% (") in markdown
        assert f"{100 * metrics['per_class'][name]['ppv']:.1f}% ({100 * interval['lower']:.1f}% – " in markdown
    assert "](confusion_matrix.png)" in markdown and "](cam_0.png)" in markdown
    assert "| Images | 240 |" in markdown and "| Patients | 80 |" in markdown
    # 80 patients: the AUC, F1, MCC and Brier bootstrap intervals are marked approximate, with the reason once.
    assert "†" in markdown and markdown.count("fewer than 200) covers less than 92% in simulation") == \
        markdown.count("## Per-class metrics") + 2  # per-class, overall and the cancer table each explain it

    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "src='confusion_matrix.png'" not in page
    assert "<code>matthews_corrcoef</code>" in page
    assert page.count("<div class='gallery'>") == 1  # the Grad-CAM panels, as a gallery

    # The debiased ECE is shown with an interval that holds it, next to the Brier score, under one name.
    interval = metrics["ci"]["ece_debiased"]
    assert (f"| ECE (debiased, 15 bins) | {metrics['ece_debiased']:.3f} ({interval['lower']:.3f} – "
            f"{interval['upper']:.3f})") in markdown
    assert "| Brier score (0 best, 2 worst) |" in markdown and "Kumar, Liang &amp; Ma 2019" in markdown
    assert "ECE, plug-in" not in markdown and "Korn &amp; Graubard 1998" in markdown


def test_calibration_patient_level_and_model_card_sections(tmp_path):
    y_true, probs = random_predictions(5, 180, 3)
    groups = np.arange(180) // 4
    metrics = evaluate_predictions(y_true, probs, STUDY_CLASSES, groups, num_bootstrap=50)
    before = evaluate_predictions(y_true, probs ** 2 / (probs ** 2).sum(1, keepdims=True), STUDY_CLASSES, groups,
                                  num_bootstrap=50)

    def calibration(m):
        return {"ece": m["ece"], "ece_debiased": m["ece_debiased"], "ece_debiased_ci": m["ci"]["ece_debiased"],
                "brier": m["brier"], "brier_ci": m["ci"]["brier"], "nll": m["nll"]}

    scaling = {"temperature": 2.0, "fit": {"num_samples": 90, "temperature": 2.0},
               "before": calibration(before), "after": calibration(metrics)}
    cases = patient_level(y_true, probs, groups)
    patients = {"aggregation": "mean", "num_patients": 45, "num_cases": len(cases["labels"]),
                "frames_per_case": {"min": 1, "median": 2.0, "max": 4},
                "metrics": evaluate_predictions(cases["labels"], cases["probs"], STUDY_CLASSES, cases["groups"],
                                                num_bootstrap=50)}
    card = [Heading("Model card: x", 1), Heading("Intended use"), Paragraph("NOT FOR DIAGNOSIS.")]
    paths = write_report(tmp_path, metrics, y_true, probs, STUDY_CLASSES, "calibrated", temperature_scaling=scaling,
                         patient_level=patients, model_card=card)
    markdown = paths["markdown"].read_text()
    assert "## Calibration" in markdown and "T = 2.000" in markdown
    assert "| Measure | Before (T = 1) | After (T = 2.000) |" in markdown
    assert f"| ECE (debiased, 15 bins) (95% CI) | {before['ece_debiased']:.3f} (" in markdown
    assert f"plug-in ECE, which that noise inflates, is {metrics['ece']:.3f}" in markdown
    # T = 2 flattens these probabilities: worse on this split, and the report says so.
    assert metrics["nll"] > before["nll"]
    assert ("On this split the temperature made calibration worse (" in markdown
            and f"the negative log-likelihood {before['nll']:.3f} → {metrics['nll']:.3f}" in markdown)
    assert "## Per image and per patient" in markdown and "45 patients" in markdown
    patient_accuracy = patients["metrics"]["accuracy"]
    assert f"| Accuracy | {100 * metrics['accuracy']:.1f}% (" in markdown
    assert f" | {100 * patient_accuracy:.1f}% (" in markdown
    # The model card is the report's last section, one heading level down.
    assert markdown.index("## Model card: x") > markdown.index("## Methods")
    assert "### Intended use" in markdown and "NOT FOR DIAGNOSIS." in markdown


@pytest.mark.parametrize("num_classes", [2, 12])
def test_report_without_cancer_class_or_intervals(tmp_path, num_classes):
    classes = [f"finding_{k}" for k in range(num_classes)]
    y_true, probs = random_predictions(2, 150, num_classes)
    metrics = evaluate_predictions(y_true, probs, classes, num_bootstrap=0)
    paths = write_report(tmp_path, metrics, y_true, probs, classes, "no cancer class",
                         details={"images": "150 (given by the caller)"})
    markdown = paths["markdown"].read_text()
    assert "| images | 150 (given by the caller) |" in markdown and "| Images | 150 |" not in markdown
    assert "Cancer vs benign" not in markdown and "Operating point" not in markdown
    assert "No confidence intervals were computed" in markdown
    with Image.open(paths["confusion_matrix"]) as image:
        assert image.width >= 400


def test_report_refuses_metrics_of_other_predictions(tmp_path):
    y_true, probs = random_predictions(3, 50, 3)
    metrics = evaluate_predictions(y_true, probs, STUDY_CLASSES, num_bootstrap=0)
    with pytest.raises(ValueError, match="do not belong"):
        write_report(tmp_path, metrics, y_true[:40], probs[:40], STUDY_CLASSES, "mismatch")


def test_markdown_shows_untrusted_names_literally(tmp_path):
    classes = ["<img src=x onerror=alert(1)>", "two\nlines | pipe", "plain"]
    y_true, probs = random_predictions(4, 60, 3)
    metrics = evaluate_predictions(y_true, probs, classes, num_bootstrap=0)
    Image.new("RGB", (32, 32)).save(tmp_path / "cam.png")
    paths = write_report(tmp_path, metrics, y_true, probs, classes, "<script>alert(1)</script>",
                         cam_images=[("cam.png", "key](http://evil.example) <b>")])
    markdown = paths["markdown"].read_text()
    assert "<img" not in markdown and "<script>" not in markdown and "<b>" not in markdown
    assert "&lt;img src=x onerror=alert(1)&gt;" in markdown and "| Two lines \\| pipe |" in markdown
    assert "![key\\](http://evil.example) &lt;b&gt;](cam.png)" in markdown
    assert "<script>" not in paths["html"].read_text()
