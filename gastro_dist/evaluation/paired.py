"""Paired comparison of classifiers scored on the same images: is one really better than another?

Per pair of models: McNemar's exact test on which images each gets right (statsmodels), the
differences in accuracy, macro AUC and cancer-versus-benign AUC with paired patient-level bootstrap
CIs (both models scored on the same resamples), DeLong's test for the difference in the binary
(cancer-versus-benign) AUC, a paired bootstrap test for the difference in macro AUC (DeLong's test is
for one binary AUC), and Holm's correction of each test's p-values across all pairs (`holm`, equal to
statsmodels' multipletests). DeLong's and the bootstrap test are written here: neither scipy,
statsmodels nor scikit-learn has them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import chi2, norm, rankdata
from statsmodels.stats.contingency_tables import mcnemar

from gastro_dist.evaluation.intervals import expanded_percentile_interval
from gastro_dist.evaluation.metrics import PreparedPredictions, bootstrap_weights, replicate_statistics
from gastro_dist.evaluation.report import display_name

ALPHA = 0.05  # the significance level the text reads the Holm-adjusted p-values at
# Fewest patients (or images) with the positive class for DeLong's test to keep its size (simulated).
MIN_DELONG_UNITS = 10


def mcnemar_exact(correct_a, correct_b) -> dict:
    """McNemar's exact test (two-sided binomial test on the discordant images) that two classifiers,
    right or wrong on the same images, are equally accurate: statsmodels' ``mcnemar(exact=True)``."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    result = mcnemar(table, exact=True)
    return {"both_right": table[0][0], "only_a_right": table[0][1], "only_b_right": table[1][0],
            "both_wrong": table[1][1], "statistic": float(result.statistic), "p_value": float(result.pvalue)}


