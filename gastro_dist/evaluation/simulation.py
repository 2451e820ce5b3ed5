"""Do the report's intervals keep their level and its tests their size? Checked on simulated test sets
whose truth is known, with the report's own functions (`evaluate_predictions`, `compare_models`).

The data: three classes, each patient has one (drawn with equal probability) and one frame
(unclustered) or 1 + Poisson(2) frames (clustered: the frames share an offset drawn per patient, so
they are right or wrong together). A frame's features are its class's mean plus the patient's offset
plus noise, and its probabilities are the exact posterior under that model, so the model is
calibrated by construction (ECE 0); the "overconfident" model sharpens them (logits / 0.7). Two
separations of the class means put the figures near the middle (accuracy about 75%) or near the
boundary (about 98%, most classes at 100% in small test sets). The truth of every measure is its
value on 100,000 patients of the same model.

- `coverage`: per scenario, the share of test sets whose 95% interval contains the truth, for every
  interval `evaluate_predictions` gives (per image, and per patient in clustered scenarios).
- `test_sizes`: per scenario, the share of test sets in which each paired test rejects at 5% when two
  models of equal skill are compared.

`gastro-dist bench statistics` runs both and writes the tables (benchmarks/statistics.md);
tests/test_simulation.py asserts their bounds (slow).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import softmax

from gastro_dist.evaluation.metrics import evaluate_predictions, patient_level
from gastro_dist.evaluation.paired import compare_models, delong_test

CLASSES = ["class_a", "class_b", "class_c"]
POSITIVE = "class_a"  # the cancer-versus-benign view's class
# Separation of the class means by (position, clustered): accuracy about 0.77 / 0.75 in the middle and
# 0.98 / 0.98 at the boundary (macro AUC 0.91 / 0.90 and 0.999), the patient offsets blurring clustered frames.
SEPARATIONS = {("middle", False): 1.5, ("middle", True): 2.0, ("boundary", False): 3.2, ("boundary", True): 4.5}
PATIENT_OFFSET_SD = 1.0  # clustered: SD of the feature offset a patient's frames share
EXTRA_FRAMES_MEAN = 2.0  # clustered: frames per patient are 1 + Poisson(this)
OVERCONFIDENT_TEMPERATURE = 0.7
MODEL_OWN_SHARE = 0.7  # two models: the share (in SD) of a patient's offset that is each model's own
TRUTH_PATIENTS = 100_000
LEVEL = 0.95
ALPHA = 0.05
# The measures whose intervals are simulated; per-class ones are pooled over the classes (they are alike here).
PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "auc")
OVERALL = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "mcc", "brier", "ece_debiased")


@dataclass(frozen=True)
class Scenario:
    num_patients: int
    clustered: bool
    position: str = "middle"  # "middle" or "boundary" (SEPARATIONS)
    calibrated: bool = True

    def describe(self) -> str:
        return (f"{self.num_patients} patients, {'clustered frames' if self.clustered else 'one image each'}, "
                f"{self.position}{'' if self.calibrated else ', overconfident'}")


def simulate(scenario: Scenario, rng: np.random.Generator, num_patients: int | None = None,
             positive_patients: int | None = None, num_models: int = 1) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """One test set: (labels, one N x 3 probability array per model, patient of each frame). Models differ
    only in their frame noise (equal skill); ``positive_patients`` fixes how many patients have class_a."""
    num_patients = num_patients or scenario.num_patients
    if positive_patients is None:
        patient_class = rng.integers(0, len(CLASSES), num_patients)
    else:
        patient_class = np.r_[np.zeros(positive_patients, dtype=int),
                              rng.integers(1, len(CLASSES), num_patients - positive_patients)]
    frames = 1 + rng.poisson(EXTRA_FRAMES_MEAN, num_patients) if scenario.clustered else np.ones(num_patients, int)
    patient = np.repeat(np.arange(num_patients), frames)
    labels = patient_class[patient]
    separation = SEPARATIONS[scenario.position, scenario.clustered]
    offset_sd = PATIENT_OFFSET_SD if scenario.clustered else 0.0
    offsets = rng.normal(0.0, offset_sd, (num_patients, len(CLASSES)))[patient]
    variance = 1.0 + offset_sd ** 2  # a frame's features vary this much around its class mean
    temperature = 1.0 if scenario.calibrated else OVERCONFIDENT_TEMPERATURE
    probs = []
    for _ in range(num_models):
        # With two models, part of a patient's offset is each model's own (each finds other patients hard),
        # so that their disagreements cluster by patient as real models' do.
        share = MODEL_OWN_SHARE if num_models > 1 else 0.0
        own = rng.normal(0.0, offset_sd * share, (num_patients, len(CLASSES)))[patient]
        features = (separation * np.eye(len(CLASSES))[labels] + offsets * math.sqrt(1 - share ** 2) + own
                    + rng.normal(size=(len(labels), len(CLASSES))))
        # The posterior of each class under equal priors: softmax(x . mu_k / variance), the |mu_k|^2 terms equal.
        probs.append(softmax(separation * features / variance / temperature, axis=1))
    return labels, probs, patient


@lru_cache(maxsize=None)
def truth(scenario: Scenario) -> dict[str, dict[str, float]]:
    """Every simulated measure's value on TRUTH_PATIENTS patients: {"image": {...}, "patient": {...}}."""
    big = dataclasses.replace(scenario, num_patients=TRUTH_PATIENTS)
    labels, (probs,), patient = simulate(big, np.random.default_rng(12345))
    values = {"image": _values(evaluate_predictions(labels, probs, CLASSES, num_bootstrap=0, positive_class=POSITIVE))}
    if scenario.calibrated:
        values["image"]["ece_debiased"] = 0.0  # calibrated by construction; the plug-in on 10^5 frames is noise
    if scenario.clustered:
        cases = patient_level(labels, probs, patient)
        values["patient"] = _values(evaluate_predictions(cases["labels"], cases["probs"], CLASSES, num_bootstrap=0,
                                                         positive_class=POSITIVE))
    return values


