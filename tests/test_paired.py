"""Paired comparison: McNemar against statsmodels and scipy, DeLong against a hand-worked example and a
brute-force reading of DeLong et al. (1988), its clustered form, Holm against statsmodels, and the
paired bootstrap and the plain-language verdicts on fixed predictions."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from gastro_dist.evaluation.paired import (MIN_DELONG_UNITS, bootstrap_difference_test, clustered_mcnemar,
                                           compare_models, delong_test, holm, mcnemar_exact, significance_sentences)

CLASSES = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis"]


def test_mcnemar_is_statsmodels_exact_test_and_the_binomial_test_of_the_discordant_pairs():
    # 20 images: both right 7, only a right 8, only b right 2, both wrong 3.
    a = np.array([1] * 7 + [1] * 8 + [0] * 2 + [0] * 3, bool)
    b = np.array([1] * 7 + [0] * 8 + [1] * 2 + [0] * 3, bool)
    result = mcnemar_exact(a, b)
    assert (result["both_right"], result["only_a_right"], result["only_b_right"], result["both_wrong"]) == (7, 8, 2, 3)
    reference = mcnemar([[7, 8], [2, 3]], exact=True)
    assert result["p_value"] == reference.pvalue and result["statistic"] == reference.statistic == 2
    # Exact McNemar = two-sided binomial test of 2 successes in 10 discordant pairs at 1/2: 2 * 56/1024.
    assert result["p_value"] == pytest.approx(binomtest(2, 10, 0.5).pvalue) == pytest.approx(0.109375)
    assert mcnemar_exact(a, a)["p_value"] == 1.0


def test_clustered_mcnemar_is_mcnemars_test_per_image_and_counts_patients_when_clustered():
    a = np.array([1] * 7 + [1] * 8 + [0] * 2 + [0] * 3, bool)
    b = np.array([1] * 7 + [0] * 8 + [1] * 2 + [0] * 3, bool)
    unclustered = clustered_mcnemar(a, b)
    reference = mcnemar([[7, 8], [2, 3]], exact=False, correction=False)  # (8 - 2)^2 / (8 + 2) = 3.6
    assert unclustered["statistic"] == pytest.approx(reference.statistic) == pytest.approx(3.6)
    assert unclustered["p_value"] == pytest.approx(reference.pvalue)
    # 4 patients of 5 images; per patient, images only a got right minus those only b got right: d = 0, 2, 5, -2,
    # so the statistic is (0 + 2 + 5 - 2)^2 / (0 + 4 + 25 + 4) = 25 / 33.
    patients = np.repeat([0, 1, 2, 3], 5)
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0], bool)
    b = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0], bool)
    clustered = clustered_mcnemar(a, b, patients)
    assert clustered["statistic"] == pytest.approx(25 / 33) and clustered["units_with_discordance"] == 3
    assert clustered["p_value"] > mcnemar_exact(a, b)["p_value"]  # 4 patients are less evidence than 20 images
    assert clustered_mcnemar(a, a, patients)["p_value"] == 1.0


def test_delong_gives_no_p_value_when_a_class_comes_from_one_unit():
    """27 positive frames of one patient and one negative image: the variance has no term for the positives'
    spread between patients, and the old p-value (0.023) came from the negatives' term alone."""
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(27, bool), np.zeros(1, bool)]
    a, b = rng.normal(size=28), rng.normal(size=28)
    for groups in (np.r_[np.zeros(27, int), [1]], None):  # one positive patient; one negative image
        result = delong_test(truth, a, b, groups)
        assert result["p_value"] is None and result["se"] is None and "needs at least 2" in result["note"]
        assert result["auc_a"] is not None  # the AUCs themselves are still given
    truth = np.r_[np.ones(1, bool), np.zeros(20, bool)]
    one_positive = delong_test(truth, rng.normal(size=21), rng.normal(size=21))
    assert one_positive["p_value"] is None and "positive images number 1" in one_positive["note"]


