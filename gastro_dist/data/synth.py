"""Synthetic gastroscopy-like frames for the three study classes (`gastro-dist synth`): white-light
mucosa with class evidence (cancer mass, ulcer crater, diffuse gastritis), class folders plus
manifest.csv, byte-identical for a seed whatever the number of workers; style "alt" for generalisation checks."""

from __future__ import annotations

import colorsys
import csv
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageFilter
from rich.progress import Progress

from gastro_dist import UserError

CLASSES = ("gastric_cancer", "gastric_ulcer", "chronic_gastritis")
STYLES = ("default", "alt")
JPEG_QUALITY = 92
# Written next to manifest.csv; pack records it in index.json, and reports then say the frames are synthetic.
SYNTHETIC_MARKER = "synthetic.json"
GENERATOR = "gastro-dist synth"
WORK_WIDTH = 320  # frames are rendered at most this wide, then upscaled
MIN_WIDTH = 32

# Second entropy word of every random stream, so patient plans, patient traits and images never share one.
_STREAM_PLAN, _STREAM_PATIENT, _STREAM_IMAGE = 0, 1, 2

_FIBRIN = np.array([0.96, 0.89, 0.70], np.float32)
_WHITISH = np.array([0.88, 0.76, 0.72], np.float32)  # dull: no ulcer-like fibrin
_HYPERAEMIA = np.array([1.10, 0.60, 0.62], np.float32)  # gains on the mucosa colour
_DARK_RED = np.array([0.80, 0.52, 0.56], np.float32)
_PALE = np.array([1.06, 1.30, 1.30], np.float32)
_HAEMATIN = np.array([0.35, 0.12, 0.12], np.float32)


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    num_images: int
    per_class: dict[str, int]
    num_patients: int

    def line(self) -> str:
        counts = ", ".join(f"{n} {label}" for label, n in self.per_class.items())
        return f"synth: {self.num_images} images ({counts}) of {self.num_patients} patients -> {self.out_dir}"


@dataclass(frozen=True)
class _Look:
    """What a rendering style changes: palette, optics, aspect ratios. Never the lesions."""

    aspects: tuple[float, ...]
    hue: tuple[float, float]  # degrees, 0 = red
    saturation: tuple[float, float]
    value: tuple[float, float]
    fov: str  # "circle" or "octagon"
    fov_offset: float  # largest sideways shift of the field of view, in halves of the frame's shorter side
    vignette: tuple[float, float]  # brightness lost at the edge of the field of view
    highlights: str  # "blobs" or "speckle"
    highlight_rgb: tuple[float, float, float]
    blur: tuple[float, float]  # Gaussian radius at work resolution
    noise: tuple[float, float]  # sensor noise amplitude, 0-255 scale


_LOOKS = {
    "default": _Look(aspects=(5 / 4, 4 / 3), hue=(-6.0, 10.0), saturation=(0.40, 0.62), value=(0.80, 0.96),
                     fov="circle", fov_offset=0.04, vignette=(0.25, 0.55), highlights="blobs",
                     highlight_rgb=(1.0, 1.0, 1.0), blur=(0.0, 0.0), noise=(1.5, 3.0)),
    # alt: more orange mucosa. Its saturation and value keep fibrin and whitish lesions as far from the mucosa
    # colour as in default (a paler mucosa hid them); its glints are cool white, not fibrin-yellow.
    "alt": _Look(aspects=(16 / 9, 1.0), hue=(11.0, 24.0), saturation=(0.46, 0.62), value=(0.74, 0.90),
                 fov="octagon", fov_offset=0.35, vignette=(0.45, 0.75), highlights="speckle",
                 highlight_rgb=(0.93, 0.97, 1.0), blur=(0.5, 1.1), noise=(3.0, 5.0)),
}


@dataclass(frozen=True)
class _Job:
    out_dir: str
    rel_path: str
    label: str
    index: int
    patient: int  # index of the patient within its class
    patient_id: str
    seed: int
    size_range: tuple[int, int]
    style: str


@dataclass(frozen=True)
class _Patient:
    """What stays the same across one patient's images: mucosa, folds and the lesion itself."""

    hsv: tuple[float, float, float]
    fold_angle: float
    fold_freq: float
    fold_depth: float
    vessels: float
    severity: float
    lesion_scale: float
    aspect: float  # minor/major axis of an ulcer
    border: np.ndarray  # (amplitude, phase) per harmonic of an irregular lesion border
    raised: bool
    pale: bool
    ulcerated: bool
    converging_folds: bool
    background_gastritis: bool


