"""Optimizer parameter groups of a phase: learning rate and weight decay for each trainable parameter.

- The new head trains at `phase.lr`, the unfrozen backbone at `phase.backbone_lr`.
- Layer-wise LR decay (`phase.layer_decay` below 1, the usual ViT fine-tuning recipe): the backbone's
  fine layer groups (`freezing.layer_groups(fine=True)`: timm's group_matcher, each block of a ViT or
  ConvNeXt) train at `backbone_lr * layer_decay ** (layers above it)`: the last block at backbone_lr,
  the one below at backbone_lr * layer_decay, ..., the stem lowest.
- No weight decay on biases, norm layers (every parameter with fewer than 2 dimensions) and the
  parameters a timm model names in `no_weight_decay()` (position embeddings, class tokens).
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

from torch import nn

from gastro_dist.config import PhaseConfig
from gastro_dist.models.backbones import HeadSpec, head_parameter_names, is_timm_model
from gastro_dist.models.freezing import layer_groups


def build_param_groups(model: nn.Module, spec: HeadSpec, phase: PhaseConfig) -> list[dict[str, Any]]:
    """Param groups for torch.optim of the parameters that require grad, backbone layers input to output,
    then the head; each group is {"name", "params", "lr", "weight_decay"}, and empty ones are left out."""
    head = head_parameter_names(model, spec)
    no_decay_patterns = tuple(model.no_weight_decay()) if is_timm_model(model) and hasattr(model, "no_weight_decay") else ()
    layers = layer_groups(model, spec, fine=True) if phase.layer_decay != 1.0 else [[]]
    layer_of = {name: index for index, group in enumerate(layers) for name in group}
    top = len(layers) - 1

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not any(fnmatch(name, pattern) for pattern in no_decay_patterns)
        if name in head:
            key, label, lr = (top + 1, decay), "head", phase.lr
        else:
            layer = layer_of.get(name, top)
            key, lr = (layer, decay), phase.backbone_lr * phase.layer_decay ** (top - layer)
            label = f"backbone.{layer}" if len(layers) > 1 else "backbone"
        group = groups.setdefault(key, {"name": f"{label}.{'decay' if decay else 'no_decay'}", "params": [],
                                        "lr": lr, "weight_decay": phase.weight_decay if decay else 0.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