def test_delong_below_its_unit_threshold_is_never_called_significant():
    rng = np.random.default_rng(1)
    positives = MIN_DELONG_UNITS - 5
    truth = np.r_[np.ones(positives, bool), np.zeros(60, bool)]
    strong = truth + rng.normal(0, 0.3, len(truth))
    weak = rng.normal(size=len(truth))
    result = delong_test(truth, strong, weak)
    assert result["p_value"] < 0.05 and f"only {positives} positive images" in result["note"]
    y_true = np.where(truth, 0, 1)
    probs = {name: np.stack([s, -s], axis=1) for name, s in (("strong", strong), ("weak", weak))}
    probs = {name: np.exp(x) / np.exp(x).sum(1, keepdims=True) for name, x in probs.items()}
    comparison = compare_models(y_true, probs, ["gastric_cancer", "other"], num_bootstrap=50)
    delong = comparison["pairs"][0]["delong"]
    assert delong["p_holm"] < 0.05 and not delong["significant"]
    sentence = next(s for s in significance_sentences(comparison) if "DeLong" in s)
    assert "not significantly different" in sentence and "read as descriptive" in sentence


def test_delong_hand_worked_example():
    """3 positives, 2 negatives, two models (DeLong et al. 1988, eqs. for V10, V01, S10, S01).

    a: positives 0.9 0.7 0.4, negatives 0.5 0.2 -> AUC 5/6; V10 = (1, 1, 1/2), V01 = (2/3, 1)
    b: positives 0.8 0.3 0.6, negatives 0.7 0.1 -> AUC 2/3; V10 = (1, 1/2, 1/2), V01 = (1/3, 1)
    S10: var_a = 1/12, var_b = 1/12, cov = 1/24 (divisor m - 1 = 2); S01: 1/18, 2/9, 1/9 (divisor 1).
    Var(a - b) = (1/12 + 1/12 - 2/24) / 3 + (1/18 + 2/9 - 2/9) / 2 = 1/36 + 1/36 = 1/18
    z = (5/6 - 2/3) / sqrt(1/18) = sqrt(18)/6 = 1/sqrt(2), p = 2 (1 - Phi(0.7071)) = 0.4795
    """
    truth = np.array([1, 1, 1, 0, 0])
    result = delong_test(truth, [0.9, 0.7, 0.4, 0.5, 0.2], [0.8, 0.3, 0.6, 0.7, 0.1])
    assert result["auc_a"] == pytest.approx(5 / 6) and result["auc_b"] == pytest.approx(2 / 3)
    assert result["se"] == pytest.approx(math.sqrt(1 / 18), abs=1e-12)
    assert result["z"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert result["p_value"] == pytest.approx(2 * norm.sf(1 / math.sqrt(2)), abs=1e-12)
    assert result["p_value"] == pytest.approx(0.4795, abs=1e-4)
    assert result["method"] == "DeLong 1988"


def brute_force_delong(truth, a, b):
    """DeLong et al. (1988) written out pair by pair: psi, V10, V01, S10, S01, z."""
    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
    m, n = len(positives), len(negatives)
    v10 = np.array([[np.mean([psi(s[i], s[j]) for j in negatives]) for i in positives] for s in (a, b)])
    v01 = np.array([[np.mean([psi(s[i], s[j]) for i in positives]) for j in negatives] for s in (a, b)])
    auc = v10.mean(axis=1)
    s10, s01 = np.cov(v10), np.cov(v01)
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return auc, (auc[0] - auc[1]) / math.sqrt(variance)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random(40) < 0.4
    a = np.round(rng.normal(truth * 1.0, 1.0), 1)  # rounded: many ties
    b = np.round(rng.normal(truth * 0.5, 1.0), 1)
    auc, z = brute_force_delong(truth, a, b)
    result = delong_test(truth, a, b)
    assert (result["auc_a"], result["auc_b"]) == pytest.approx(tuple(auc), abs=1e-12)
    assert result["z"] == pytest.approx(z, abs=1e-9)


def test_clustered_delong_counts_a_patient_once_however_many_frames():
    truth = np.array([1, 1, 1, 0, 0])
    a, b = np.array([0.9, 0.7, 0.4, 0.5, 0.2]), np.array([0.8, 0.3, 0.6, 0.7, 0.1])
    single = delong_test(truth, a, b)
    # One patient per image: exactly DeLong.
    assert delong_test(truth, a, b, groups=np.arange(5))["se"] == pytest.approx(single["se"], abs=1e-15)
    # Each image three times over: DeLong alone takes them as 15 independent images and shrinks the SE;
    # clustered by patient (Obuchowski 1997), the SE is that of the 5 images.
    frames = np.repeat(np.arange(5), 3)
    naive = delong_test(truth[frames], a[frames], b[frames])
    clustered = delong_test(truth[frames], a[frames], b[frames], groups=frames)
    assert naive["se"] < 0.5 * single["se"]
    assert clustered["se"] == pytest.approx(single["se"], abs=1e-12)
    assert clustered["p_value"] == pytest.approx(single["p_value"], abs=1e-12)
    assert "Obuchowski" in clustered["method"]


def test_delong_degenerate_cases():
    truth = np.array([1, 0, 1, 0])
    same = delong_test(truth, [0.9, 0.1, 0.8, 0.3], [0.9, 0.1, 0.8, 0.3])
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["z"] is None
    absent = delong_test(np.zeros(4, bool), [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])
    assert absent["auc_a"] is None and absent["p_value"] is None


def test_holm_is_statsmodels_holm():
    # Sorted 0.01 0.03 0.04: 3 x 0.01 = 0.03; max(0.03, 2 x 0.03) = 0.06; max(0.06, 1 x 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    for p_values in ([0.002, 0.2, 0.013, 0.04, 0.5], [0.3, 0.3, 0.01, 0.9, 0.3],
                     list(np.random.default_rng(0).uniform(size=12))):  # ties, and values capped at 1
        assert holm(p_values) == pytest.approx(list(multipletests(p_values, method="holm")[1]))
    assert holm([None, 0.02, None]) == [None, 0.02, None]