@dataclass(frozen=True)
class _Fov:
    cx: float
    cy: float
    radius: float
    shape: str

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = np.abs(x - self.cx), np.abs(y - self.cy)
        if self.shape == "circle":
            return np.sqrt(dx * dx + dy * dy) - self.radius
        corner = (dx + dy - 1.45 * self.radius) / math.sqrt(2)
        return np.maximum(np.maximum(dx, dy) - self.radius, corner)


class _Canvas:
    """Work-resolution pixel grid in units of half the frame's shorter side, and random fields on it."""

    def __init__(self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, unit: float):
        self.rng, self.x, self.y, self.unit = rng, x, y, unit
        self.shape = (y.shape[0], x.shape[1])

    @classmethod
    def for_frame(cls, rng: np.random.Generator, width: int, height: int) -> _Canvas:
        unit = min(width, height) / 2
        return cls(rng, _axis(width, unit)[None, :], _axis(height, unit)[:, None], unit)

    def crop(self, cx: float, cy: float, reach: float) -> tuple[_Canvas, tuple[slice, slice]] | None:
        """The part within `reach` units of (cx, cy) and its slices into this canvas; None if it misses."""
        h, w = self.shape
        col, row = (cx - self.x[0, 0]) * self.unit, (cy - self.y[0, 0]) * self.unit
        half = reach * self.unit + 1
        c0, c1 = max(0, int(col - half)), min(w, int(col + half) + 2)
        r0, r1 = max(0, int(row - half)), min(h, int(row + half) + 2)
        if c0 >= c1 or r0 >= r1:
            return None
        sy, sx = slice(r0, r1), slice(c0, c1)
        return _Canvas(self.rng, self.x[:, sx], self.y[sy, :], self.unit), (sy, sx)

    def noise(self, cells: float) -> np.ndarray:
        """Smooth zero-mean field, about `cells` features across the frame's shorter side, whatever the crop."""
        h, w = self.shape
        per_pixel = cells / (2 * self.unit)
        grid = self.rng.standard_normal((max(2, round(h * per_pixel) + 1), max(2, round(w * per_pixel) + 1)),
                                        dtype=np.float32)
        return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))

    def fbm(self, cells: float, octaves: int) -> np.ndarray:
        return sum(0.5 ** o * self.noise(cells * 2 ** o) for o in range(octaves))

    def polar(self, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = self.x - cx, self.y - cy
        return np.hypot(dx, dy), np.arctan2(dy, dx)

    def at(self, field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        h, w = self.shape
        cols = np.clip(np.round((x - self.x[0, 0]) * self.unit).astype(int), 0, w - 1)
        rows = np.clip(np.round((y - self.y[0, 0]) * self.unit).astype(int), 0, h - 1)
        return field[rows, cols]


@dataclass
class _Surface:
    """Mucosa layers the lesions paint on before shading."""

    albedo: np.ndarray  # (h, w, 3)
    relief: np.ndarray  # height, in canvas units
    fold_gain: np.ndarray  # where lesions flatten or interrupt the rugae

    def crop(self, window: tuple[slice, slice]) -> _Surface:
        """Views into this surface: painting the crop paints the frame."""
        return _Surface(self.albedo[window], self.relief[window], self.fold_gain[window])

    def paint(self, colour, weight: np.ndarray) -> None:
        self.albedo[...] = _blend(self.albedo, colour, weight)


# ---------------------------------------------------------------- public entry point
def generate_dataset(out_dir, per_class: int, seed: int = 0, size_range=(640, 1280),
                     images_per_patient=(2, 5), style: str = "default", workers: int | None = None,
                     classes=CLASSES) -> SynthSummary:
    """Render `per_class` frames for each class into `out_dir` (class folders, manifest.csv and synthetic.json)."""
    out_dir = Path(out_dir)
    size_range, images_per_patient, classes = _check_arguments(
        out_dir, per_class, seed, size_range, images_per_patient, style, workers, classes)
    jobs = _plan_jobs(out_dir, int(per_class), int(seed), size_range, images_per_patient, style, classes)
    for label in classes:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
    _run_jobs(jobs, int(workers or os.cpu_count() or 1))
    _write_manifest(out_dir / "manifest.csv", jobs)
    (out_dir / SYNTHETIC_MARKER).write_text(json.dumps(
        {"generator": GENERATOR, "seed": int(seed), "per_class": int(per_class), "style": style,
         "classes": list(classes), "note": "synthetic frames rendered by gastro-dist synth, not endoscopy images"},
        indent=2) + "\n")
    summary = SynthSummary(out_dir=out_dir, num_images=len(jobs),
                           per_class={label: per_class for label in classes},
                           num_patients=len({job.patient_id for job in jobs}))
    print(summary.line())
    return summary


def read_synthetic_marker(folder: Path) -> dict | None:
    """What `generate_dataset` recorded in FOLDER/synthetic.json, or None when the folder was not made by it.
    The file is a user's as much as ours: only a small JSON object naming this generator counts."""
    path = Path(folder) / SYNTHETIC_MARKER
    try:
        if not path.is_file() or path.stat().st_size > 65536:
            return None
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        return None
    return {key: marker[key] for key in ("generator", "seed", "per_class", "style")
            if isinstance(marker.get(key), (str, int)) and not isinstance(marker.get(key), bool)}


def _check_arguments(out_dir, per_class, seed, size_range, images_per_patient, style, workers, classes):
    if not _is_whole(per_class) or per_class < 1:
        raise UserError(f"per_class must be a whole number >= 1 (got {per_class!r})")
    if not _is_whole(seed) or seed < 0:
        raise UserError(f"seed must be a whole number >= 0 (got {seed!r})")
    size_range = _whole_pair(size_range, "size_range")
    if size_range[0] < MIN_WIDTH or size_range[0] > size_range[1]:
        raise UserError(f"size_range must be two frame widths MIN <= MAX, MIN >= {MIN_WIDTH} (got {size_range!r})")
    images_per_patient = _whole_pair(images_per_patient, "images_per_patient")
    if images_per_patient[0] < 1 or images_per_patient[0] > images_per_patient[1]:
        raise UserError(f"images_per_patient must be two counts 1 <= MIN <= MAX (got {images_per_patient!r})")
    if style not in _LOOKS:
        raise UserError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}")
    if workers is not None and (not _is_whole(workers) or workers < 1):
        raise UserError(f"workers must be a whole number >= 1 (got {workers!r})")
    classes = tuple(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise UserError(f"classes must be distinct names from {', '.join(CLASSES)} (got {classes!r})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty folder; choose a new output folder")
    return size_range, images_per_patient, classes


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _whole_pair(value, name: str) -> tuple[int, int]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        lo = hi = None
    if not (_is_whole(lo) and _is_whole(hi)):
        raise UserError(f"{name} must be two whole numbers (got {value!r})")
    return int(lo), int(hi)


# ---------------------------------------------------------------- planning, workers, manifest
def _plan_jobs(out_dir, per_class, seed, size_range, images_per_patient, style, classes) -> list[_Job]:
    jobs, next_patient = [], 0
    for label in classes:
        sizes = _patient_sizes(seed, CLASSES.index(label), per_class, images_per_patient)
        index = 0
        for patient, size in enumerate(sizes):
            patient_id = f"p{next_patient + patient:05d}"
            for n in range(size):
                jobs.append(_Job(str(out_dir), f"{label}/{patient_id}_{n:02d}.jpg", label, index, patient,
                                 patient_id, seed, size_range, style))
                index += 1
        next_patient += len(sizes)
    return jobs


def _patient_sizes(seed: int, class_idx: int, count: int, images_per_patient: tuple[int, int]) -> list[int]:
    rng = np.random.default_rng([seed, _STREAM_PLAN, class_idx])
    sizes: list[int] = []
    while sum(sizes) < count:
        sizes.append(int(rng.integers(images_per_patient[0], images_per_patient[1] + 1)))
    sizes[-1] -= sum(sizes) - count
    return sizes


def _run_jobs(jobs: list[_Job], workers: int) -> None:
    if workers == 1:
        _track(map(_render_job, jobs), len(jobs))
        return
    # fork on Linux, so scripts without a __main__ guard work; elsewhere fork is unsafe and spawn is the default
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_render_job, job) for job in jobs]  # forks before the progress bar starts its thread
        try:
            _track((future.result() for future in as_completed(futures)), len(jobs))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _track(done, total: int) -> None:
    with Progress() as progress:
        task = progress.add_task("rendering frames", total=total)
        for _ in done:
            progress.advance(task)


