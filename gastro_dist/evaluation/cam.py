"""Grad-CAM heatmaps: which region of a gastroscopy frame drove a prediction.

Owns choosing the layer to explain for each backbone family, computing Grad-CAM (Selvaraju et al.
2017) with a forward hook and ``torch.autograd.grad``, blending a heatmap over the original frame,
and the panel clinicians read (`cam_panel`): the frame at its own resolution beside the overlay,
the map laid on the part of the frame the network saw, with a caption.
The model is left exactly as found: per-module training modes are restored, parameters'
``requires_grad`` flags and ``.grad`` are never touched (gradients flow because the input requires
grad, so frozen backbones work), and the hook is always removed.

CNNs are explained at their last convolutional stage. Vision transformers (timm ViTs and their
relatives, torchvision's ViT) are explained on their patch tokens: class and register tokens dropped,
the tokens are laid back on their grid (h x w with h * w tokens and the image's aspect ratio) as a
C x h x w map, which Grad-CAM then treats like a CNN's. Which tokens depends on the readout:
- a model that pools its patch tokens (timm's global_pool 'avg', 'max', 'map') is explained at its last
  block's output, the exact counterpart of a CNN's last stage before global average pooling;
- a model read out through its class token (timm's global_pool 'token', torchvision's ViT) is explained
  at its last block's first LayerNorm, the input of the attention that mixes the patches into the
  class token: the block's output would carry no gradient at the patches. This is less faithful than
  on a CNN: a LayerNorm output has no "absent" value, so a map can show the evidence's location weakly.
Channel-last maps (Swin) are transposed. This is the grad-cam package's ``reshape_transform`` in a
few lines; the package itself is not used: it would bring a second Grad-CAM implementation, with its
own hooks and gradient handling, that the guarantees above would have to be re-checked against.

A CAM has the spatial resolution of the target layer's output, upsampled to the input: e.g. ResNet
layer4 is input/32, a ViT's patch grid input/16, and inception_v3's Mixed_7c is 1x1 below about
107 px input (a uniform map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision import models

from gastro_dist import UserError
from gastro_dist.models.backbones import is_timm_model, model_logits

# Families whose deepest stage is their ``features`` Sequential's last block.
_LAST_FEATURE_BLOCK = (models.EfficientNet, models.MobileNetV2, models.MobileNetV3, models.ConvNeXt)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)
_NORMALISATIONS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
LAYOUTS = ("NCHW", "NHWC", "tokens")


@dataclass(frozen=True)
class CamTarget:
    """The layer Grad-CAM weights and how its output is laid out: "NCHW" feature maps, "NHWC" (Swin),
    or "tokens" (N x tokens x C, the first ``num_prefix_tokens`` of them class/register tokens)."""
    layer: nn.Module
    layout: str = "NCHW"
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        assert self.layout in LAYOUTS, self.layout


def find_cam_target(model: nn.Module) -> CamTarget:
    """The layer to explain and its layout, for the torchvision or timm backbone itself or inside a
    wrapper module (the first one found). Anything else, VGG included, gets the rectified output of
    its last ``nn.Conv2d``."""
    for module in model.modules():
        if is_timm_model(module):
            return _timm_target(module)
        if isinstance(module, models.ResNet):  # also ResNeXt and wide ResNets
            return CamTarget(module.layer4)
        if isinstance(module, models.Inception3):
            return CamTarget(module.Mixed_7c)
        if isinstance(module, models.DenseNet):
            return CamTarget(module.features)
        if isinstance(module, _LAST_FEATURE_BLOCK):
            return CamTarget(module.features[-1])
        if isinstance(module, models.RegNet):
            return CamTarget(module.trunk_output)
        if isinstance(module, models.VisionTransformer):
            return CamTarget(module.encoder.layers[-1].ln_1, "tokens", num_prefix_tokens=1)
        if isinstance(module, models.SwinTransformer):
            return CamTarget(module.features[-1], "NHWC")
    return CamTarget(_last_convolution_output(model))


def _timm_target(model: nn.Module) -> CamTarget:
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "num_prefix_tokens") and blocks is not None and hasattr(blocks[-1], "norm1"):
        prefix = int(model.num_prefix_tokens)
        if getattr(model, "global_pool", "token") == "token":
            return CamTarget(blocks[-1].norm1, "tokens", num_prefix_tokens=prefix)
        return CamTarget(blocks[-1], "tokens", num_prefix_tokens=prefix)
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise UserError(f"Grad-CAM does not know where to look in {type(model).__name__}; pass target_layer explicitly")
    # The deepest feature map timm itself exposes (features_only), in the model's output format.
    return CamTarget(model.get_submodule(feature_info[-1]["module"]), str(getattr(model, "output_fmt", "NCHW")))


def find_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations Grad-CAM weights (see `find_cam_target`)."""
    return find_cam_target(model).layer


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


