"""Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one scalar T,
fitted at the end of training on the best model's validation logits by minimising the negative
log-likelihood of softmax(logits / T). T > 1 softens over-confident probabilities; the argmax, and
so every accuracy figure, is unchanged. model.json stores T; evaluate, predict, cam and export apply it."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# A fit that ends outside this range means a validation split the model nearly separates (the NLL
# falls towards 0 as T -> 0) or a broken model: it says nothing useful, so T is held at the bound.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits, labels) -> float:
    """The T minimising the mean NLL of softmax(logits / T) over (N x C logits, N labels).

    LBFGS with a strong-Wolfe line search on log T (so T stays positive), in float64 on the CPU.
    Rows with a non-finite logit are left out. The answer is 1.0 (no change) with no usable row, and
    when the model classifies every row correctly: the NLL then only falls as T -> 0, and sharpening
    the probabilities without limit on that evidence would be the opposite of calibrating them.
    """
    logits, labels = _usable(logits, labels)
    if len(labels) == 0 or bool((logits.argmax(dim=1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = math.exp(float(log_t.detach()))
    if not math.isfinite(temperature):  # log T ran off towards -inf or +inf: a separable split
        temperature = MIN_TEMPERATURE if float(log_t.detach()) < 0 else MAX_TEMPERATURE
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def temperature_nll(logits, labels, temperature: float) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of softmax(logits / temperature)."""
    logits, labels = _usable(logits, labels)
    if len(labels) == 0:
        return float("nan")
    return float(F.cross_entropy(logits / temperature, labels))


def calibration_fit(logits, labels) -> dict:
    """`fit_temperature` with what it achieved, for summary.json: temperature, num_samples, nll_before, nll_after."""
    temperature = fit_temperature(logits, labels)
    _, usable = _usable(logits, labels)
    return {"method": "temperature scaling (LBFGS on the validation NLL)", "fitted_on": "val",
            "temperature": temperature, "num_samples": int(len(usable)),
            "nll_before": _number(temperature_nll(logits, labels, 1.0)),
            "nll_after": _number(temperature_nll(logits, labels, temperature))}


def calibrated_probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) in float64, row by row (a row's -inf logits get probability 0).

    The one function turning stored logits into the probabilities evaluate measures: metrics.json
    can be recomputed exactly from predictions.csv's logits with it.
    """
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    if scaled.size == 0:
        return scaled
    with np.errstate(invalid="ignore"):  # a row of NaN or all -inf stays NaN and is reported as non-finite
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        exponentials = np.exp(shifted)
        return exponentials / exponentials.sum(axis=1, keepdims=True)


def _usable(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.isfinite(logits).all(axis=1) & (labels >= 0) & (labels < logits.shape[1])
    return torch.from_numpy(logits[keep]), torch.from_numpy(labels[keep])


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None