def _write_manifest(path: Path, jobs: list[_Job]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "patient_id"])
        for job in sorted(jobs, key=lambda j: j.rel_path):
            writer.writerow([job.rel_path, job.label, job.patient_id])


def _render_job(job: _Job) -> None:
    class_idx = CLASSES.index(job.label)
    look = _LOOKS[job.style]
    patient = _draw_patient(np.random.default_rng([job.seed, _STREAM_PATIENT, class_idx, job.patient]), look)
    rng = np.random.default_rng([job.seed, _STREAM_IMAGE, class_idx, job.index])
    frame = _render_frame(rng, job.label, patient, job.size_range, look)
    frame.save(Path(job.out_dir) / job.rel_path, "JPEG", quality=JPEG_QUALITY)


def _draw_patient(rng: np.random.Generator, look: _Look) -> _Patient:
    # Every class draws the same fields in the same order: colour and fold statistics cannot tell classes apart.
    harmonics = np.arange(2, 8)  # lobes of an irregular border; higher ones get smaller
    return _Patient(
        hsv=(rng.uniform(*look.hue), rng.uniform(*look.saturation), rng.uniform(*look.value)),
        fold_angle=rng.uniform(0, math.pi),
        fold_freq=rng.uniform(1.2, 2.8),
        fold_depth=rng.uniform(0.01, 0.05),
        vessels=rng.uniform(0.0, 0.45),
        severity=rng.uniform(0.2, 0.45) if rng.random() < 0.15 else rng.uniform(0.5, 1.0),
        lesion_scale=rng.uniform(0.8, 1.25),
        aspect=rng.uniform(0.6, 1.0),
        border=np.stack([rng.uniform(0.04, 0.16, harmonics.size) / np.sqrt(harmonics / 2),
                         rng.uniform(0, 2 * math.pi, harmonics.size)], axis=1),
        raised=rng.random() < 0.6,
        pale=rng.random() < 0.5,
        ulcerated=rng.random() < 0.35,
        converging_folds=rng.random() < 0.4,
        background_gastritis=rng.random() < 0.35,
    )