def clustered_mcnemar(correct_a, correct_b, groups=None) -> dict:
    """Durkalski, Palesch, Lipsitz & Rust's (2003, Stat Med 22:2417) McNemar test for clustered data: per
    patient, d = (images only a got right) - (images only b got right); the statistic (sum d)^2 / sum d^2
    is chi-square with 1 degree of freedom. It is McNemar's (uncorrected) test when each patient has one
    image, and keeps its size when a patient's frames are right or wrong together, where McNemar's, which
    counts every frame as independent evidence, does not (`simulation.test_sizes`). p_value is 1.0 when
    no patient has a discordant image. statsmodels has McNemar's test but not this one."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    unit = _units(groups, len(a))
    d = np.bincount(unit, weights=(a & ~b).astype(float) - (~a & b), minlength=int(unit.max()) + 1)
    denominator = float(np.sum(d ** 2))
    statistic = float(d.sum() ** 2 / denominator) if denominator else 0.0
    return {"statistic": statistic, "p_value": float(chi2.sf(statistic, 1)) if denominator else 1.0,
            "num_units": int(unit.max()) + 1, "units_with_discordance": int(np.count_nonzero(d)),
            "method": "clustered McNemar (Durkalski et al. 2003)" if groups is not None else "McNemar (asymptotic)"}


def delong_test(y_binary, scores_a, scores_b, groups=None) -> dict:
    """DeLong, DeLong & Clarke-Pearson (1988): the difference of two correlated AUCs (same images and
    truth) over its standard error, from the placement values of each positive among the negatives
    and each negative among the positives (midranks, so ties count one half).

    With ``groups`` (patient ids), images of one patient are not independent: the variance is then
    Obuchowski's (1997, Biometrics 53:567) clustered form, the placement values summed per patient.
    With one image per patient it is exactly DeLong's. Returns auc_a, auc_b, difference (a - b),
    se, z, p_value (two-sided, normal), the method used, the numbers of patients (or images) with
    positive and negative images, and ``note``: why there is no p-value, or a warning.

    The variance has a term per class estimated from its units: with the positives (or negatives) of
    fewer than 2 units that term cannot be estimated, and leaving it out (as this function once did)
    gives a p-value that rejects a true null most of the time; se, z and p_value are then None and
    ``note`` says why. Below MIN_DELONG_UNITS positive units the test rejects more often than its level
    (simulated: `simulation.delong_sizes`), which ``note`` says and `significance_sentences` heeds.
    z is None with p_value 1.0 when both models rank every pair alike (se 0).
    """
    truth = np.asarray(y_binary, dtype=bool)
    scores = np.stack([np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)])
    clustered = groups is not None and len(np.unique(np.asarray(groups))) < len(truth)
    method = "DeLong (clustered by patient, Obuchowski 1997)" if clustered else "DeLong 1988"
    num_pos, num_neg = int(truth.sum()), int((~truth).sum())
    unit = _units(groups, len(truth))
    units_pos = len(np.unique(unit[truth]))
    units_neg = len(np.unique(unit[~truth]))
    counts = {"method": method, "positive_units": units_pos, "negative_units": units_neg}
    if num_pos == 0 or num_neg == 0:
        return {"auc_a": None, "auc_b": None, "difference": None, "se": None, "z": None, "p_value": None,
                "note": "the positive class or the rest is absent", **counts}
    # Placement values: a positive's share of negatives below it, a negative's share of positives above it.
    combined = rankdata(scores, axis=1)
    positive_placement = (combined[:, truth] - rankdata(scores[:, truth], axis=1)) / num_neg
    negative_placement = 1.0 - (combined[:, ~truth] - rankdata(scores[:, ~truth], axis=1)) / num_pos
    auc = positive_placement.mean(axis=1)
    aucs = {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": float(auc[0] - auc[1])}
    what = "patients" if clustered else "images"
    if min(units_pos, units_neg) < 2:
        side = "positive" if units_pos < 2 else "negative"
        return {**aucs, "se": None, "z": None, "p_value": None, **counts,
                "note": f"no p-value: the {side} {what} number {min(units_pos, units_neg)}, and the variance of "
                        f"the AUC difference needs at least 2"}
    num_units = int(unit.max() + 1)
    # Per unit: the summed deviations of its positives' and negatives' placements from the AUC, model a minus b.
    deviation = positive_placement - auc[:, None]
    pos_dev = np.bincount(unit[truth], weights=deviation[0] - deviation[1], minlength=num_units)
    deviation = negative_placement - auc[:, None]
    neg_dev = np.bincount(unit[~truth], weights=deviation[0] - deviation[1], minlength=num_units)
    units_all = len(np.unique(unit))
    variance = (_inflation(units_pos) * np.sum(pos_dev ** 2) / num_pos ** 2
                + _inflation(units_neg) * np.sum(neg_dev ** 2) / num_neg ** 2
                + 2 * _inflation(units_all) * np.sum(pos_dev * neg_dev) / (num_pos * num_neg))
    difference = aucs["difference"]
    se = math.sqrt(max(variance, 0.0))
    if se == 0:
        z, p_value = None, 1.0 if difference == 0 else None
    else:
        z = difference / se
        p_value = float(2 * norm.sf(abs(z)))
    note = None
    if units_pos < MIN_DELONG_UNITS:
        note = (f"only {units_pos} positive {what}: below {MIN_DELONG_UNITS} DeLong's test rejects more often than "
                f"its level (simulated), so its p-value is read as descriptive")
    return {**aucs, "se": se, "z": z, "p_value": p_value, **counts, "note": note}


def bootstrap_difference_test(difference: float | None, replicates: np.ndarray) -> dict:
    """The paired bootstrap test of pROC's ``roc.test(method="bootstrap")`` (Robin et al. 2011): the
    difference over the standard deviation of its bootstrap replicates, read on the normal distribution
    (two-sided). se, z and p_value are None without replicates; z None with p_value 1.0 when every
    replicate is the same zero difference (a model compared with its copy)."""
    replicates = replicates[~np.isnan(replicates)]
    method = "paired bootstrap (pROC roc.test, method='bootstrap')"
    if difference is None or len(replicates) < 2:
        return {"se": None, "z": None, "p_value": None, "method": method}
    se = float(np.std(replicates, ddof=1))
    if se == 0:
        z, p_value = None, 1.0 if difference == 0 else None
    else:
        z = difference / se
        p_value = float(2 * norm.sf(abs(z)))
    return {"se": se, "z": z, "p_value": p_value, "method": method}


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values that exist; None stays None.

    Written out (the k-th smallest of m times m - k + 1, made monotone, capped at 1) rather than
    statsmodels' ``multipletests(method="holm")``, which gives the same values (a test checks it) but
    runs a full ``gc.collect()`` on every call: about 0.3 s in a process that holds a trained model,
    paid once per test per compare and per simulated dataset.
    """
    present = [k for k, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    if present:
        values = np.array([p_values[k] for k in present], dtype=float)
        order = np.argsort(values, kind="stable")
        scaled = values[order] * np.arange(len(values), 0, -1)
        corrected = np.empty_like(values)
        corrected[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
        for k, value in zip(present, corrected):
            adjusted[k] = float(value)
    return adjusted


def compare_models(y_true, probs: dict[str, np.ndarray], classes: list[str], groups=None,
                   positive_class: str | None = "gastric_cancer", num_bootstrap: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Every pair of the models in ``probs`` (name -> N x C probabilities, rows the same images, truth
    ``y_true``), each test Holm-corrected across the pairs. ``groups`` (patient ids) makes the
    bootstrap resample patients and DeLong's variance cluster by patient."""
    y_true = np.asarray(y_true, dtype=np.int64)
    names = list(probs)
    positive = classes.index(positive_class) if positive_class in classes else None
    unit = _units(groups, len(y_true))
    num_units = int(unit.max() + 1) if len(unit) else 0
    prepared = {name: PreparedPredictions(y_true, np.asarray(probs[name], dtype=float), unit) for name in names}
    correct = {name: np.asarray(probs[name]).argmax(axis=1) == y_true for name in names}
    point = {name: {key: values[0] for key, values in replicate_statistics(prepared[name],
                                                                           np.ones((1, num_units))).items()}
             for name in names}
    replicates = {name: [] for name in names}
    for weights in bootstrap_weights(num_units, num_bootstrap, seed) if num_bootstrap > 0 else []:
        for name in names:
            stats = replicate_statistics(prepared[name], weights)
            replicates[name].append(np.stack([stats["accuracy"], stats["macro_auc"],
                                              stats["auc"][:, positive] if positive is not None
                                              else np.full(len(weights), np.nan)], axis=1))
    replicates = {name: np.concatenate(parts) if parts else np.empty((0, 3)) for name, parts in replicates.items()}

    pairs = []
    for a, b in itertools.combinations(names, 2):
        pair = {"a": a, "b": b,
                "accuracy_test": clustered_mcnemar(correct[a], correct[b], groups),
                "mcnemar": mcnemar_exact(correct[a], correct[b])}
        for column, (key, value) in enumerate((("accuracy", "accuracy"), ("macro_auc", "macro_auc"),
                                               ("cancer_auc", "auc"))):
            estimate_a = point[a][value] if key != "cancer_auc" else (point[a]["auc"][positive] if positive is not None
                                                                      else np.nan)
            estimate_b = point[b][value] if key != "cancer_auc" else (point[b]["auc"][positive] if positive is not None
                                                                      else np.nan)
            differences = replicates[a][:, column] - replicates[b][:, column]
            pair[f"{key}_difference"] = {"a": _number(estimate_a), "b": _number(estimate_b),
                                         "difference": _number(estimate_a - estimate_b),
                                         "ci": expanded_percentile_interval(differences, num_units, level)}
            if key == "macro_auc":
                pair["macro_auc_test"] = bootstrap_difference_test(pair[f"{key}_difference"]["difference"],
                                                                   differences)
        pair["delong"] = (delong_test(y_true == positive, probs[a][:, positive], probs[b][:, positive], groups)
                          if positive is not None else None)
        pairs.append(pair)

    for test, p_of in (("accuracy_test", lambda pair: pair["accuracy_test"]["p_value"]),
                       ("mcnemar", lambda pair: pair["mcnemar"]["p_value"]),
                       ("macro_auc_test", lambda pair: pair["macro_auc_test"]["p_value"]),
                       ("delong", lambda pair: pair["delong"]["p_value"] if pair["delong"] else None)):
        for pair, adjusted in zip(pairs, holm([p_of(pair) for pair in pairs])):
            if pair[test] is not None:
                pair[test]["p_holm"] = adjusted
                # a DeLong p-value with a note comes from too few positive patients to keep its size
                pair[test]["significant"] = adjusted is not None and adjusted < ALPHA and not pair[test].get("note")
    return {"models": names, "num_images": int(len(y_true)), "num_units": num_units,
            "unit": "patient" if groups is not None else "image", "positive_class": classes[positive]
            if positive is not None else None, "num_resamples": int(num_bootstrap), "seed": int(seed),
            "level": float(level), "alpha": ALPHA, "pairs": pairs}


def significance_sentences(comparison: dict) -> list[str]:
    """Plain sentences, one per pair and measure, saying whether the difference is significant. Accuracy is
    judged by the clustered McNemar test (patients, when there are patient ids); McNemar's exact test, which
    counts every image as independent, follows as a secondary line. A DeLong p-value from too few positive
    patients is given but not called significant (its `note` says why)."""
    level = f"{comparison['level']:.0%}"
    sentences = []
    for pair in comparison["pairs"]:
        a, b, exact = pair["a"], pair["b"], pair["mcnemar"]
        accuracy_test = pair["accuracy_test"]
        sentences.append(_verdict(
            "Accuracy", pair, "accuracy_difference", accuracy_test, accuracy_test["method"], level, _pct, _points,
            f" ({accuracy_test['units_with_discordance']} of {accuracy_test['num_units']} "
            f"{'patients' if comparison['unit'] == 'patient' else 'images'} with images only one model got right)"))
        sentences.append(f"Secondary, images treated as independent: McNemar's exact test {_p(exact['p_value'])} "
                         f"(Holm-adjusted {_p(exact['p_holm'])}; {exact['only_a_right']} images only {a} got right, "
                         f"{exact['only_b_right']} only {b}).")
        if pair["macro_auc_test"]["p_value"] is not None:
            sentences.append(_verdict("Macro AUC", pair, "macro_auc_difference", pair["macro_auc_test"],
                                      "paired bootstrap test", level, _dec, _signed))
        delong = pair["delong"]
        if delong is not None and delong["p_value"] is not None:
            sentences.append(_verdict(f"{display_name(comparison['positive_class'])}-vs-rest AUC", pair, "cancer_auc_difference",
                                      delong, "DeLong", level, _dec, _signed,
                                      f" ({delong['note']})" if delong.get("note") else ""))
        elif delong is not None and delong.get("note"):
            sentences.append(f"{display_name(comparison['positive_class'])}-vs-rest AUC of {a} and {b}: {delong['note']}.")
    return sentences


def _verdict(measure: str, pair: dict, difference_key: str, test: dict, test_name: str, level: str,
             value_format, difference_format, note: str = "") -> str:
    """'<measure> of a and b is (not) significantly different: A vs B, difference D (CI); <test> p, Holm p.'"""
    difference = pair[difference_key]
    verdict = "significantly different" if test["significant"] else "not significantly different"
    return (f"{measure} of {pair['a']} and {pair['b']} is {verdict}: {value_format(difference['a'])} vs "
            f"{value_format(difference['b'])}, difference {difference_format(difference['difference'])} ({level} CI "
            f"{_ci(difference['ci'], difference_format)}); {test_name} {_p(test['p_value'])}, Holm-adjusted "
            f"{_p(test['p_holm'])}{note}.")


def _units(groups, num_images: int) -> np.ndarray:
    """0..U-1 per image: its patient with ``groups``, else the image itself."""
    if groups is None:
        return np.arange(num_images)
    return np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)


def _inflation(num_units: int) -> float:
    """I / (I - 1): the small-sample factor of a variance estimated from I independent units."""
    return num_units / (num_units - 1) if num_units > 1 else 0.0


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} points"


def _dec(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _p(value) -> str:
    return "p n/a" if value is None else ("p < 0.001" if value < 0.001 else f"p = {value:.3f}")


def _ci(interval: dict | None, fmt) -> str:
    return "n/a" if interval is None else f"{fmt(interval['lower'])} to {fmt(interval['upper'])}"
