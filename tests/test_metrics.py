"""Metrics: hand-worked cases, agreement with scikit-learn, bootstrap behaviour, operating points."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from gastro_dist import UserError
from gastro_dist.evaluation import metrics as M
from gastro_dist.evaluation.intervals import exact_interval
from gastro_dist.evaluation.metrics import (
    binary_metrics_at_threshold,
    dummy_baselines,
    evaluate_predictions,
    operating_point,
    roc_curve,
    threshold_for_sensitivity,
)

STUDY_CLASSES = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis"]


def probs_predicting(predicted, num_classes, top=0.6):
    """Probabilities whose argmax is ``predicted``: ``top`` there, the rest shared evenly."""
    probs = np.full((len(predicted), num_classes), (1 - top) / (num_classes - 1))
    probs[np.arange(len(predicted)), predicted] = top
    return probs


def random_predictions(seed, num_samples, num_classes, signal=1.5):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes))
    logits[np.arange(num_samples), y_true] += signal
    probs = np.exp(logits)
    return y_true, probs / probs.sum(axis=1, keepdims=True)


def test_three_class_example_worked_by_hand():
    # true:      0 0 0 0 1 1 1 2 2 2
    # predicted: 0 0 0 1 1 1 2 2 2 0
    # confusion (rows true):  [3 1 0] / [0 2 1] / [1 0 2]; 7 of 10 correct.
    # class 0: tp 3 fn 1 fp 1 tn 5 -> sens 3/4, spec 5/6, ppv 3/4, npv 5/6, f1 6/8
    # class 1: tp 2 fn 1 fp 1 tn 6 -> sens 2/3, spec 6/7, ppv 2/3, npv 6/7, f1 4/6; class 2 the same.
    # MCC: t = p = [4 3 3], c = 7, s = 10: (7*10 - 34) / sqrt((100 - 34)^2) = 36/66 = 6/11.
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    m = evaluate_predictions(y_true, probs_predicting(predicted, 3), ["a", "b", "c"], num_bootstrap=0)

    assert m["num_samples"] == 10
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["per_class_accuracy"] == pytest.approx({"a": 3 / 4, "b": 2 / 3, "c": 2 / 3})
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    a, b = m["per_class"]["a"], m["per_class"]["b"]
    assert (a["sensitivity"], a["specificity"], a["ppv"], a["npv"], a["f1"]) == pytest.approx(
        (3 / 4, 5 / 6, 3 / 4, 5 / 6, 3 / 4))
    assert (b["sensitivity"], b["specificity"], b["ppv"], b["npv"], b["f1"]) == pytest.approx(
        (2 / 3, 6 / 7, 2 / 3, 6 / 7, 2 / 3))
    assert [m["per_class"][c]["support"] for c in "abc"] == [4, 3, 3]
    assert m["macro_f1"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["mcc"] == pytest.approx(6 / 11)
    assert m["cancer_vs_benign"] is None and m["ci"] is None


def test_binary_auc_with_a_tie_and_cancer_view_worked_by_hand():
    # P(cancer) of the 3 cancers 0.9 0.6 0.4 and of the 4 benign 0.6 0.3 0.2 0.1.
    # Pairs won: 0.9 beats all 4; 0.6 beats 3 and ties 1 (counts 1/2); 0.4 beats 3 -> 10.5 / 12.
    # Argmax says cancer above 0.5: tp 2 (0.9, 0.6), fn 1 (0.4), fp 1 (benign 0.6), tn 3.
    # MCC = (2*3 - 1*1) / sqrt(3*3*4*4) = 5/12.
    cancer_scores = np.array([0.9, 0.6, 0.4, 0.6, 0.3, 0.2, 0.1])
    y_true = np.array([1, 1, 1, 0, 0, 0, 0])
    probs = np.stack([1 - cancer_scores, cancer_scores], axis=1)
    m = evaluate_predictions(y_true, probs, ["benign", "gastric_cancer"], num_bootstrap=0)

    view = m["cancer_vs_benign"]
    assert view["positive_class"] == "gastric_cancer" and view["negative_classes"] == ["benign"]
    assert (view["tp"], view["fn"], view["fp"], view["tn"]) == (2, 1, 1, 3)
    assert (view["sensitivity"], view["specificity"], view["ppv"], view["npv"]) == pytest.approx(
        (2 / 3, 3 / 4, 2 / 3, 3 / 4))
    assert view["auc"] == pytest.approx(10.5 / 12)
    assert m["per_class"]["benign"]["auc"] == pytest.approx(10.5 / 12)
    assert m["mcc"] == pytest.approx(5 / 12)


def test_positive_class_is_a_parameter():
    y_true, probs = random_predictions(0, 50, 3)
    m = evaluate_predictions(y_true, probs, ["x", "y", "malignant"], num_bootstrap=20,
                             positive_class="malignant")
    assert m["cancer_vs_benign"]["positive_class"] == "malignant"
    assert m["cancer_vs_benign"]["sensitivity"] == m["per_class_accuracy"]["malignant"]
    assert set(m["ci"]["cancer_vs_benign"]) == {"sensitivity", "specificity", "ppv", "npv", "auc"}
    assert m["ci"]["cancer_vs_benign"]["ppv"] == m["ci"]["per_class_ppv"]["malignant"]


def test_five_classes_perfect_and_degenerate():
    y_true = np.array([0, 1, 2, 3, 4] * 4)
    perfect = evaluate_predictions(y_true, probs_predicting(y_true, 5, top=0.9), list("abcde"), num_bootstrap=0)
    assert perfect["accuracy"] == 1 and perfect["mcc"] == 1 and perfect["macro_f1"] == 1
    assert all(perfect["per_class"][c]["auc"] == 1 for c in "abcde")

    # Always predicting one class: MCC's denominator vanishes, scikit-learn then returns 0.
    constant = np.zeros(len(y_true), dtype=int)
    m = evaluate_predictions(y_true, probs_predicting(constant, 5), list("abcde"), num_bootstrap=0)
    assert m["mcc"] == 0 == skm.matthews_corrcoef(y_true, constant)
    assert m["accuracy"] == pytest.approx(0.2)
    assert all(m["per_class"][c]["auc"] == 0.5 for c in "abcde")  # every score tied


def test_calibration_error_worked_by_hand():
    # Top probabilities 0.95 0.95 0.55 0.55, correct 1 1 1 0: bins (14/15, 1] and (8/15, 9/15].
    # ECE = 2/4 * |1 - 0.95| + 2/4 * |0.5 - 0.55| = 0.05.
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.55, 0.45]])
    m = evaluate_predictions(np.array([0, 1, 0, 1]), probs, ["a", "b"], num_bootstrap=0)
    assert m["ece"] == pytest.approx(0.05)
    bins = m["calibration"]["bins"]
    assert len(bins) == m["calibration"]["num_bins"] == 15
    assert [b["count"] for b in bins] == [0] * 8 + [2] + [0] * 5 + [2]
    assert bins[14]["accuracy"] == 1 and bins[14]["confidence"] == pytest.approx(0.95)
    assert bins[8]["accuracy"] == 0.5 and bins[0]["accuracy"] is None


@pytest.mark.parametrize("seed,num_classes", [(0, 3), (1, 4), (2, 5), (3, 6), (4, 3)])
def test_agrees_with_scikit_learn(seed, num_classes):
    y_true, probs = random_predictions(seed, 300, num_classes, signal=0.8)
    # Coarse scores create ties, which the AUCs must handle like scikit-learn.
    probs = np.round(probs, 2)
    probs /= probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    classes = [f"class_{k}" for k in range(num_classes)]
    m = evaluate_predictions(y_true, probs, classes, num_bootstrap=0)

    labels = list(range(num_classes))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, predicted), abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, predicted), abs=1e-9)
    assert m["confusion_matrix"] == skm.confusion_matrix(y_true, predicted, labels=labels).tolist()
    recall = skm.recall_score(y_true, predicted, average=None, labels=labels)
    precision = skm.precision_score(y_true, predicted, average=None, labels=labels)
    f1 = skm.f1_score(y_true, predicted, average=None, labels=labels)
    for k, name in enumerate(classes):
        row = m["per_class"][name]
        assert row["sensitivity"] == pytest.approx(recall[k], abs=1e-9)
        assert m["per_class_accuracy"][name] == pytest.approx(recall[k], abs=1e-9)
        assert row["ppv"] == pytest.approx(precision[k], abs=1e-9)
        assert row["f1"] == pytest.approx(f1[k], abs=1e-9)
        assert row["auc"] == pytest.approx(skm.roc_auc_score(y_true == k, probs[:, k]), abs=1e-9)
        # Specificity is the recall of "not this class".
        assert row["specificity"] == pytest.approx(skm.recall_score(y_true != k, predicted != k), abs=1e-9)
        assert row["npv"] == pytest.approx(skm.precision_score(y_true != k, predicted != k), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, predicted, average="macro"), abs=1e-9)
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y_true, predicted), abs=1e-9)
    assert m["macro_auc"] == pytest.approx(
        skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"), abs=1e-9)
    # Brier's multiclass score (sum over classes, 0 to 2) and the log loss, as scikit-learn computes them.
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y_true, probs, labels=labels, scale_by_half=False),
                                       abs=1e-12)
    assert m["nll"] == pytest.approx(skm.log_loss(y_true, probs, labels=labels), abs=1e-12)


def test_brier_worked_by_hand():
    # (0.8, 0.2) for class 0: (0.2^2 + 0.2^2) = 0.08; (0.3, 0.7) for class 0: 0.7^2 + 0.7^2 = 0.98.
    m = evaluate_predictions(np.array([0, 0]), np.array([[0.8, 0.2], [0.3, 0.7]]), ["a", "b"], num_bootstrap=0)
    assert m["brier"] == pytest.approx((0.08 + 0.98) / 2)
    assert m["nll"] == pytest.approx(-(np.log(0.8) + np.log(0.3)) / 2)


def test_debiased_ece_interval_contains_its_estimate_where_the_percentile_interval_did_not():
    """A calibrated model on 450 images: the plug-in ECE (0.028) is all noise, and the percentile interval of
    its bootstrap replicates (biased once more) lies above it (0.032 - 0.082), as the report once showed ('ECE
    0.029, 95% CI 0.034 - 0.100'). The debiased ECE's interval holds its estimate, by construction."""
    rng = np.random.default_rng(26)
    logits = rng.normal(0, 1.5, size=(450, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_true = (rng.random(450)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)  # drawn from probs: calibrated
    m = evaluate_predictions(y_true, probs, STUDY_CLASSES, num_bootstrap=500, seed=0)
    replicates = M._bootstrap_statistics(M.PreparedPredictions(y_true, probs), 500, 0)["ece"]
    lower, upper = np.percentile(replicates, [2.5, 97.5])
    assert not lower <= m["ece"] <= upper  # the old interval misses its own estimate
    interval = m["ci"]["ece_debiased"]
    assert interval["lower"] <= m["ece_debiased"] <= interval["upper"]
    assert m["ece_debiased"] < m["ece"]
    for seed in range(20):  # whatever the replicates
        y, p = random_predictions(seed, 120, 3)
        again = evaluate_predictions(y, p, STUDY_CLASSES, np.arange(120) // 3, num_bootstrap=100, seed=seed)
        assert again["ci"]["ece_debiased"]["lower"] <= again["ece_debiased"] <= again["ci"]["ece_debiased"]["upper"]


def test_debiased_ece_corrects_each_bin_by_its_expected_noise():
    # One bin of 10 images at confidence 0.95 with 9 right: gap -0.05, s^2 = 0.9 * 0.1 / 10 = 0.009 (the
    # authors' library divides by n). E|N(g, s^2)| = s sqrt(2/pi) exp(-g^2/2s^2) + g erf(g / (s sqrt 2)), and
    # debiased = 2 * 0.05 - E|N(g, s^2)| (the plug-in ECE is 0.05).
    from scipy.special import erf

    def expected_abs(gap, sd):
        return sd * np.sqrt(2 / np.pi) * np.exp(-gap ** 2 / (2 * sd ** 2)) + gap * erf(gap / (sd * np.sqrt(2)))

    probs = np.tile([0.95, 0.05], (10, 1))
    y_true = np.array([0] * 9 + [1])
    m = evaluate_predictions(y_true, probs, ["a", "b"], num_bootstrap=0)
    assert m["ece"] == pytest.approx(0.05)
    assert m["ece_debiased"] == pytest.approx(2 * 0.05 - expected_abs(-0.05, np.sqrt(0.009)))
    # A bin whose images are all right (here one image at 0.9) has no accuracy variance; the bin's confidence
    # gives it, 0.9 * 0.1 / 1, so it is debiased too instead of counted as a gap of 0.1.
    single = evaluate_predictions(np.array([0]), np.array([[0.9, 0.1]]), ["a", "b"], num_bootstrap=0)
    assert single["ece"] == pytest.approx(0.1)
    assert single["ece_debiased"] == max(0.0, 2 * 0.1 - expected_abs(0.1, 0.3))


def test_patient_level_mean_and_max():
    # Patient p1: two cancer frames (P(cancer) 0.9 and 0.3); p2: one gastritis frame and one ulcer frame.
    classes = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis"]
    probs = np.array([[0.9, 0.05, 0.05], [0.3, 0.5, 0.2], [0.1, 0.2, 0.7], [0.2, 0.6, 0.2]])
    y_true = np.array([0, 0, 2, 1])
    groups = np.array(["p1", "p1", "p2", "p2"])
    mean = M.patient_level(y_true, probs, groups, "mean")
    assert mean["groups"].tolist() == ["p1", "p2", "p2"] and mean["labels"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(mean["probs"], [[0.6, 0.275, 0.125], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]])
    assert mean["num_frames"].tolist() == [2, 1, 1]
    largest = M.patient_level(y_true, probs, groups, "max", positive_index=0)
    # p1: P(cancer) = 0.9; the other 0.1 shared as the means 0.275 : 0.125.
    np.testing.assert_allclose(largest["probs"][0], [0.9, 0.1 * 0.275 / 0.4, 0.1 * 0.125 / 0.4])
    np.testing.assert_allclose(largest["probs"].sum(axis=1), 1.0)
    with pytest.raises(UserError, match="positive class"):
        M.patient_level(y_true, probs, groups, "max")
    # Patient-level metrics are ordinary metrics of the cases, resampled by patient.
    m = evaluate_predictions(mean["labels"], mean["probs"], classes, mean["groups"], num_bootstrap=20)
    assert m["num_samples"] == 3 and m["num_groups"] == 2 and m["accuracy"] == 1.0


def test_roc_curve_matches_scikit_learn():
    y_true, probs = random_predictions(5, 200, 3)
    scores = np.round(probs[:, 0], 2)
    fpr, tpr = roc_curve(y_true == 0, scores)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y_true == 0, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_bootstrap_intervals_contain_estimate_and_are_seeded():
    y_true, probs = random_predictions(7, 400, 3)
    groups = np.arange(400) // 4
    first = evaluate_predictions(y_true, probs, STUDY_CLASSES, groups, num_bootstrap=300, seed=1)
    again = evaluate_predictions(y_true, probs, STUDY_CLASSES, groups, num_bootstrap=300, seed=1)
    other = evaluate_predictions(y_true, probs, STUDY_CLASSES, groups, num_bootstrap=300, seed=2)

    assert first["ci"] == again["ci"]
    assert first["ci"]["macro_auc"] != other["ci"]["macro_auc"]
    assert first["ci"]["accuracy"] == other["ci"]["accuracy"]  # exact intervals draw nothing
    assert first["bootstrap"] == {"num_resamples": 300, "seed": 1, "level": 0.95,
                                  "method": "expanded percentile (AUC, macro-F1, MCC, Brier score)",
                                  "proportion_method": M.intervals.PROPORTION_METHOD,
                                  "balanced_accuracy_method": M.intervals.BALANCED_ACCURACY_METHOD,
                                  "ece_method": M.ECE_INTERVAL_METHOD, "unit": "patient", "num_units": 100}
    ci = first["ci"]

    def contains(interval, value):
        return interval["lower"] <= value <= interval["upper"] and interval["lower"] < interval["upper"]

    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "mcc", "brier", "ece_debiased"):
        assert contains(ci[name], first[name]), name
    for name in STUDY_CLASSES:
        assert contains(ci["per_class_accuracy"][name], first["per_class_accuracy"][name])
        assert contains(ci["per_class_auc"][name], first["per_class"][name]["auc"])
        for statistic in ("specificity", "ppv", "npv"):
            assert contains(ci[f"per_class_{statistic}"][name], first["per_class"][name][statistic])
    for name in ("sensitivity", "specificity", "ppv", "npv", "auc"):
        assert contains(ci["cancer_vs_benign"][name], first["cancer_vs_benign"][name])


def test_bootstrap_resamples_patients_not_images():
    # Patient A: 10 images all right; patient B: 10 images all wrong. Two patients are one degree of freedom:
    # the accuracy's interval spans about [0, 1]; treating the images as independent gives one around 1/2.
    y_true = np.zeros(20, dtype=int)
    predicted = np.r_[np.zeros(10, dtype=int), np.ones(10, dtype=int)]
    probs = probs_predicting(predicted, 2)
    groups = np.array(["A"] * 10 + ["B"] * 10)
    by_patient = evaluate_predictions(y_true, probs, ["a", "b"], groups, num_bootstrap=400)
    by_image = evaluate_predictions(y_true, probs, ["a", "b"], num_bootstrap=400)
    assert by_patient["ci"]["accuracy"] == pytest.approx({"lower": 0.0, "upper": 1.0}, abs=1e-6)
    assert by_patient["ci"]["macro_f1"]["lower"] == 0.0  # the bootstrap draws A twice a quarter of the time
    assert by_patient["num_groups"] == 2 and by_patient["bootstrap"]["unit"] == "patient"
    assert by_image["ci"]["accuracy"]["upper"] - by_image["ci"]["accuracy"]["lower"] < 0.5
    assert by_image["bootstrap"]["unit"] == "image"

    # A single patient says nothing about the next one: the accuracy's interval is nearly [0, 1] (a bootstrap of
    # one patient collapses to the estimate).
    y_true, probs = random_predictions(3, 60, 3)
    single = evaluate_predictions(y_true, probs, STUDY_CLASSES, np.full(60, 17), num_bootstrap=50)
    assert single["ci"]["accuracy"]["lower"] < 0.01 and single["ci"]["accuracy"]["upper"] > 0.99
    assert single["ci"]["macro_auc"]["lower"] == pytest.approx(single["macro_auc"])


def test_weighted_replicate_equals_metrics_of_the_resampled_images():
    """A replicate's weights stand for repeated images: same numbers as evaluating the repeats."""
    y_true, probs = random_predictions(11, 80, 4)
    probs = np.round(probs, 1)
    probs /= probs.sum(axis=1, keepdims=True)
    drawn = np.random.default_rng(0).integers(0, 80, 80)
    weights = np.bincount(drawn, minlength=80).astype(float)
    replicate = M.replicate_statistics(M.PreparedPredictions(y_true, probs), weights[None, :])
    direct = evaluate_predictions(y_true[drawn], probs[drawn], list("abcd"), num_bootstrap=0)
    assert replicate["accuracy"][0] == pytest.approx(direct["accuracy"])
    assert replicate["mcc"][0] == pytest.approx(direct["mcc"])
    assert replicate["macro_f1"][0] == pytest.approx(direct["macro_f1"])
    assert replicate["ece"][0] == pytest.approx(direct["ece"])
    assert replicate["brier"][0] == pytest.approx(direct["brier"])
    assert max(0, replicate["ece_debiased"][0]) == pytest.approx(direct["ece_debiased"])
    for k, name in enumerate("abcd"):
        assert replicate["auc"][0, k] == pytest.approx(direct["per_class"][name]["auc"])


def test_unit_weights_are_the_weights_of_their_images():
    """A replicate drawn by patient (R x U counts, summed per patient) gives the metrics of the same replicate
    written as per-image weights."""
    y_true, probs = random_predictions(12, 90, 3)
    units = np.arange(90) // 4
    counts = np.random.default_rng(1).integers(0, 3, size=(2, units.max() + 1)).astype(float)
    by_unit = M.replicate_statistics(M.PreparedPredictions(y_true, probs, units), counts)
    by_image = M.replicate_statistics(M.PreparedPredictions(y_true, probs), counts[:, units])
    for name in ("confusion", "accuracy", "auc", "ece_debiased", "brier", "mcc", "bin_confidence"):
        np.testing.assert_allclose(by_unit[name], by_image[name], rtol=1e-12, atol=1e-12)


def test_absent_class_gives_none_and_json_without_nan():
    y_true = np.array([0, 0, 1, 1, 0, 1, 0, 1])  # class 2 never occurs
    predicted = np.array([0, 1, 1, 1, 0, 2, 0, 1])
    m = evaluate_predictions(y_true, probs_predicting(predicted, 3), STUDY_CLASSES, num_bootstrap=50)
    absent = m["per_class"]["chronic_gastritis"]
    assert absent["auc"] is None and absent["sensitivity"] is None and absent["support"] == 0
    assert absent["f1"] == 0  # predicted once, never right
    assert m["per_class_accuracy"]["chronic_gastritis"] is None
    assert m["ci"]["per_class_auc"]["chronic_gastritis"] is None
    assert m["macro_auc"] == pytest.approx(np.mean([m["per_class"][c]["auc"] for c in STUDY_CLASSES[:2]]))
    json.dumps(m, allow_nan=False)


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="logits"):
        evaluate_predictions(np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 3.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="one column per class"):
        evaluate_predictions(np.array([0, 1]), np.eye(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="class indices"):
        evaluate_predictions(np.array([0, 2]), np.eye(2), ["a", "b"])


def test_dummy_baselines():
    y_true = np.array([0] * 6 + [1] * 3 + [2] * 1)
    baselines = dummy_baselines(y_true, STUDY_CLASSES, seed=3)
    majority = baselines["majority"]
    assert majority["accuracy"] == pytest.approx(0.6) and majority["mcc"] == 0
    assert majority["per_class"]["gastric_cancer"]["auc"] == 0.5
    assert majority["per_class_accuracy"] == {"gastric_cancer": 1.0, "gastric_ulcer": 0.0, "chronic_gastritis": 0.0}
    assert baselines["stratified"] == dummy_baselines(y_true, STUDY_CLASSES, seed=3)["stratified"]
    assert set(baselines["stratified"]) == set(majority)
    json.dumps(baselines, allow_nan=False)

    # Frequencies from the training labels change which class the majority baseline picks.
    trained_on = np.array([2] * 5 + [0] * 2)
    assert dummy_baselines(y_true, STUDY_CLASSES, train_labels=trained_on)["majority"]["accuracy"] == pytest.approx(0.1)


def test_threshold_for_sensitivity_reaches_target_and_is_the_highest():
    rng = np.random.default_rng(0)
    truth = rng.random(500) < 0.3
    scores = np.clip(rng.normal(0.3 + 0.4 * truth, 0.2), 0, 1)
    for target in (0.5, 0.7, 0.9, 0.95, 1.0):
        threshold = threshold_for_sensitivity(truth, scores, target)
        assert binary_metrics_at_threshold(truth, scores, threshold)["sensitivity"] >= target
        assert binary_metrics_at_threshold(truth, scores, np.nextafter(threshold, 2))["sensitivity"] < target

    # 0.7 * 10 is 7.000000000000001 in floating point: still the 7th highest positive score.
    assert threshold_for_sensitivity(np.ones(10, bool), np.arange(10) / 10, 0.7) == 0.3
    with pytest.raises(UserError, match="no positive"):
        threshold_for_sensitivity(np.zeros(5, bool), np.ones(5), 0.9)


def test_binary_metrics_at_threshold_worked_by_hand():
    truth = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.6, 0.4, 0.6, 0.3, 0.2, 0.1])
    result = binary_metrics_at_threshold(truth, scores, 0.4)  # positives: 0.9 0.6 0.4 | 0.6
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (3, 0, 1, 3)
    assert (result["sensitivity"], result["specificity"], result["ppv"], result["npv"]) == pytest.approx(
        (1, 3 / 4, 3 / 4, 1))
    assert binary_metrics_at_threshold(truth, scores, 2.0)["ppv"] is None