def _as_feature_maps(tensor: torch.Tensor, target: CamTarget, image_size: tuple[int, int]) -> torch.Tensor:
    """The target layer's output (or its gradient) as N x C x h x w."""
    if target.layout == "NHWC":
        return tensor.permute(0, 3, 1, 2)
    if target.layout == "tokens":
        patches = tensor[:, target.num_prefix_tokens:, :]
        count = patches.shape[1]
        height = round(math.sqrt(count * image_size[0] / image_size[1]))
        width = count // max(height, 1)
        if height * width != count:
            raise UserError(f"cannot lay {count} patch tokens on a grid with the image's aspect ratio "
                            f"{image_size[0]}x{image_size[1]}")
        return patches.reshape(patches.shape[0], height, width, patches.shape[2]).permute(0, 3, 1, 2)
    if tensor.ndim != 4:
        raise UserError(f"the Grad-CAM target layer gives a {tensor.ndim}-d output, not N x C x H x W feature maps; "
                        "pass target_layer explicitly")
    return tensor


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: nn.Module | CamTarget | None = None,
    class_index: int | list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a normalised N x 3 x H x W batch; returns (cams N x H x W in [0, 1], logits N x C).

    ``target_layer``: None finds it (`find_cam_target`); a module is taken as giving N x C x H x W maps.
    ``class_index``: None explains each image's predicted class, an int the same class for all,
    a list one class per image. Runs the model in eval mode (so inception returns plain logits).
    Each CAM is min-max scaled per image; one without any positive evidence is all zeros.
    Both results are detached and on the CPU.
    """
    if target_layer is None:
        target = find_cam_target(model)
    else:
        target = target_layer if isinstance(target_layer, CamTarget) else CamTarget(target_layer)
    captured: dict[str, torch.Tensor] = {}

    def keep_activation(module, inputs, output):
        captured["activation"] = output
        # Later in-place ops (DenseNet's relu_, VGG's ReLU(inplace=True)) then modify the copy.
        return output.clone()

    training_modes = {module: module.training for module in model.modules()}
    handle = target.layer.register_forward_hook(keep_activation)
    try:
        model.eval()
        device = next(model.parameters()).device
        # Gradients reach the activations through the input, whatever the parameters' flags.
        images = images.detach().to(device).requires_grad_(True)
        with torch.enable_grad():
            logits, _ = model_logits(model(images))
            classes = _explained_classes(class_index, logits)
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval mode
            activation = captured["activation"]
            (gradients,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        for module, was_training in training_modes.items():
            module.training = was_training

    with torch.no_grad():
        activation = _as_feature_maps(activation, target, images.shape[-2:])
        gradients = _as_feature_maps(gradients, target, images.shape[-2:])
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


def eval_crop_box(width: int, height: int, image_size: int, eval_crop_ratio: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in a width x height frame of the square the evaluation preprocessing
    feeds the network: resize the shorter side to round(image_size / eval_crop_ratio), centre-crop
    image_size (`data.augmentation.eval_transform`). A CAM covers exactly this square."""
    side = image_size * min(width, height) / round(image_size / eval_crop_ratio)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