def predictions(seed, num_samples, signal):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, num_samples)
    logits = rng.normal(size=(num_samples, 3))
    logits[np.arange(num_samples), y_true] += signal
    return y_true, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_compare_models_pairs_tests_and_verdicts():
    y_true, strong = predictions(0, 300, 3.0)
    rng = np.random.default_rng(1)
    weak = np.exp(rng.normal(size=(300, 3)))
    weak /= weak.sum(axis=1, keepdims=True)
    groups = np.arange(300) // 3
    result = compare_models(y_true, {"strong": strong, "weak": weak, "strong_copy": strong.copy()}, CLASSES,
                            groups=groups, num_bootstrap=200, seed=0)
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("strong", "weak"), ("strong", "strong_copy"),
                                                           ("weak", "strong_copy")]
    assert result["unit"] == "patient" and result["num_units"] == 100 and result["positive_class"] == "gastric_cancer"
    better, same, worse = result["pairs"]

    # McNemar and DeLong per pair, Holm over the three pairs of each test.
    assert better["mcnemar"]["p_value"] == mcnemar(
        [[better["mcnemar"]["both_right"], better["mcnemar"]["only_a_right"]],
         [better["mcnemar"]["only_b_right"], better["mcnemar"]["both_wrong"]]], exact=True).pvalue
    for test in ("accuracy_test", "mcnemar", "delong", "macro_auc_test"):
        raw = [pair[test]["p_value"] for pair in result["pairs"]]
        assert [pair[test]["p_holm"] for pair in result["pairs"]] == pytest.approx(
            list(multipletests(raw, method="holm")[1]))
    assert better["accuracy_test"] == {**clustered_mcnemar(strong.argmax(1) == y_true, weak.argmax(1) == y_true,
                                                            groups), "p_holm": better["accuracy_test"]["p_holm"],
                                       "significant": better["accuracy_test"]["significant"]}
    assert better["accuracy_test"]["method"].startswith("clustered McNemar")
    assert better["accuracy_test"]["significant"] and better["delong"]["significant"]
    assert better["macro_auc_test"]["significant"] and not same["macro_auc_test"]["significant"]
    assert same["macro_auc_test"]["p_value"] == 1.0 and same["macro_auc_test"]["z"] is None  # a copy: no difference
    assert not same["mcnemar"]["significant"] and same["mcnemar"]["p_value"] == 1.0
    assert better["delong"]["method"].startswith("DeLong (clustered")

    # Differences (a - b): point estimates are the models' own metrics, CIs hold them, a copy differs by 0.
    accuracy = better["accuracy_difference"]
    assert accuracy["a"] == pytest.approx(np.mean(strong.argmax(1) == y_true))
    assert accuracy["difference"] == pytest.approx(accuracy["a"] - accuracy["b"])
    assert accuracy["ci"]["lower"] <= accuracy["difference"] <= accuracy["ci"]["upper"]
    assert better["cancer_auc_difference"]["difference"] == pytest.approx(better["delong"]["difference"])
    assert same["macro_auc_difference"] == {"a": same["macro_auc_difference"]["a"],
                                            "b": same["macro_auc_difference"]["a"], "difference": 0.0,
                                            "ci": {"lower": 0.0, "upper": 0.0}}
    assert worse["accuracy_difference"]["difference"] == pytest.approx(-accuracy["difference"])
    again = compare_models(y_true, {"strong": strong, "weak": weak}, CLASSES, groups=groups, num_bootstrap=200,
                           seed=0)
    assert again["pairs"][0]["accuracy_difference"] == accuracy  # same seed, same paired resamples

    sentences = significance_sentences(result)
    assert sentences[0].startswith("Accuracy of strong and weak is significantly different")
    assert any(s.startswith("Accuracy of strong and strong_copy is not significantly different") for s in sentences)
    assert any(s.startswith("Macro AUC of strong and weak is significantly different") for s in sentences)
    assert any(s.startswith("Macro AUC of strong and strong_copy is not significantly different") for s in sentences)
    without_bootstrap = compare_models(y_true, {"strong": strong, "weak": weak}, CLASSES, num_bootstrap=0)
    assert without_bootstrap["pairs"][0]["macro_auc_test"]["p_value"] is None
    assert not any(s.startswith("Macro AUC") for s in significance_sentences(without_bootstrap))


