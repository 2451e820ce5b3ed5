"""Clinical classification metrics from true labels and softmax probabilities, with patient-level
bootstrap CIs: each resample is a weight per image, so point estimates and replicates share one
vectorised path (checked against scikit-learn in the tests). What is reported: README, "Evaluation".
Also the patient-level view: one probability vector per patient from the frames' (`patient_level`)."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
from scipy import sparse
from scipy.special import erf

from gastro_dist import UserError
from gastro_dist.evaluation import intervals

NUM_CALIBRATION_BINS = 15
# Where the simulated coverage of an interval kind falls below APPROXIMATE_BELOW (`_flag_approximate`).
APPROXIMATE_BELOW = 0.92
BOOTSTRAP_MIN_UNITS = 200
NEAR_BEST = {"auc": (1.0, 0.05), "macro_f1": (1.0, 0.05), "mcc": (1.0, 0.1), "brier": (0.0, 0.1)}  # (best, reach)
ECE_APPROXIMATE_ABOVE_ACCURACY = 0.95
ECE_INTERVAL_METHOD = ("debiased ECE (normal approximation per bin); the union of the basic and the "
                       "median-centred bootstrap intervals, its lower limit 0 when a model calibrated by "
                       "definition gives an ECE as large in at least 2.5% of label draws")
# Bootstrap replicates are processed in chunks of about this many (resample, image) weights:
# small enough for the working arrays to stay in cache, which roughly halves the run time.
_CHUNK_ELEMENTS = 100_000


def evaluate_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    groups: np.ndarray | None = None,
    num_bootstrap: int = 1000,
    seed: int = 0,
    positive_class: str | None = "gastric_cancer",
    ci_level: float = 0.95,
    on_resamples: Callable[[int], None] | None = None,
) -> dict:
    """All metrics of one set of predictions as a JSON-serialisable dict (undefined values are None).

    ``y_true`` holds class indices into ``classes``; ``probs`` is N x len(classes) softmax output;
    ``groups`` (patient ids, any dtype) makes the bootstrap resample patients instead of images.
    ``num_bootstrap=0`` skips the confidence intervals (``ci`` is then None); ``positive_class``
    None (or a class not in ``classes``) leaves out the cancer-vs-benign view. ``on_resamples(n)`` is
    called as each chunk of n bootstrap resamples is done (for a progress display).

    Keys: num_samples, num_groups, classes, accuracy, balanced_accuracy, per_class_accuracy,
    confusion_matrix, per_class, macro_f1, macro_auc, mcc, ece (plug-in), ece_debiased, brier, nll,
    calibration, cancer_vs_benign (None without the positive class), ci, bootstrap.

    Intervals: every proportion (accuracy, each class's sensitivity, specificity, PPV and NPV, the
    cancer-versus-benign view's) is Clopper-Pearson's, on the effective sample size when a patient has
    several images, and balanced accuracy's is MOVER's (`intervals`): a percentile bootstrap collapses
    at 0/n and n/n. AUCs, macro-F1, MCC and the Brier score keep the percentile bootstrap of the
    patients. ECE's plug-in estimate is biased upwards (the noise of each bin's accuracy only ever adds
    to |accuracy - confidence|), so the interval is given for the debiased ECE (`_ece_interval`).
    """
    y_true, probs = _validated(y_true, probs, classes)
    group_ids = None if groups is None else _group_indices(groups, len(y_true))
    positive_index = classes.index(positive_class) if positive_class in classes else None
    units = group_ids if group_ids is not None else np.arange(len(y_true))
    data = PreparedPredictions(y_true, probs, units)

    point = replicate_statistics(data, np.ones((1, data.num_units)))
    point = {name: values[0] for name, values in point.items()}
    confusion = np.rint(point["confusion"]).astype(int)

    per_class = _per_class_rows(point, confusion, classes)
    for k, name in enumerate(classes):  # how many patients the class's images come from (None without ids)
        per_class[name]["patients"] = None if group_ids is None else int(len(np.unique(group_ids[y_true == k])))
    metrics = {
        "num_samples": int(len(y_true)),
        "num_groups": None if group_ids is None else int(group_ids.max() + 1),
        "classes": list(classes),
        "accuracy": _number(point["accuracy"]),
        "balanced_accuracy": _number(point["balanced_accuracy"]),
        "per_class_accuracy": {name: per_class[name]["sensitivity"] for name in classes},
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "macro_f1": _number(point["macro_f1"]),
        "macro_auc": _number(point["macro_auc"]),
        "mcc": _number(point["mcc"]),
        "ece": _number(point["ece"]),
        "ece_debiased": max(0.0, float(point["ece_debiased"])),
        # Brier's original multiclass score, sum over classes of (p - y)^2 averaged over images: 0 to 2.
        "brier": _number(point["brier"]),
        "nll": _log_loss(y_true, probs),
        "calibration": {"num_bins": NUM_CALIBRATION_BINS, "bins": _calibration_bins(point)},
        "cancer_vs_benign": None,
        "ci": None,
        "bootstrap": None,
    }
    if positive_index is not None:
        metrics["cancer_vs_benign"] = _positive_vs_rest(per_class, confusion, classes, positive_index)

    if num_bootstrap > 0:
        replicates = _bootstrap_statistics(data, num_bootstrap, seed, on_resamples)
        metrics["ci"] = _confidence_intervals(replicates, classes, positive_index, int(units.max() + 1), ci_level)
        proportions = _proportion_intervals(y_true, probs.argmax(axis=1), units, classes, positive_index, ci_level)
        if positive_index is not None:
            metrics["ci"]["cancer_vs_benign"].update(proportions.pop("cancer_vs_benign"))
        metrics["ci"].update(proportions)
        metrics["ci"]["ece_debiased"] = _ece_interval(data, float(point["ece_debiased"]), replicates["ece_debiased"],
                                                      num_bootstrap, seed, ci_level)
        _flag_approximate(metrics, int(units.max() + 1))
        metrics["bootstrap"] = {
            "num_resamples": int(num_bootstrap),
            "seed": int(seed),
            "level": float(ci_level),
            "method": "expanded percentile (AUC, macro-F1, MCC, Brier score)",
            "proportion_method": intervals.PROPORTION_METHOD,
            "balanced_accuracy_method": intervals.BALANCED_ACCURACY_METHOD,
            "ece_method": ECE_INTERVAL_METHOD,
            "unit": "patient" if group_ids is not None else "image",
            "num_units": int(units.max() + 1),
        }
    return metrics


def _per_class_rows(point: dict, confusion: np.ndarray, classes: list[str]) -> dict:
    """Each class's one-vs-rest figures, by class name."""
    return {name: {"support": int(confusion[k].sum()),
                   "sensitivity": _number(point["recall"][k]),
                   "specificity": _number(point["specificity"][k]),
                   "ppv": _number(point["ppv"][k]),
                   "npv": _number(point["npv"][k]),
                   "f1": _number(point["f1"][k]),
                   "auc": _number(point["auc"][k])}
            for k, name in enumerate(classes)}


