"""Training and evaluation input pipelines over WebDataset shards.

Why the epoch plan is ours and not webdataset's splitters: DDP needs every rank to run the
same number of steps whatever the shard count, evaluation must see each sample exactly
once across ranks, and a resumed run must continue inside an epoch at the exact sample.
webdataset's `split_by_node`/`split_by_worker` assign whole shards (uneven counts, a rank
with no shard at all when shards < ranks) and `with_epoch` counts per worker. So each epoch
is planned from index.json's per-shard counts:

* the epoch's shard order is a permutation seeded by (seed, epoch); concatenated, the shards
  give one global sequence of sample positions;
* training: `steps = N // (world * batch)`; rank r takes a contiguous chunk of `steps * batch`
  positions, split between its DataLoader workers in whole batches, so every rank yields
  exactly `steps` full batches (the few left-over positions fall at a different place each
  epoch because the shard order changes);
* evaluation: the unpermuted sequence is cut into `world` near-equal chunks, every sample once;
* each worker reads only the shards its chunk overlaps (webdataset's tar reader), shuffles
  its raw samples in a seeded buffer, and decodes after the shuffle. Every item carries its
  position in the worker's raw stream; a checkpoint records how far each worker got, and a
  resumed epoch skips those raw samples without decoding them. Augmentation randomness is
  seeded per sample from its position, so a resumed epoch is augmented exactly like the
  uninterrupted one.
"""

from __future__ import annotations

import io
import itertools
import math
import random
import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from gastro_dist import RunFailure, UserError
from gastro_dist.config import DataConfig
from gastro_dist.data.images import DEFAULT_MAX_PIXELS
from gastro_dist.data.shards import (ShardFile, ShardIndex, ShardReadError, TarSample, iter_shard_samples,  # noqa: F401
                                     load_shard_index)  # load_shard_index: still imported from here by evaluation/ and benchmark


# ---------------------------------------------------------------- epoch plan
@dataclass(frozen=True)
class Chunk:
    """A contiguous run [start, stop) of one shard's samples."""
    shard: ShardFile
    start: int
    stop: int


def _ordered_shards(shards: list[ShardFile], seed: int, epoch: int, shuffle: bool) -> list[ShardFile]:
    if not shuffle:
        return list(shards)
    order = list(shards)
    random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    return order


def _slice_sequence(shards: list[ShardFile], start: int, stop: int) -> list[Chunk]:
    """The shard chunks covering global positions [start, stop) of the concatenated shards."""
    chunks, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.count)
        if lo < hi:
            chunks.append(Chunk(shard, lo - offset, hi - offset))
        offset += shard.count
    return chunks


def train_steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    steps = num_samples // (world_size * batch_size)
    if steps == 0:
        raise UserError(f"the training split has {num_samples} samples, fewer than one batch per process "
                        f"({world_size} processes x batch_size {batch_size}); lower data.batch_size or use fewer processes")
    return steps


