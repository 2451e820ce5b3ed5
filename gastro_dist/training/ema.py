"""Weight EMA (`ema.decay`): an exponential moving average of the weights, kept beside them and validated
every epoch. timm's `ModelEmaV3` does the averaging (decay warm-up, buffers averaged too, kept in float32
whatever precision the training copy is in).

Every rank keeps the EMA of its own unwrapped model: validation splits the val set across the ranks,
so each needs the EMA weights, and updating a local copy costs no communication. The parameters are the
same on every rank (DDP), but BatchNorm's running statistics come from each rank's own batches, so
before the EMA is validated or saved the main process's copy is broadcast (`synchronise`): one collective
per epoch, and a checkpoint resumes every rank from the same EMA.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn

from gastro_dist.config import EmaConfig


def make_ema(model: nn.Module, config: EmaConfig) -> nn.Module | None:
    """A `ModelEmaV3` of `model` (its `.module` holds the averaged weights), or None when ema.decay is 0."""
    if config.decay == 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=config.decay, use_warmup=config.warmup, dtype=torch.float32)


def synchronise(accelerator: Accelerator, ema: nn.Module) -> None:
    """The main process's EMA weights and buffers on every rank (see the module docstring)."""
    if accelerator.num_processes > 1:
        broadcast(list(ema.module.state_dict().values()), from_process=0)
