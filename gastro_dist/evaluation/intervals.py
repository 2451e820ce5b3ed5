"""Confidence intervals for the proportions a report shows (accuracy, sensitivity, specificity, PPV, NPV),
per image or per patient, and for balanced accuracy, that keep their level at 0/n and n/n and when a
patient contributes several frames.

A percentile bootstrap of a proportion collapses at the boundary (14 of 14 patients gives
"100% - 100%") and is too narrow with few patients. Here instead:

- Images that are independent (each unit, a patient or an image, holds one of the proportion's
  images): Clopper-Pearson's exact binomial interval (scipy's ``binomtest(...).proportion_ci("exact")``
  form, written on beta quantiles so that it also takes a fractional count, below).
- Units that hold several images (a patient's stills, a video's frames): Korn & Graubard's (1998,
  Survey Methodology 24:193) Clopper-Pearson interval on the effective sample size. The variance of
  the ratio x/n is estimated from the units (the cluster-robust "sandwich" estimate with the m/(m-1)
  small-sample factor); n_eff = n / design effect, the design effect floored at 1, shrunk further by
  (z / t_{m-1})^2 for the m - 1 degrees of freedom of that variance; then the exact interval of
  n_eff trials with the same proportion. At 0/n or n/n the variance is 0 and says nothing about how
  alike a patient's frames are, so the design effect is its largest plausible value, n / m (every
  patient counts once), rather than 1: with 10 patients whose frames are all right, the interval is
  that of 10 right, not of their 30 frames.
- Balanced accuracy (the mean of the classes' sensitivities): Zou & Donner's (2008) MOVER, which
  combines the classes' own intervals (above) into one for their mean, so that a class at 100% still
  brings its width.
- Measures that are not proportions (AUC, macro-F1, MCC, Brier score) and paired differences: the
  bootstrap percentile interval, expanded for the number of patients resampled (Hesterberg 2015): a
  plain percentile interval is too narrow with few patients.

Coverage of these intervals, simulated at 10, 40 and 150 patients, in the middle and near the
boundary, with and without patient clustering: `gastro_dist.evaluation.simulation` (the table is in
benchmarks/statistics.md); scipy and statsmodels have neither the clustered interval nor MOVER.
"""

from __future__ import annotations

import math

import numpy as np
# scipy.special's ufuncs rather than scipy.stats' distributions: the same quantiles (beta.ppf is betaincinv,
# t.ppf stdtrit, norm.ppf ndtri) without the ~50 us of argument checking per call, which a report's dozens of
# intervals and the coverage simulation's tens of thousands would pay.
from scipy.special import betaincinv, ndtr, ndtri, stdtrit

PROPORTION_METHOD = ("Clopper-Pearson exact interval; with several images per patient, on the effective sample "
                     "size (Korn & Graubard 1998)")
BALANCED_ACCURACY_METHOD = "MOVER (Zou & Donner 2008) from the classes' sensitivity intervals"