def batches_per_worker(num_batches: int, num_workers: int) -> list[int]:
    """Whole batches given to each DataLoader worker; the DataLoader then yields them round-robin."""
    return [num_batches // num_workers + (1 if w < num_batches % num_workers else 0) for w in range(num_workers)]


def train_worker_chunks(shards: list[ShardFile], *, seed: int, epoch: int, rank: int, world_size: int,
                        batch_size: int, num_workers: int) -> list[list[Chunk]]:
    """Per DataLoader worker of `rank`, the shard chunks it reads this epoch."""
    steps = train_steps_per_epoch(sum(s.count for s in shards), world_size, batch_size)
    ordered = _ordered_shards(shards, seed, epoch, shuffle=True)
    start = rank * steps * batch_size
    result = []
    for num_batches in batches_per_worker(steps, num_workers):
        stop = start + num_batches * batch_size
        result.append(_slice_sequence(ordered, start, stop))
        start = stop
    return result


def _even_split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def eval_worker_chunks(shards: list[ShardFile], *, rank: int, world_size: int, num_workers: int) -> list[list[Chunk]]:
    """Every sample exactly once across all ranks and workers, in shard order."""
    rank_sizes = _even_split(sum(s.count for s in shards), world_size)
    start = sum(rank_sizes[:rank])
    result = []
    for size in _even_split(rank_sizes[rank], num_workers):
        result.append(_slice_sequence(shards, start, start + size))
        start += size
    return result


def eval_batches_per_rank(num_samples: int, world_size: int, num_workers: int, batch_size: int) -> list[int]:
    """Number of (possibly partial) batches each rank's evaluation loader yields."""
    return [sum(-(-n // batch_size) for n in _even_split(rank_n, num_workers))
            for rank_n in _even_split(num_samples, world_size)]


# ---------------------------------------------------------------- transforms
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_GRAY_SUM = sum(_GRAY_WEIGHTS)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many areas before its fallback
_CROP_LOG_RATIOS = (math.log(3 / 4), math.log(4 / 3))
_CROP_DRAWS = 4 * _CROP_ATTEMPTS  # area, aspect ratio, top, left per attempt
_NUM_DRAWS = _CROP_DRAWS + 7 + 3  # crop; flips, angle, brightness, contrast, saturation, hue; jitter order
# What a worker hands over per image besides its pixels: the rest of the augmentation's draws.
AUGMENT_PARAMS = ("hflip", "vflip", "angle_deg", "brightness", "contrast", "saturation", "step0", "step1", "step2")


class TrainAugmentation:
    """The worker half of the training augmentation: random resized crop (and hue, when enabled).

    The steps and distributions are torchvision's RandomResizedCrop, RandomHorizontalFlip,
    RandomVerticalFlip, RandomRotation (nearest, black corners) and ColorJitter, in that order,
    split in two so that a data worker's share is only the crop (0.2 to 0.3 ms at 224 px):

    * here, in the worker: the crop, resized by torch's antialiased bilinear uint8 kernel in
      channels-last layout, handed over as uint8 HWC (a quarter of the bytes of a float image to
      collate, to pass through shared memory and to copy to the GPU), with the draws of all the
      other steps (`AUGMENT_PARAMS`);
    * `DeviceAugmentation`, on the training device for the whole batch: flips and rotation as one
      nearest-neighbour warp, then brightness, contrast and saturation in their random order and
      the normalisation, fused into one 3x3 matrix per image.

    Hue (off by default) is shifted here by torchvision's kernel, before the other jitter; being
    per pixel, it commutes with the flips and the rotation.

    All random numbers of an image come from one draw of torch's global generator, which
    `ShardSamples` seeds per sample (any other DataLoader dataset gets its per-worker seeding).
    """

    def __init__(self, cfg: DataConfig):
        self.size = cfg.image_size
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
                  *sorted(range(3), key=order_draws.__getitem__)]
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
        resized = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True)
        return resized.squeeze(0).permute(1, 2, 0).contiguous()


class DeviceAugmentation:
    """The device half of the training augmentation (see `TrainAugmentation`), on a whole batch.

    Takes a batch of float NCHW pixels in 0..255 and its `AUGMENT_PARAMS` rows, on the training device,
    and returns the normalised float32 NCHW batch (channels-last memory). torchvision clamps after each
    of brightness, contrast and saturation; the fused matrix clamps only the result, which differs
    only where an intermediate step saturated.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._constants_on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Mean, std, grey weights and clamp bounds on `device`, made once: building them each step
        would be a blocking host-to-device copy, a wait for the GPU."""
        if device not in self._constants_on:
            mean, std = torch.tensor(self.cfg.mean), torch.tensor(self.cfg.std)
            values = {"mean": mean, "std": std, "grey_weights": torch.tensor(_GRAY_WEIGHTS), "eye": torch.eye(3),
                      "low": -mean / std, "high": (1 - mean) / std}
            self._constants_on[device] = {name: value.to(device) for name, value in values.items()}
        return self._constants_on[device]

    def training_batch(self, batch: dict, device: torch.device,
                       channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A `train_loader` batch on `device`: (augmented, normalised images in the model's memory
        format, labels, reasons for images dropped because the device could not decode them)."""
        params = batch["augment"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        problems: list[str] = []
        if "jpeg" in batch:
            pixels, kept, problems = decode_crops_on_device(batch, self.cfg.image_size, device)
            if problems and self.cfg.strict:
                raise CorruptSample(f"{problems[0]} (data.strict=true; set data.strict=false to skip broken samples)")
            if problems:
                kept_index = torch.tensor(kept, device=device)
                params, labels = params[kept_index], labels[kept_index]
        else:
            pixels = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        images = self(pixels, params)
        return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), labels, problems

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        # Decided from the config, not from the params: reading device values would make the host
        # wait for the GPU every step. Params of "no flip, 0 degrees" warp to the image itself.
        if self.cfg.hflip or self.cfg.vflip or self.cfg.rotation_deg:
            x = self._flip_rotate(x, params[:, 0], params[:, 1], params[:, 2])
        matrix, offset = self._jitter_matrix(x, params)
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, 3)
        out = torch.baddbmm(offset.unsqueeze(1), pixels, matrix.transpose(1, 2))
        constants = self._constants(out.device)
        out = torch.minimum(torch.maximum(out, constants["low"]), constants["high"])
        return out.view(batch, height, width, 3).permute(0, 3, 1, 2)

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

    def _jitter_matrix(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x 3 x 3 matrices, B x 3 offsets) taking 0..255 RGB pixels to jittered, normalised ones.

        Each of the three steps maps a pixel p to a p + (b grey(p) + c) (1, 1, 1), grey(p) = w.p, and
        so does their composition: only (a, b, c) per image is tracked (w sums to `_GRAY_SUM`, not 1).
        """
        brightness, contrast, saturation = params[:, 3], params[:, 4], params[:, 5]
        constants = self._constants(x.device)
        weights = constants["grey_weights"]
        image_grey = x.mean(dim=(2, 3)) @ weights  # mean grey level of each image before jitter
        a, b, c = torch.ones_like(brightness), torch.zeros_like(brightness), torch.zeros_like(brightness)
        for position in range(3):
            step = params[:, 6 + position]
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


def train_transform(cfg: DataConfig) -> TrainAugmentation:
    """The worker half of the training augmentation (`TrainAugmentation`); `DeviceAugmentation` finishes it."""
    return TrainAugmentation(cfg)


def decode_crops_on_device(batch: dict, size: int, device: torch.device) -> tuple[torch.Tensor, list[int], list[str]]:
    """`data.decode_on=device`: the batch's JPEGs decoded on `device` (nvJPEG on CUDA, in one batched
    call), each cropped to its `crop_box` and resized to size x size by the antialiased bilinear kernel.

    Returns (float NCHW pixels in 0..255, batch indices of the decoded images, reasons for the others).
    A JPEG the decoder rejects fails the batched call, so then each is decoded alone and the broken
    ones are left out (the worker only read its header).
    """
    data = list(torch.split(batch["jpeg"], batch["jpeg_lengths"].tolist()))
    problems: list[str] = []
    try:
        images, kept = decode_jpeg(data, mode=ImageReadMode.RGB, device=device), list(range(len(data)))
    except RuntimeError:
        images, kept = [], []
        for i, one in enumerate(data):
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                kept.append(i)
            except RuntimeError as error:
                problems.append(f"{batch['key'][i]}: undecodable on {device.type}: {error}")
    if not kept:
        raise CorruptSample(f"no image of the batch could be decoded on {device.type}: {problems[0]}; "
                            "check the shards with `gastro-dist verify`, or set data.decode_on=workers")
    boxes = batch["crop_box"].tolist()
    crops = []
    for i, image in zip(kept, images):
        left, top, right, bottom = boxes[i]
        crop = image[:, top:bottom, left:right].unsqueeze(0).float()
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True))
    # rounded like the uint8 crops the workers make, so both paths feed the same values
    return torch.cat(crops).round_().clamp_(0, 255), kept, problems


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """The one preprocessing used by validation, evaluate, predict and Grad-CAM (PIL image or CHW uint8 tensor)."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(cfg.image_size / cfg.eval_crop_ratio), antialias=True),
        v2.CenterCrop(cfg.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ])


_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 (not DHT, JPG, DAC)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stored_image_header(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) of a stored image from its header, refusing decompression bombs.

    JPEG and PNG headers are parsed here (a few microseconds: the frame marker is in the first few
    hundred bytes) instead of with PIL's `Image.open`, which costs a twentieth of a decode; torchvision's
    decoder has no pixel limit of its own, so this check is what keeps a 60,000-pixel-wide frame in a
    hostile shard from allocating gigabytes.
    """
    width = height = 0
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        image_format = "PNG"
    elif data[:2] == b"\xff\xd8":
        image_format = "JPEG"
        offset = 2
        while offset + 9 <= len(data) and data[offset] == 0xFF:
            marker = data[offset + 1]
            if marker in _JPEG_FRAME_MARKERS:
                height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
                break
            if marker == 0xFF:  # fill byte
                offset += 1
                continue
            offset += 2 + struct.unpack(">H", data[offset + 2:offset + 4])[0]
    else:
        header = Image.open(io.BytesIO(data))  # other formats: PIL's own bomb check applies
        (width, height), image_format = header.size, header.format
    if width < 1 or height < 1:
        raise ValueError(f"{image_format or 'image'} header gives no valid size")
    if width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"decompression bomb: {width}x{height} pixels exceeds the limit of {DEFAULT_MAX_PIXELS:,}")
    return width, height, image_format


