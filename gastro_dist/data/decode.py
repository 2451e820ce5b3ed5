"""Decoding stored images: a cheap header check against decompression bombs, JPEG/PNG decoding in
the workers (PIL's DCT scaling for large JPEGs, torchvision's decoder otherwise), and batched
decoding on the training device (nvJPEG on CUDA) for `data.decode_on=device`."""

from __future__ import annotations

import io
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from gastro_dist import RunFailure
from gastro_dist.data.images import DEFAULT_MAX_PIXELS


class CorruptSample(RunFailure):
    """Shard data that cannot be used: in `data.strict` mode any broken sample, otherwise a worker
    that finds no usable sample at all (it must stop, never spin)."""


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


def decode_crops_on_device(batch: dict, size: int, device: torch.device,
                           resize_mode: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """`data.decode_on=device`: the batch's JPEGs decoded on `device` (nvJPEG on CUDA, in one batched
    call), each cropped to its `crop_box` and resized to size x size by the antialiased `resize_mode`
    ('bilinear' or 'bicubic') kernel.

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
    crops = batched_resized_crops(images, batch["crop_box"][kept].to(device).float(), size, resize_mode)
    # rounded like the uint8 crops the workers make, so both paths feed the same values
    return crops.round_().clamp_(0, 255), kept, problems


def batched_resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int, resize_mode: str) -> torch.Tensor:
    """Each image's (left, top, right, bottom) box resized to size x size by the antialiased `resize_mode`
    filter, for the whole batch in two batched matrix products instead of a crop and an `interpolate` per
    image (a kernel launch each on a GPU).

    An antialiased resize is separable and linear: output row i is a weighted sum of input rows, the
    weights those `interpolate(antialias=True)` computes (`_antialias_weights`), zero outside the box. So
    with H (B x size x height) and W (B x size x width) built from the boxes, the crops are H @ frame @ W^T
    on the frames padded to a common size. Equal to the per-image resize up to float rounding.
    """
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    padded = torch.stack([F.pad(image.float(), (0, width - image.shape[2], 0, height - image.shape[1]))
                          for image in images])
    rows = _antialias_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], height, size, resize_mode)
    columns = _antialias_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], width, size, resize_mode)
    return torch.einsum("bih,bchw,bjw->bcij", rows, padded, columns)


def _antialias_weights(starts: torch.Tensor, lengths: torch.Tensor, padded_size: int, size: int,
                       mode: str) -> torch.Tensor:
    """B x size x padded_size: the weights with which torch's antialiased resize of the span [start,
    start + length) to `size` samples (align_corners=False) mixes the input pixels: the filter (triangle for
    bilinear, Keys cubic with a = -0.5 for bicubic) centred on each output pixel, stretched by the
    downscaling factor when larger than 1, cut to the span and normalised to sum 1."""
    scale = (lengths / size).float()
    stretch = scale.clamp(min=1.0)
    centre = scale[:, None] * (torch.arange(size, device=scale.device, dtype=torch.float32) + 0.5)  # in the span
    position = torch.arange(padded_size, device=scale.device, dtype=torch.float32)[None, :] - starts[:, None]
    x = (position[:, None, :] + 0.5 - centre[:, :, None]) / stretch[:, None, None]
    distance = x.abs()
    if mode == "bilinear":
        weights = (1 - distance).clamp(min=0)
    else:
        a = -0.5
        weights = torch.where(distance < 1, ((a + 2) * distance - (a + 3)) * distance ** 2 + 1,
                              torch.where(distance < 2, (((distance - 5) * distance + 8) * distance - 4) * a, 0.0))
    inside = (position >= 0) & (position < lengths[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)