# ---------------------------------------------------------------- one frame
def _render_frame(rng: np.random.Generator, label: str, patient: _Patient, size_range: tuple[int, int],
                  look: _Look) -> Image.Image:
    width = int(rng.integers(size_range[0], size_range[1] + 1))
    height = max(1, round(width / look.aspects[rng.integers(len(look.aspects))]))
    work_w = min(width, WORK_WIDTH)
    canvas = _Canvas.for_frame(rng, work_w, max(1, round(work_w * height / width)))
    fov = _draw_fov(rng, look)
    colour = _mucosa_colour(rng, patient)
    surface = _mucosa(canvas, patient, colour)
    severity = float(np.clip(patient.severity * rng.uniform(0.85, 1.15), 0.15, 1.0))
    focus = _LESIONS[label](canvas, surface, fov, patient, severity)
    if label != "chronic_gastritis" and patient.background_gastritis:
        _draw_gastritis(canvas, surface, fov, patient, rng.uniform(0.15, 0.45), erosions=int(rng.integers(0, 7)))
    rgb, relief, light = _shade(canvas, surface, fov, patient, look, focus)
    rgb = _auto_exposure(rng, canvas, fov, rgb, colour)
    glare = _highlights(canvas, fov, relief, patient, look, light)
    rgb = _blend(rgb, np.array(look.highlight_rgb, np.float32), glare)
    return _finish(rng, rgb, width, height, fov, look)


def _draw_fov(rng: np.random.Generator, look: _Look) -> _Fov:
    # octagonal scopes record into wide frames with the image shifted left, leaving room for text on the right
    shift = rng.uniform(-look.fov_offset, 0.3 * look.fov_offset) if look.fov == "octagon" \
        else rng.uniform(-look.fov_offset, look.fov_offset)
    return _Fov(cx=shift, cy=rng.uniform(-0.04, 0.04), radius=rng.uniform(0.97, 1.14), shape=look.fov)


def _mucosa_colour(rng: np.random.Generator, patient: _Patient) -> np.ndarray:
    h, s, v = patient.hsv
    return np.array(colorsys.hsv_to_rgb(((h + rng.uniform(-2, 2)) / 360) % 1.0,
                                        np.clip(s + rng.uniform(-0.04, 0.04), 0, 1),
                                        np.clip(v + rng.uniform(-0.04, 0.04), 0, 1)), np.float32)


