"""The warmup-cosine schedule's values and the masking of secrets in run files, on their own."""

from __future__ import annotations

import math

import pytest

from gastro_dist.run_dir import redact
from gastro_dist.training.optim import warmup_cosine


def test_warmup_rises_linearly_then_cosine_falls_to_the_floor():
    factor = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.01)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert factor(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert factor(110) == pytest.approx(0.01) and factor(500) == pytest.approx(0.01)  # held at the floor
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "the cosine part must never rise"


def test_no_warmup_starts_at_the_peak():
    factor = warmup_cosine(total_steps=4, warmup_steps=0, min_ratio=0.0)
    assert [factor(s) for s in range(5)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                            0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_secrets_are_masked_by_key_and_by_value(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcdefgh12345678")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # under 8 characters: too short to match by value safely
    data = {"tracking": {"api_key": "x", "project": "p"}, "note": "key abcdefgh12345678 leaked",
            "nested": [{"password": "pw"}, "abc"], "count": 3, "hf_token": None}
    masked = redact(data)
    assert masked == {"tracking": {"api_key": "***", "project": "p"}, "note": "***",
                      "nested": [{"password": "***"}, "abc"], "count": 3, "hf_token": None}
    assert data["tracking"]["api_key"] == "x", "the input is left as it was"
