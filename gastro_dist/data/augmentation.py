"""Training augmentation in two halves, the worker's (random resized crop to uint8) and the device's
(flips, rotation, optional RandAugment/TrivialAugment, colour jitter and normalisation, then optional
mixup/CutMix, batched on the GPU), and the one evaluation preprocessing that validation, evaluate,
predict and Grad-CAM share."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from gastro_dist.config import DataConfig
from gastro_dist.data.decode import CorruptSample, decode_crops_on_device

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_GRAY_SUM = sum(_GRAY_WEIGHTS)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many areas before its fallback
_CROP_LOG_RATIOS = (math.log(3 / 4), math.log(4 / 3))
_CROP_DRAWS = 4 * _CROP_ATTEMPTS  # area, aspect ratio, top, left per attempt
_NUM_DRAWS = _CROP_DRAWS + 7 + 3  # crop; flips, angle, brightness, contrast, saturation, hue; jitter order
# What a worker hands over per image besides its pixels: the rest of the augmentation's draws.


class AugmentParams(NamedTuple):
    """What a worker hands over per image besides its pixels: the draws of every step after the crop.
    Travels as one float row per image (`as_row`, collated to B x 9); the device half reads it back
    as named columns (`from_rows`)."""
    hflip: torch.Tensor  # 1.0: flip left-right
    vflip: torch.Tensor  # 1.0: flip upside down
    angle_deg: torch.Tensor
    brightness: torch.Tensor  # jitter factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    first_jitter: torch.Tensor  # the jitter order: 0 brightness, 1 contrast, 2 saturation
    second_jitter: torch.Tensor
    third_jitter: torch.Tensor

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> AugmentParams:
        return cls(*rows.unbind(dim=1))

    def jitter_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.first_jitter, self.second_jitter, self.third_jitter


AUGMENT_PARAMS = AugmentParams._fields


class TrainAugmentation:
    """The worker half of the training augmentation: random resized crop (and hue, when enabled).

    The steps and distributions are torchvision's RandomResizedCrop, RandomHorizontalFlip,
    RandomVerticalFlip, RandomRotation (nearest, black corners) and ColorJitter, in that order,
    split in two so that a data worker's share is only the crop (0.2 to 0.3 ms at 224 px):

    * here, in the worker: the crop, resized by torch's antialiased uint8 kernel (bilinear, or
      bicubic for weights trained so: `DataConfig.resize_mode`) in channels-last layout, handed
      over as uint8 HWC (a quarter of the bytes of a float image to collate, to pass through shared
      memory and to copy to the GPU), with the draws of all the other steps (`AUGMENT_PARAMS`);
    * `DeviceAugmentation`, on the training device for the whole batch: flips and rotation as one
      nearest-neighbour warp, then brightness, contrast and saturation in their random order and
      the normalisation, fused into one 3x3 matrix per image.

    Hue (off by default) is shifted here by torchvision's kernel, before the other jitter; being
    per pixel, it commutes with the flips and the rotation.

    All random numbers of an image come from one draw of torch's global generator, which
    `ShardSamples` seeds per sample (any other DataLoader dataset gets its per-worker seeding).
    """

    def __init__(self, cfg: DataConfig):
        self.size, self.resize_mode = cfg.image_size, cfg.resize_mode
        self.crop_scale_min = cfg.crop_scale_min
        self.hflip, self.vflip, self.rotation_deg = cfg.hflip, cfg.vflip, cfg.rotation_deg
        self.color_jitter, self.hue_jitter = cfg.color_jitter, cfg.hue_jitter

    def __call__(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(size x size x 3 uint8 crop, float32 `AUGMENT_PARAMS`) of a PIL image or a CHW uint8 tensor."""
        height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[1:]
        box, params, hue_shift = self.draw(width, height)
        resized = self._resized_crop(image, box)
        if hue_shift:
            chw = v2.functional.adjust_hue(resized.permute(2, 0, 1), hue_shift)
            resized = chw.permute(1, 2, 0).contiguous()
        return resized, params

    def draw(self, width: int, height: int) -> tuple[tuple[int, int, int, int], torch.Tensor, float]:
        """All random choices for one image of this size: (crop box, `AUGMENT_PARAMS`, hue shift)."""
        draws = torch.rand(_NUM_DRAWS).tolist()
        crop_draws, order_draws = draws[:_CROP_DRAWS], draws[_CROP_DRAWS + 7:]
        u_hflip, u_vflip, u_angle, *factor_draws, u_hue = draws[_CROP_DRAWS:_CROP_DRAWS + 7]
        low = max(0.0, 1 - self.color_jitter)
        params = [float(self.hflip and u_hflip < 0.5), float(self.vflip and u_vflip < 0.5),
                  self.rotation_deg * (2 * u_angle - 1),
                  *(low + (1 + self.color_jitter - low) * u for u in factor_draws),
                  *sorted(range(3), key=order_draws.__getitem__)]  # the fields of AugmentParams, in order
        return self._crop_box(width, height, crop_draws), torch.tensor(params), self.hue_jitter * (2 * u_hue - 1)

    def _crop_box(self, width: int, height: int, draws: list[float]) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), sampled as torchvision's RandomResizedCrop does."""
        area = width * height
        log_min, log_max = _CROP_LOG_RATIOS
        for attempt in range(_CROP_ATTEMPTS):
            u_area, u_ratio, u_top, u_left = draws[4 * attempt: 4 * attempt + 4]
            target_area = area * (self.crop_scale_min + (1 - self.crop_scale_min) * u_area)
            ratio = math.exp(log_min + (log_max - log_min) * u_ratio)
            w, h = round(math.sqrt(target_area * ratio)), round(math.sqrt(target_area / ratio))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
                return left, top, left + w, top + h
        w = min(width, round(height * 4 / 3))  # the fallback: a central crop with the ratio clamped
        h = min(height, round(width * 4 / 3))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def _resized_crop(self, image: Image.Image | torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The crop resized to size x size: uint8, HWC, contiguous."""
        left, top, right, bottom = box
        if isinstance(image, Image.Image):
            crop = torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1)
        else:
            crop = image[:, top:bottom, left:right]
        # NCHW in channels-last memory: what torch's fast uint8 antialiased kernel takes (a decoded
        # JPEG already has that layout, so this copies only the crop, without transposing)
        crop = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(crop, size=(self.size, self.size), mode=self.resize_mode, antialias=True)
        return resized.squeeze(0).permute(1, 2, 0).contiguous()


def step_seed(seed: int, epoch_seed: int, micro_step: int, rank: int) -> int:
    """The seed of one training step's draws on the device (auto-augment policy, mixup/CutMix): its own
    for every rank and step, and the same when a resumed run repeats the step."""
    return hash((seed, epoch_seed, micro_step, rank)) & 0x7FFF_FFFF


@contextlib.contextmanager
def seeded_cpu_draws(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded with `seed` inside, restored after: torchvision's RandAugment,
    TrivialAugmentWide, MixUp and CutMix draw from it (on the CPU, whatever device the images are on),
    while the training step's own randomness (dropout) goes on untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class DeviceAugmentation:
    """The device half of the training augmentation (see `TrainAugmentation`), on a whole batch.

    Takes a batch of float NCHW pixels in 0..255 and its `AUGMENT_PARAMS` rows, on the training device,
    and returns the normalised float32 NCHW batch (channels-last memory). torchvision clamps after each
    of brightness, contrast and saturation; the fused matrix clamps only the result, which differs
    only where an intermediate step saturated.

    Optional, off by default: an auto-augment policy (`data.auto_augment`) after the flips and rotation,
    and mixup/CutMix (`data.mixup_alpha`, `data.cutmix_alpha`) on the normalised batch, which turns the
    labels into soft targets (the loss's label smoothing then applies to the mixed targets). Both are
    torchvision's own transforms, drawing from the CPU generator that `training_batch` seeds per step.
    """

    def __init__(self, cfg: DataConfig, num_classes: int = 0):
        self.cfg = cfg
        self._constants_on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.auto_augment = _auto_augment_policy(cfg)
        self.mixup = v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes) if cfg.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes) if cfg.cutmix_alpha > 0 else None
        self.num_classes = num_classes
        assert num_classes > 0 or not (self.mixup or self.cutmix), "mixing needs the number of classes"

    def _constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Mean, std, grey weights and clamp bounds on `device`, made once: building them each step
        would be a blocking host-to-device copy, a wait for the GPU."""
        if device not in self._constants_on:
            mean, std = torch.tensor(self.cfg.mean), torch.tensor(self.cfg.std)
            values = {"mean": mean, "std": std, "grey_weights": torch.tensor(_GRAY_WEIGHTS), "eye": torch.eye(3),
                      "low": -mean / std, "high": (1 - mean) / std}
            self._constants_on[device] = {name: value.to(device) for name, value in values.items()}
        return self._constants_on[device]

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (their targets are then B x classes probabilities)."""
        return self.mixup is not None or self.cutmix is not None

    def training_batch(self, batch: dict, device: torch.device, channels_last: bool,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A `TrainLoader` batch on `device`: (augmented, normalised images in the model's memory
        format, targets: the labels, or soft targets when mixing, reasons for images dropped because
        the device could not decode them). `seed` (`step_seed`): this step's auto-augment and mixing draws."""
        params = batch["augment"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        problems: list[str] = []
        if "jpeg" in batch:
            pixels, kept, problems = decode_crops_on_device(batch, self.cfg.image_size, device, self.cfg.resize_mode)
            if problems and self.cfg.strict:
                raise CorruptSample(f"{problems[0]} (data.strict=true; set data.strict=false to skip broken samples)")
            if problems:
                kept_index = torch.tensor(kept, device=device)
                params, labels = params[kept_index], labels[kept_index]
        else:
            pixels = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        # Only a step that draws (a policy, mixing) needs the seeded generator: saving and restoring its state
        # is kept off the plain step.
        with seeded_cpu_draws(seed) if self.auto_augment is not None or self.mixes else contextlib.nullcontext():
            images = self(pixels, params)
            if self.mixes:
                images, labels = self.mixed(images, labels)
        return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), labels, problems

    def mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, B x classes soft targets): a `data.mixup_prob` share of batches mixed by mixup or CutMix
        (chosen by `data.mixup_switch_prob` when both are on, as timm does), the rest with one-hot targets,
        so that the loss is the same kind of soft-target cross-entropy every step."""
        if torch.rand(()) >= self.cfg.mixup_prob:
            return images, F.one_hot(labels, self.num_classes).float()
        use_cutmix = self.mixup is None or (self.cutmix is not None and torch.rand(()) < self.cfg.mixup_switch_prob)
        return (self.cutmix if use_cutmix else self.mixup)(images, labels)

    def __call__(self, x: torch.Tensor, param_rows: torch.Tensor) -> torch.Tensor:
        """Augmented, normalised images from float NCHW pixels and their B x 9 `AugmentParams` rows (the
        auto-augment policy draws from torch's CPU generator: `training_batch` seeds it per step)."""
        batch, _, height, width = x.shape
        params = AugmentParams.from_rows(param_rows)
        # Decided from the config, not from the params: reading device values would make the host
        # wait for the GPU every step. Params of "no flip, 0 degrees" warp to the image itself.
        if self.cfg.hflip or self.cfg.vflip or self.cfg.rotation_deg:
            x = self._flip_rotate(x, params.hflip, params.vflip, params.angle_deg)
        if self.auto_augment is not None:
            x = self._auto_augmented(x)
        matrix, offset = self._jitter_matrix(x, params)
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, 3)
        out = torch.baddbmm(offset.unsqueeze(1), pixels, matrix.transpose(1, 2))
        constants = self._constants(out.device)
        out = torch.minimum(torch.maximum(out, constants["low"]), constants["high"])
        return out.view(batch, height, width, 3).permute(0, 3, 1, 2)

    def _auto_augmented(self, x: torch.Tensor) -> torch.Tensor:
        """The policy applied to each image with its own draw, on uint8 pixels (the dtype its operations
        are defined on). Written as a loop: torchvision's policies, given a batch, apply one draw to all of it."""
        pixels = x.round().clamp_(0, 255).to(torch.uint8)
        return torch.stack([self.auto_augment(image) for image in pixels]).float()

    @staticmethod
    def _flip_rotate(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """Flips, then a rotation about the centre (counter-clockwise for positive angles, as
        torchvision's), as one nearest-neighbour warp with black corners. Square images only."""
        radians = torch.deg2rad(angle)
        cos, sin = torch.cos(radians), torch.sin(radians)
        # output -> input coordinates in [-1, 1]: rotate back, then undo the flips (x -> -x)
        x_sign, y_sign = 1 - 2 * hflip, 1 - 2 * vflip
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([x_sign * cos, -x_sign * sin, zero], dim=1),
                             torch.stack([y_sign * sin, y_sign * cos, zero], dim=1)], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _jitter_matrix(self, x: torch.Tensor, params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x 3 x 3 matrices, B x 3 offsets) taking 0..255 RGB pixels to jittered, normalised ones.

        Each of the three steps maps a pixel p to a p + (b grey(p) + c) (1, 1, 1), grey(p) = w.p, and
        so does their composition: only (a, b, c) per image is tracked (w sums to `_GRAY_SUM`, not 1).
        """
        brightness, contrast, saturation = params.brightness, params.contrast, params.saturation
        constants = self._constants(x.device)
        weights = constants["grey_weights"]
        image_grey = x.mean(dim=(2, 3)) @ weights  # mean grey level of each image before jitter
        a, b, c = torch.ones_like(brightness), torch.zeros_like(brightness), torch.zeros_like(brightness)
        for step in params.jitter_order():
            # step 1 blends with the image's mean grey level as it is at this step
            mean_grey = (a + b * _GRAY_SUM) * image_grey + c * _GRAY_SUM
            candidates = (
                (a * brightness, b * brightness, c * brightness),  # step 0: p * brightness
                (a * contrast, b * contrast, contrast * c + (1 - contrast) * mean_grey),
                (saturation * a, saturation * b + (1 - saturation) * (a + b * _GRAY_SUM),  # step 2: blend
                 c * (saturation + (1 - saturation) * _GRAY_SUM)),                       # with each pixel's grey
            )
            a, b, c = (torch.where(step == 0, c0, torch.where(step == 1, c1, c2)) for c0, c1, c2 in zip(*candidates))
        mean, std, eye = constants["mean"], constants["std"], constants["eye"]
        matrix = (a[:, None, None] * eye + b[:, None, None] * weights) / (255 * std[:, None])
        offset = (c[:, None] / 255 - mean) / std
        return matrix, offset


def _auto_augment_policy(cfg: DataConfig) -> v2.Transform | None:
    """torchvision's policy named by `data.auto_augment` (None for "none"); black fill, like the rotation's."""
    if cfg.auto_augment == "randaugment":
        return v2.RandAugment(num_ops=cfg.auto_augment_ops, magnitude=cfg.auto_augment_magnitude)
    if cfg.auto_augment == "trivialaugment":
        return v2.TrivialAugmentWide()
    return None


def train_transform(cfg: DataConfig) -> TrainAugmentation:
    """The worker half of the training augmentation (`TrainAugmentation`); `DeviceAugmentation` finishes it."""
    return TrainAugmentation(cfg)


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """The one preprocessing used by validation, evaluate, predict and Grad-CAM (PIL image or CHW uint8 tensor)."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(cfg.image_size / cfg.eval_crop_ratio), interpolation=v2.InterpolationMode(cfg.resize_mode),
                  antialias=True),
        v2.CenterCrop(cfg.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ])