def decode_stored(data: bytes, min_short_side: int, stored_short_side: int = 0) -> torch.Tensor:
    """Decode a shard's stored JPEG/PNG bytes to a CHW uint8 RGB tensor.

    A JPEG at least twice the needed size is DCT-downscaled by PIL (`draft`) while still
    >= `min_short_side`; everything else goes through torchvision's decoder, about a third faster
    than PIL's on the small JPEGs pack stores, and already in the channels-last memory layout the
    resize kernel wants. `stored_short_side` (the index's; 0: unknown) tells when no stored image
    can be that large, so that the header is not parsed by PIL as well.
    """
    width, height, image_format = stored_image_header(data)
    scale = min(width, height) / max(min_short_side, 1)
    if (stored_short_side == 0 or stored_short_side >= 2 * min_short_side) and image_format == "JPEG" and scale >= 2:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
        rgb = image.convert("RGB") if image.mode != "RGB" else image
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are kept while
    # the pinned torch range ships them (pyproject.toml), PIL being the slower alternative.
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


# ---------------------------------------------------------------- datasets
class CorruptSample(RunFailure):
    """Shard data that cannot be used: in `data.strict` mode any broken sample, otherwise a worker
    that finds no usable sample at all (it must stop, never spin)."""


def parse_label(cls_member: bytes, num_classes: int) -> int:
    """A sample's class index from its `.cls` member, which must be a whole number in [0, num_classes):
    -100 would be silently ignored by the loss (PyTorch's ignore_index), a larger one crash it."""
    text = cls_member.decode("ascii").strip()
    if not text.isdigit() or int(text) >= num_classes:
        raise ValueError(f"label {text[:20]!r} is not a class index in 0..{num_classes - 1}")
    return int(text)


