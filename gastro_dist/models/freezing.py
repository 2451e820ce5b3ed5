"""Freezing: which parameters train in each phase, and frozen BatchNorm kept in eval mode.

A backbone is split into ordered *layer groups* (input to output, head excluded) so that a phase can
unfreeze "the last K stages" and the optimizer can decay learning rates layer by layer:

- timm models: timm's own `group_matcher`. Coarse groups (`unfreeze: K`) are the stem and then each
  stage (ConvNeXt, ResNet, EfficientNet) or each block (ViT); fine groups (layer-wise LR decay) are the
  stem and then each block.
- torchvision models: for ResNet conv1/bn1, layer1..layer4; for VGG the conv blocks between max-pools
  and then the 4096-wide classifier layers; for Inception-V3 its named Conv2d_*/Mixed_* blocks (plus
  the auxiliary branch's convolutions); any other model its top-level children, a `features`
  Sequential expanded into its blocks. Coarse and fine are the same.

A group with no weight matrix (a final norm layer such as ConvNeXt's head norm) joins the group before
it: "the last stage" is never a lone LayerNorm. Parameters owned by the model itself (a class token)
belong to the first group.

Phase `head` freezes every group, so only the classifier trains (norm layers, LayerNorm included,
are frozen with their group). A frozen part keeps its BatchNorm layers in eval mode even while the
model trains, so their running statistics do not move: freezing only `requires_grad` would still
update them.
"""

from __future__ import annotations

from torch import nn

from gastro_dist import UserError
from gastro_dist.models.backbones import HeadSpec, head_parameter_names, is_timm_model

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def backbone_stages(model: nn.Module, spec: HeadSpec) -> list[list[str]]:
    """A torchvision model's ordered stages as lists of dotted module names, excluding the head."""
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


def layer_groups(model: nn.Module, spec: HeadSpec, fine: bool = False) -> list[list[str]]:
    """The backbone's parameter names in ordered groups, input to output, the head excluded.

    `fine=False`: the stages `unfreeze: K` counts; `fine=True`: the layers of layer-wise LR decay.
    """
    head = head_parameter_names(model, spec)
    names = [name for name, _ in model.named_parameters() if name not in head]
    if is_timm_model(model):
        from timm.models import group_parameters

        by_layer = group_parameters(model, model.group_matcher(coarse=not fine))
        groups = [[n for n in by_layer[layer] if n not in head] for layer in sorted(by_layer)]
    else:
        groups = []
        for stage in backbone_stages(model, spec):
            prefixes = tuple(f"{module}." for module in stage)
            groups.append([n for n in names if n.startswith(prefixes)])
        own = [n for n in names if "." not in n]  # e.g. torchvision ViT's class_token
        groups[0:1] = [own + groups[0]] if groups else [own]
        covered = {n for group in groups for n in group}
        assert covered == set(names), f"parameters in no stage: {sorted(set(names) - covered)[:5]}"
    return _merge_weightless(model, [g for g in groups if g])


def _merge_weightless(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Join each group without a weight matrix (only norms and biases) to the group before it."""
    params = dict(model.named_parameters())
    merged: list[list[str]] = []
    for group in groups:
        if merged and all(params[n].ndim <= 1 for n in group):
            merged[-1] = merged[-1] + group
        else:
            merged.append(group)
    return merged


def set_trainable(model: nn.Module, spec: HeadSpec, unfreeze: str) -> list[str]:
    """Freeze the backbone except per `unfreeze` ('none' | 'all' | K last stages); return the frozen parameter names."""
    stages = layer_groups(model, spec)
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
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """After model.train(): put every BatchNorm whose parameters are all frozen back into eval mode
    (timm's BatchNorm+activation layers are BatchNorm2d subclasses and are included)."""
    for module in model.modules():
        if isinstance(module, _BATCHNORM):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
