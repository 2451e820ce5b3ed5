"""`predict-video`: a trained run over recorded procedure videos and live streams.

Owns the path from a video to its outputs: decoding (`data.video.video_frames`: pixel caps, damaged packets
skipped and counted) in a reader thread, the run's own evaluation preprocessing, the model in batches
(PyTorch, or ONNX Runtime on `export`'s file), temporal smoothing and findings (`video_timeline`), and
the files of DIR: frames.csv (a row per predicted frame), findings.csv, videos.csv (a row per video: what
was decoded, predicted, dropped or damaged), the annotated copies and summary.html (`video_output`).

Recorded files and live input differ only in what happens when the model falls behind the decoder: a
file's reader waits (every frame is predicted), a live reader drops the oldest queued frame and counts
it (latency stays bounded: a frame is at most `queue_frames` old when the model takes it). Live input
is a URL (rtsp://, udp://, ...), a named pipe, or with ``live=True`` a file still being written; it
takes only the causal smoothing. Ctrl-C or the end of the stream closes every output before the command
ends. Nothing of a container's metadata (title, comments, names, serial numbers) is read into an output:
only frames, their times, and the stream's frame rate and rotation.
"""

from __future__ import annotations

import csv
import math
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from gastro_dist import UserError
from gastro_dist.data import video
from gastro_dist.data.augmentation import eval_transform
from gastro_dist.data.frames import MAX_FRAMES_PER_S, FrameRules, LeftOut, TimeSampler
from gastro_dist.data.images import DEFAULT_MAX_PIXELS, BadImage
from gastro_dist.evaluation.inference import (TrainedModel, default_device, file_identities, for_inference,
                                              full_precision)
from gastro_dist.evaluation.video_output import AnnotatedVideo, upright, write_summary_html
from gastro_dist.evaluation.video_timeline import Finding, FindingRules, FindingTracker, Smoothing
from gastro_dist.files import csv_text, distinct_names, safe_name
from gastro_dist.models.backbones import model_logits

BACKENDS = ("torch", "onnx")
LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "rtp://", "srt://", "tcp://", "http://", "https://")
MAX_VIDEO_BYTES = 20_000 * 10**6  # pack's --max-video-mb default: a recorded file is streamed, never held whole
THUMBNAIL_HEIGHT_PX = 120
# The whole duration of even a long procedure at every frame, with room: a recording that claims more is refused
# by the decoder's frames-per-second check long before.
_MAX_FRAMES = 10**8


@dataclass(frozen=True)
class VideoSettings:
    """What `predict-video` does with each video (its options)."""
    fps: float | None = None  # frames predicted per second of video; None: every frame
    smoothing: Smoothing = Smoothing()
    findings: FindingRules = FindingRules()
    annotate: bool = False
    cam_every: int = 0  # with annotate: a Grad-CAM overlay on every k-th predicted frame; 0: none
    batch_size: int = 8
    queue_frames: int = 16  # decoded frames waiting for the model; a live reader drops the oldest beyond this
    idle_timeout_s: float = 30.0  # live: a stream silent this long has ended
    realtime: bool = False  # read recorded files at their own pace, as live (bench, and trying an installation)

    def __post_init__(self) -> None:
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= MAX_FRAMES_PER_S):
            raise UserError(f"--fps must be in (0, {MAX_FRAMES_PER_S}], not {self.fps}")
        for option, value in (("--batch-size", self.batch_size), ("--queue-frames", self.queue_frames)):
            if value < 1:
                raise UserError(f"{option} must be 1 or more, not {value}")
        if self.cam_every < 0:
            raise UserError(f"--cam-every must be 0 (no Grad-CAM) or more, not {self.cam_every}")
        if self.cam_every and not self.annotate:
            raise UserError("--cam-every draws on the annotated video: add --annotate")
        if not self.idle_timeout_s > 0:
            raise UserError(f"--idle-timeout-s must be positive, not {self.idle_timeout_s}")

    def frame_rules(self) -> FrameRules:
        """What the decoder gives: the --fps sample, or every frame (up to 240 a second) when all are
        predicted or annotated (the reader then picks the --fps sample itself)."""
        every_frame = self.fps is None or self.annotate
        return FrameRules(fps=MAX_FRAMES_PER_S if every_frame else self.fps, near_duplicate_bits=0,
                          max_frames=_MAX_FRAMES)


