"""Freezing: which parameters train in each phase, and frozen BatchNorm kept in eval mode.

A backbone is split into ordered *stages* (input to output) so that a phase can unfreeze
"the last K stages": for ResNet these are conv1/bn1, layer1..layer4; for VGG the conv blocks
between max-pools and then the 4096-wide classifier layers; for Inception-V3 its named
Conv2d_*/Mixed_* blocks (plus the auxiliary branch's convolutions). Any other torchvision
model is split by its top-level children, expanding a `features` Sequential into its blocks.

A frozen part keeps its BatchNorm layers in eval mode even while the model trains, so their
running statistics do not move: freezing only `requires_grad` would still update them.
"""

from __future__ import annotations

from torch import nn

from gastro_dist import UserError
from gastro_dist.models.backbones import HeadSpec

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def backbone_stages(model: nn.Module, spec: HeadSpec) -> list[list[str]]:
    """Ordered stages as lists of dotted module names, excluding the head."""
    head_roots = {p.split(".")[0] for p in (spec.main, spec.auxiliary) if p}
    stages: list[list[str]] = []
    for name, child in model.named_children():
        if name == "AuxLogits":
            # Inception's auxiliary branch: its convolutions are backbone, its new fc is head.
            stages.append([f"AuxLogits.{n}" for n, _ in child.named_children() if f"AuxLogits.{n}" != spec.auxiliary])
            continue
        if name in (spec.main, spec.auxiliary) or not any(True for _ in child.parameters()):
            continue
        if name == "features" and isinstance(child, nn.Sequential):
            stages.extend(_feature_blocks(child, prefix="features"))
        elif name in head_roots and isinstance(child, nn.Sequential):
            # e.g. VGG's classifier: the layers before the replaced Linear are a backbone stage.
            inner = [f"{name}.{n}" for n, m in child.named_children()
                     if f"{name}.{n}" not in (spec.main, spec.auxiliary) and any(True for _ in m.parameters())]
            if inner:
                stages.append(inner)
        elif name not in head_roots:
            stages.append([name])
    return [s for s in stages if s]


def _feature_blocks(features: nn.Sequential, prefix: str) -> list[list[str]]:
    """Split a `features` Sequential into blocks: at max-pools when it has them (VGG), else one block per child."""
    children = list(features.named_children())
    plain_convnet = all(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)) for _, m in children)
    if plain_convnet:
        blocks, current = [], []
        for n, m in children:
            current.append(f"{prefix}.{n}")
            if isinstance(m, nn.MaxPool2d):
                blocks.append(current)
                current = []
        if current:
            blocks.append(current)
        return [[name for name in b if any(True for _ in features.get_submodule(name.split(".", 1)[1]).parameters())] for b in blocks]
    return [[f"{prefix}.{n}"] for n, m in children if any(True for _ in m.parameters())]


def set_trainable(model: nn.Module, spec: HeadSpec, unfreeze: str) -> list[str]:
    """Freeze the backbone except per `unfreeze` ('none' | 'all' | K last stages); return the frozen module names."""
    stages = backbone_stages(model, spec)
    if unfreeze == "none":
        num_frozen = len(stages)
    elif unfreeze == "all":
        num_frozen = 0
    else:
        k = int(unfreeze)
        if k > len(stages):
            raise UserError(f"unfreeze={k} but this model has only {len(stages)} backbone stages; use 'all' or a smaller number")
        num_frozen = len(stages) - k
    frozen = [name for stage in stages[:num_frozen] for name in stage]
    for param in model.parameters():
        param.requires_grad_(True)
    for name in frozen:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(False)
    if num_frozen:
        # Parameters owned by the model itself (ViT's class token) belong to its input stage.
        for param in model.parameters(recurse=False):
            param.requires_grad_(False)
    return frozen


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """After model.train(): put every BatchNorm whose parameters are all frozen back into eval mode."""
    for module in model.modules():
        if isinstance(module, _BATCHNORM):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
