"""Functions that build their own Accelerator leave the process free to build the next one with other
settings: compare and cv train and evaluate several runs in one process, and so may a notebook."""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from gastro_dist.training.distributed import forgets_accelerator_settings


@pytest.fixture(autouse=True)
def fresh_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _precision_of_a_new_accelerator(precision: str) -> str:
    return str(Accelerator(cpu=True, mixed_precision=precision).mixed_precision)


def test_the_next_accelerator_takes_its_own_precision():
    build = forgets_accelerator_settings(_precision_of_a_new_accelerator)
    assert build("no") == "no"
    assert build("bf16") == "bf16"  # not refused, not the previous one's


def test_settings_are_forgotten_when_the_function_raises():
    @forgets_accelerator_settings
    def fails():
        Accelerator(cpu=True, mixed_precision="bf16")
        raise RuntimeError("a run that stopped")

    with pytest.raises(RuntimeError):
        fails()
    assert _precision_of_a_new_accelerator("no") == "no"


def test_without_it_accelerate_keeps_the_first_settings():
    """Why the decorator exists: accelerate refuses (or ignores) a second Accelerator's other settings."""
    _precision_of_a_new_accelerator("no")
    try:
        second = _precision_of_a_new_accelerator("bf16")
    except ValueError:
        return  # refused: "AcceleratorState has already been initialized and cannot be changed"
    assert second == "no"  # or silently kept