def test_bootstrap_difference_test_is_the_difference_over_the_sd_of_its_replicates():
    replicates = np.array([0.01, 0.03, 0.05, 0.02, 0.04, np.nan])  # a NaN replicate (a class absent) is dropped
    result = bootstrap_difference_test(0.03, replicates)
    se = np.std([0.01, 0.03, 0.05, 0.02, 0.04], ddof=1)  # 0.0158
    assert result["se"] == pytest.approx(se) and result["z"] == pytest.approx(0.03 / se)
    assert result["p_value"] == pytest.approx(2 * (1 - norm.cdf(0.03 / se)))  # z 1.90: p 0.058
    assert bootstrap_difference_test(-0.03, replicates)["p_value"] == pytest.approx(result["p_value"])
    assert bootstrap_difference_test(0.0, np.zeros(10))["p_value"] == 1.0
    assert bootstrap_difference_test(0.03, np.array([0.03]))["p_value"] is None  # too few replicates
    assert bootstrap_difference_test(None, replicates)["p_value"] is None


@pytest.mark.slow  # 200 simulated comparisons, ~30 s
def test_bootstrap_test_holds_its_size_under_no_difference():
    """Two models of the same skill (independent noise), many simulated test sets: the test rejects at 5%
    about 5% of the time (binomial 95% range for 200 sets: 4 to 17 rejections)."""
    rejections = 0
    for trial in range(200):
        rng = np.random.default_rng(100 + trial)
        y_true = rng.integers(0, 3, 90)
        logits = [np.eye(3)[y_true] * 1.0 + rng.normal(size=(90, 3)) for _ in range(2)]
        probs = [np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in logits]
        result = compare_models(y_true, {"a": probs[0], "b": probs[1]}, CLASSES, num_bootstrap=200, seed=trial)
        rejections += result["pairs"][0]["macro_auc_test"]["p_value"] < 0.05
    assert 2 <= rejections <= 20, rejections


