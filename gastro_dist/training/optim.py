"""The optimizer and the learning-rate schedule of a phase."""

from __future__ import annotations

import math

import torch
from torch import nn

from gastro_dist.config import PhaseConfig


def build_optimizer(model: nn.Module, head_names: set[str], phase: PhaseConfig) -> torch.optim.Optimizer:
    """Param groups: head / backbone, each split into decayed weights and undecayed biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name in head_names
        decay = param.ndim > 1
        groups.setdefault((is_head, decay), []).append(param)
    param_groups = [
        {"params": params, "lr": phase.lr if is_head else phase.backbone_lr,
         "weight_decay": phase.weight_decay if decay else 0.0}
        for (is_head, decay), params in sorted(groups.items())
    ]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=phase.lr, momentum=phase.momentum, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=phase.lr)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
