"""Reading endoscopy procedure videos (mp4, avi, mkv, mov) as sampled RGB frames, with PyAV.

Owns which extensions are videos, the file checks (a regular file under `--max-video-mb`, hashed as it
is streamed: a video is never held in memory whole), and decoding: one video stream, frames decoded
in order from the start or from a segment's start (seeking to the keyframe before it), sampled by
`frames.TimeSampler`. Bounds: a frame larger than the pixel limit, more sampled frames than the cap,
or more than `frames.MAX_FRAMES_PER_S` decoded frames per second of recording (a stream whose timestamps
stand still would otherwise decode forever) reject the video, as does any decoding error; each reason is
one line without the file's path. PyAV is the optional `video` extra: `require_pyav` says how to add it.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from gastro_dist import UserError
from gastro_dist.data.frames import MAX_FRAMES_PER_S, Frame, FrameRules, TimeSampler
from gastro_dist.data.images import BadImage, capped_chunks, open_input_file

try:
    import av
except ImportError:  # the optional `video` extra; pack reports it once, before reading anything
    av = None

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov"})
_HASH_CHUNK_BYTES = 1 << 22


def require_pyav(num_videos: int) -> None:
    if av is None:
        raise UserError(f"{num_videos} video file(s) to pack, but PyAV is not installed; "
                        "install it with: pip install 'gastro-dist[video]'")


@contextmanager
def opened_video(path: str | Path, max_bytes: int) -> Iterator[tuple[BinaryIO, str]]:
    """The open file, positioned at its start, and the sha256 of its bytes."""
    with open_input_file(path) as handle:
        digest, num_bytes = hashlib.sha256(), 0
        for chunk in capped_chunks(handle, max_bytes, _HASH_CHUNK_BYTES):
            digest.update(chunk)
            num_bytes += len(chunk)
        if num_bytes == 0:
            raise BadImage("empty file")
        handle.seek(0)
        yield handle, digest.hexdigest()


def video_frames(handle: BinaryIO, rules: FrameRules, max_pixels: int,
                 segment_s: tuple[float, float] | None = None) -> Iterator[Frame]:
    """The sampled frames of the first video stream (of `segment_s` = (start, end) seconds, if given).

    Frame times count from the stream's first timestamp, as a player shows them; `index` is the frame
    number at the stream's average rate (exact for constant-frame-rate video, the usual case).
    """
    start_s, end_s = segment_s or (0.0, math.inf)
    try:
        container = av.open(handle, metadata_errors="ignore")
    except av.FFmpegError as err:
        raise BadImage(f"not a video: {_detail(err)}") from None
    with container:
        if not container.streams.video:
            raise BadImage("not a video: the file has no video stream")
        stream = container.streams.video[0]
        width_px, height_px = stream.codec_context.width, stream.codec_context.height
        if width_px * height_px > max_pixels:
            raise BadImage(f"decompression bomb: {width_px}x{height_px} pixels per frame exceeds the limit "
                           f"of {max_pixels}")
        stream.codec_context.thread_count = 1  # pack runs a decoder per worker process; more threads would compete
        try:
            yield from _sampled(container, stream, rules, start_s, end_s)
        except av.FFmpegError as err:
            raise BadImage(f"corrupt video: {_detail(err)}") from None


def _sampled(container, stream, rules: FrameRules, start_s: float, end_s: float) -> Iterator[Frame]:
    time_base = float(stream.time_base)
    first_s = (stream.start_time or 0) * time_base
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if start_s > 0:
        container.seek(round((first_s + start_s) / time_base), stream=stream)  # the keyframe at or before
    sampler = TimeSampler(rules, start_s)
    num_decoded = num_sampled = 0
    first_decoded_s = None  # after a seek, the keyframe before the segment (a GOP can span seconds)
    for frame in container.decode(stream):
        if frame.pts is not None:
            time_s = frame.pts * time_base - first_s
        elif rate:
            time_s = num_decoded / rate
        else:
            raise BadImage("corrupt video: frames without timestamps and no frame rate")
        first_decoded_s = time_s if first_decoded_s is None else first_decoded_s
        num_decoded += 1
        if num_decoded > (time_s - first_decoded_s + 1.0) * MAX_FRAMES_PER_S:
            raise BadImage(f"corrupt video: more than {MAX_FRAMES_PER_S} frames per second of recording")
        if time_s >= end_s:
            return
        if time_s < start_s or not sampler.take(time_s):
            continue
        num_sampled += 1
        sampler.check_count(num_sampled)
        yield Frame(frame.to_image(), (frame.width, frame.height), round(time_s * rate) if rate else None,
                    round(time_s, 3))


def _detail(err: Exception) -> str:
    """FFmpeg's message without the file name PyAV appends (a path may name the patient)."""
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or 'FFmpeg error'}"