def test_operating_point_is_chosen_on_one_split_and_applied_to_another():
    y_val, probs_val = random_predictions(1, 300, 3)
    y_test, probs_test = random_predictions(2, 300, 3)
    point = operating_point(y_val, probs_val, y_test, probs_test, STUDY_CLASSES, 0.9)
    assert point["selection"]["sensitivity"] >= 0.9
    assert point["metrics"]["threshold"] == point["threshold"] == point["selection"]["threshold"]
    assert point["metrics"]["tp"] + point["metrics"]["fn"] == int(np.sum(y_test == 0))
    # Intervals on the reported split: exact, or with patients as the units.
    tp, fn, tn, fp = (point["metrics"][key] for key in ("tp", "fn", "tn", "fp"))
    assert point["intervals"]["sensitivity"] == pytest.approx(dict(zip(("lower", "upper"),
                                                                       map(float, exact_interval(tp, tp + fn)))))
    assert point["intervals"]["specificity"] == pytest.approx(dict(zip(("lower", "upper"),
                                                                       map(float, exact_interval(tn, tn + fp)))))
    assert point["target_reached"] == (point["metrics"]["sensitivity"] >= 0.9)
    clustered = operating_point(y_val, probs_val, y_test, probs_test, STUDY_CLASSES, 0.9, groups_report=np.arange(300) // 5)
    width = lambda i: i["upper"] - i["lower"]  # noqa: E731
    assert width(clustered["intervals"]["specificity"]) >= width(point["intervals"]["specificity"])
    # A target the reported split misses is said so.
    missed = operating_point(y_val, probs_val, y_val, np.roll(probs_val, 1, axis=1), STUDY_CLASSES, 0.9)
    assert not missed["target_reached"] and missed["metrics"]["sensitivity"] < 0.9
    with pytest.raises(UserError, match="positive class"):
        operating_point(y_val, probs_val, y_test, probs_test, ["a", "b", "c"], 0.9)


def test_bootstrap_units_group_frames_of_one_video_without_a_patient_id():
    from gastro_dist.evaluation.evaluate import _sample_metadata, bootstrap_unit

    texts = [json.dumps({"patient_id": "p7", "source": "a.mp4", "source_kind": "video", "frame_index": 3}),
             json.dumps({"patient_id": None, "source": "b.mp4", "source_kind": "video", "frame_index": 0}),
             json.dumps({"patient_id": None, "source": "b.mp4", "source_kind": "video", "frame_index": 30}),
             json.dumps({"patient_id": "", "source": "c.dcm", "source_kind": "dicom", "frame_index": 2}),
             json.dumps({"patient_id": None, "source": "still.jpg", "source_kind": "image", "frame_index": None}),
             json.dumps({"source": "x.mp4", "frame_index": "7"})]
    keys = [f"k{i}" for i in range(len(texts))]
    metas, problems = _sample_metadata(texts, keys)
    assert [bootstrap_unit(meta, key) for meta, key in zip(metas, keys)] == [
        "patient:p7", "source:b.mp4", "source:b.mp4", "source:c.dcm", "image:k4", "image:k5"]
    assert problems == ["k5: frame_index in sample .json is not a whole number; left empty"]