def coverage(scenario: Scenario, num_datasets: int, num_bootstrap: int, seed: int = 0) -> dict:
    """Share of ``num_datasets`` test sets whose interval holds the truth, per view and measure, with the
    share of test sets where the interval could not be given (e.g. no image predicted as a class)."""
    true = truth(scenario)
    rng = np.random.default_rng([seed, scenario.num_patients, scenario.clustered, len(scenario.position),
                                 scenario.calibrated])
    hits: dict[str, dict[str, list[bool]]] = {view: {} for view in true}
    for d in range(num_datasets):
        labels, (probs,), patient = simulate(scenario, rng)
        views = {"image": (labels, probs, patient)}
        if scenario.clustered:
            cases = patient_level(labels, probs, patient)
            views["patient"] = (cases["labels"], cases["probs"], cases["groups"])
        for view, (y, p, groups) in views.items():
            metrics = evaluate_predictions(y, p, CLASSES, groups=groups, num_bootstrap=num_bootstrap, seed=d,
                                           positive_class=POSITIVE)
            for name, interval in _intervals(metrics).items():
                target = true[view][name]
                hit = None if interval is None else interval["lower"] - 1e-12 <= target <= interval["upper"] + 1e-12
                flagged = interval is not None and "flag" in interval
                hits[view].setdefault(name.rpartition("/")[2], []).append((hit, flagged))  # classes pooled
    result = {}
    for view, by_name in hits.items():
        for name, found in by_name.items():
            given = [hit for hit, _ in found if hit is not None]
            unflagged = [hit for hit, flagged in found if hit is not None and not flagged]
            result[f"{view}: {name}"] = {
                "coverage": float(np.mean(given)) if given else None,
                "unflagged_coverage": float(np.mean(unflagged)) if unflagged else None,
                "unflagged_count": len(unflagged),
                "flagged": float(np.mean([flagged for _, flagged in found])),
                "undefined": 1 - len(given) / len(found)}
    return result