def clustered_proportion_interval(successes: np.ndarray, trials: np.ndarray, level: float = 0.95
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, effective n) of x/n per row of ``successes`` and ``trials`` (... x U: per unit, the
    images counted and how many of them were successes). Rows without a trial give NaN."""
    successes = np.asarray(successes, dtype=float)
    trials = np.asarray(trials, dtype=float)
    n = trials.sum(axis=-1)
    x = successes.sum(axis=-1)
    num_units = (trials > 0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / n
        residual = successes - p[..., None] * trials
        robust_variance = (num_units / np.maximum(num_units - 1, 1)) * np.sum(residual ** 2, axis=-1) / n ** 2
        binomial_variance = p * (1 - p) / n
        # Without two units or with 0/n or n/n, the data cannot say how alike a unit's images are: assume
        # they are all alike (each unit counts once).
        estimable = (binomial_variance > 0) & (num_units >= 2)
        design_effect = np.where(estimable, robust_variance / binomial_variance, n / num_units)
    design_effect = np.maximum(design_effect, 1.0)
    z = ndtri(0.5 + level / 2)
    degrees_of_freedom = np.maximum(num_units - 1, 1)
    # The degrees-of-freedom shrinkage is for a variance estimated from the units; the assumed one is not.
    shrinkage = np.where(estimable, (z / stdtrit(degrees_of_freedom, 0.5 + level / 2)) ** 2, 1.0)
    effective_n = np.minimum(n, n / design_effect * shrinkage)
    # One image per unit: nothing is clustered, and the exact interval of x of n is the answer.
    independent = num_units == n
    effective_n = np.where(independent, n, effective_n)
    lower, upper = exact_interval(p * effective_n, effective_n, level)
    empty = ~(n > 0)
    return np.where(empty, np.nan, lower), np.where(empty, np.nan, upper), np.where(empty, np.nan, effective_n)


def exact_interval(successes: np.ndarray, trials: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson: the beta quantiles that bound x successes of n (x and n need not be whole numbers:
    Korn & Graubard's effective counts are not)."""
    successes = np.asarray(successes, dtype=float)
    trials = np.asarray(trials, dtype=float)
    alpha = 1 - level
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(successes > 0, betaincinv(successes, trials - successes + 1, alpha / 2), 0.0)
        upper = np.where(successes < trials, betaincinv(successes + 1, trials - successes, 1 - alpha / 2), 1.0)
    return lower, upper


def mover_mean_interval(estimates: np.ndarray, lowers: np.ndarray, uppers: np.ndarray) -> tuple[float, float]:
    """Zou & Donner's MOVER interval of the mean of independent estimates, from each one's own interval:
    mean -/+ sqrt(sum of the squared distances to each lower / upper limit) / K."""
    estimates, lowers, uppers = (np.asarray(a, dtype=float) for a in (estimates, lowers, uppers))
    k = len(estimates)
    mean = estimates.mean()
    lower = mean - np.sqrt(np.sum((estimates - lowers) ** 2)) / k
    upper = mean + np.sqrt(np.sum((uppers - estimates) ** 2)) / k
    return float(max(lower, 0.0)), float(min(upper, 1.0))


def proportion_interval(success: np.ndarray, counted: np.ndarray, unit_of_image: np.ndarray,
                        level: float = 0.95) -> dict | None:
    """The interval of a proportion over images: ``counted`` marks the images in its denominator (e.g. the
    images of a class, for its sensitivity), ``success`` those in its numerator, ``unit_of_image`` the
    patient (0..U-1) each image belongs to. None when no image is counted."""
    counted = np.asarray(counted, dtype=bool)
    if not counted.any():
        return None
    units = np.asarray(unit_of_image)[counted]
    num_units = int(units.max()) + 1
    trials = np.bincount(units, minlength=num_units)
    successes = np.bincount(units, weights=np.asarray(success, dtype=float)[counted], minlength=num_units)
    lower, upper, effective_n = clustered_proportion_interval(successes[trials > 0], trials[trials > 0], level)
    return {"lower": float(lower), "upper": float(upper), "effective_n": round(float(effective_n), 2),
            "images": int(counted.sum()), "units": int(np.count_nonzero(trials))}


def expanded_percentile_interval(replicates: np.ndarray, num_units: int, level: float = 0.95) -> dict | None:
    """Hesterberg's (2015, "What teachers should know about the bootstrap", Am Stat 69:371) expanded
    percentile interval: the percentiles at the normal tail area whose quantile is sqrt(U/(U-1)) times
    Student's t quantile with U-1 degrees of freedom (U the patients, or images, resampled), which
    corrects the percentile interval's narrowness with few units. None without a defined replicate."""
    replicates = np.asarray(replicates, dtype=float)
    replicates = replicates[~np.isnan(replicates)]
    if len(replicates) == 0:
        return None
    if num_units > 1:
        quantile = math.sqrt(num_units / (num_units - 1)) * stdtrit(num_units - 1, 0.5 + level / 2)
        tail = float(ndtr(-quantile))
    else:
        tail = (1 - level) / 2
    lower, upper = np.percentile(replicates, [100 * tail, 100 * (1 - tail)])
    return {"lower": float(lower), "upper": float(upper)}
