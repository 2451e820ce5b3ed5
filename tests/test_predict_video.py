"""`predict-video` on recorded files: smoothing and findings, the CSVs, the annotated copy (frame rate and
duration of the original), summary.html, PyTorch against ONNX Runtime, and odd or hostile videos (variable
frame rate, rotation, audio, large frames, a damaged middle, empty and non-video files, container metadata
that must not reach any output). Videos are a few seconds of 64x48 to 96x72 frames written here with PyAV;
the run is an untrained tiny model (what is tested does not depend on what it learned), and where timing
matters a model whose probabilities follow the frame's colour stands in for it."""

from __future__ import annotations

import csv
import fractions
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="needs the [video] extra: pip install 'gastro-dist[video]'")
from PIL import Image
from conftest import write_untrained_run
from test_pack_hostile import fails_after
from test_pack_video import scene, write_video

from gastro_dist.cli import main
from gastro_dist.evaluation import video_predict
from gastro_dist.evaluation.video_timeline import FindingRules, FindingTracker, Smoothing

# Any names: model.json's, written into CSV cells, HTML and the video as untrusted text.
CLASSES = ["=red lesion", "<b>blue</b> mucosa", "Barrett's"]
RED, BLUE, GREEN, GREY = (220, 30, 30), (30, 30, 220), (30, 220, 30), (128, 128, 128)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_untrained_run(tmp_path_factory.mktemp("untrained") / "run", CLASSES, image_size=48, temperature=1.5)


def colour_model(self, images: torch.Tensor) -> np.ndarray:
    """Stands in for the network: class 0 follows the red channel, class 1 the blue one, class 2 the green one."""
    red, green, blue = images.mean(dim=(2, 3)).unbind(dim=1)
    logits = 4 * torch.stack([red, blue, green], dim=1)
    return torch.softmax(logits, dim=1).numpy().astype(np.float64)


def write_clip(path: Path, colours: list[tuple[int, int, int]], fps: int = 10, size=(96, 72),
               codec: str = "mpeg4", metadata: dict | None = None, format: str | None = None) -> Path:
    """One frame per colour, at `fps`, with a little texture so that the encoder has something to code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 20, (size[1], size[0], 3), dtype=np.uint8)
    with av.open(str(path), "w", format=format) as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for colour in colours:
            pixels = np.clip(np.array(colour, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def probe(path: Path) -> tuple[int, float, float]:
    """(frames, average frame rate, duration in seconds) as a player would read them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        num_frames = sum(1 for _ in container.decode(stream))
        duration_s = float(container.duration / av.time_base)
        return num_frames, float(stream.average_rate), duration_s


# ---------------------------------------------------------------- smoothing and findings
def test_smoothing_latency_and_values():
    times_s = np.arange(20) / 10
    raw = [np.array([float(t >= 1.0), float(t < 1.0)]) for t in times_s]  # a step at 1 s

    none = Smoothing("none").smoother()
    assert [len(none.add(t, r, t)) for t, r in zip(times_s, raw)] == [1] * 20
    ema = Smoothing("ema", window_s=0.4).smoother()
    ema_out = [ema.add(t, r, t)[0][2][0] for t, r in zip(times_s, raw)]
    assert ema_out[9] == 0 and ema_out[10] == pytest.approx(1 - math.exp(-0.1 / 0.2))  # causal, tau = window_s / 2
    assert Smoothing("ema").latency_s == 0 and Smoothing("centred", 0.4).latency_s == 0.2

    centred = Smoothing("centred", window_s=0.4).smoother()
    emitted = []
    for t, r in zip(times_s, raw):
        emitted.append([payload for payload, _, _ in centred.add(t, r, t)])
    # a frame's value is known once the frame 0.2 s after it has arrived: its latency
    assert emitted[0] == [] and emitted[1] == [] and emitted[2] == [0.0] and emitted[3] == [pytest.approx(0.1)]
    rest = centred.finish()
    assert [payload for payload, _, _ in rest] == pytest.approx(list(times_s[-2:]))
    values = {}
    smoother = Smoothing("centred", window_s=0.4).smoother()
    for t, r in zip(times_s, raw):
        values.update({payload: smoothed[0] for payload, _, smoothed in smoother.add(t, r, t)})
    values.update({payload: smoothed[0] for payload, _, smoothed in smoother.finish()})
    assert values[times_s[10]] == pytest.approx(3 / 5) and values[times_s[7]] == 0 and values[times_s[12]] == 1
    with pytest.raises(Exception, match="--smoothing must be one of"):
        Smoothing("median")