def test_sizes(scenario: Scenario, num_datasets: int, num_bootstrap: int, seed: int = 0) -> dict:
    """Share of test sets in which each paired test rejects at ALPHA when two models of equal skill are
    compared (no Holm adjustment: one pair), and how often it gave no p-value."""
    rng = np.random.default_rng([seed, 7, scenario.num_patients, scenario.clustered])
    found: dict[str, list[bool | None]] = {}
    for d in range(num_datasets):
        labels, (a, b), patient = simulate(scenario, rng, num_models=2)
        result = compare_models(labels, {"a": a, "b": b}, CLASSES, groups=patient, positive_class=POSITIVE,
                                num_bootstrap=num_bootstrap, seed=d)["pairs"][0]
        for name, test in (("accuracy (clustered McNemar)", result["accuracy_test"]),
                           ("accuracy (McNemar, images independent)", result["mcnemar"]),
                           ("macro AUC (paired bootstrap)", result["macro_auc_test"]),
                           (f"{POSITIVE} AUC (DeLong)", result["delong"])):
            p = test["p_value"]
            found.setdefault(name, []).append(None if p is None else p < ALPHA)
    return _rates(found)


def delong_sizes(clustered: bool, positive_patients: int, num_datasets: int, num_patients: int = 60,
                 seed: int = 0) -> dict:
    """DeLong's size with few patients of the positive class (the rest of ``num_patients`` negative)."""
    scenario = Scenario(num_patients, clustered)
    rng = np.random.default_rng([seed, 11, positive_patients, clustered])
    found = []
    for _ in range(num_datasets):
        labels, (a, b), patient = simulate(scenario, rng, positive_patients=positive_patients, num_models=2)
        p = delong_test(labels == 0, a[:, 0], b[:, 0], patient)["p_value"]
        found.append(None if p is None else p < ALPHA)
    return _rates({"DeLong": found})["DeLong"]


def _rates(found: dict[str, list[bool | None]]) -> dict:
    result = {}
    for name, values in found.items():
        given = [v for v in values if v is not None]
        result[name] = {"rejection_rate": float(np.mean(given)) if given else None,
                        "no_p_value": 1 - len(given) / len(values)}
    return result


def _values(metrics: dict) -> dict[str, float]:
    """The simulated measures' point values: overall ones by name, per-class ones as 'class/measure'."""
    values = {name: metrics[name] for name in OVERALL}
    for name in CLASSES:
        for measure in PER_CLASS:
            values[f"{name}/{measure}"] = metrics["per_class"][name][measure]
    return values


def _intervals(metrics: dict) -> dict[str, dict | None]:
    ci = metrics["ci"]
    found = {name: ci[name] for name in OVERALL}
    for name in CLASSES:
        for measure in PER_CLASS:
            key = "per_class_accuracy" if measure == "sensitivity" else f"per_class_{measure}"
            found[f"{name}/{measure}"] = ci[key][name]
    return found


# ---------------------------------------------------------------- all scenarios, as tables
PATIENT_COUNTS = (10, 40, 150)
DELONG_POSITIVE_PATIENTS = (2, 3, 5, 10, 20)


def coverage_scenarios() -> list[Scenario]:
    """10, 40 and 150 patients, unclustered and clustered, a calibrated model in the middle and at the
    boundary, and an overconfident one in the middle (ECE away from 0); and 300 patients in the middle,
    where the bootstrap intervals are no longer flagged (metrics.BOOTSTRAP_MIN_UNITS)."""
    return [Scenario(n, clustered, position, calibrated)
            for position, calibrated, counts in (("middle", True, (*PATIENT_COUNTS, 300)),
                                                 ("boundary", True, PATIENT_COUNTS), ("middle", False, PATIENT_COUNTS))
            for clustered in (False, True) for n in counts]