def _calibration_bins(point: dict) -> list[dict]:
    """The reliability diagram's bins: confidence range, images, accuracy and mean confidence (None if empty)."""
    bins = []
    for b in range(NUM_CALIBRATION_BINS):
        count = point["bin_weight"][b]
        bins.append({
            "lower": b / NUM_CALIBRATION_BINS,
            "upper": (b + 1) / NUM_CALIBRATION_BINS,
            "count": int(round(count)),
            "accuracy": _number(point["bin_correct"][b] / count) if count else None,
            "confidence": _number(point["bin_confidence"][b] / count) if count else None,
        })
    return bins


def _positive_vs_rest(per_class: dict, confusion: np.ndarray, classes: list[str], k: int) -> dict:
    """The positive class's one-vs-rest row restated with its counts, for the clinical question "cancer or
    not" (argmax prediction, score P(positive))."""
    positive = classes[k]
    tp = int(confusion[k, k])
    fn = int(confusion[k].sum()) - tp
    fp = int(confusion[:, k].sum()) - tp
    return {
        "positive_class": positive,
        "negative_classes": [name for name in classes if name != positive],
        **{key: per_class[positive][key] for key in ("sensitivity", "specificity", "ppv", "npv", "auc")},
        "tp": tp, "fn": fn, "fp": fp, "tn": int(confusion.sum()) - tp - fn - fp,
    }


