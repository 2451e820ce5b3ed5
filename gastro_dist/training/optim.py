"""The optimizer and the learning-rate schedule of a phase."""

from __future__ import annotations

import math

import torch
from torch import nn

from gastro_dist.config import PhaseConfig
from gastro_dist.models.backbones import HeadSpec
from gastro_dist.models.param_groups import build_param_groups


def build_optimizer(model: nn.Module, spec: HeadSpec, phase: PhaseConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the phase's parameter groups (`models.param_groups`: head and backbone
    learning rates, no weight decay on biases and norms, optional layer-wise decay)."""
    groups = build_param_groups(model, spec, phase)
    if phase.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=phase.lr)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
