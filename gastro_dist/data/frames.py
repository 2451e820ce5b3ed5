"""Choosing which frames of a video or a multi-frame DICOM become samples.

Owns the rules shared by `video` and `dicom`: time sampling (the first frame of every 1/fps-second
interval), the per-input frame cap, and the content filters run on each sampled frame: a frame whose
perceptual hash (a 64-bit difference hash) is within a few bits of the last kept frame's is a near
duplicate (the scope held still) and is dropped, and with `blur_threshold` a dark frame (mean luma
below `DARK_MEAN_LUMA`) or a blurred one (variance of the Laplacian below the threshold) is dropped too.
Both filters look at a grey copy with a fixed short side, so their thresholds do not depend on the
recording's resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from gastro_dist.data.images import BadImage

DARK_MEAN_LUMA = 16.0  # of 255: the lumen seen with the light off, or the scope outside the body
# High-speed endoscopy records at most this many frames per second; a recording that claims more (or whose
# timestamps stand still) is refused, since walking its frames would take unbounded time.
MAX_FRAMES_PER_S = 240
_ANALYSIS_SHORT_SIDE_PX = 256  # the grey copy the filters look at
_HASH_SIZE = 8  # 8x8 gradient signs: a 64-bit difference hash


class Frame(NamedTuple):
    """One picture to pack: a still, or a frame of a video or multi-frame DICOM."""

    image: Image.Image  # 8-bit RGB, upright
    orig_size: tuple[int, int]  # (w, h) as stored in the source
    index: int | None  # frame number in the recording; None for a still
    time_s: float | None  # seconds from the recording's start; None for a still or when the source has no timing


class LeftOut(NamedTuple):
    """A part of a packed input that is not in the shards (a `skipped.jsonl` line with `part`): damaged or
    oversized frames, a lost tail, frames whose labels conflict."""

    part: str  # which part, in words: "3 frames", "12.4-25.0 s"
    reason: str  # "category: detail", like every reason pack writes


@dataclass(frozen=True)
class FrameRules:
    """How frames are taken from a moving input (a `pack` option each)."""

    fps: float = 1.0  # frames sampled per second of recording
    near_duplicate_bits: int = 3  # a frame whose hash differs from the last kept one's in fewer bits is dropped
    blur_threshold: float | None = None  # None: dark and blurred frames are kept
    max_frames: int = 10_000  # sampled frames per input; an input with more is rejected (never cut silently)


@dataclass
class FrameCounts:
    """What happened to the sampled frames of one input (index.json totals add these up)."""

    sampled: int = 0
    near_duplicates: int = 0
    dark_or_blurry: int = 0


class TimeSampler:
    """Takes the first frame of each 1/fps-second interval from `start_s` on, at most `max_frames` of them."""

    def __init__(self, rules: FrameRules, start_s: float = 0.0):
        self._rules = rules
        self._start_s = start_s
        self._next_interval = 0

    def take(self, time_s: float) -> bool:
        interval = math.floor((time_s - self._start_s) * self._rules.fps + 1e-6)  # 1e-6: pts rounding
        if interval < self._next_interval:
            return False
        self._next_interval = interval + 1
        return True

    def check_count(self, num_sampled: int) -> None:
        if num_sampled > self._rules.max_frames:
            raise BadImage(f"too many frames: more than {self._rules.max_frames} sampled "
                           "(raise --max-frames-per-video or lower --video-fps)")


class FrameFilter:
    """Decides, frame after frame of one input, which sampled frames are kept; counts the others."""

    def __init__(self, rules: FrameRules):
        self._rules = rules
        self._last_kept_hash: int | None = None
        self.counts = FrameCounts()

    def keep(self, img: Image.Image) -> bool:
        self.counts.sampled += 1
        grey = _analysis_grey(img)
        if self._rules.blur_threshold is not None and _is_dark_or_blurry(grey, self._rules.blur_threshold):
            self.counts.dark_or_blurry += 1
            return False
        frame_hash = difference_hash(grey)
        if (self._last_kept_hash is not None
                and (frame_hash ^ self._last_kept_hash).bit_count() < self._rules.near_duplicate_bits):
            self.counts.near_duplicates += 1
            return False
        self._last_kept_hash = frame_hash
        return True


def _analysis_grey(img: Image.Image) -> Image.Image:
    grey = img.convert("L")
    scale = _ANALYSIS_SHORT_SIDE_PX / min(grey.size)
    if scale >= 1:
        return grey
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    return grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def difference_hash(grey: Image.Image) -> int:
    """64-bit dHash (Krawetz): whether each of 8x8 cells is brighter than its right neighbour; robust to
    noise, JPEG artefacts and small exposure changes, sensitive to the scene moving."""
    cells = np.asarray(grey.resize((_HASH_SIZE + 1, _HASH_SIZE), Image.Resampling.BOX), dtype=np.int16)
    bits = (cells[:, 1:] > cells[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def laplacian_variance(grey: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian: low when edges are soft (motion blur, out of focus, fog)."""
    luma = np.asarray(grey, dtype=np.float32)
    if min(luma.shape) < 3:
        return 0.0
    laplacian = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1])
    return float(laplacian.var())


def _is_dark_or_blurry(grey: Image.Image, blur_threshold: float) -> bool:
    return float(np.asarray(grey).mean()) < DARK_MEAN_LUMA or laplacian_variance(grey) < blur_threshold