# ---------------------------------------------------------------- backends
class TorchFrameModel:
    """The run's model in PyTorch: channels_last as `inference.for_inference`; bf16 autocast on CUDA (the
    speed a video needs; probabilities within about 1e-2 of float32), float32 on the CPU."""

    def __init__(self, trained: TrainedModel, device: torch.device | None = None):
        self.device = device or default_device()
        self.model = for_inference(trained.model, self.device)
        self.temperature = trained.temperature
        self.precision = "bf16" if self.device.type == "cuda" else "fp32"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = model_logits(self.model(images))[0]
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy().astype(np.float64)


class OnnxFrameModel:
    """ONNX Runtime on the file `export` writes, checked against the run (classes, preprocessing, temperature)
    so that it gives the run's probabilities: within 1e-4 of PyTorch's float32 ones (tests/test_predict_video.py)."""

    def __init__(self, path: Path, trained: TrainedModel, device: torch.device | None = None):
        from gastro_dist.evaluation.export import _import_optional, _sidecar_path
        from gastro_dist.files import read_json_file

        onnxruntime = _import_optional("onnxruntime")
        sidecar_path = _sidecar_path(path)
        if not path.is_file() or not sidecar_path.is_file():
            raise UserError(f"--onnx {path} or its sidecar {sidecar_path.name} is missing; write both with "
                            f"gastro-dist export --run RUN --format onnx --out {path}")
        sidecar = read_json_file(sidecar_path)
        meta = trained.meta
        expected = {"classes": meta.classes, "input_size": meta.image_size, "mean": meta.mean, "std": meta.std,
                    "temperature": meta.temperature}
        differing = [key for key, value in expected.items()
                     if not isinstance(sidecar, dict) or not _same(sidecar.get(key), value)]
        if differing:
            raise UserError(f"--onnx {path} was not exported from this run ({', '.join(differing)} differ); "
                            "export it again from --run")
        self.softmax = sidecar.get("output") == "logits"  # logits / T: softmax gives the probabilities
        providers = ["CUDAExecutionProvider"] if device is not None and device.type == "cuda" else []
        options = onnxruntime.SessionOptions()
        # idle threads sleep rather than spin: the decoding thread needs the same cores (benchmarks/README.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=providers + ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.precision = "fp32"

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        output = self.session.run(None, {self.input_name: images.numpy().astype(np.float32)})[0].astype(np.float64)
        if self.softmax:
            output = np.exp(output - output.max(axis=1, keepdims=True))
            output /= output.sum(axis=1, keepdims=True)
        return output


def _same(found, expected) -> bool:
    if isinstance(expected, list) and isinstance(found, list) and len(found) == len(expected):
        return all(_same(a, b) for a, b in zip(found, expected))
    if isinstance(expected, float) or isinstance(found, float):
        return isinstance(found, (int, float)) and math.isclose(found, expected, rel_tol=1e-9)
    return found == expected


