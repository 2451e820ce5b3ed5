"""What an endoscopist reviews after `predict-video`: the annotated copy of each video and summary.html.

The annotated copy is every decoded frame (dropped live frames excepted) at its own timestamp, so it keeps
the original's frame rate and duration, turned upright as a player shows the original, with the predicted
class (the smoothed argmax) and a probability bar per class; frames between two predicted ones (--fps) carry
the last prediction, and with --cam-every k every k-th predicted frame carries its Grad-CAM on the square
the network saw. It is H.264 in MP4 (MPEG-4 part 2 where this FFmpeg lacks libx264) and carries no metadata
of the original's container.

summary.html is one self-contained file, readable offline: per video an inline SVG timeline of each class's
smoothed probability, the findings as bands in their class's colour, and a table of findings with the frame
at each one's peak (JPEG as a data: URI). Names of videos and classes are untrusted text, always escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import deque
from functools import lru_cache
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gastro_dist.data import video
from gastro_dist.evaluation.cam import _caption_font, eval_crop_box, overlay_heatmap
from gastro_dist.evaluation.report import display_name

# matplotlib's tab10: distinct on screen and in greyscale print
CLASS_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf"]
_MILLISECONDS = Fraction(1, 1000)


_font = lru_cache(maxsize=4)(_caption_font)


def class_colour(k: int) -> str:
    return CLASS_COLOURS[k % len(CLASS_COLOURS)]


def upright(image: Image.Image, rotation_deg: int) -> Image.Image:
    """The frame as a player shows it: the stream's display rotation (counter-clockwise degrees, FFmpeg's
    convention) applied. The model sees the frame as stored, as `pack` stores frames for training."""
    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    return image.transpose(turns[rotation_deg]) if rotation_deg in turns else image


class AnnotatedVideo:
    """Writes the annotated copy as results arrive: frames are held until the prediction they show is known."""

    def __init__(self, path: Path, classes: list[str], trained):
        self.path, self.classes = path, [display_name(name) for name in classes]  # as drawn on the frames
        self._image_size, self._crop_ratio = trained.image_size, trained.meta.eval_crop_ratio
        self._held: deque = deque()
        self._current: np.ndarray | None = None
        self._container = self._stream = None
        self._last_pts = -1
        self._info = None

    def hold(self, items: list, info) -> None:
        self._info = info
        self._held.extend(items)

    def result(self, item, smoothed: np.ndarray, cam: np.ndarray | None) -> None:
        """`item`'s prediction is known: write it, and the frames before and after it that show the same."""
        while self._held and self._held[0] is not item:  # frames between two predicted ones: the earlier result
            self._write(self._held.popleft(), self._current, None)
        if self._held:
            self._write(self._held.popleft(), smoothed, cam)
        self._current = smoothed
        while self._held and self._held[0].tensor is None:
            self._write(self._held.popleft(), smoothed, None)

    def finish(self) -> str:
        """Writes what is still held; returns the file's name ('' when no frame was written)."""
        while self._held:
            self._write(self._held.popleft(), self._current, None)
        if self._container is None:
            return ""
        self._container.mux(self._stream.encode())
        self._container.close()
        return self.path.name

    def _write(self, item, smoothed: np.ndarray | None, cam: np.ndarray | None) -> None:
        image = item.image.convert("RGB")
        if cam is not None:
            box = tuple(round(v) for v in eval_crop_box(image.width, image.height, self._image_size, self._crop_ratio))
            image.paste(overlay_heatmap(image.crop(box), cam), box[:2])
        image = upright(image, self._info.rotation_deg if self._info else 0)
        picture = self._annotated(image, smoothed)
        if self._container is None:
            self._open(picture.size)
        frame = video.av.VideoFrame.from_image(picture)
        # the original's timestamps (ms), strictly increasing as an encoder requires
        self._last_pts = max(round(item.time_s * 1000), self._last_pts + 1)
        frame.pts, frame.time_base = self._last_pts, _MILLISECONDS
        self._container.mux(self._stream.encode(frame))

    def _open(self, size: tuple[int, int]) -> None:
        codec = "libx264" if "libx264" in video.av.codecs_available else "mpeg4"
        rate = (self._info.rate if self._info and self._info.rate else None) or Fraction(25)
        self._container = video.av.open(str(self.path), "w", format="mp4")
        self._stream = self._container.add_stream(codec, rate=rate,
                                                  options={"preset": "veryfast"} if codec == "libx264" else {})
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = _MILLISECONDS
        self._stream.time_base = _MILLISECONDS

    def _annotated(self, image: Image.Image, smoothed: np.ndarray | None) -> Image.Image:
        """The frame padded to even sides (yuv420p), with the predicted class and one bar per class."""
        width, height = image.width + image.width % 2, image.height + image.height % 2
        canvas = Image.new("RGB", (width, height))
        canvas.paste(image, (0, 0))
        if smoothed is None:
            return canvas
        draw = ImageDraw.Draw(canvas, "RGBA")
        font_px = max(8, height // 28)
        font = _font(font_px)
        row_px = font_px + 4
        top = int(np.argmax(smoothed))
        draw.rectangle((0, 0, width, row_px + 2), fill=(0, 0, 0, 160))
        draw.text((4, 2), f"{self.classes[top]} {smoothed[top]:.0%}", fill="white", font=font)
        bar_px = max(20, width // 4)
        first = height - row_px * len(self.classes) - 4
        draw.rectangle((0, first - 2, width, height), fill=(0, 0, 0, 120))
        for k, (name, probability) in enumerate(zip(self.classes, smoothed)):
            y = first + k * row_px
            draw.rectangle((4, y + 2, 4 + bar_px, y + row_px - 2), outline=(255, 255, 255, 200))
            draw.rectangle((4, y + 2, 4 + round(bar_px * float(probability)), y + row_px - 2), fill=class_colour(k))
            draw.text((8 + bar_px, y), f"{name} {probability:.0%}", fill="white", font=font)
        return canvas


# ---------------------------------------------------------------- summary.html
def write_summary_html(path: Path, results: list, classes: list[str], settings, trained, backend: str,
                       precision: str) -> None:
    smoothing, rules = settings.smoothing, settings.findings
    legend = " ".join(f'<span class="key" style="background:{class_colour(k)}"></span>{html.escape(display_name(name))}'
                      for k, name in enumerate(classes))
    sections = [_video_section(result, classes, rules.threshold) for result in results]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>predict-video summary</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 24px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }}
