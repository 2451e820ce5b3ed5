"""Temperature scaling: the fit is the NLL's minimum (scipy's bounded search agrees), the NLL falls,
probabilities are scipy's softmax of logits / T, and model.json carries T (absent: 1.0)."""

import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import log_loss

from gastro_dist import UserError
from gastro_dist.run_dir import ModelMeta
from gastro_dist.training.calibration import (MAX_TEMPERATURE, MIN_TEMPERATURE, calibrated_probabilities,
                                              calibration_fit, fit_temperature, temperature_nll)


def overconfident(seed=0, num_samples=400, num_classes=3, sharpen=3.0):
    """Labels drawn from softmax(z); the model reports sharpen * z, so the best temperature is near sharpen."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.2, size=(num_samples, num_classes))
    truth = softmax(logits, axis=1)
    labels = (rng.random(num_samples)[:, None] > np.cumsum(truth, axis=1)).sum(axis=1)
    return sharpen * logits, labels


def scipy_nll(logits, labels, temperature):
    return -np.mean(log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels])


@pytest.mark.parametrize("sharpen", [0.5, 1.0, 3.0])
def test_fit_is_the_minimum_scipy_finds(sharpen):
    logits, labels = overconfident(sharpen=sharpen)
    temperature = fit_temperature(logits, labels)
    reference = minimize_scalar(lambda t: scipy_nll(logits, labels, t), bounds=(MIN_TEMPERATURE, MAX_TEMPERATURE),
                                method="bounded", options={"xatol": 1e-9})
    assert temperature == pytest.approx(reference.x, rel=1e-4)
    assert temperature == pytest.approx(sharpen, rel=0.25)  # recovers how much the logits were sharpened


def test_nll_falls_and_is_scipys_and_scikit_learns():
    logits, labels = overconfident(sharpen=3.0)
    temperature = fit_temperature(logits, labels)
    before, after = temperature_nll(logits, labels, 1.0), temperature_nll(logits, labels, temperature)
    assert after < before
    assert after <= temperature_nll(logits, labels, temperature * 1.05)
    assert after <= temperature_nll(logits, labels, temperature / 1.05)
    assert before == pytest.approx(scipy_nll(logits, labels, 1.0), abs=1e-12)
    assert after == pytest.approx(log_loss(labels, calibrated_probabilities(logits, temperature), labels=[0, 1, 2]),
                                  abs=1e-12)
    fit = calibration_fit(logits, labels)
    assert fit["temperature"] == temperature and fit["num_samples"] == 400
    assert fit["nll_after"] == pytest.approx(after) and fit["nll_before"] == pytest.approx(before)


def test_calibrated_probabilities_are_scipys_softmax_and_keep_the_argmax():
    logits, _ = overconfident()
    for temperature in (0.5, 1.0, 2.7):
        probs = calibrated_probabilities(logits, temperature)
        np.testing.assert_allclose(probs, softmax(logits / temperature, axis=1), rtol=0, atol=1e-15)
        assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()
    assert calibrated_probabilities(np.array([[0.0, -np.inf]]))[0].tolist() == [1.0, 0.0]


def test_degenerate_validation_sets():
    # Every image right: the NLL only falls as T -> 0; no temperature is fitted.
    logits = np.array([[5.0, -5.0], [-5.0, 5.0]] * 10)
    labels = np.array([0, 1] * 10)
    assert fit_temperature(logits, labels) == 1.0
    # Confident and right only half the time: the NLL falls as T -> infinity; the fit stops at the bound.
    logits = np.array([[10.0, -10.0]] * 20)
    assert fit_temperature(logits, np.array([0, 1] * 10)) == MAX_TEMPERATURE
    # Nothing usable: no change.
    assert fit_temperature(np.full((3, 2), np.nan), np.array([0, 1, 0])) == 1.0
    assert fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 1.0


BASE = {"architecture": "resnet18", "classes": ["a", "b", "c"], "image_size": 48, "eval_crop_ratio": 0.875,
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_model_json_carries_the_temperature(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(BASE))
    assert ModelMeta.read(path).temperature == 1.0  # a run trained before temperature scaling
    ModelMeta(**BASE, temperature=1.7).write(path)
    assert json.loads(path.read_text())["temperature"] == 1.7
    assert ModelMeta.read(path).temperature == 1.7
    for wrong in (0, -1.0, "2", None, True):
        path.write_text(json.dumps({**BASE, "temperature": wrong}))
        with pytest.raises(UserError, match="temperature must be a positive number"):
            ModelMeta.read(path)
