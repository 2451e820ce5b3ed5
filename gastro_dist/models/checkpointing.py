"""Gradient checkpointing (`model.grad_checkpointing`): each backbone block keeps only its input in the
forward pass and recomputes its activations in the backward pass. Less activation memory for about a
third more compute; the gradients are the same. As with any checkpointing (timm's, Hugging Face's),
BatchNorm layers in training mode update their running statistics again during the recomputation.

timm models have their own switch (`set_grad_checkpointing`). torchvision models have none, so it is
written here: the blocks are found from the same stages that freezing uses (`backbone_stages`): the
children of a stage that is an nn.Sequential of blocks (ResNet, ShuffleNet, EfficientNet, ConvNeXt), a
stage module that is itself a block (Inception-V3's Mixed_*), or a stage's run of plain layers inside a
Sequential (VGG's convolutions between two max-pools). Checkpointing is switched on by giving a module a
subclass of its own class whose forward runs under `torch.utils.checkpoint` (a block by itself, or a
Sequential's runs of layers): unlike a wrapper module, this keeps the module tree and state_dict keys,
so weights files, freezing and layer groups are unchanged.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gastro_dist import UserError
from gastro_dist.models.backbones import HeadSpec, is_timm_model
from gastro_dist.models.freezing import backbone_stages


def enable_grad_checkpointing(model: nn.Module, spec: HeadSpec) -> None:
    """Switch gradient checkpointing on for `model`'s backbone (timm's own, or this module's for torchvision)."""
    if is_timm_model(model):
        try:
            model.set_grad_checkpointing(True)
        except AssertionError:  # timm's way of saying that a model has no checkpointing
            raise UserError(f"timm's {type(model).__name__} has no gradient checkpointing; set "
                            "model.grad_checkpointing=false") from None
        return
    blocks, runs = [], {}
    for stage in backbone_stages(model, spec):
        stage_blocks, stage_run = _checkpoint_units(model, stage)
        blocks += stage_blocks
        if stage_run is not None:
            sequential, start, stop = stage_run
            runs.setdefault(sequential, {})[start] = stop
    if not blocks and not runs:
        raise UserError(f"found no blocks to checkpoint in {type(model).__name__}; set model.grad_checkpointing=false")
    for block in blocks:
        block.__class__ = _checkpointed_class(type(block))
    for sequential, stops in runs.items():
        sequential.__class__ = _checkpointed_sequential_class(type(sequential))
        sequential.checkpoint_runs = stops


def _checkpoint_units(model: nn.Module, stage: list[str]) -> tuple[list[nn.Module], tuple[nn.Sequential, int, int] | None]:
    """A stage's blocks to checkpoint each by itself, or its run of plain layers inside a Sequential to checkpoint
    as one: (the Sequential, the first layer's index, the index after the run), the run taking in the layers
    without parameters that follow it (VGG's ReLUs and max-pool)."""
    modules = [model.get_submodule(name) for name in stage]
    if len(modules) == 1 and isinstance(modules[0], nn.Sequential) and all(map(_has_children, modules[0])):
        return list(modules[0]), None  # a stage of blocks
    parent_name = stage[0].rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and not any(map(_has_children, modules)):
        indices = [int(name.rpartition(".")[2]) for name in stage]
        stop = max(indices) + 1
        while stop < len(parent) and next(parent[stop].parameters(), None) is None:
            stop += 1
        return [], (parent, min(indices), stop)
    return [module for module in modules if _has_children(module)], None  # blocks; a lone layer saves nothing


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _run_in_training(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


@cache
def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` with its forward run under checkpointing while training."""
    def forward(self, *args, **kwargs):
        if not _run_in_training(self):
            return cls.forward(self, *args, **kwargs)
        return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})


@cache
def _checkpointed_sequential_class(cls: type[nn.Sequential]) -> type[nn.Sequential]:
    """`cls` (an nn.Sequential) running each of its `checkpoint_runs` ({start: stop} child indices) under
    checkpointing while training, its other children as usual."""
    def forward(self, x):
        if not _run_in_training(self):
            return cls.forward(self, x)
        layers, index = list(self), 0
        while index < len(layers):
            stop = self.checkpoint_runs.get(index)
            if stop is None:
                x, index = layers[index](x), index + 1
            else:
                x, index = checkpoint(_run_layers, layers[index:stop], x, use_reentrant=False), stop
        return x

    return type(f"CheckpointedRuns{cls.__name__}", (cls,), {"forward": forward})


def _run_layers(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x