def test_findings_merge_close_stretches_and_drop_short_ones():
    rules = FindingRules(threshold=0.5, min_duration_s=1.0, merge_gap_s=0.5)
    tracker = FindingTracker(rules, num_classes=2)
    # class 0: above 1.0-2.0 s, a 0.3 s dip, above 2.3-3.0 s (one finding); a 0.5 s blip at 5.0 s (too short)
    probabilities = {}
    for step in range(80):
        t = round(step / 10, 1)
        above = 1.0 <= t < 2.0 or 2.3 <= t < 3.0 or 5.0 <= t < 5.5
        probabilities[t] = 0.9 if t == 2.5 else 0.8 if above else 0.2
        tracker.add(t, np.array([probabilities[t], 1 - probabilities[t]]), thumbnail=lambda t=t: f"frame {t}")
    findings = [f for f in tracker.finish() if f.class_index == 0]
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.start_s, finding.end_s, finding.duration_s) == (1.0, 3.0, 2.0)
    assert (finding.peak, finding.peak_time_s, finding.peak_thumbnail) == (0.9, 2.5, "frame 2.5")
    inside = [p for t, p in probabilities.items() if 1.0 <= t < 3.0]
    assert finding.mean == pytest.approx(np.mean(inside))  # the dip's frames count
    # class 1 is above everywhere else: its stretches are merged where under 0.5 s apart, and the last is open
    class_1 = [(f.start_s, f.end_s) for f in tracker.finish() if f.class_index == 1]
    assert class_1[-1] == pytest.approx((3.0, 8.0))  # open until the end: the last frame lasts one frame interval


# ---------------------------------------------------------------- end to end
def test_predict_video_end_to_end_csvs_annotated_copy_and_summary(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(video_predict.TorchFrameModel, "__call__", colour_model)
    clip = write_clip(tmp_path / "in" / "procedure.mp4", [GREEN] * 10 + [RED] * 20 + [BLUE] * 10)  # 4 s at 10 fps
    out = tmp_path / "out"
    assert main(["predict-video", "--run", str(run), str(clip), "--out", str(out), "--smoothing", "centred",
                 "--window-s", "0.4", "--threshold", "0.6", "--min-duration-s", "0.5", "--annotate",
                 "--cam-every", "10", "--batch-size", "4"]) == 0
    assert "40 frames predicted, 3 findings" in capsys.readouterr().out

    frames = read_csv(out / "frames.csv")
    assert [float(row["time_s"]) for row in frames] == pytest.approx([k / 10 for k in range(40)])
    assert [int(row["frame_index"]) for row in frames] == list(range(40))
    assert list(frames[0])[3:9] == ["prob_=red lesion", "prob_<b>blue</b> mucosa", "prob_Barrett's",
                                    "smoothed_=red lesion", "smoothed_<b>blue</b> mucosa", "smoothed_Barrett's"]
    for row in frames:
        values = [float(v) for k, v in row.items() if k.startswith(("prob_", "smoothed_"))]
        assert sum(values[:3]) == pytest.approx(1) and sum(values[3:]) == pytest.approx(1)
    assert frames[15]["predicted_label"] == "'=red lesion" and frames[35]["predicted_label"] == "<b>blue</b> mucosa"

    findings = read_csv(out / "findings.csv")
    assert [(f["class"], float(f["start_s"]), float(f["end_s"])) for f in findings] == [
        ("Barrett's", 0.0, pytest.approx(1.0, abs=0.15)),
        ("'=red lesion", pytest.approx(1.0, abs=0.15), pytest.approx(3.0, abs=0.15)),
        ("<b>blue</b> mucosa", pytest.approx(3.0, abs=0.15), pytest.approx(4.0, abs=0.05))]
    assert all(float(f["peak"]) >= float(f["mean"]) > 0.6 for f in findings)

    videos = read_csv(out / "videos.csv")
    assert [(v["status"], v["frames_read"], v["frames_predicted"], v["frames_dropped"]) for v in videos] == [
        ("predicted", "40", "40", "0")]
    assert videos[0]["annotated"] == "procedure.annotated.mp4"
    num_frames, rate, duration_s = probe(out / "procedure.annotated.mp4")
    original = probe(clip)
    assert (num_frames, rate) == original[:2] == (40, 10.0)
    assert duration_s == pytest.approx(original[2], abs=0.11)

    page = (out / "summary.html").read_text()
    assert "<svg" in page and page.count("data:image/jpeg;base64,") == 3
    assert "&lt;b&gt;blue&lt;/b&gt; mucosa" in page and "<b>blue</b>" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "latency 0.2 s" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # as a browser reads it, with every host name unresolvable: nothing is fetched
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                              "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", (out / "summary.html").as_uri()],
                             capture_output=True, text=True, timeout=60).stdout
        assert dom.count("<polyline") == 3 and dom.count("<img") == 3 and "&lt;b&gt;blue&lt;/b&gt; mucosa" in dom