class ShardSamples(IterableDataset):
    """One rank's samples for one epoch; each DataLoader worker reads its own chunks.

    `worker_chunks[w]` are worker w's shard chunks. Yields dicts with `image`, `label`, (training:
    `augment`, see `TrainAugmentation`), `key`, `worker`, `position` (the sample's index in the
    worker's raw stream, what resume skips to) and `skipped` (the broken samples passed over since
    the previous item, as a list of reasons).
    A broken sample (unreadable tar data, undecodable image, missing member, a label outside the
    classes, a key that is not a plain name, an oversized member) is skipped and reported, or raises
    `CorruptSample` when `strict`. In training (`planned_per_worker` given) a worker that lost samples
    refills from further passes over `refill_chunks` (the whole split), so that every rank still
    yields exactly its planned number of batches and DDP stays in step; a refill pass that yields
    nothing means nothing in the split is usable, and stops the run. Problems are reported from the
    first pass only: refill passes meet the same ones again.
    """

    def __init__(self, worker_chunks: list[list[Chunk]], transform, *, num_classes: int, max_member_bytes: int,
                 decode_short_side: int, stored_short_side: int = 0, shuffle_buffer: int = 0, seed: int = 0,
                 epoch: int = 0, rank: int = 0, planned_per_worker: list[int] | None = None,
                 refill_chunks: list[Chunk] | None = None, skip_positions: list[int] | None = None,
                 with_meta: bool = False, strict: bool = False, first_slot: int = 0, decode_on_device: bool = False):
        self.worker_chunks = worker_chunks
        self.transform = transform
        self.num_classes, self.max_member_bytes = num_classes, max_member_bytes
        self.decode_short_side, self.stored_short_side = decode_short_side, stored_short_side
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.planned_per_worker = planned_per_worker
        self.refill_chunks = refill_chunks or [c for chunks in worker_chunks for c in chunks]
        self.skip_positions = skip_positions or [0] * len(worker_chunks)
        self.with_meta = with_meta
        self.strict = strict
        self.first_slot = first_slot
        self.decode_on_device = decode_on_device

    def _report(self, reason: str, problems: _Problems | None) -> None:
        if self.strict:
            raise CorruptSample(f"{reason} (data.strict=true; set data.strict=false to skip broken samples)")
        if problems is not None:
            problems.add(reason)

    def _raw_samples(self, chunks: list[Chunk], problems: _Problems | None) -> Iterator[tuple[str, TarSample]]:
        """(shard name, sample) of each chunk in order; problems go to `problems` (None: not reported)."""
        for chunk in chunks:
            name, num_read = chunk.shard.path.name, 0
            try:
                for sample in iter_shard_samples(chunk.shard.path, self.max_member_bytes):
                    if num_read >= chunk.stop:
                        break
                    if num_read >= chunk.start:
                        yield name, sample
                    num_read += 1
            except ShardReadError as error:
                self._report(f"{name}: {error}", problems)
            if num_read < chunk.stop:
                self._report(f"{name}: ended after {num_read} samples, index.json lists {chunk.shard.count}", problems)

    def _shuffled(self, chunks: list[Chunk], worker: int, pass_index: int,
                  problems: _Problems | None) -> Iterator[tuple[str, TarSample]]:
        stream = self._raw_samples(chunks, problems)
        if self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                 seed=f"{self.seed}:samples:{self.epoch}:{self.rank}:{worker}:{pass_index}")(stream)
        return stream

    def _decode(self, sample: TarSample) -> dict:
        """`image` and `label`, and for training the `augment` params the device half needs."""
        if sample.problem:
            raise ValueError(sample.problem)
        image_bytes = sample.members.get("jpg") or sample.members.get("png")
        if image_bytes is None or "cls" not in sample.members:
            raise ValueError("sample has no image or no cls member")
        label = parse_label(sample.members["cls"], self.num_classes)
        if self.decode_on_device:
            return {**self._undecoded(image_bytes), "label": label}
        transformed = self.transform(decode_stored(image_bytes, self.decode_short_side, self.stored_short_side))
        if isinstance(self.transform, TrainAugmentation):
            image, augment = transformed
            return {"image": image, "augment": augment, "label": label}
        return {"image": transformed, "label": label}

    def _undecoded(self, image_bytes: bytes) -> dict:
        """`data.decode_on=device`: only the JPEG header is read here, for the size the crop is drawn for."""
        width, height, image_format = stored_image_header(image_bytes)
        if image_format != "JPEG":
            raise ValueError(f"a {image_format} member: data.decode_on=device decodes JPEGs only; use data.decode_on=workers")
        box, params, _ = self.transform.draw(width, height)
        return {"jpeg": torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8),
                "crop_box": torch.tensor(box), "augment": params}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        if num_workers != len(self.worker_chunks):
            raise RuntimeError(f"planned for {len(self.worker_chunks)} workers, running with {num_workers}")
        # `worker` is the plan's slot; the DataLoader's worker 0 serves slot `first_slot`, so that a
        # resumed epoch continues the round-robin where the interrupted one stopped.
        worker = ((info.id if info is not None else 0) + self.first_slot) % num_workers
        planned = None if self.planned_per_worker is None else self.planned_per_worker[worker]
        if planned == 0:
            return
        problems = _Problems()
        yielded, position = 0, 0
        for pass_index in itertools.count():
            chunks = self.worker_chunks[worker] if pass_index == 0 else self.refill_chunks
            reported = problems if pass_index == 0 else None
            yielded_in_pass = resumed_in_pass = 0
            for shard_name, sample in self._shuffled(chunks, worker, pass_index, reported):
                position += 1
                if position <= self.skip_positions[worker]:  # consumed before the checkpoint
                    resumed_in_pass += 1
                    continue
                try:
                    with _augmentation_seed(hash((self.seed, self.epoch, self.rank, worker, position - 1)), info is None):
                        item = self._decode(sample)
                except Exception as error:  # any broken sample: PIL, missing member, bad label
                    self._report(f"{shard_name}#{sample.key}: {type(error).__name__}: {error}", reported)
                    continue
                item.update(key=sample.key, worker=worker, position=position - 1, skipped=problems.take())
                if self.with_meta:
                    item["meta"] = sample.members.get("json", b"{}").decode("utf-8", errors="replace")
                yield item
                yielded += 1
                yielded_in_pass += 1
                if planned is not None and yielded >= planned:
                    return
            if planned is None:
                return
            if pass_index > 0 and yielded_in_pass == resumed_in_pass == 0:
                shards = sorted({c.shard.path.name for c in self.refill_chunks})
                raise CorruptSample(f"no usable training sample in {', '.join(shards)} (first problem: "
                                    f"{problems.first or 'none recorded'}); run `gastro-dist verify` on the shard "
                                    "folder and re-pack the data")


