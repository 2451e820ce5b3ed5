"""The report's intervals keep their level and its tests their size, by simulation (`evaluation.simulation`,
the tables in benchmarks/statistics.md): 500 test sets per scenario, 10 to 300 patients, mid-range and
near-perfect models, one image per patient or clustered frames, calibrated or not. About two minutes of
one core in all, split by scenario so that the test workers share it."""

from __future__ import annotations

import pytest
from scipy.stats import binom

from gastro_dist.evaluation import simulation
from gastro_dist.evaluation.metrics import APPROXIMATE_BELOW
from gastro_dist.evaluation.paired import MIN_DELONG_UNITS

pytestmark = pytest.mark.slow

NUM_DATASETS = 500
NUM_BOOTSTRAP = 200
PROPORTIONS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv")
GROUPS = sorted({(s.position, s.calibrated, s.clustered) for s in simulation.coverage_scenarios()})


def _keeps_level(coverage: float, count: int) -> bool:
    """At least APPROXIMATE_BELOW; with fewer than 100 unflagged test sets, not significantly below it (1%)."""
    if count >= 100:
        return coverage >= APPROXIMATE_BELOW
    return binom.cdf(round(coverage * count), count, APPROXIMATE_BELOW) > 0.01


@pytest.mark.parametrize("position, calibrated, clustered", GROUPS)
def test_every_unflagged_interval_keeps_its_level(position, calibrated, clustered):
    for scenario in simulation.coverage_scenarios():
        if (scenario.position, scenario.calibrated, scenario.clustered) != (position, calibrated, clustered):
            continue
        result = simulation.coverage(scenario, NUM_DATASETS, NUM_BOOTSTRAP)
        for name, cell in result.items():
            measure = name.split(": ")[1]
            if measure in PROPORTIONS:  # exact intervals: never flagged, at least 93% everywhere
                assert cell["flagged"] == 0 and cell["coverage"] >= 0.93, (scenario.describe(), name, cell)
            if cell["unflagged_coverage"] is not None:
                assert _keeps_level(cell["unflagged_coverage"], cell["unflagged_count"]), (scenario.describe(), name,
                                                                                            cell)


def test_tests_hold_their_size_and_mcnemar_on_frames_does_not():
    primary = ("accuracy (clustered McNemar)", "macro AUC (paired bootstrap)", f"{simulation.POSITIVE} AUC (DeLong)")
    mcnemar_on_frames = []
    for clustered in (False, True):
        for n in simulation.PATIENT_COUNTS:
            scenario = simulation.Scenario(n, clustered)
            sizes = simulation.test_sizes(scenario, NUM_DATASETS, NUM_BOOTSTRAP)
            for name in primary:
                assert sizes[name]["rejection_rate"] <= 0.065, (scenario.describe(), name, sizes[name])
            if clustered:
                mcnemar_on_frames.append(sizes["accuracy (McNemar, images independent)"]["rejection_rate"])
    # The images-independent McNemar test rejects too often once frames cluster: it is only a secondary line.
    assert max(mcnemar_on_frames) > 0.075, mcnemar_on_frames


def test_delong_with_few_positive_patients_is_what_its_note_says():
    few = simulation.delong_sizes(clustered=True, positive_patients=2, num_datasets=NUM_DATASETS)
    assert few["rejection_rate"] > 0.065  # why a p-value from so few positive patients is not called significant
    for clustered in (False, True):
        enough = simulation.delong_sizes(clustered, MIN_DELONG_UNITS, NUM_DATASETS)
        assert enough["rejection_rate"] <= 0.065, (clustered, enough)