def test_compare_models_without_a_cancer_class_has_no_delong():
    y_true, probs = predictions(3, 60, 1.0)
    result = compare_models(y_true, {"x": probs, "y": probs[::-1].copy()}, ["a", "b", "c"], num_bootstrap=20)
    pair = result["pairs"][0]
    assert pair["delong"] is None and pair["cancer_auc_difference"]["difference"] is None
    assert result["unit"] == "image" and result["positive_class"] is None
    assert not any("-vs-rest AUC of x and y" in s for s in significance_sentences(result))


def test_paired_comparison_of_runs_reads_evaluates_predictions_and_matches_images_by_key(tmp_path):
    from gastro_dist.compare import paired_comparison_of_runs
    from gastro_dist.evaluation.evaluate import _write_predictions_csv

    y_true, strong = predictions(4, 90, 3.0)
    _, weak = predictions(5, 90, 0.2)
    keys = [f"test_{k:04d}" for k in range(90)]
    groups = np.array([f"patient:p{k // 3}" for k in range(90)], dtype=object)
    metas = [{"patient_id": f"p{k // 3}"} for k in range(90)]
    for name, probs, rows in (("a", strong, slice(None)), ("b", weak, slice(5, None))):  # b lacks 5 images
        (tmp_path / name).mkdir()
        _write_predictions_csv(tmp_path / name / "predictions.csv", keys[rows], metas[rows], groups[rows],
                               y_true[rows], probs[rows], np.log(probs[rows]), CLASSES)
    result = paired_comparison_of_runs({"a": tmp_path / "a", "b": tmp_path / "b"}, CLASSES, num_bootstrap=50)
    assert result["num_images"] == 85 and result["num_images_not_in_all"] == 5
    assert result["unit"] == "patient" and result["num_units"] == 29  # p0's three images and p1's first two left out
    direct = compare_models(y_true[5:], {"a": strong[5:], "b": weak[5:]}, CLASSES, groups=groups[5:],
                            num_bootstrap=50)
    assert result["pairs"] == direct["pairs"]  # the CSVs hold the probabilities exactly


def test_compare_cli_on_prediction_files_trains_nothing(tmp_path, capsys):
    from gastro_dist.cli import main
    from gastro_dist.evaluation.evaluate import _write_predictions_csv

    y_true, strong = predictions(6, 60, 3.0)
    _, weak = predictions(7, 60, 0.2)
    keys = [f"k{k}" for k in range(60)]
    groups = np.array([f"patient:p{k // 2}" for k in range(60)], dtype=object)
    for name, probs in (("r50", strong), ("vgg", weak)):
        _write_predictions_csv(tmp_path / f"{name}.csv", keys, [{}] * 60, groups, y_true, probs, np.log(probs), CLASSES)
    out = tmp_path / "cmp"
    assert main(["compare", "--predictions", f"r50={tmp_path / 'r50.csv'}", f"vgg={tmp_path / 'vgg.csv'}",
                 "--out", str(out), "--bootstrap", "30"]) == 0
    table = (out / "comparison.md").read_text()
    assert "## Paired comparison" in table and "| r50 − vgg |" in table and "Accuracy of r50 and vgg is" in table
    assert (out / "comparison.html").is_file() and (out / "comparison_forest.png").is_file()
    capsys.readouterr()
    assert main(["compare", "--predictions", f"r50={tmp_path / 'r50.csv'}", "--out", str(out)]) == 2
    assert "two models" in capsys.readouterr().err
    assert main(["compare", "--out", str(out)]) == 2