def frame_model(trained: TrainedModel, backend: str, onnx_file: Path | None = None,
                device: torch.device | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "onnx":
        if onnx_file is None:
            raise UserError("--backend onnx needs the exported file: --onnx FILE "
                            "(gastro-dist export --run RUN --format onnx --out FILE)")
        return OnnxFrameModel(onnx_file, trained, device)
    if onnx_file is not None:
        raise UserError("--onnx is only read with --backend onnx")
    return TorchFrameModel(trained, device)


# ---------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One input: `name` is what the outputs call it (a URL without its credentials)."""
    name: str
    location: str
    live: bool  # frames arrive at the recording's pace: drop rather than fall behind, causal smoothing only
    followed: bool  # read as a stream (a URL, a pipe, a growing file), not as a file of known size


def sources(inputs: list[str], follow_files: bool = False, realtime: bool = False) -> list[Source]:
    """URLs and named pipes are live streams; with `follow_files`, files are read as they grow; with
    `realtime`, files are read at their own frame rate, as a live feed arrives."""
    from gastro_dist.data.locations import redact_argv

    found = []
    for item in inputs:
        is_url = item.lower().startswith(LIVE_SCHEMES)
        name = redact_argv([item])[0] if is_url else item
        try:
            is_pipe = not is_url and stat.S_ISFIFO(os.stat(item).st_mode)
        except OSError:
            is_pipe = False
        followed = follow_files or is_url or is_pipe
        found.append(Source(name, item, live=followed or realtime, followed=followed))
    return found


class _FollowedFile:
    """A live file for PyAV: a named pipe read until its writer closes it, or a file being written read
    past its current end until it has not grown for `idle_timeout_s`. Not seekable: the format must
    stream (MPEG-TS, Matroska, fragmented MP4)."""

    def __init__(self, path: str, idle_timeout_s: float, stop: threading.Event):
        self._handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        self._is_pipe = stat.S_ISFIFO(os.fstat(self._handle.fileno()).st_mode)
        self._idle_timeout_s, self._stop = idle_timeout_s, stop
        self._ended = False

    def read(self, num_bytes: int) -> bytes:
        waited_s = 0.0
        while not self._ended:
            data = self._handle.read(num_bytes)
            if data:
                return data
            self._ended = self._is_pipe or self._stop.is_set() or waited_s >= self._idle_timeout_s
            if not self._ended:
                time.sleep(0.05)
                waited_s += 0.05
        return b""  # the end, for good: FFmpeg asks again after the first

    def close(self) -> None:
        self._handle.close()


# ---------------------------------------------------------------- decoding thread
@dataclass
class DecodedFrame:
    """One decoded frame on its way to the model (when `tensor` is set) and the annotated copy."""
    time_s: float
    frame_index: int | None
    image: Image.Image
    tensor: torch.Tensor | None  # the preprocessed model input; None: not sampled (annotated only)
    decoded_at: float  # time.perf_counter() when the decoder gave it


class FrameQueue:
    """Decoded frames waiting for the model, at most `capacity`. When it is full a live reader drops the
    oldest frame (counted in `num_dropped`), so the model always gets the newest ones; a file's reader
    waits instead. `max_length` records the longest it ever was (tests check the bound)."""

    def __init__(self, capacity: int, drop_oldest: bool):
        self.capacity, self.drop_oldest = capacity, drop_oldest
        self._items: deque[DecodedFrame] = deque()
        self._changed = threading.Condition()
        self.closed = False
        self.error: str | None = None
        self.num_dropped = 0
        self.max_length = 0

    def put(self, item: DecodedFrame, stop: threading.Event) -> None:
        with self._changed:
            while len(self._items) >= self.capacity and not stop.is_set():
                if self.drop_oldest:
                    self._items.popleft()
                    self.num_dropped += 1
                else:
                    self._changed.wait(0.1)
            self._items.append(item)
            self.max_length = max(self.max_length, len(self._items))
            self._changed.notify_all()

    def close(self, error: str | None = None) -> None:
        with self._changed:
            self.closed, self.error = True, error
            self._changed.notify_all()

    def take(self, max_items: int, wait_for_all: bool, timeout_s: float) -> list[DecodedFrame] | None:
        """Up to `max_items` frames: as many as there are (live), or `max_items` unless the stream ends
        (a file: full batches). None when the stream has ended and nothing is left; [] after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        wanted = min(max_items, self.capacity) if wait_for_all else 1
        with self._changed:
            while len(self._items) < wanted and not self.closed:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return []
                self._changed.wait(min(remaining_s, 0.5))
            if not self._items:
                return None
            taken = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._changed.notify_all()
            return taken


@dataclass
class StreamInfo:
    """What the reader learnt about the video stream (never its container's metadata)."""
    rate: Fraction | None = None
    rotation_deg: int = 0
    left_out: list[LeftOut] = field(default_factory=list)
    num_read: int = 0  # frames the decoder gave: every frame, or the --fps sample without --annotate
    sha256: str = ""


def _probe(handle, info: StreamInfo) -> None:
    """The stream's frame rate and display rotation (from its first frame), read before decoding starts."""
    try:
        with video.av.open(handle, metadata_errors="ignore") as container:
            if container.streams.video:
                stream = container.streams.video[0]
                info.rate = stream.average_rate or stream.guessed_rate
                width_px, height_px = stream.codec_context.width, stream.codec_context.height
                if width_px * height_px > DEFAULT_MAX_PIXELS:
                    return  # video_frames refuses it, with the reason
                stream.codec_context.options = {"max_pixels": str(DEFAULT_MAX_PIXELS)}  # as video_frames decodes
                for frame in container.decode(stream):
                    info.rotation_deg = round(getattr(frame, "rotation", 0) or 0) % 360
                    break
    except video.av.FFmpegError:
        pass  # video_frames says what is wrong with it, in its own words
    finally:
        handle.seek(0)


def read_frames(source: Source, settings: VideoSettings, transform, queue: FrameQueue, stop: threading.Event,
                info: StreamInfo) -> None:
    """The reader thread: decode, sample, preprocess, queue; close the queue with the reason it stopped."""
    error = None
    followed = None
    try:
        if source.followed:
            if source.location.lower().startswith(LIVE_SCHEMES):
                frames = video.video_frames(source.location, settings.frame_rules(), DEFAULT_MAX_PIXELS, None,
                                            info.left_out)
            else:
                followed = _FollowedFile(source.location, settings.idle_timeout_s, stop)
                frames = video.video_frames(followed, settings.frame_rules(), DEFAULT_MAX_PIXELS, None, info.left_out)
            _queue_frames(frames, settings, transform, queue, stop, info)
        else:
            with video.opened_video(source.location, MAX_VIDEO_BYTES) as (handle, sha256):
                info.sha256 = sha256
                _probe(handle, info)
                frames = video.video_frames(handle, settings.frame_rules(), DEFAULT_MAX_PIXELS, None, info.left_out)
                _queue_frames(frames, settings, transform, queue, stop, info)
    except BadImage as bad:
        error = bad.reason
    except (OSError, video.av.FFmpegError) as err:
        error = f"unreadable: {video._detail(err) if isinstance(err, video.av.FFmpegError) else err.strerror or err}"
    except Exception as err:  # noqa: BLE001 (a thread's exception would otherwise vanish: it is the video's line)
        error = f"{type(err).__name__}: {err}"
    finally:
        if followed is not None:
            followed.close()
        queue.close(error)


def _queue_frames(frames: Iterator, settings: VideoSettings, transform, queue: FrameQueue, stop: threading.Event,
                  info: StreamInfo) -> None:
    sampler = TimeSampler(FrameRules(fps=settings.fps)) if settings.fps and settings.annotate else None
    first_at = None
    for frame in frames:
        if stop.is_set():
            return
        if settings.realtime:  # the frame arrives when the recording reaches it
            first_at = first_at if first_at is not None else time.perf_counter() - frame.time_s
            time.sleep(max(0.0, first_at + frame.time_s - time.perf_counter()))
        decoded_at = time.perf_counter()
        info.num_read += 1
        predicted = sampler is None or sampler.take(frame.time_s)
        if not predicted and not settings.annotate:
            continue
        tensor = transform(frame.image) if predicted else None
        queue.put(DecodedFrame(frame.time_s, frame.index, frame.image, tensor, decoded_at), stop)


# ---------------------------------------------------------------- the command
@dataclass
class VideoResult:
    """One row of videos.csv: what happened to one input."""
    name: str
    status: str = "predicted"  # predicted | failed | interrupted
    error: str = ""
    info: StreamInfo = field(default_factory=StreamInfo)
    num_predicted: int = 0
    num_dropped: int = 0
    max_queue_frames: int = 0
    end_s: float = 0.0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # per predicted frame: decoded -> smoothed probability
    findings: list[Finding] = field(default_factory=list)
    timeline: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (time_s, smoothed) per predicted frame
    annotated: str = ""
    silent: bool = False  # live: ended because nothing arrived for idle_timeout_s

    @property
    def frames_per_s(self) -> float:
        return self.num_predicted / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self, percentile: float) -> float | None:
        return 1000 * float(np.percentile(self.latencies_s, percentile)) if self.latencies_s else None


OUTPUT_FILES = ("frames.csv", "findings.csv", "videos.csv", "summary.html")
VIDEO_COLUMNS = ["video", "status", "error", "frames_read", "frames_predicted", "frames_dropped", "max_queue_frames",
                 "last_frame_s", "rotation_deg", "frames_per_s", "latency_p50_ms", "latency_p95_ms", "damage",
                 "annotated", "sha256"]


def predict_videos(trained: TrainedModel, inputs: list[str], out_dir: Path, settings: VideoSettings,
                   backend: str = "torch", onnx_file: Path | None = None, live: bool = False,
                   device: torch.device | None = None, report: Callable[[str], None] = print) -> list[VideoResult]:
    """Predict every input into `out_dir` (see the module docstring); `report` gets a line per problem.
    Every input gets its videos.csv row; a video that cannot be read is one line and the rest go on."""
    if video.av is None:
        raise UserError("predict-video reads videos with PyAV, which is not installed: pip install 'gastro-dist[video]'")
    all_sources = sources(inputs, follow_files=live, realtime=settings.realtime)
    if settings.smoothing.method == "centred" and any(source.live for source in all_sources):
        raise UserError("--smoothing centred needs the frames after each one; live input takes the causal "
                        "--smoothing ema (or none)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder; give a folder for predict-video's outputs")
    names = distinct_names([safe_name(Path(source.name).stem or "stream") for source in all_sources],
                           [source.name for source in all_sources])
    outputs = [out_dir / name for name in OUTPUT_FILES] + [out_dir / f"{name}.annotated.mp4" for name in names]
    if file_identities(outputs) & file_identities(inputs):
        raise UserError(f"--out {out_dir} holds an input under the name of an output, which would destroy it; "
                        "choose another folder")
    model = frame_model(trained, backend, onnx_file, device)
    transform = eval_transform(trained.data_config())
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = trained.classes
    results: list[VideoResult] = []
    with (out_dir / "frames.csv").open("w", newline="") as frames_file:
        frames_csv = csv.writer(frames_file)
        frames_csv.writerow([csv_text(cell) for cell in ["video", "time_s", "frame_index",
                                                         *[f"prob_{c}" for c in classes],
                                                         *[f"smoothed_{c}" for c in classes], "predicted_label"]])
        try:
            for source, name in zip(all_sources, names):
                annotated = AnnotatedVideo(out_dir / f"{name}.annotated.mp4", classes, trained) if settings.annotate \
                    else None
                result = VideoResult(source.name)
                results.append(result)
                _predict_video(source, settings, trained, model, transform, frames_csv, frames_file, annotated, result)
                for problem in result.info.left_out:
                    report(f"{source.name}: {problem.reason}")
                if result.num_dropped:
                    report(f"{source.name}: {result.num_dropped} frames dropped: the model fell behind the stream")
                if result.error:
                    report(f"{source.name}: {result.error}")
                if result.status == "interrupted":
                    raise KeyboardInterrupt
        finally:  # also after Ctrl-C: what was predicted is written out
            _write_findings(out_dir / "findings.csv", results, classes)
            _write_videos(out_dir / "videos.csv", results)
            write_summary_html(out_dir / "summary.html", results, classes, settings, trained, backend,
                               model.precision)
    return results


def _predict_video(source: Source, settings: VideoSettings, trained: TrainedModel, model, transform, frames_csv,
                   frames_file, annotated, result: VideoResult) -> None:
    queue = FrameQueue(settings.queue_frames, drop_oldest=source.live)
    stop = threading.Event()
    reader = threading.Thread(target=read_frames, args=(source, settings, transform, queue, stop, result.info),
                              name="gastro-dist video reader", daemon=True)
    smoother = settings.smoothing.smoother()
    tracker = FindingTracker(settings.findings, len(trained.classes))
    classes = trained.classes
    started = time.perf_counter()

    def emit(item: DecodedFrame, raw: np.ndarray, smoothed: np.ndarray) -> None:
        result.latencies_s.append(time.perf_counter() - item.decoded_at)
        result.num_predicted += 1
        predicted = classes[int(smoothed.argmax())]
        frames_csv.writerow([csv_text(source.name), f"{item.time_s:.3f}",
                             "" if item.frame_index is None else item.frame_index, *map(full_precision, raw),
                             *map(full_precision, smoothed), csv_text(predicted)])
        tracker.add(item.time_s, smoothed, thumbnail=lambda: _thumbnail(item.image, result.info.rotation_deg))
        result.timeline.append((item.time_s, smoothed.astype(np.float32)))
        result.end_s = item.time_s
        if annotated is not None:
            cam = None
            if settings.cam_every and (result.num_predicted - 1) % settings.cam_every == 0:
                cam = _grad_cam(trained, item.tensor)
            annotated.result(item, smoothed, cam)

    reader.start()
    try:
        # a followed file's reader gives up after idle_timeout_s itself (a clean end): wait a little longer
        while (items := queue.take(settings.batch_size, wait_for_all=not source.live,
                                   timeout_s=settings.idle_timeout_s + 2.0)) is not None:
            if not items:
                if source.followed:  # nothing for idle_timeout_s: the stream has ended (a file ends by itself)
                    result.silent = True
                    break
                continue
            if annotated is not None:
                annotated.hold(items, result.info)
            batch = [item for item in items if item.tensor is not None]
            if batch:
                probabilities = model(torch.stack([item.tensor for item in batch]))
                for item, raw in zip(batch, probabilities):
                    for finished in smoother.add(item.time_s, raw, item):
                        emit(*finished)
            frames_file.flush()
    except KeyboardInterrupt:
        result.status = "interrupted"
    finally:
        stop.set()
        for finished in smoother.finish():
            emit(*finished)
        frames_file.flush()
        result.findings = tracker.finish()
        if annotated is not None:
            result.annotated = annotated.finish()
        reader.join(timeout=5)  # a live reader blocked in a network read is a daemon: it ends with the process
        result.wall_s = time.perf_counter() - started
        result.num_dropped, result.max_queue_frames = queue.num_dropped, queue.max_length
        if queue.error and not result.num_predicted:
            result.status, result.error = "failed", queue.error
        elif queue.error:
            result.error = f"stopped early: {queue.error}"
        elif result.silent:
            result.error = f"no frame for {settings.idle_timeout_s:g} s: the stream was taken as ended"


def _grad_cam(trained: TrainedModel, tensor: torch.Tensor) -> np.ndarray:
    from gastro_dist.evaluation.cam import grad_cam

    cams, _ = grad_cam(trained.model, tensor[None])
    return cams[0].numpy()


def _thumbnail(image: Image.Image, rotation_deg: int) -> Image.Image:
    picture = upright(image, rotation_deg)
    width_px = max(1, round(picture.width * THUMBNAIL_HEIGHT_PX / picture.height))
    return picture.resize((width_px, THUMBNAIL_HEIGHT_PX), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _write_findings(path: Path, results: list[VideoResult], classes: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "class", "start_s", "end_s", "duration_s", "peak", "peak_time_s", "mean"])
        for result in results:
            for finding in result.findings:
                writer.writerow([csv_text(result.name), csv_text(classes[finding.class_index]),
                                 f"{finding.start_s:.3f}", f"{finding.end_s:.3f}", f"{finding.duration_s:.3f}",
                                 f"{finding.peak:.6f}", f"{finding.peak_time_s:.3f}", f"{finding.mean:.6f}"])


def _write_videos(path: Path, results: list[VideoResult]) -> None:
    def number(value: float | None, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VIDEO_COLUMNS)
        for r in results:
            writer.writerow([csv_text(r.name), r.status, csv_text(r.error), r.info.num_read, r.num_predicted,
                             r.num_dropped, r.max_queue_frames, f"{r.end_s:.3f}", r.info.rotation_deg,
                             number(r.frames_per_s), number(r.latency_ms(50)), number(r.latency_ms(95)),
                             csv_text("; ".join(problem.reason for problem in r.info.left_out)),
                             csv_text(r.annotated), r.info.sha256])