def run(num_datasets: int = 500, num_bootstrap: int = 200, seed: int = 0, log=print) -> dict:
    """Every coverage and size cell: {"coverage": [...], "sizes": [...], "delong": [...], settings}."""
    started = time.perf_counter()
    result = {"num_datasets": num_datasets, "num_bootstrap": num_bootstrap, "seed": seed, "level": LEVEL,
              "alpha": ALPHA, "coverage": [], "sizes": [], "delong": []}
    for scenario in coverage_scenarios():
        result["coverage"].append({**dataclasses.asdict(scenario),
                                   "measures": coverage(scenario, num_datasets, num_bootstrap, seed)})
        log(f"coverage: {scenario.describe()} ({time.perf_counter() - started:.0f} s)")
    for clustered in (False, True):
        for n in PATIENT_COUNTS:
            scenario = Scenario(n, clustered)
            result["sizes"].append({**dataclasses.asdict(scenario),
                                    "tests": test_sizes(scenario, num_datasets, num_bootstrap, seed)})
        for positives in DELONG_POSITIVE_PATIENTS:
            result["delong"].append({"clustered": clustered, "positive_patients": positives,
                                     **delong_sizes(clustered, positives, num_datasets, seed=seed)})
        log(f"sizes: {'clustered' if clustered else 'unclustered'} ({time.perf_counter() - started:.0f} s)")
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def markdown(result: dict) -> str:
    """The coverage and size tables of `run`, as benchmarks/statistics.md holds them."""
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Simulated with `gastro-dist bench statistics` ({result['num_datasets']} test sets per cell, "
             f"{result['num_bootstrap']} bootstrap resamples each, seed {result['seed']}, {result['seconds']:.0f} s "
             "on one core); the model and data are described in `gastro_dist/evaluation/simulation.py`.", "",
             f"### Coverage of the nominal {result['level']:.0%} intervals (%)", "",
             "Each cell: the share of test sets whose interval holds the true value; per-class measures pooled "
             "over the three classes. In brackets, where the report flags some of them as approximate: the "
             "coverage of the unflagged ones and the share flagged. `—`: never defined (or always flagged).", ""]
    views = [("image", "per image"), ("patient", "per patient (clustered scenarios)")]
    measures = [name.split(": ", 1)[1] for name in result["coverage"][0]["measures"] if name.startswith("image: ")]
    for view, title in views:
        rows = [row for row in result["coverage"] if any(name.startswith(view + ": ") for name in row["measures"])]
        lines += [f"**{title}**", "", "| scenario | " + " | ".join(measures) + " |",
                  "|---|" + "---|" * len(measures)]
        for row in rows:
            cells = []
            for name in measures:
                cell = row["measures"][f"{view}: {name}"]
                text = pct(cell["coverage"])
                if cell["flagged"] > 0:
                    text += f" ({pct(cell['unflagged_coverage'])}, {pct(cell['flagged'])} flagged)"
                cells.append(text)
            lines.append(f"| {Scenario(row['num_patients'], row['clustered'], row['position'], row['calibrated']).describe()} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"### Size of the paired tests at {result['alpha']:.0%} (% of true nulls rejected)", "",
              "Two models of equal skill, each with patient effects of its own, so that their disagreements "
              "cluster by patient. `no p` is the share of test sets where the test gave no p-value.", ""]
    tests = list(result["sizes"][0]["tests"])
    lines += ["| scenario | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for row in result["sizes"]:
        cells = []
        for name in tests:
            cell = row["tests"][name]
            cells.append(pct(cell["rejection_rate"]) + (f" (no p {pct(cell['no_p_value'])})" if cell["no_p_value"] else ""))
        lines.append(f"| {Scenario(row['num_patients'], row['clustered']).describe()} | " + " | ".join(cells) + " |")
    lines += ["", "DeLong's test with few patients of the positive class (60 patients in all):", "",
              "| positive patients | one image each | clustered frames |", "|---|---|---|"]
    by_key = {(row["clustered"], row["positive_patients"]): row for row in result["delong"]}
    for positives in DELONG_POSITIVE_PATIENTS:
        lines.append(f"| {positives} | {pct(by_key[False, positives]['rejection_rate'])} | "
                     f"{pct(by_key[True, positives]['rejection_rate'])} |")
    return "\n".join(lines) + "\n"
