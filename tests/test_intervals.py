"""Intervals of proportions: Clopper-Pearson against scipy, the clustered (Korn-Graubard) interval worked by
hand, MOVER for a mean, the expanded percentile interval; and the report's boundary cases."""

import math

import numpy as np
import pytest
from scipy.stats import beta, binomtest, norm, t

from gastro_dist.evaluation.intervals import (clustered_proportion_interval, exact_interval,
                                              expanded_percentile_interval, mover_mean_interval, proportion_interval)
from gastro_dist.evaluation.metrics import evaluate_predictions


@pytest.mark.parametrize("x, n", [(0, 10), (14, 14), (39, 40), (7, 13), (1, 1)])
def test_exact_interval_is_scipys_clopper_pearson(x, n):
    lower, upper = exact_interval(x, n)
    reference = binomtest(x, n).proportion_ci(0.95, method="exact")
    assert float(lower) == pytest.approx(reference.low, abs=1e-12)
    assert float(upper) == pytest.approx(reference.high, abs=1e-12)


def test_the_reports_boundary_cases_get_honest_intervals():
    """14 of 14 patients once read '100.0% (100.0% - 100.0%)'; 39 of 40 images '93.3-100%'."""
    units = np.arange(14)
    every = proportion_interval(np.ones(14), np.ones(14, bool), units)
    assert every["upper"] == 1.0 and every["lower"] == pytest.approx(0.025 ** (1 / 14))  # 76.8%
    almost = proportion_interval(np.r_[np.ones(39), 0], np.ones(40, bool), np.arange(40))
    assert (almost["lower"], almost["upper"]) == pytest.approx((0.8684, 0.99937), abs=1e-4)


def test_clustered_interval_by_hand():
    """4 patients with 3, 3, 2, 4 frames, 3, 1, 2, 2 right: p = 8/12. Robust variance 4/3 * sum (x - p n)^2 / n^2
    = 4/3 * (1 + 1 + 4/9 + 4/9) / 144; binomial p(1-p)/n = (2/9)/12; design effect their ratio; the effective n is
    12 / deff * (z / t_3)^2 and the interval the exact one of (8/12) n_eff of n_eff."""
    x, n = np.array([3, 1, 2, 2.0]), np.array([3, 3, 2, 4.0])
    p = 8 / 12
    robust = 4 / 3 * np.sum((x - p * n) ** 2) / 144
    deff = robust / (p * (1 - p) / 12)
    effective = 12 / deff * (norm.ppf(0.975) / t.ppf(0.975, 3)) ** 2
    lower, upper, found = clustered_proportion_interval(x, n)
    assert float(found) == pytest.approx(effective)
    assert float(lower) == pytest.approx(beta.ppf(0.025, p * effective, effective - p * effective + 1))
    assert float(upper) == pytest.approx(beta.ppf(0.975, p * effective + 1, effective - p * effective))
    # All right: the data cannot say how alike a patient's frames are, so each patient counts once.
    lower, upper, found = clustered_proportion_interval(n, n)
    assert float(found) == 4 and float(lower) == pytest.approx(0.025 ** (1 / 4)) and float(upper) == 1.0
    # One frame per patient: the plain exact interval.
    assert clustered_proportion_interval(np.ones(9), np.ones(9))[0] == pytest.approx(exact_interval(9, 9)[0])


def test_mover_and_expanded_percentile():
    lower, upper = mover_mean_interval([0.8, 1.0], [0.6, 0.7], [0.9, 1.0])
    assert lower == pytest.approx(0.9 - math.sqrt(0.2 ** 2 + 0.3 ** 2) / 2)
    assert upper == pytest.approx(0.9 + math.sqrt(0.1 ** 2) / 2)
    replicates = np.random.default_rng(0).normal(size=100_000)
    plain = np.percentile(replicates, [2.5, 97.5])
    for units, quantile in ((10, math.sqrt(10 / 9) * t.ppf(0.975, 9)), (1000, math.sqrt(1000 / 999) * t.ppf(0.975, 999))):
        interval = expanded_percentile_interval(replicates, units)
        assert interval["upper"] == pytest.approx(quantile, abs=0.03) and interval["upper"] > plain[1]
    assert expanded_percentile_interval(np.full(5, np.nan), 10) is None


def test_evaluation_gives_every_proportion_an_interval_and_the_balanced_accuracy_one_by_mover():
    y_true = np.repeat([0, 1, 2], 10)
    predicted = y_true.copy()
    predicted[[10, 11, 20]] = 0  # class 0 all right (10/10), class 1 8/10, class 2 9/10
    probs = np.full((30, 3), 0.1)
    probs[np.arange(30), predicted] = 0.8
    m = evaluate_predictions(y_true, probs, ["a", "b", "c"], num_bootstrap=20, positive_class="a")
    ci = m["ci"]
    assert ci["per_class_accuracy"]["a"] == pytest.approx({"lower": 0.025 ** 0.1, "upper": 1.0})
    # class a's specificity: 17 of the 20 other images not called a; PPV: 10 of the 13 called a
    assert ci["per_class_specificity"]["a"] == pytest.approx(dict(zip(("lower", "upper"), map(float, exact_interval(17, 20)))))
    assert ci["per_class_ppv"]["a"] == pytest.approx(dict(zip(("lower", "upper"), map(float, exact_interval(10, 13)))))
    assert ci["cancer_vs_benign"]["npv"] == ci["per_class_npv"]["a"]
    lowers = [exact_interval(k, 10)[0] for k in (10, 8, 9)]
    uppers = [exact_interval(k, 10)[1] for k in (10, 8, 9)]
    assert (ci["balanced_accuracy"]["lower"], ci["balanced_accuracy"]["upper"]) == pytest.approx(
        mover_mean_interval([1.0, 0.8, 0.9], lowers, uppers))
    assert all("flag" not in ci[name] for name in ("accuracy", "balanced_accuracy"))
    assert "fewer than 200" in ci["macro_auc"]["flag"]  # 30 images: the bootstrap's interval is approximate