class _Problems:
    """Reasons for skipped samples: `pending` until the next yielded item carries them away, and the
    `first` one, for the error of a worker that finds nothing usable."""

    def __init__(self):
        self.pending: list[str] = []
        self.first: str | None = None

    def add(self, reason: str) -> None:
        self.pending.append(reason)
        self.first = self.first or reason

    def take(self) -> list[str]:
        taken, self.pending = self.pending, []
        return taken


class _augmentation_seed:
    """Seed the augmentation of one sample from its position, so a resumed epoch is augmented
    exactly like an uninterrupted one. In the main process (num_workers=0) the global RNG is
    restored afterwards, so the training step's own randomness (dropout) is untouched."""

    def __init__(self, seed: int, restore: bool):
        self.seed, self.restore = seed & 0x7FFF_FFFF, restore

    def __enter__(self):
        if self.restore:
            self.saved = torch.random.get_rng_state()
        # Only the CPU generator: torch.manual_seed would also queue a lazy CUDA seeding, with a
        # formatted stack trace, for every sample (a tenth of a millisecond each).
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self.restore:
            torch.random.set_rng_state(self.saved)
        return False


def collate_samples(items: list[dict]) -> dict:
    """torch's default collation, except that the skip reasons of all items become one flat list, and
    JPEG bytes of different lengths (`data.decode_on=device`) become one byte tensor and their
    lengths: one shared-memory block per batch, not one per image."""
    skipped = [reason for item in items for reason in item.pop("skipped", [])]
    jpegs = [item.pop("jpeg") for item in items] if "jpeg" in items[0] else None
    batch = default_collate(items)
    batch["skipped"] = skipped
    if jpegs is not None:
        batch["jpeg"], batch["jpeg_lengths"] = torch.cat(jpegs), torch.tensor([len(j) for j in jpegs])
    return batch


