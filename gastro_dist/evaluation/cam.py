"""Grad-CAM heatmaps: which region of a gastroscopy frame drove a prediction.

Owns choosing the convolutional layer to explain for each torchvision family, computing Grad-CAM
(Selvaraju et al. 2017) with a forward hook and ``torch.autograd.grad``, and blending a heatmap over
the original frame. The model is left exactly as found: per-module training modes are restored,
parameters' ``requires_grad`` flags and ``.grad`` are never touched (gradients flow because the
input requires grad, so frozen backbones work), and the hook is always removed.

A CAM has the spatial resolution of the target layer's output, upsampled to the input: e.g. ResNet
layer4 is input/32, and inception_v3's Mixed_7c is 1x1 below about 107 px input (a uniform map).
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import models

from gastro_dist import UserError

# Families whose deepest stage is their ``features`` Sequential's last block.
_LAST_FEATURE_BLOCK = (models.EfficientNet, models.MobileNetV2, models.MobileNetV3, models.ConvNeXt)
_TRANSFORMERS = (models.VisionTransformer, models.SwinTransformer)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)
_NORMALISATIONS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def find_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations Grad-CAM weights: the last convolutional stage of the backbone.

    Recognises the torchvision backbone itself or inside a wrapper module (the first one found).
    Anything else, VGG included, gets the rectified output of its last ``nn.Conv2d``.
    """
    for module in model.modules():
        if isinstance(module, models.ResNet):  # also ResNeXt and wide ResNets
            return module.layer4
        if isinstance(module, models.Inception3):
            return module.Mixed_7c
        if isinstance(module, models.DenseNet):
            return module.features
        if isinstance(module, _LAST_FEATURE_BLOCK):
            return module.features[-1]
        if isinstance(module, models.RegNet):
            return module.trunk_output
        if isinstance(module, _TRANSFORMERS):
            raise UserError(f"Grad-CAM needs a convolutional backbone; {type(module).__name__} is a "
                            f"vision transformer: choose a CNN model (resnet, vgg, inception, ...)")
    return _last_convolution_output(model)


def _last_convolution_output(model: nn.Module) -> nn.Module:
    """The activation that follows the last Conv2d (past any normalisation), else that Conv2d.

    Grad-CAM needs rectified feature maps: on raw convolution outputs the large negative responses
    away from the object cancel the evidence (e.g. VGG's last conv versus the ReLU after it).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Conv2d layer to explain; pass target_layer explicitly")
    parent_name, _, child_name = names[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    target = parent.get_submodule(child_name)
    if isinstance(parent, nn.Sequential):
        siblings = list(parent.named_children())
        position = [name for name, _ in siblings].index(child_name)
        for _, module in siblings[position + 1:]:
            if isinstance(module, _ACTIVATIONS):
                target = module
            elif not isinstance(module, _NORMALISATIONS):
                break
    return target


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: nn.Module | None = None,
    class_index: int | list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a normalised N x 3 x H x W batch; returns (cams N x H x W in [0, 1], logits N x C).

    ``class_index``: None explains each image's predicted class, an int the same class for all,
    a list one class per image. Runs the model in eval mode (so inception returns plain logits).
    Each CAM is min-max scaled per image; one without any positive evidence is all zeros.
    Both results are detached and on the CPU.
    """
    target_layer = target_layer if target_layer is not None else find_target_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def keep_activation(module, inputs, output):
        captured["activation"] = output
        # Later in-place ops (DenseNet's relu_, VGG's ReLU(inplace=True)) then modify the copy.
        return output.clone()

    training_modes = {module: module.training for module in model.modules()}
    handle = target_layer.register_forward_hook(keep_activation)
    try:
        model.eval()
        device = next(model.parameters()).device
        # Gradients reach the activations through the input, whatever the parameters' flags.
        images = images.detach().to(device).requires_grad_(True)
        with torch.enable_grad():
            logits = model(images)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            classes = _explained_classes(class_index, logits)
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval mode
            activation = captured["activation"]
            (gradients,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        for module, was_training in training_modes.items():
            module.training = was_training

    with torch.no_grad():
        channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
        cams = F.relu((channel_weights * activation).sum(dim=1, keepdim=True))
        cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lowest = cams.amin(dim=(1, 2), keepdim=True)
        spread = cams.amax(dim=(1, 2), keepdim=True) - lowest
        cams = (cams - lowest) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return cams.cpu(), logits.detach().cpu()


def _explained_classes(class_index, logits: torch.Tensor) -> torch.Tensor:
    num_images, num_classes = logits.shape
    if class_index is None:
        return logits.argmax(dim=1)
    classes = torch.as_tensor(class_index, dtype=torch.long, device=logits.device).reshape(-1)
    if classes.numel() == 1:
        classes = classes.expand(num_images)
    if classes.numel() != num_images or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"class_index must be one class or one per image, each in 0..{num_classes - 1}")
    return classes


def overlay_heatmap(image: Image.Image | np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``image`` (PIL or uint8 H x W x 3) blended with the jet-coloured ``cam`` (values in [0, 1]).

    A CAM of another size (e.g. computed on the resized model input) is stretched to the image.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be RGB uint8 H x W x 3, got {pixels.dtype} {pixels.shape}")
    cam = np.asarray(cam, dtype=np.float32)
    height, width = pixels.shape[:2]
    if cam.shape != (height, width):
        cam = np.asarray(Image.fromarray(cam).resize((width, height), Image.Resampling.BILINEAR))
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * pixels + alpha * heat
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