def test_fps_predicts_a_sample_and_the_annotated_copy_keeps_every_frame(run, tmp_path, monkeypatch):
    monkeypatch.setattr(video_predict.TorchFrameModel, "__call__", colour_model)
    clip = write_clip(tmp_path / "clip.mkv", [RED] * 15 + [BLUE] * 15)
    out = tmp_path / "out"
    assert main(["predict-video", "--run", str(run), str(clip), "--out", str(out), "--fps", "2", "--annotate"]) == 0
    assert [float(row["time_s"]) for row in read_csv(out / "frames.csv")] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert probe(out / "clip.annotated.mp4")[:2] == (30, 10.0)


def test_torch_and_onnx_runtime_give_the_same_probabilities(run, tmp_path):
    """Tolerance: 1e-4 absolute per probability (float32 on both; `export`'s own check uses the same)."""
    clip = write_clip(tmp_path / "clip.mp4", [RED, BLUE, GREY, (90, 160, 40)] * 3)
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(onnx_file)]) == 0
    for backend in ("torch", "onnx"):
        assert main(["predict-video", "--run", str(run), str(clip), "--out", str(tmp_path / backend),
                     "--backend", backend, *(["--onnx", str(onnx_file)] if backend == "onnx" else [])]) == 0
    probabilities = {backend: np.array([[float(v) for k, v in row.items() if k.startswith("prob_")]
                                        for row in read_csv(tmp_path / backend / "frames.csv")])
                     for backend in ("torch", "onnx")}
    assert probabilities["torch"].shape == (12, 3)
    assert np.abs(probabilities["torch"] - probabilities["onnx"]).max() < 1e-4


def test_onnx_backend_mistakes_are_one_line(run, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", [RED] * 3)
    assert main(["predict-video", "--run", str(run), str(clip), "--out", str(tmp_path / "a"), "--backend", "onnx"]) == 2
    assert "needs the exported file: --onnx FILE" in capsys.readouterr().err
    assert main(["predict-video", "--run", str(run), str(clip), "--out", str(tmp_path / "b"), "--backend", "onnx",
                 "--onnx", str(tmp_path / "absent.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.onnx or its sidecar" in err
    other = tmp_path / "other.onnx"  # exported from a run with other classes: refused before it is loaded
    other.write_bytes(b"onnx")
    (tmp_path / "other.onnx.json").write_text(json.dumps({"classes": ["a", "b", "c"], "input_size": 48,
                                                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                          "temperature": 1.5}))
    assert main(["predict-video", "--run", str(run), str(clip), "--out", str(tmp_path / "d"), "--backend", "onnx",
                 "--onnx", str(other)]) == 2
    assert "was not exported from this run (classes differ)" in capsys.readouterr().err
    assert main(["predict-video", "--run", str(run), str(clip), "--out", str(tmp_path / "c"), "--cam-every", "3"]) == 2
    assert "add --annotate" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_bf16_probabilities_are_within_2e_2_of_cpu_float32(run, tmp_path):
    from gastro_dist.evaluation.inference import load_trained_model
    from gastro_dist.evaluation.video_predict import VideoSettings, predict_videos

    clip = write_clip(tmp_path / "clip.mp4", [RED, BLUE, GREEN, GREY] * 3)
    probabilities = {}
    for device in ("cpu", "cuda"):
        predict_videos(load_trained_model(run), [str(clip)], tmp_path / device, VideoSettings(),
                       device=torch.device(device))
        probabilities[device] = np.array([[float(v) for k, v in row.items() if k.startswith("prob_")]
                                          for row in read_csv(tmp_path / device / "frames.csv")])
    assert np.abs(probabilities["cpu"] - probabilities["cuda"]).max() < 2e-2


# ---------------------------------------------------------------- odd and hostile videos
SECRETS = {"title": "Patient Jane Doe 1957-03-02", "comment": "device serial SN-4471-XK", "artist": "Dr Who"}


def variable_frame_rate(path: Path) -> Path:
    """Frames at irregular times (0, 40, 50, 300, 310, 900 ms ...), as a capture card under load writes them."""
    times_ms = [0, 40, 50, 300, 310, 900, 1000, 1500]
    with av.open(str(path), "w") as container:
        container.metadata.update(SECRETS)
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for k, time_ms in enumerate(times_ms):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), (20 * k, 80, 120)))
            frame.pts, frame.time_base = time_ms, fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def with_rotation_audio_and_metadata(path: Path) -> Path:
    """A phone-style recording: display rotation 90 degrees, an AAC track, and names in the container."""
    with av.open(str(path), "w") as container:
        container.metadata.update(SECRETS)
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.metadata["title"] = SECRETS["title"]
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        if hasattr(stream, "set_display_rotation"):
            stream.set_display_rotation(90)
        for k in range(10):
            container.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (64, 48), RED))))
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1600), dtype=np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, 1600 * k
            container.mux(audio.encode(samples))
        container.mux(stream.encode())
        container.mux(audio.encode())
    return path