def _mucosa(canvas: _Canvas, patient: _Patient, colour: np.ndarray) -> _Surface:
    mottle = canvas.fbm(4, 3)
    albedo = colour * (1 + 0.10 * mottle[..., None] * np.array([0.5, 1.0, 1.0], np.float32))
    surface = _Surface(albedo=albedo, relief=0.0015 * canvas.fbm(24, 2),  # areae gastricae: fine bumps
                       fold_gain=np.ones(canvas.shape, np.float32))
    veins = np.exp(-(canvas.noise(6) / 0.12) ** 2) * patient.vessels * np.clip(canvas.noise(3) + 0.3, 0, 1)
    surface.paint(albedo * np.array([0.78, 0.62, 0.74], np.float32), veins)
    return surface


def _rugae(canvas: _Canvas, patient: _Patient) -> np.ndarray:
    """Height of tortuous parallel folds in [0, 1]: broad crests, narrow furrows."""
    rng = canvas.rng
    angle = patient.fold_angle + rng.normal(0, 0.25)
    across = canvas.x * math.cos(angle) + canvas.y * math.sin(angle)
    warp = 0.35 * canvas.noise(2) + 0.08 * canvas.noise(5)
    phase = 2 * math.pi * patient.fold_freq * rng.uniform(0.85, 1.15) * (across + warp) + rng.uniform(0, 2 * math.pi)
    return np.sqrt(0.5 + 0.5 * np.sin(phase))


# ---------------------------------------------------------------- class evidence
def _draw_cancer(canvas: _Canvas, surface: _Surface, fov: _Fov, patient: _Patient, severity: float):
    rng = canvas.rng
    cx, cy = _lesion_centre(rng, fov)
    r0 = fov.radius * rng.uniform(0.20, 0.38) * patient.lesion_scale
    rotation = rng.uniform(0, 2 * math.pi)
    if patient.converging_folds:
        _converging_folds(canvas, surface, cx, cy, r0 * 1.2, severity * 0.6, clubbed=True)
    canvas, window = canvas.crop(cx, cy, 2.0 * r0 * (1 + patient.border[:, 0].sum()))
    surface = surface.crop(window)

    dist, angle = canvas.polar(cx, cy)
    amplitude, phase = (patient.border[:, i, None, None] for i in (0, 1))
    harmonic = np.arange(2, 2 + len(patient.border))[:, None, None]
    border = 1 + np.sum(amplitude * np.cos(harmonic * (angle - rotation) + phase), axis=0)
    rho = dist / (r0 * border) + 0.10 * canvas.noise(16)  # ragged, irregular margin
    inside = _smoothstep(1.06, 0.94, rho)
    nodules = canvas.fbm(14, 2)
    if patient.raised:  # a mound, nodular on top
        surface.relief += severity * r0 * (0.4 * _smoothstep(1.1, 0.4, rho) + 0.07 * nodules * inside)
    else:  # depressed type: sunken uneven centre, irregular raised margin
        surface.relief += severity * r0 * (0.06 * nodules * inside - 0.2 * _smoothstep(0.95, 0.4, rho)
                                           + 0.1 * np.exp(-((rho - 0.95) / 0.2) ** 2))
    surface.fold_gain *= 1 - 0.9 * _smoothstep(1.5, 0.9, rho)  # folds stop abruptly at the tumour

    tint = _PALE if patient.pale else _DARK_RED
    mottle = np.clip(0.9 + 0.3 * canvas.noise(12), 0.4, 1)
    surface.paint(surface.albedo * tint, inside * (0.6 + 0.4 * severity) * mottle)
    surface.paint(_WHITISH, 0.5 * severity * inside * _smoothstep(0.3, 1.1, canvas.noise(9)))
    if patient.ulcerated:
        _ulceration(canvas, surface, cx, cy, r0, severity)
    return cx, cy


def _ulceration(canvas: _Canvas, surface: _Surface, cx: float, cy: float, r0: float, severity: float) -> None:
    """Dirty, irregular fibrin patch inside a tumour: resembles an ulcer base but without a regular rim."""
    rng = canvas.rng
    a, shift = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.35) * r0
    dist, _ = canvas.polar(cx + shift * math.cos(a), cy + shift * math.sin(a))
    base = _smoothstep(1.05, 0.85, dist / (r0 * rng.uniform(0.3, 0.7)) + 0.25 * canvas.noise(14))
    dirt = np.clip(0.5 + 0.6 * canvas.noise(20), 0, 1)[..., None]
    surface.paint(_FIBRIN * (1 - 0.25 * dirt) + 0.12 * dirt * _DARK_RED, base * min(1.0, 0.4 + severity))
    surface.relief -= 0.015 * base * severity