def dummy_baselines(
    y_true: np.ndarray,
    classes: list[str],
    groups: np.ndarray | None = None,
    seed: int = 0,
    train_labels: np.ndarray | None = None,
    num_bootstrap: int = 0,
    positive_class: str | None = "gastric_cancer",
    ci_level: float = 0.95,
) -> dict[str, dict]:
    """Metrics of two classifiers that never look at the image, as floors for the real one.

    Class frequencies come from ``train_labels`` when given, else from ``y_true``.
    ``majority`` always predicts the most frequent class, with the class frequencies as its
    probabilities (scikit-learn's DummyClassifier "prior"); ``stratified`` draws a random label
    per image from the frequencies (seeded) and puts all probability on it.
    """
    y_true = np.asarray(y_true)
    reference = y_true if train_labels is None else np.asarray(train_labels)
    priors = np.bincount(reference, minlength=len(classes)).astype(float)
    priors /= priors.sum()

    majority_probs = np.tile(priors, (len(y_true), 1))
    drawn = np.random.default_rng(seed).choice(len(classes), size=len(y_true), p=priors)
    stratified_probs = np.eye(len(classes))[drawn]

    def metrics_of(probs: np.ndarray) -> dict:
        return evaluate_predictions(y_true, probs, classes, groups, num_bootstrap=num_bootstrap,
                                    seed=seed, positive_class=positive_class, ci_level=ci_level)

    return {"majority": metrics_of(majority_probs), "stratified": metrics_of(stratified_probs)}


PATIENT_AGGREGATIONS = ("mean", "max")