.key {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; }}
.problem {{ color: #a00; }}
svg {{ border: 1px solid #ddd; background: #fff; }}
</style></head><body>
<h1>predict-video summary</h1>
<p>Model: {html.escape(trained.architecture)} at {trained.image_size} px, temperature {trained.temperature:g},
{html.escape(backend)} ({html.escape(precision)}). Smoothing: {html.escape(smoothing.describe())}.
Findings: smoothed probability above {rules.threshold:g} for at least {rules.min_duration_s:g} s, stretches
less than {rules.merge_gap_s:g} s apart merged. Frames: {"every frame" if settings.fps is None
else f"{settings.fps:g} per second"}.</p>
<p>Classes: {legend}</p>
{"".join(sections)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def _video_section(result, classes: list[str], threshold: float) -> str:
    name = html.escape(result.name)
    facts = (f"{result.num_predicted} frames predicted of {result.info.num_read} read"
             + (f", {result.num_dropped} dropped (the model fell behind the stream)" if result.num_dropped else ""))
    problems = [problem.reason for problem in result.info.left_out] + ([result.error] if result.error else [])
    problem_text = "".join(f'<p class="problem">{html.escape(text)}</p>' for text in problems)
    if not result.timeline:
        return f"<h2>{name}</h2><p>{facts}</p>{problem_text}"
    rows = "".join(
        f"<tr><td>{html.escape(display_name(classes[f.class_index]))}</td><td>{f.start_s:.1f}</td><td>{f.end_s:.1f}</td>"
        f"<td>{f.duration_s:.1f}</td><td>{f.peak:.2f} at {f.peak_time_s:.1f} s</td><td>{f.mean:.2f}</td>"
        f"<td>{_thumbnail_img(f.peak_thumbnail, f'{display_name(classes[f.class_index])} at {f.peak_time_s:.1f} s')}</td></tr>"
        for f in result.findings)
    table = ("<table><tr><th>class</th><th>start (s)</th><th>end (s)</th><th>duration (s)</th><th>peak</th>"
             f"<th>mean</th><th>frame at the peak</th></tr>{rows}</table>" if result.findings
             else "<p>No findings.</p>")
    return f"<h2>{name}</h2><p>{facts}</p>{problem_text}{timeline_svg(result, classes, threshold)}{table}"


def _thumbnail_img(picture: Image.Image | None, alt: str) -> str:
    if picture is None:
        return ""
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(alt)}" height="{picture.height}">'


def timeline_svg(result, classes: list[str], threshold: float, width_px: int = 1000, height_px: int = 220) -> str:
    """Each class's smoothed probability over time (at most ~2,000 points a line), findings as bands."""
    left, right, top, bottom = 40, 10, 10, 30
    plot_w, plot_h = width_px - left - right, height_px - top - bottom
    times_s = np.array([time_s for time_s, _ in result.timeline])
    smoothed = np.stack([values for _, values in result.timeline])
    end_s = max(float(times_s[-1]), max((f.end_s for f in result.findings), default=0.0), 1e-3)

    def x(t: float) -> float:
        return left + plot_w * t / end_s

    def y(p: float) -> float:
        return top + plot_h * (1 - p)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width_px}" height="{height_px}" role="img" '
             f'aria-label="smoothed probability per class over time">']
    for f in result.findings:
        parts.append(f'<rect x="{x(f.start_s):.1f}" y="{top}" width="{max(x(f.end_s) - x(f.start_s), 1):.1f}" '
                     f'height="{plot_h}" fill="{class_colour(f.class_index)}" fill-opacity="0.18"/>')
    step = max(1, math.ceil(len(times_s) / 2000))
    for k in range(len(classes)):
        points = " ".join(f"{x(t):.1f},{y(p):.1f}" for t, p in zip(times_s[::step], smoothed[::step, k]))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{class_colour(k)}" stroke-width="1.5"/>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                 'stroke="#555" stroke-dasharray="4 3"/>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for p in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 4}" y="{y(p) + 4:.1f}" font-size="11" text-anchor="end">{p:g}</text>')
    tick_s = _tick_step(end_s)
    for t in np.arange(0.0, end_s + 1e-9, tick_s):
        parts.append(f'<text x="{x(t):.1f}" y="{height_px - 12}" font-size="11" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height_px - 1}" font-size="11" text-anchor="end">time (s)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tick_step(end_s: float) -> float:
    """1, 2 or 5 times a power of ten: about 10 ticks over the video."""
    rough = end_s / 10
    power = 10 ** math.floor(math.log10(rough))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