def _draw_ulcer(canvas: _Canvas, surface: _Surface, fov: _Fov, patient: _Patient, severity: float):
    rng = canvas.rng
    cx, cy = _lesion_centre(rng, fov)
    a = fov.radius * rng.uniform(0.11, 0.24) * patient.lesion_scale
    b = a * patient.aspect
    rotation = rng.uniform(0, math.pi)
    if patient.converging_folds:
        _converging_folds(canvas, surface, cx, cy, a * 1.4, severity, clubbed=False)
    canvas, window = canvas.crop(cx, cy, 2.5 * a)
    surface = surface.crop(window)

    dx, dy = canvas.x - cx, canvas.y - cy
    u = dx * math.cos(rotation) + dy * math.sin(rotation)
    v = -dx * math.sin(rotation) + dy * math.cos(rotation)
    ell = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 0.02 * canvas.noise(18)  # smooth, regular margin
    edge = 1.2 / (b * canvas.unit)  # about one pixel: the punched-out look
    base = _smoothstep(1 + edge, 1 - edge, ell)
    halo = np.exp(-((ell - 1) / rng.uniform(0.25, 0.5)) ** 2) * (ell > 1 - edge)
    surface.fold_gain *= 1 - 0.8 * _smoothstep(1.6, 1.0, ell)
    surface.relief += severity * a * (0.08 * np.exp(-((ell - 1.15) / 0.3) ** 2) - 0.12 * _smoothstep(1.15, 0.5, ell))
    surface.paint(surface.albedo * _HYPERAEMIA, halo * severity)
    # fibrin: uneven, sometimes old and greyish
    surface.paint(_FIBRIN * (rng.uniform(0.88, 1.0) + 0.07 * canvas.fbm(10, 2))[..., None],
                  base * min(1.0, 0.45 + severity))
    if rng.random() < 0.2:  # haematin spots on the base
        for _ in range(int(rng.integers(1, 3))):
            r, t = rng.uniform(0, 0.6), rng.uniform(0, 2 * math.pi)
            _spot(canvas, surface, cx + a * r * math.cos(t), cy + b * r * math.sin(t),
                  rng.uniform(0.006, 0.014), _HAEMATIN, None, 0.7)
    return cx, cy


def _converging_folds(canvas: _Canvas, surface: _Surface, cx: float, cy: float, reach: float,
                      strength: float, clubbed: bool) -> None:
    rng = canvas.rng
    dist, angle = canvas.polar(cx, cy)
    spokes = (0.5 + 0.5 * np.sin(int(rng.integers(5, 10)) * angle + 0.6 * canvas.noise(3))) ** 3
    fade = np.exp(-dist / (reach * 2.5)) * _smoothstep(reach, reach * 1.4, dist)
    if clubbed:  # malignant folds end swollen and abruptly at the margin
        fade = fade * (1 + 1.5 * np.exp(-((dist - reach * 1.5) / (0.3 * reach)) ** 2))
    surface.relief += 0.035 * strength * spokes * fade
    surface.fold_gain *= 1 - 0.6 * np.exp(-dist / (reach * 2))


def _draw_gastritis(canvas: _Canvas, surface: _Surface, fov: _Fov, patient: _Patient, severity: float,
                    erosions: int | None = None):
    rng = canvas.rng
    coverage = _smoothstep(-0.7, 0.5, canvas.noise(2) + rng.uniform(-0.2, 0.5))
    patches = _smoothstep(-0.1, 0.9, canvas.noise(8)) * coverage
    surface.paint(surface.albedo * _HYPERAEMIA, 0.75 * patches * severity)
    surface.relief += 0.002 * severity * coverage * canvas.noise(30)  # oedematous, granular mucosa
    if erosions is None:
        erosions = int(rng.integers(12, 45) * (0.5 + severity))
    strength = min(1.0, 0.4 + severity)
    for cx, cy in _scatter(rng, canvas, fov, coverage, erosions):
        if rng.random() < 0.65:
            _spot(canvas, surface, cx, cy, rng.uniform(0.018, 0.034), _FIBRIN, _HYPERAEMIA, strength)
        else:  # petechia-like red erosion
            _spot(canvas, surface, cx, cy, rng.uniform(0.018, 0.034), None, _DARK_RED * np.float32(0.9), strength)
    if erosions and rng.random() < 0.2:  # one larger erosion: the ulcer look-alike
        cx, cy = _lesion_centre(rng, fov)
        _spot(canvas, surface, cx, cy, rng.uniform(0.035, 0.06), _FIBRIN, _HYPERAEMIA, strength)


