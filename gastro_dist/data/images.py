"""Reading one image file as an 8-bit RGB picture, or saying exactly why it cannot be used.

Owns the rules shared by packing (`gastro_dist.data.pack`) and prediction: which file
extensions count as images, which files may be read at all (regular files under a size cap),
the decompression-bomb limit, full decoding (so truncated files are caught here and not in the
middle of training), EXIF orientation, and the conversion of every PIL mode we meet in hospital
exports (grayscale, 16-bit, palette, CMYK, alpha) to RGB.
Every failure is raised as `BadImage` with a short reason that is written to rejected.jsonl.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gastro_dist.files import NotRegularFile, open_regular_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

# 100 MP is ~10x a 4K endoscopy frame; PIL itself refuses anything above 2 * Image.MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 100_000_000

# A 4K frame is a few MB, 50 MB even as 16-bit uncompressed TIFF; the cap bounds what one read holds in memory.
DEFAULT_MAX_FILE_BYTES = 512_000_000
_READ_CHUNK_BYTES = 1 << 16  # read request after the first (of the stat size): small, as it usually just finds the end

# Modes whose samples are wider than 8 bits; their 8-bit rendering needs scaling, not clipping.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class BadImage(Exception):
    """The file cannot be used (as an image, or as a video or DICOM by `video` and `dicom`); `reason` is one
    short line for rejected.jsonl, never holding the file's path (pack may be told to keep paths private)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_image_path(path: str | Path) -> bool:
    """True for the extensions we pack (case-insensitive); everything else is listed as skipped."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image_file(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file (links followed) of at most `max_bytes`, or `BadImage` saying why not."""
    with open_input_file(path) as handle:
        return b"".join(capped_chunks(handle, max_bytes))


def open_input_file(path: str | Path) -> BinaryIO:
    """`files.open_regular_file` (a device or a FIFO is never read), failing with `BadImage`."""
    try:
        return open_regular_file(path)
    except OSError as err:
        raise BadImage(err.strerror if isinstance(err, NotRegularFile) else
                       f"unreadable file: {err.strerror or err}") from None