def patient_level(y_true: np.ndarray, probs: np.ndarray, groups, aggregation: str = "mean",
                  positive_index: int | None = None) -> dict:
    """Per-patient predictions from per-frame ones: one case per (patient, true class), so a patient
    with frames of two findings is scored once for each; the bootstrap still resamples patients.

    ``mean``: the case's probabilities are the means over its frames. ``max``: the positive class's
    probability is its largest over the frames (a lesion seen in one frame is there), the other
    classes share the rest in proportion to their means. Returns labels, probs, groups (the case's
    patient) and num_frames, cases in order of patient and class.
    """
    if aggregation not in PATIENT_AGGREGATIONS:
        raise UserError(f"unknown patient aggregation {aggregation!r}; use one of: {', '.join(PATIENT_AGGREGATIONS)}")
    if aggregation == "max" and positive_index is None:
        raise UserError("patient aggregation 'max' takes the positive class's largest probability, and there is "
                        "no positive class; use 'mean', or name the positive class")
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=float)
    group_names, group_of_frame = np.unique(np.asarray(groups), return_inverse=True)
    num_classes = probs.shape[1]
    cases, case_of_frame = np.unique(group_of_frame.reshape(-1) * num_classes + y_true, return_inverse=True)
    case_of_frame = case_of_frame.reshape(-1)
    num_frames = np.bincount(case_of_frame, minlength=len(cases))
    sums = np.stack([np.bincount(case_of_frame, weights=probs[:, k], minlength=len(cases))
                     for k in range(num_classes)], axis=1)
    case_probs = sums / num_frames[:, None]
    if aggregation == "max":
        k = positive_index
        largest = np.full(len(cases), -np.inf)
        np.maximum.at(largest, case_of_frame, probs[:, k])
        others = np.delete(case_probs, k, axis=1)
        others_total = others.sum(axis=1, keepdims=True)
        share = np.divide(others, others_total, out=np.full(others.shape, 1.0 / others.shape[1]),
                          where=others_total > 0)
        case_probs = np.insert(share * (1.0 - largest[:, None]), k, largest, axis=1)
    return {"labels": (cases % num_classes).astype(np.int64), "probs": case_probs,
            "groups": group_names[cases // num_classes], "num_frames": num_frames}


def threshold_for_sensitivity(y_true_binary: np.ndarray, scores: np.ndarray,
                              target_sensitivity: float) -> float:
    """The highest threshold t whose rule ``score >= t`` reaches ``target_sensitivity`` on this data.

    Pick it on the validation split and report the test split at it
    (:func:`binary_metrics_at_threshold`): the usual way to fix a screening operating point.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    positives = np.sort(np.asarray(scores, dtype=float)[np.asarray(y_true_binary, dtype=bool)])[::-1]
    if len(positives) == 0:
        raise UserError("cannot pick a threshold for a sensitivity: the data has no positive "
                        "images; choose the operating point on a split that contains the positive class")
    # Rounding first keeps e.g. 0.7 * 10 = 7.000000000000001 from asking for an 8th positive.
    needed = max(1, math.ceil(round(target_sensitivity * len(positives), 9)))
    return float(positives[needed - 1])


def binary_metrics_at_threshold(y_true_binary: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV and the four counts of the rule ``score >= threshold``."""
    truth = np.asarray(y_true_binary, dtype=bool)
    predicted = np.asarray(scores, dtype=float) >= threshold
    tp = int(np.sum(truth & predicted))
    fn = int(np.sum(truth & ~predicted))
    fp = int(np.sum(~truth & predicted))
    tn = int(np.sum(~truth & ~predicted))
    return {
        "threshold": float(threshold),
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "ppv": _safe_ratio(tp, tp + fp),
        "npv": _safe_ratio(tn, tn + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def operating_point(y_true_select: np.ndarray, probs_select: np.ndarray, y_true_report: np.ndarray,
                    probs_report: np.ndarray, classes: list[str], target_sensitivity: float,
                    positive_class: str = "gastric_cancer", selected_on: str = "val", groups_report=None,
                    level: float = 0.95) -> dict:
    """Threshold on P(positive class) chosen on one split for a target sensitivity, applied to another.

    Returns the ``operating_point`` dict that :func:`gastro_dist.evaluation.report.write_report`
    renders: target_sensitivity, positive_class, selected_on, threshold, ``selection`` (metrics on
    the split it was chosen on), ``metrics`` (on the reported split), ``intervals`` (the reported
    sensitivity's and specificity's, patients as units with ``groups_report``) and ``target_reached``
    (whether the reported sensitivity reaches the target: a threshold chosen on one split need not).
    """
    if positive_class not in classes:
        raise UserError(f"no class named {positive_class!r} among {classes}; "
                        f"set the positive class to one of them")
    k = classes.index(positive_class)
    select_truth = np.asarray(y_true_select) == k
    select_scores = np.asarray(probs_select, dtype=float)[:, k]
    threshold = threshold_for_sensitivity(select_truth, select_scores, target_sensitivity)
    report_truth = np.asarray(y_true_report) == k
    said = np.asarray(probs_report, dtype=float)[:, k] >= threshold
    reported = binary_metrics_at_threshold(report_truth, np.asarray(probs_report, dtype=float)[:, k], threshold)
    units = np.arange(len(report_truth)) if groups_report is None else _group_indices(groups_report, len(report_truth))
    found = {name: intervals.proportion_interval(success, counted, units, level)
             for name, success, counted in (("sensitivity", said, report_truth), ("specificity", ~said, ~report_truth))}
    return {
        "target_sensitivity": float(target_sensitivity),
        "positive_class": positive_class,
        "selected_on": selected_on,
        "threshold": threshold,
        "selection": binary_metrics_at_threshold(select_truth, select_scores, threshold),
        "metrics": reported,
        "intervals": {name: None if value is None else {"lower": value["lower"], "upper": value["upper"]}
                      for name, value in found.items()},
        "target_reached": reported["sensitivity"] is not None and reported["sensitivity"] >= target_sensitivity,
    }


def roc_curve(y_true_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from (0, 0) to (1, 1), one point per distinct score.

    Same points as scikit-learn's ``roc_curve(..., drop_intermediate=False)``.
    """
    truth = np.asarray(y_true_binary, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    last_of_level = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tps = np.cumsum(sorted_truth)[last_of_level]
    fps = (last_of_level + 1) - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


# ----------------------------------------------------------------------------- internals


class PreparedPredictions:
    """What every bootstrap replicate reuses, summed per resampling unit (a patient, or an image), so that a
    replicate's confusion matrix, calibration bins and Brier score are one sparse product of its unit counts
    with these sums: per unit and statistic, ``unit_sums`` holds the images in each confusion cell, in each
    calibration bin, right in each bin, their confidence per bin and their Brier score. AUCs need the images
    themselves: per class, the negatives in score order, the positives, and for each positive how many
    negatives score below it and at or below it (`_weighted_auc`)."""

    def __init__(self, y_true: np.ndarray, probs: np.ndarray, unit_of_image: np.ndarray | None = None):
        num_images, k = probs.shape
        self.num_classes = k
        self.unit_of_image = np.arange(num_images) if unit_of_image is None else np.asarray(unit_of_image)
        self.num_units = int(self.unit_of_image.max()) + 1 if num_images else 0
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        self.confidence = confidence
        correct = (predicted == y_true).astype(float)
        squared_error = probs ** 2
        squared_error[np.arange(num_images), y_true] = (1.0 - probs[np.arange(num_images), y_true]) ** 2
        # Bins are (lower, upper], the first one also holding 0.
        self.calibration_bin = np.clip(np.ceil(confidence * NUM_CALIBRATION_BINS).astype(int) - 1,
                                       0, NUM_CALIBRATION_BINS - 1)
        bins = NUM_CALIBRATION_BINS
        columns = np.concatenate([y_true * k + predicted, k * k + self.calibration_bin,
                                  k * k + bins + self.calibration_bin, k * k + 2 * bins + self.calibration_bin,
                                  np.full(num_images, k * k + 3 * bins)])
        values = np.concatenate([np.ones(num_images), np.ones(num_images), correct, confidence,
                                 squared_error.sum(axis=1)])
        self.unit_sums = sparse.csr_matrix((values, (np.tile(self.unit_of_image, 5), columns)),
                                           shape=(self.num_units, k * k + 3 * bins + 1))
        self.auc_orders = []
        for c in range(k):
            negatives = np.flatnonzero(y_true != c)
            negatives = negatives[np.argsort(probs[negatives, c], kind="stable")]
            positives = np.flatnonzero(y_true == c)
            negative_scores = probs[negatives, c]
            below = np.searchsorted(negative_scores, probs[positives, c], side="left")
            at_or_below = np.searchsorted(negative_scores, probs[positives, c], side="right")
            # unit -1 first: the zero column `_weighted_auc` appends, so the cumulative sums start at 0
            self.auc_orders.append((np.r_[-1, self.unit_of_image[negatives]], self.unit_of_image[positives], below,
                                    None if np.array_equal(below, at_or_below) else at_or_below))


def replicate_statistics(data: PreparedPredictions, unit_weights: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of each row of ``unit_weights`` (R x U: how often each unit is in a replicate; ones for the
    data as they are)."""
    num_replicates = unit_weights.shape[0]
    k, bins = data.num_classes, NUM_CALIBRATION_BINS
    sums = np.asarray((data.unit_sums.T @ unit_weights.T).T)  # R x statistics
    confusion = sums[:, :k * k].reshape(num_replicates, k, k)
    bin_weight, bin_correct, bin_confidence = (sums[:, k * k + j * bins:k * k + (j + 1) * bins] for j in range(3))
    total = confusion.sum(axis=(1, 2))
    support = confusion.sum(axis=2)
    predicted_count = confusion.sum(axis=1)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    fn = support - tp
    fp = predicted_count - tp
    tn = total[:, None] - tp - fn - fp

    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    correct_total = tp.sum(axis=1)
    # scikit-learn's matthews_corrcoef, written on the confusion matrix.
    cov_true_pred = correct_total * total - np.sum(support * predicted_count, axis=1)
    cov_pred_pred = total ** 2 - np.sum(predicted_count ** 2, axis=1)
    cov_true_true = total ** 2 - np.sum(support ** 2, axis=1)
    mcc_denominator = np.sqrt(cov_true_true * cov_pred_pred)
    mcc = np.divide(cov_true_pred, mcc_denominator, out=np.zeros_like(total), where=mcc_denominator > 0)

    auc = np.stack([_weighted_auc(unit_weights, *data.auc_orders[c]) for c in range(k)], axis=1)
    return {
        "confusion": confusion,
        "accuracy": correct_total / total,
        "balanced_accuracy": _nanmean(recall),
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": f1,
        "macro_f1": _nanmean(f1),
        "mcc": mcc,
        "auc": auc,
        "macro_auc": _nanmean(auc),
        "ece": np.abs(bin_correct - bin_confidence).sum(axis=1) / total,
        "ece_debiased": _debiased_ece(bin_weight, bin_correct, bin_confidence) / total,
        "brier": sums[:, -1] / total,
        "bin_weight": bin_weight,
        "bin_correct": bin_correct,
        "bin_confidence": bin_confidence,
    }


def _row_bincount(index: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise ``bincount(index_row, weights=weights_row, minlength=size)``.

    ``index`` and ``weights`` broadcast to R x N; one bincount over offset indices does all rows.
    """
    index, weights = np.broadcast_arrays(index, np.ones(1) if weights is None else weights)
    num_rows = index.shape[0]
    offsets = (np.arange(num_rows) * size)[:, None] + index
    return np.bincount(offsets.ravel(), weights=weights.ravel(), minlength=num_rows * size).reshape(num_rows, size)


def _weighted_auc(weights: np.ndarray, negatives: np.ndarray, positives: np.ndarray, below: np.ndarray,
                  at_or_below: np.ndarray | None) -> np.ndarray:
    """Mann-Whitney AUC per weight row (R x U unit counts): P(score_pos > score_neg) + P(tie) / 2; NaN without
    both classes.

    The cumulative weight of the negatives in score order (`negatives`: their units, after a zero), read
    at each positive's place among them (`PreparedPredictions`), is the weight it beats; a tie counts
    half, so a positive scores the mean of the weight below it and at or below it (the same when no
    score ties: `at_or_below` None). Linear in the images per replicate.
    """
    padded = np.concatenate([weights, np.zeros((len(weights), 1))], axis=1)  # unit -1: weight 0
    negative_cumulative = np.cumsum(padded[:, negatives], axis=1)
    positive_weights = weights[:, positives]
    beaten = negative_cumulative[:, below]
    if at_or_below is not None:
        beaten = 0.5 * (beaten + negative_cumulative[:, at_or_below])
    concordant = np.einsum("rp,rp->r", positive_weights, beaten)
    return _ratio(concordant, positive_weights.sum(axis=1) * negative_cumulative[:, -1])


def bootstrap_weights(num_units: int, num_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of bootstrap replicates as R x U unit counts: how often each unit (patient, or image) is drawn
    when ``num_units`` units are drawn with replacement. The same seed gives the same replicates, so two models
    scored on them are compared pairwise."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(num_units, 1))
    for start in range(0, num_resamples, chunk):
        drawn = rng.integers(0, num_units, size=(min(chunk, num_resamples - start), num_units))
        yield _row_bincount(drawn, num_units)


def _bootstrap_statistics(data: PreparedPredictions, num_resamples: int, seed: int,
                          on_resamples: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Statistics of ``num_resamples`` replicates drawing the data's units (patients or images) with replacement."""
    parts = []
    for weights in bootstrap_weights(data.num_units, num_resamples, seed):
        parts.append(replicate_statistics(data, weights))
        if on_resamples is not None:
            on_resamples(len(weights))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _debiased_ece(bin_weight: np.ndarray, bin_correct: np.ndarray, bin_confidence: np.ndarray) -> np.ndarray:
    """Sum over bins of count x debiased |accuracy - confidence| (divide by the total for the ECE).

    A bin's observed gap g = accuracy - confidence carries the noise of its accuracy, variance
    s^2 = a(1 - a)/n as in the authors' library (Kumar, Liang & Ma 2019, "Verified uncertainty
    calibration", debiasing under the normal approximation); |g| is then biased upwards by
    E|N(g, s^2)| - |g|, which is subtracted, here in closed form: E|N(g, s^2)| = s sqrt(2/pi)
    exp(-g^2/2s^2) + g erf(g/(s sqrt 2)). Where the bin's accuracy is 0 or 1 (every bin of one image)
    it gives no variance, and the bin's mean confidence c stands for a: c(1 - c)/n, the noise a
    calibrated model's bin would have, so those bins are debiased too instead of counted at face value.
    The result may be negative in a well-calibrated model's bins; the reported ECE is floored at 0.
    """
    count = np.maximum(bin_weight, 1e-300)
    accuracy = bin_correct / count
    gap = accuracy - bin_confidence / count
    noise_rate = np.where((accuracy > 0) & (accuracy < 1), accuracy, bin_confidence / count)
    variance = np.where(bin_weight > 0, noise_rate * (1 - noise_rate) / count, 0.0)
    sd = np.sqrt(np.maximum(variance, 0.0))
    safe_sd = np.where(sd > 0, sd, 1.0)
    expected_abs = np.where(sd > 0, sd * math.sqrt(2 / math.pi) * np.exp(-gap ** 2 / (2 * safe_sd ** 2))
                            + gap * erf(gap / (safe_sd * math.sqrt(2))), np.abs(gap))
    return np.sum(bin_weight * (2 * np.abs(gap) - expected_abs), axis=-1)


def _ece_interval(data: PreparedPredictions, estimate: float, replicates: np.ndarray, num_resamples: int, seed: int,
                  level: float) -> dict:
    """The debiased ECE's interval, built to keep its level both at ECE 0 and away from it (simulated in
    `simulation`; a plain percentile interval of these replicates almost never contains 0).

    Two bootstrap intervals, each good where the other is not, are joined: the basic interval
    [2t - q_hi, 2t - q_lo] (Davison & Hinkley 1997, eq. 5.6) and the same interval pivoting on the
    replicates' median instead of t, [t - (q_hi - m), t - (q_lo - m)], which always contains t. Its
    lower limit becomes 0 when ECE 0 is not rejected: when models that are calibrated by definition, the
    labels drawn from their own confidences (Broecker & Smith's 2007 consistency resampling), give a
    debiased ECE at least t in more than (1 - level)/2 of draws. Those draws are independent per image,
    so with several frames per patient the lower limit leaves 0 a little too readily (the simulation
    says how much). Bounds are floored at 0.
    """
    lower_q, median, upper_q = np.percentile(replicates, [50 * (1 - level), 50, 50 * (1 + level)])
    floored = max(estimate, 0.0)
    lower = min(2 * estimate - upper_q, floored - (upper_q - median))
    upper = max(2 * estimate - lower_q, floored - (lower_q - median))
    if estimate <= np.percentile(_calibrated_ece_draws(data, num_resamples, seed), 50 * (1 + level)):
        lower = 0.0
    return {"lower": max(0.0, float(lower)), "upper": max(0.0, float(upper))}


def _calibrated_ece_draws(data: PreparedPredictions, num_draws: int, seed: int) -> np.ndarray:
    """Debiased ECEs of a model calibrated by definition with these confidences: each image right with
    probability its confidence, in its own bin."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the bootstrap's replicates stay as they were
    bin_weight = np.bincount(data.calibration_bin, minlength=NUM_CALIBRATION_BINS)
    bin_confidence = np.bincount(data.calibration_bin, weights=data.confidence, minlength=NUM_CALIBRATION_BINS)
    chunk = max(1, _CHUNK_ELEMENTS // len(data.confidence))
    draws = []
    for start in range(0, num_draws, chunk):
        correct = rng.random((min(chunk, num_draws - start), len(data.confidence))) < data.confidence
        bin_correct = _row_bincount(data.calibration_bin[None, :], NUM_CALIBRATION_BINS, correct.astype(float))
        draws.append(_debiased_ece(bin_weight, bin_correct, bin_confidence) / len(data.confidence))
    return np.concatenate(draws)


def _flag_approximate(metrics: dict, num_units: int) -> None:
    """Mark (`flag`: why) each interval of ``metrics["ci"]`` where `simulation.coverage` found intervals of its
    kind covering less than APPROXIMATE_BELOW of the time: a bootstrap interval (AUC, macro-F1, MCC, Brier)
    with fewer than BOOTSTRAP_MIN_UNITS patients resampled or a value within reach of its best, and the ECE's
    when nearly every image is right (its debiasing then removes a small miscalibration with the noise).
    tests/test_simulation.py checks that every unflagged interval keeps the level."""
    ci = metrics["ci"]
    few = num_units < BOOTSTRAP_MIN_UNITS
    unit_word = "patients" if metrics["num_groups"] is not None else "images"

    def flag(interval: dict | None, measure: str, value) -> None:
        if interval is None or value is None:
            return
        best, reach = NEAR_BEST[measure]
        if few:
            interval["flag"] = (f"approximate: a bootstrap interval from {num_units} {unit_word} (fewer than "
                                f"{BOOTSTRAP_MIN_UNITS}) covers less than {APPROXIMATE_BELOW:.0%} in simulation")
        elif abs(best - value) <= reach:
            interval["flag"] = (f"approximate: a bootstrap interval this close to {best:g} covers less than "
                                f"{APPROXIMATE_BELOW:.0%} in simulation")

    for measure in ("macro_f1", "macro_auc", "mcc", "brier"):
        flag(ci[measure], "auc" if measure == "macro_auc" else measure, metrics[measure])
    for name, interval in ci["per_class_auc"].items():
        flag(interval, "auc", metrics["per_class"][name]["auc"])
    if metrics["accuracy"] >= ECE_APPROXIMATE_ABOVE_ACCURACY:
        ci["ece_debiased"]["flag"] = (f"approximate: with accuracy above {ECE_APPROXIMATE_ABOVE_ACCURACY:.0%} the "
                                      "interval can miss a small miscalibration (simulation)")


def _proportion_intervals(y_true: np.ndarray, predicted: np.ndarray, unit_of_image: np.ndarray, classes: list[str],
                          positive_index: int | None, level: float) -> dict:
    """Exact (clustered) intervals of every proportion the metrics hold, and MOVER's for balanced accuracy."""
    def interval(success, counted) -> dict | None:
        found = intervals.proportion_interval(success, counted, unit_of_image, level)
        return None if found is None else {"lower": found["lower"], "upper": found["upper"]}

    everything = np.ones(len(y_true), dtype=bool)
    result = {"accuracy": interval(predicted == y_true, everything)}
    rows = {}
    for k, name in enumerate(classes):
        truth, said = y_true == k, predicted == k
        rows[name] = {"sensitivity": interval(said, truth), "specificity": interval(~said, ~truth),
                      "ppv": interval(truth, said), "npv": interval(~truth, ~said)}
    for key, statistic in (("per_class_accuracy", "sensitivity"), ("per_class_specificity", "specificity"),
                           ("per_class_ppv", "ppv"), ("per_class_npv", "npv")):
        result[key] = {name: rows[name][statistic] for name in classes}
    present = [k for k, name in enumerate(classes) if rows[name]["sensitivity"] is not None]
    recalls = np.array([np.mean(predicted[y_true == k] == k) for k in present])
    result["balanced_accuracy"] = dict(zip(("lower", "upper"), intervals.mover_mean_interval(
        recalls, [rows[classes[k]]["sensitivity"]["lower"] for k in present],
        [rows[classes[k]]["sensitivity"]["upper"] for k in present])))
    if positive_index is not None:
        result["cancer_vs_benign"] = dict(rows[classes[positive_index]])
    return result


def _confidence_intervals(replicates: dict[str, np.ndarray], classes: list[str], positive_index: int | None,
                          num_units: int, level: float) -> dict:
    """Expanded percentile intervals of the bootstrap replicates, for the measures that are not proportions."""
    def interval(values: np.ndarray) -> dict | None:
        # Replicates where a statistic is undefined (e.g. a rare class was not drawn) are left out.
        return intervals.expanded_percentile_interval(values, num_units, level)

    found = {name: interval(replicates[name]) for name in ("macro_f1", "macro_auc", "mcc", "brier")}
    found["per_class_auc"] = {c: interval(replicates["auc"][:, k]) for k, c in enumerate(classes)}
    found["cancer_vs_benign"] = None
    if positive_index is not None:
        found["cancer_vs_benign"] = {"auc": found["per_class_auc"][classes[positive_index]]}
    return found


def _validated(y_true, probs, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be N x {len(classes)} (one column per class), got shape {probs.shape}")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(f"y_true must have shape ({probs.shape[0]},), got {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("no predictions to evaluate")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= len(classes):
        raise ValueError(f"y_true must hold class indices 0..{len(classes) - 1}")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3) or probs.min() < 0:
        raise ValueError("probs must be softmax probabilities (non-negative rows summing to 1), not logits")
    return y_true.astype(np.int64), probs


def _group_indices(groups, num_samples: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (num_samples,):
        raise ValueError(f"groups must have one patient id per image ({num_samples}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, float), np.asarray(denominator, float))
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator != 0)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (without a warning) when a row has no number."""
    defined = ~np.isnan(values)
    return _ratio(np.where(defined, values, 0.0).sum(axis=-1), defined.sum(axis=-1))


def _log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood (natural log) of the true classes, each probability clipped to
    [eps, 1 - eps] as scikit-learn's log_loss does."""
    eps = np.finfo(np.float64).eps
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1 - eps))))


def _safe_ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