def test_odd_and_hostile_videos_one_line_each_and_no_container_metadata_in_any_output(run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    vfr = variable_frame_rate(folder / "vfr.mkv")
    rotated = with_rotation_audio_and_metadata(folder / "rotated.mp4")
    large = write_clip(folder / "large.mkv", [GREY, RED], size=(1920, 1080), fps=25)
    whole = write_video(tmp_path / "whole.mkv", [scene(second) for second in range(10)])  # as pack's damage test
    data = bytearray(whole.read_bytes())
    data[len(data) // 2: len(data) // 2 + 200] = bytes(200)
    (folder / "damaged.mkv").write_bytes(bytes(data))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a video, a text file named like one\n" * 20)
    inputs = [vfr, rotated, large, folder / "damaged.mkv", folder / "empty.mp4", folder / "notes.mp4",
              folder / "absent.mp4"]
    out = tmp_path / "out"
    with fails_after(60):
        status = main(["predict-video", "--run", str(run), *map(str, inputs), "--out", str(out), "--annotate",
                       "--cam-every", "4"])
    assert status == 1  # some videos gave nothing; the others were predicted
    err = capsys.readouterr().err
    lines: dict[str, list[str]] = {}
    for line in err.strip().splitlines():
        video_name, reason = line.split(": ", 1)
        lines.setdefault(video_name, []).append(reason)
    assert lines.pop(str(folder / "empty.mp4")) == ["empty file"]
    assert [reason.split(":")[0] for reason in lines.pop(str(folder / "notes.mp4"))] == ["not a video"]
    assert "No such file or directory" in lines.pop(str(folder / "absent.mp4"))[0]
    assert lines.pop(str(folder / "damaged.mkv"))[0].startswith("corrupt video: ")
    assert not lines  # the variable frame rate, the rotation and the large frames are no problem

    videos = {row["video"]: row for row in read_csv(out / "videos.csv")}
    assert len(videos) == len(inputs)
    frames = read_csv(out / "frames.csv")
    times = {}
    for row in frames:
        times.setdefault(row["video"], []).append(float(row["time_s"]))
    assert times[str(vfr)] == [0.0, 0.04, 0.05, 0.3, 0.31, 0.9, 1.0, 1.5]
    assert len(times[str(rotated)]) == 10 and videos[str(rotated)]["rotation_deg"] in ("90", "270")
    assert len(times[str(large)]) == 2
    damaged = videos[str(folder / "damaged.mkv")]
    assert damaged["status"] == "predicted" and 30 <= int(damaged["frames_predicted"]) < 50
    assert damaged["damage"].startswith("corrupt video: ")
    assert [videos[str(folder / name)]["status"] for name in ("empty.mp4", "notes.mp4", "absent.mp4")] == ["failed"] * 3
    # the rotated recording is annotated upright, as a player shows the original
    with av.open(str(out / "rotated.annotated.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (48, 64)
        assert not container.streams.audio
    for path in out.iterdir():
        data = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, (path.name, secret)


def test_bench_video_reports_speed_latency_and_whether_it_keeps_up(tmp_path, capsys):
    figures = tmp_path / "bench.json"
    assert main(["bench", "video", "--model", "shufflenet_v2_x0_5", "--image-size", "48", "--seconds", "1",
                 "--fps", "10", "--width", "64", "--height", "48", "--batch-size", "2", "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())
    assert result["frames_per_s"] > 0 and result["as_fast_as_possible"]["frames_predicted"] == 10
    assert result["realtime_frames_predicted"] + result["realtime_frames_dropped"] == 10
    assert 0 < result["realtime_latency_p50_ms"] <= result["realtime_latency_p95_ms"]
    assert isinstance(result["keeps_up"], bool) and "keeps up" in capsys.readouterr().out
