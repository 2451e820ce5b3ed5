"""Reading endoscopy procedure videos (mp4, avi, mkv, mov) as sampled RGB frames, with PyAV.

Owns which extensions are videos, the file checks (a regular file under `--max-video-mb`, hashed as it
is streamed: a video is never held in memory whole), and decoding: one video stream, frames decoded
in order from the start or from a segment's start (seeking to the keyframe before it), sampled by
`frames.TimeSampler`. Bounds: a stream declaring frames larger than the pixel limit, more sampled frames
than the cap, or more than `frames.MAX_FRAMES_PER_S` decoded frames per second of recording (a stream whose
timestamps stand still would otherwise decode forever) reject the video. Damage inside a video that still
gives frames is reported, not fatal: every frame is held to the pixel limit before a picture is allocated
(FFmpeg's `max_pixels` in every decoder, and for MJPEG the packet's JPEG header, so the size is known), an
undecodable packet is skipped and counted, and a video that ends before the duration its container
declares is packed up to the damage with the seconds lost (`frames.LeftOut`). Each reason is one line
without the file's path. PyAV is the optional `video` extra: `require_pyav` says how to add it.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from gastro_dist import UserError
from gastro_dist.data.frames import MAX_FRAMES_PER_S, Frame, FrameRules, LeftOut, TimeSampler
from gastro_dist.data.images import BadImage, capped_chunks, jpeg_size, open_input_file

try:
    import av
except ImportError:  # the optional `video` extra; pack reports it once, before reading anything
    av = None

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov"})
_HASH_CHUNK_BYTES = 1 << 22
# A container's declared duration and its last frame's end may differ by a frame or an edit list: a shortfall
# below this is not reported as a lost tail.
_END_TOLERANCE_S = 1.0


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


def video_frames(handle: BinaryIO, rules: FrameRules, max_pixels: int, segment_s: tuple[float, float] | None = None,
                 left_out: list[LeftOut] | None = None) -> Iterator[Frame]:
    """The sampled frames of the first video stream (of `segment_s` = (start, end) seconds, if given).

    Frame times count from the stream's first timestamp, as a player shows them; `index` is the frame
    number at the stream's average rate (exact for constant-frame-rate video, the usual case). What is
    lost on the way (frames above `max_pixels`, undecodable packets, a tail cut off) is appended to
    `left_out` once the frames are exhausted; a video that gives no frame at all raises it instead.
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
        # FFmpeg's own cap, checked before any decoder allocates a picture (a later frame may be larger)
        stream.codec_context.options = {"max_pixels": str(max_pixels)}
        damage = _Damage(max_pixels)
        try:
            yield from _sampled(container, stream, rules, start_s, end_s, damage)
        except av.FFmpegError as err:  # seeking, or converting a decoded frame
            raise BadImage(f"corrupt video: {_detail(err)}") from None
        problems = damage.left_out()
        if not damage.num_yielded and problems:
            raise BadImage("; ".join(problem.reason for problem in problems))
        if left_out is not None:
            left_out.extend(problems)


class _Damage:
    """What one video's decoding skipped, and how far it got."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.oversized_frames, self.largest_oversized = 0, (0, 0)
        self.undecodable_packets = 0
        self.unreadable_after: str | None = None  # the demuxer's error, when the container stops being readable
        self.decoded_end_s = 0.0  # end of the last decoded frame
        self.expected_end_s: float | None = None  # the segment's end, or the duration the container declares
        self.declared_s: float | None = None
        self.num_yielded = 0

    def oversized(self, width_px: int, height_px: int) -> None:
        self.oversized_frames += 1
        self.largest_oversized = max(self.largest_oversized, (width_px, height_px), key=lambda size: size[0] * size[1])

    def left_out(self) -> list[LeftOut]:
        problems = []
        if self.oversized_frames:
            width_px, height_px = self.largest_oversized
            problems.append(LeftOut(_counted(self.oversized_frames, "frame"), (
                f"decompression bomb: {_counted(self.oversized_frames, 'frame')} above the limit of {self.max_pixels} "
                f"pixels skipped, the largest {width_px}x{height_px}")))
        if self.undecodable_packets:
            problems.append(LeftOut(_counted(self.undecodable_packets, "packet"), (
                f"corrupt video: {_counted(self.undecodable_packets, 'packet')} could not be decoded, skipped")))
        if self.expected_end_s is not None and self.decoded_end_s < self.expected_end_s - _END_TOLERANCE_S:
            cause = f" (unreadable from there: {self.unreadable_after})" if self.unreadable_after else ""
            problems.append(LeftOut(f"{self.decoded_end_s:.1f}-{self.expected_end_s:.1f} s", (
                f"truncated video: decoded {self.decoded_end_s:.1f} s of {self.declared_s:.1f} s the container "
                f"declares{cause}")))
        return problems


def _sampled(container, stream, rules: FrameRules, start_s: float, end_s: float, damage: _Damage) -> Iterator[Frame]:
    time_base = float(stream.time_base)
    first_s = (stream.start_time or 0) * time_base
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    frame_s = 1 / rate if rate else 0.0
    declared_s = (stream.duration * time_base if stream.duration else
                  container.duration / av.time_base if container.duration else None)
    if declared_s:
        damage.declared_s, damage.expected_end_s = declared_s, min(end_s, declared_s)
    if start_s > 0:
        container.seek(round((first_s + start_s) / time_base), stream=stream)  # the keyframe at or before
    sampler = TimeSampler(rules, start_s)
    num_decoded = 0
    first_decoded_s = None  # after a seek, the keyframe before the segment (a GOP can span seconds)
    for frame in _decoded(container, stream, damage):
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
        damage.decoded_end_s = max(damage.decoded_end_s, time_s + frame_s)
        if time_s >= end_s:
            return
        if frame.width * frame.height > damage.max_pixels:  # before the picture is converted
            damage.oversized(frame.width, frame.height)
            continue
        if time_s < start_s or not sampler.take(time_s):
            continue
        damage.num_yielded += 1
        sampler.check_count(damage.num_yielded)
        yield Frame(frame.to_image(), (frame.width, frame.height), round(time_s * rate) if rate else None,
                    round(time_s, 3))


def _decoded(container, stream, damage: _Damage) -> Iterator:
    """The stream's frames, packet by packet: an MJPEG picture above the pixel limit is skipped before it is
    decoded (its size is in the packet's JPEG header), an undecodable packet is skipped and counted, and
    the container's first unreadable byte ends the stream."""
    is_mjpeg = stream.codec_context.name == "mjpeg"
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as err:
            damage.unreadable_after = _detail(err)
            packet = None  # flushes the frames the decoder still holds
        if is_mjpeg and packet is not None and packet.size:
            width_px, height_px = jpeg_size(memoryview(packet)) or (0, 0)
            if width_px * height_px > damage.max_pixels:
                damage.oversized(width_px, height_px)
                continue
        try:
            yield from stream.decode(packet)
        except av.FFmpegError:
            damage.undecodable_packets += 1
        if packet is None:
            return


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _detail(err: Exception) -> str:
    """FFmpeg's message without the file name PyAV appends (a path may name the patient)."""
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or 'FFmpeg error'}"