_LESIONS = {"gastric_cancer": _draw_cancer, "gastric_ulcer": _draw_ulcer, "chronic_gastritis": _draw_gastritis}


def _spot(canvas: _Canvas, surface: _Surface, cx: float, cy: float, radius: float, core_rgb, halo_gain,
          strength: float) -> None:
    """Small erosion: a core colour (absolute) inside a halo that multiplies the mucosa colour."""
    cropped = canvas.crop(cx, cy, 3 * radius)
    if cropped is None:
        return
    canvas, window = cropped
    patch = surface.crop(window)
    d = np.hypot(canvas.x - cx, canvas.y - cy) / radius
    if halo_gain is not None:
        patch.paint(patch.albedo * halo_gain, np.exp(-(d / 2.0) ** 2) * strength)
    if core_rgb is not None:
        patch.paint(core_rgb, _smoothstep(1.0, 0.6, d) * strength)
    patch.relief -= 0.004 * strength * _smoothstep(1.2, 0.5, d)


def _lesion_centre(rng: np.random.Generator, fov: _Fov) -> tuple[float, float]:
    r, a = fov.radius * 0.5 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
    return fov.cx + r * math.cos(a), fov.cy + r * math.sin(a)


def _scatter(rng: np.random.Generator, canvas: _Canvas, fov: _Fov, density: np.ndarray, count: int):
    """Up to `count` points inside the field of view, denser where `density` is high."""
    x, y = _points_in_fov(rng, fov, 0.92, count * 4)
    keep = rng.random(count * 4) < canvas.at(density, x, y)
    return list(zip(x[keep][:count], y[keep][:count]))


def _points_in_fov(rng: np.random.Generator, fov: _Fov, extent: float, count: int):
    r = fov.radius * extent * np.sqrt(rng.random(count))
    a = rng.uniform(0, 2 * math.pi, count)
    return fov.cx + r * np.cos(a), fov.cy + r * np.sin(a)


# ---------------------------------------------------------------- optics
def _shade(canvas: _Canvas, surface: _Surface, fov: _Fov, patient: _Patient, look: _Look, focus):
    """Light the surface from beside the lens: rgb, the relief it lit, and where the light points."""
    rng = canvas.rng
    folds = _rugae(canvas, patient)
    relief = surface.relief + patient.fold_depth * folds * surface.fold_gain
    gy, gx = np.gradient(relief * canvas.unit)
    lx, ly = rng.normal(0, 0.35, 2)
    diffuse = np.clip((1 - gx * lx - gy * ly) / np.sqrt((1 + gx * gx + gy * gy) * (1 + lx * lx + ly * ly)), 0, 1)

    light_x, light_y = fov.cx + rng.normal(0, 0.2), fov.cy + rng.normal(0, 0.2)
    falloff = np.hypot(canvas.x - light_x, canvas.y - light_y) / fov.radius
    brightness = 1 - rng.uniform(*look.vignette) * np.clip(falloff, 0, 1.5) ** 2
    brightness -= 4.5 * patient.fold_depth * (1 - folds) ** 3 * surface.fold_gain  # furrows get less light
    if rng.random() < 0.5:
        brightness *= _lumen(canvas, fov, focus)
    rgb = surface.albedo * (diffuse * np.clip(brightness, 0.05, 1))[..., None]
    return rgb, relief, (light_x, light_y)


def _auto_exposure(rng: np.random.Generator, canvas: _Canvas, fov: _Fov, rgb: np.ndarray,
                   colour: np.ndarray) -> np.ndarray:
    """Camera exposure and white balance: the field of view averages to the plain mucosa colour at a
    brightness drawn the same way for every class, so mean colour is no class evidence; lesions keep
    their contrast to the surrounding mucosa."""
    inside = fov.signed_distance(canvas.x, canvas.y) < 0
    if not inside.any():
        return np.clip(rgb, 0, 1)
    target = colour * (rng.uniform(0.42, 0.56) / float(colour @ np.array([0.299, 0.587, 0.114], np.float32)))
    gain = np.clip(target / np.maximum(rgb[inside].mean(axis=0), 1e-3), 0.5, 2.0)
    return np.clip(rgb * gain.astype(np.float32), 0, 1)