def _loader(dataset: ShardSamples, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    # Its own generator: creating the iterator would otherwise draw from the global RNG, so a
    # resumed epoch (iterator created after the RNG state is restored) would get other dropout masks.
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      collate_fn=collate_samples, generator=torch.Generator().manual_seed(0))


def train_loader(index: ShardIndex, cfg: DataConfig, *, seed: int, epoch: int, rank: int, world_size: int,
                 resume_batches: int = 0, resume_positions: list[int] | None = None,
                 pin_memory: bool = False) -> DataLoader:
    """The rest of this rank's `train_steps_per_epoch(...)` full batches, after the first
    `resume_batches` (0: the whole epoch). `resume_positions[w]` is how far slot w's raw stream
    was consumed; both come from the checkpoint."""
    num_slots = max(cfg.num_workers, 1)
    chunks = train_worker_chunks(index.shards("train"), seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                 batch_size=cfg.batch_size, num_workers=num_slots)
    batches = batches_per_worker(train_steps_per_epoch(index.count("train"), world_size, cfg.batch_size), num_slots)
    # The DataLoader yields slots round-robin, so the first `resume_batches` came from each slot in turn.
    consumed = batches_per_worker(resume_batches, num_slots)
    remaining = [(total - done) * cfg.batch_size for total, done in zip(batches, consumed)]
    positions = resume_positions or [0] * num_slots
    if len(positions) != num_slots:
        raise UserError(f"the checkpoint was written with {len(positions)} data workers per process and this run has "
                        f"{num_slots}; resume with data.num_workers={len(positions)}")
    whole_split = [Chunk(shard, 0, shard.count) for shard in _ordered_shards(index.shards("train"), seed, epoch, True)]
    dataset = ShardSamples(chunks, train_transform(cfg), num_classes=len(index.classes),
                           max_member_bytes=cfg.max_member_mb << 20, decode_short_side=cfg.image_size,
                           stored_short_side=index.stored_short_side,
                           shuffle_buffer=cfg.shuffle_buffer, seed=seed, epoch=epoch, rank=rank,
                           planned_per_worker=remaining, refill_chunks=whole_split, skip_positions=positions,
                           strict=cfg.strict, first_slot=resume_batches % num_slots,
                           decode_on_device=cfg.decode_on == "device")
    return _loader(dataset, cfg.batch_size, cfg.num_workers, pin_memory)


def eval_loader(index: ShardIndex, cfg: DataConfig, split: str, *, rank: int, world_size: int,
                pin_memory: bool = False, with_meta: bool = False) -> DataLoader:
    """Every sample of `split` exactly once across ranks, in a fixed order, with eval preprocessing."""
    num_slots = max(cfg.num_workers, 1)
    chunks = eval_worker_chunks(index.shards(split), rank=rank, world_size=world_size, num_workers=num_slots)
    dataset = ShardSamples(chunks, eval_transform(cfg), num_classes=len(index.classes),
                           max_member_bytes=cfg.max_member_mb << 20,
                           decode_short_side=round(cfg.image_size / cfg.eval_crop_ratio),
                           stored_short_side=index.stored_short_side, with_meta=with_meta, strict=cfg.strict)
    return _loader(dataset, cfg.eval_batch_size, cfg.num_workers, pin_memory)