# Panels are drawn with frames at least this tall (small stored frames are enlarged for display, nearest
# neighbour so that no detail is invented) and captions at a size that stays readable when a report shows
# two panels side by side on a 1,400 px screen.
PANEL_MIN_FRAME_PX = 360
PANEL_FONT_PX = 22


def cam_panel(frame: Image.Image, cam: np.ndarray, crop_box: tuple[float, float, float, float],
              caption: list[str], alpha: float = 0.45) -> Image.Image:
    """The frame as stored beside the same frame with the CAM laid over the part the network saw
    (`eval_crop_box`; the rest dimmed and outlined), a colour scale, and a caption wrapped under them.

    Frames shorter than PANEL_MIN_FRAME_PX are enlarged for display. Captions hold class names from
    model.json and source names from the shards: drawn as text in the image, they cannot run as markup.
    """
    frame = frame.convert("RGB")
    overlay = Image.eval(frame, lambda value: value // 2)  # outside the network's view: dimmed
    box = tuple(int(round(v)) for v in crop_box)
    overlay.paste(overlay_heatmap(frame.crop(box), cam, alpha=alpha), box[:2])
    scale = max(1.0, PANEL_MIN_FRAME_PX / frame.height)
    size = (round(frame.width * scale), round(frame.height * scale))
    frame, overlay = (image.resize(size, Image.Resampling.NEAREST) for image in (frame, overlay))
    width, height = size
    gap = max(12, width // 40)
    font = _caption_font(PANEL_FONT_PX)
    colour_scale = _colour_scale(height, font)
    images_width = 2 * width + 2 * gap + colour_scale.width
    lines = _wrapped([" ".join(line.split())[:300] for line in caption], font, max(images_width, 600) - 2 * gap)
    line_height = int(PANEL_FONT_PX * 1.35)
    panel_width = max(images_width, 600)
    panel = Image.new("RGB", (panel_width, height + gap + line_height * len(lines) + gap), "white")
    left = (panel_width - images_width) // 2
    panel.paste(frame, (left, 0))
    panel.paste(overlay, (left + width + gap, 0))
    panel.paste(colour_scale, (left + 2 * width + 2 * gap, 0))
    draw = ImageDraw.Draw(panel)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    draw.rectangle((left + width + gap + x0, y0, left + width + gap + x1 - 1, y1 - 1), outline="white", width=2)
    for k, line in enumerate(lines):
        draw.text((gap, height + gap + k * line_height), line, fill="black", font=font)
    return panel


def _colour_scale(height: int, font: ImageFont.ImageFont) -> Image.Image:
    """A vertical jet bar, 'high' at its top and 'low' at its bottom: how to read the heatmap's colours."""
    label_height = int(PANEL_FONT_PX * 1.3)
    bar_height = max(10, height - 2 * label_height)
    values = np.linspace(1.0, 0.0, bar_height)[:, None].repeat(24, axis=1)
    bar = Image.fromarray((matplotlib.colormaps["jet"](values)[..., :3] * 255).astype(np.uint8))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(24, int(max(measure.textlength(word, font=font) for word in ("high", "low"))) + 4)
    scale = Image.new("RGB", (width, height), "white")
    scale.paste(bar, ((width - 24) // 2, label_height))
    draw = ImageDraw.Draw(scale)
    draw.text((0, 0), "high", fill="black", font=font)
    draw.text((0, label_height + bar_height + 2), "low", fill="black", font=font)
    return scale


def _wrapped(lines: list[str], font: ImageFont.ImageFont, width_px: int) -> list[str]:
    """Each line broken at spaces into lines no wider than width_px (a word longer than that stays whole)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}".strip()
            if current and measure.textlength(candidate, font=font) > width_px:
                wrapped.append(current)
                current = word
            else:
                current = candidate
        wrapped.append(current)
    return wrapped


def _caption_font(size_px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size_px)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()