def _lumen(canvas: _Canvas, fov: _Fov, focus) -> np.ndarray:
    """Dark distant lumen toward the edge, on the side away from the lesion."""
    rng = canvas.rng
    away = math.atan2(fov.cy - focus[1], fov.cx - focus[0]) if focus else rng.uniform(0, 2 * math.pi)
    a, r = away + rng.normal(0, 0.6), fov.radius * rng.uniform(0.55, 0.85)
    dist, _ = canvas.polar(fov.cx + r * math.cos(a), fov.cy + r * math.sin(a))
    size = rng.uniform(0.15, 0.35)
    return 1 - rng.uniform(0.5, 0.85) * np.exp(-((dist / size) ** 2) * (1 + 0.3 * canvas.noise(3)))


def _highlights(canvas: _Canvas, fov: _Fov, relief: np.ndarray, patient: _Patient, look: _Look,
                light: tuple[float, float]) -> np.ndarray:
    """Specular reflections of the wet mucosa: on crests and bumps, mostly near the light."""
    rng = canvas.rng
    x, y = _points_in_fov(rng, fov, 0.9, 300)
    score = canvas.at(relief, x, y) / (relief.max() + 1e-6) - 0.6 * np.hypot(x - light[0], y - light[1]) \
        + 0.3 * rng.random(x.size)
    best = np.argsort(-score)
    along = patient.fold_angle + math.pi / 2  # crests run across the fold direction
    if look.highlights == "blobs":
        spots = [(x[i], y[i], rng.uniform(0.006, 0.022), rng.uniform(1.2, 3.5), along + rng.normal(0, 0.4))
                 for i in best[:int(rng.integers(4, 12))]]
    else:  # many pinpoint glints and a streak or two
        spots = [(x[i], y[i], rng.uniform(0.003, 0.007), rng.uniform(1.0, 1.8), rng.uniform(0, math.pi))
                 for i in best[:int(rng.integers(20, 60))]]
        spots += [(x[i], y[i], rng.uniform(0.006, 0.012), rng.uniform(5, 9), along)
                  for i in best[60:60 + int(rng.integers(1, 3))]]
    glare = np.zeros(canvas.shape, np.float32)
    for px, py, sigma, stretch, angle in spots:
        cropped = canvas.crop(px, py, 3 * sigma * stretch)
        if cropped is None:
            continue
        spot, window = cropped
        dx, dy = spot.x - px, spot.y - py
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        blob = np.clip(1.6 * np.exp(-0.5 * ((u / (sigma * stretch)) ** 2 + (v / sigma) ** 2)), 0, 1)
        glare[window] = np.maximum(glare[window], blob)
    return glare


def _finish(rng: np.random.Generator, rgb: np.ndarray, width: int, height: int, fov: _Fov, look: _Look) -> Image.Image:
    """Upscale to the frame size, add sensor grain, black out everything outside the field of view."""
    image = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    blur = rng.uniform(*look.blur)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    frame = image.resize((width, height), Image.BICUBIC)
    amplitude = int(round(rng.uniform(*look.noise)))
    grain = Image.frombytes("L", (width, height), rng.bytes(width * height))
    grain = grain.point([v * (2 * amplitude + 1) >> 8 for v in range(256)])  # uniform in [0, 2 * amplitude]
    frame = ImageChops.add(frame, Image.merge("RGB", (grain,) * 3), offset=-amplitude)
    frame.paste((0, 0, 0), mask=_outside_fov(fov, width, height))
    return frame


def _outside_fov(fov: _Fov, width: int, height: int) -> Image.Image:
    """Anti-aliased mask of the frame outside the field of view, computed at half size to save time."""
    half_w, half_h = (width + 1) // 2, (height + 1) // 2
    unit = min(half_w, half_h) / 2
    distance = fov.signed_distance(_axis(half_w, unit)[None, :], _axis(half_h, unit)[:, None])
    mask = Image.fromarray(np.clip(127.5 + distance * (255 * unit), 0, 255).astype(np.uint8))
    return mask.resize((width, height), Image.BILINEAR)


# ---------------------------------------------------------------- small helpers
def _axis(pixels: int, unit: float) -> np.ndarray:
    """Pixel-centre coordinates along one axis, 0 in the middle, in units of `unit` pixels."""
    return (np.arange(pixels, dtype=np.float32) + 0.5 - pixels / 2) / unit


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def _blend(a: np.ndarray, b, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]