def capped_chunks(handle: BinaryIO, max_bytes: int, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """The bytes of an open file in chunks (default: the whole file in the first), or `BadImage` when it holds
    more than `max_bytes` or cannot be read: the size is checked before reading and at most max_bytes + 1
    bytes are read, so a file that grows meanwhile is still bounded."""
    try:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise BadImage(f"file too large: {size} bytes, the limit is {max_bytes}")
        num_bytes, request = 0, chunk_bytes or size + 1  # by default one read for the file, one to see its end
        while chunk := handle.read(min(request, max_bytes + 1 - num_bytes)):
            num_bytes += len(chunk)
            if num_bytes > max_bytes:
                raise BadImage(f"file too large: grew past the limit of {max_bytes} bytes while being read")
            yield chunk
            request = chunk_bytes or _READ_CHUNK_BYTES
    except OSError as err:  # only this generator's own reads: a consumer's errors never arrive here
        raise BadImage(f"unreadable file: {err.strerror or err}") from None


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only (lazy PIL image); rejects empty, non-image and oversized files.

    `img.size` is then the pixel size as stored in the file (before EXIF rotation).
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning; PIL's hard error (2x its limit) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: content is not a readable image format") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many types for malformed headers
        raise BadImage(f"corrupt image: {type(err).__name__}: {err}") from None
    width_px, height_px = img.size
    if width_px * height_px > max_pixels:
        raise BadImage(f"decompression bomb: {width_px}x{height_px} pixels exceeds the limit of {max_pixels}")
    return img


# JPEG markers that start a frame header (SOF0-SOF15 less DHT, JPG and DAC), whose fields give the picture's size
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read without decoding (a decoder allocates the whole
    picture first); None when it is no JPEG or no frame header comes before the scan data."""
    if bytes(data[:2]) != b"\xff\xd8":  # start of image
        return None
    position = 2
    while position + 9 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in _JPEG_FRAME_MARKERS:
            height_px = int.from_bytes(data[position + 5:position + 7], "big")
            return int.from_bytes(data[position + 7:position + 9], "big"), height_px
        if marker == 0xDA:  # start of scan
            return None
        position += 1 if marker == 0xFF else 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def decode_rgb(img: Image.Image, min_short_side_px: int | None = None) -> Image.Image:
    """Fully decode an `open_image` result, apply EXIF orientation and convert to 8-bit RGB.

    With `min_short_side_px`, JPEGs are decoded at a reduced DCT scale (1/2 .. 1/8) as long as the
    shorter side stays >= that many pixels: a large speed-up when the result is downscaled anyway.
    The whole compressed stream is still read, so truncation is detected at any scale.
    """
    if min_short_side_px and img.format == "JPEG":
        # draft() picks the largest scale whose result still covers the requested size
        short_side_px = min(img.size)
        img.draft(None, tuple(max(1, -(-side_px * min_short_side_px // short_side_px)) for side_px in img.size))
    # A truncated file must fail, never be padded with grey, even if other code enabled that globally.
    # (PIL offers no per-image switch; the flag is restored right after, so only threads racing here see it.)
    previous_truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise BadImage(f"decompression bomb: {err}") from None
    except Exception as err:  # OSError, SyntaxError, ValueError, struct.error ... depending on the plugin
        message = str(err)
        truncated = "truncated" in message or "broken data stream" in message
        raise BadImage(f"truncated image: {message}" if truncated else
                       f"corrupt image: {type(err).__name__}: {message}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated_setting
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as err:  # malformed EXIF blocks raise from deep inside PIL
        raise BadImage(f"corrupt EXIF: {type(err).__name__}: {err}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any decoded mode; transparency is composited on black (the endoscopy background)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        samples_8bit = np.round(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(samples_8bit).convert("RGB")
    if img.mode in ("I", "F"):
        return Image.fromarray(_wide_samples_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        on_black = Image.new("RGB", rgba.size, (0, 0, 0))
        on_black.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return on_black
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise BadImage(f"unsupported image mode {img.mode}: {err}") from None


def _wide_samples_to_uint8(samples: np.ndarray) -> np.ndarray:
    """Map 32-bit integer or float samples to 0..255 using the range the values actually occupy.

    Such files carry no declared bit depth, so: floats in [0, 1] are scaled by 255, values already
    in 0..255 are kept, values in 0..65535 are treated as 16-bit (divided by 257), anything else
    is stretched from its min..max.
    """
    is_float = samples.dtype.kind == "f"
    samples = np.nan_to_num(samples.astype(np.float64))
    low, high = float(samples.min()), float(samples.max())
    if is_float and low >= 0.0 and high <= 1.0:
        scaled = samples * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = samples
    elif low >= 0.0 and high <= 65535.0:
        scaled = samples / 257.0
    else:
        scaled = (samples - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def load_rgb(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short_side_px: int | None = None,
) -> Image.Image:
    """Load a file (path or its bytes) as a fully decoded, upright, 8-bit RGB image or raise `BadImage`."""
    data = read_image_file(source) if isinstance(source, (str, Path)) else source
    return decode_rgb(open_image(data, max_pixels), min_short_side_px)


def shrink_to_short_side(img: Image.Image, short_side_px: int) -> Image.Image:
    """Downscale so the shorter side is `short_side_px`, keeping the aspect ratio; never upscales.

    LANCZOS with `reducing_gap` first shrinks by an integer factor (fast box reduce), then resamples
    the last step properly: near full-LANCZOS quality at a fraction of the cost.
    """
    width_px, height_px = img.size
    if short_side_px <= 0 or min(width_px, height_px) <= short_side_px:
        return img
    scale = short_side_px / min(width_px, height_px)
    if width_px <= height_px:
        new_size = (short_side_px, max(1, round(height_px * scale)))
    else:
        new_size = (max(1, round(width_px * scale)), short_side_px)
    return img.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes with pixels only: no EXIF, ICC, XMP or comment, which can name the patient or
    the hospital (orientation is already applied to the pixels). Pillow writes EXIF, ICC and XMP only
    when asked, but copies a source JPEG's comment unless given an empty one."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality, comment=b"")
    return buffer.getvalue()
