"""`predict-video` on live input: a named pipe fed faster than a deliberately slowed model consumes it.
Frames are dropped (oldest first) and counted, the queue never holds more than its cap, the outputs are
valid, and Ctrl-C closes them; the centred smoothing, which needs future frames, is refused."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

av = pytest.importorskip("av", reason="needs the [video] extra: pip install 'gastro-dist[video]'")
from test_pack_hostile import fails_after
from test_predict_video import BLUE, RED, colour_model, read_csv, run, write_clip  # noqa: F401 (run: a fixture)

from gastro_dist.cli import main
from gastro_dist.evaluation import video_predict


def feed_pipe(pipe: Path, data: bytes) -> threading.Thread:
    """A writer thread that pushes the whole stream into the pipe as fast as the reader takes it."""
    def write() -> None:
        try:
            with open(pipe, "wb") as f:
                for start in range(0, len(data), 4096):
                    f.write(data[start:start + 4096])
        except BrokenPipeError:  # the reader stopped first (Ctrl-C)
            pass
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def test_a_named_pipe_faster_than_the_model_drops_the_oldest_frames_within_the_queue_cap(run, tmp_path, monkeypatch,
                                                                                          capsys):
    stream = write_clip(tmp_path / "stream.ts", [RED] * 40 + [BLUE] * 40, fps=25, size=(64, 48), format="mpegts")
    pipe = tmp_path / "scope.pipe"
    os.mkfifo(pipe)
    lengths = []

    def slow_model(self, images):
        time.sleep(0.05)  # 50 ms a batch: far slower than the pipe delivers
        return colour_model(self, images)

    monkeypatch.setattr(video_predict.TorchFrameModel, "__call__", slow_model)
    original_put = video_predict.FrameQueue.put

    def recording_put(self, item, stop):
        original_put(self, item, stop)
        lengths.append(len(self._items))

    monkeypatch.setattr(video_predict.FrameQueue, "put", recording_put)
    writer = feed_pipe(pipe, stream.read_bytes())
    with fails_after(60):
        assert main(["predict-video", "--run", str(run), str(pipe), "--out", str(tmp_path / "out"),
                     "--queue-frames", "4", "--batch-size", "2", "--annotate"]) == 0
    writer.join(timeout=5)
    err = capsys.readouterr().err
    videos = read_csv(tmp_path / "out" / "videos.csv")[0]
    dropped = int(videos["frames_dropped"])
    assert dropped > 0 and f"{pipe}: {dropped} frames dropped: the model fell behind the stream" in err
    assert int(videos["frames_predicted"]) + dropped == int(videos["frames_read"]) == 80
    assert max(lengths) <= 4 and int(videos["max_queue_frames"]) <= 4  # memory bounded by the queue's cap
    frames = read_csv(tmp_path / "out" / "frames.csv")
    times = [float(row["time_s"]) for row in frames]
    assert len(frames) == int(videos["frames_predicted"]) and times == sorted(times) and times[-1] > 2.5
    assert frames[-1]["predicted_label"] == "<b>blue</b> mucosa"
    with av.open(str(tmp_path / "out" / "scope.annotated.mp4")) as container:  # the frames the model saw
        assert sum(1 for _ in container.decode(video=0)) == len(frames)
    assert "<svg" in (tmp_path / "out" / "summary.html").read_text()


def test_ctrl_c_closes_the_outputs_and_live_input_refuses_the_centred_window(run, tmp_path, monkeypatch, capsys):
    stream = write_clip(tmp_path / "stream.ts", [RED] * 30, fps=25, size=(64, 48), format="mpegts")
    pipe = tmp_path / "scope.pipe"
    os.mkfifo(pipe)
    assert main(["predict-video", "--run", str(run), str(pipe), "--out", str(tmp_path / "refused"),
                 "--smoothing", "centred"]) == 2
    assert "live input takes the causal --smoothing ema" in capsys.readouterr().err
    calls = []

    def interrupted_model(self, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return colour_model(self, images)

    monkeypatch.setattr(video_predict.TorchFrameModel, "__call__", interrupted_model)
    writer = feed_pipe(pipe, stream.read_bytes())
    with fails_after(60):
        assert main(["predict-video", "--run", str(run), str(pipe), "--out", str(tmp_path / "out"),
                     "--batch-size", "1"]) == 130
    writer.join(timeout=5)
    assert capsys.readouterr().err.strip().endswith("interrupted")
    assert len(read_csv(tmp_path / "out" / "frames.csv")) == 2
    assert read_csv(tmp_path / "out" / "videos.csv")[0]["status"] == "interrupted"
    assert (tmp_path / "out" / "summary.html").read_text().endswith("</html>\n")


def test_a_file_still_being_written_is_followed_until_it_stops_growing(run, tmp_path, monkeypatch):
    monkeypatch.setattr(video_predict.TorchFrameModel, "__call__", colour_model)
    data = write_clip(tmp_path / "whole.ts", [RED] * 20 + [BLUE] * 20, fps=25, size=(64, 48),
                      format="mpegts").read_bytes()
    growing = tmp_path / "recording.ts"
    growing.write_bytes(data[: len(data) // 3])

    def keep_recording() -> None:
        time.sleep(0.5)
        with growing.open("ab") as f:
            f.write(data[len(data) // 3:])

    recorder = threading.Thread(target=keep_recording, daemon=True)
    recorder.start()
    with fails_after(30):
        assert main(["predict-video", "--run", str(run), str(growing), "--out", str(tmp_path / "out"), "--live",
                     "--idle-timeout-s", "1.5"]) == 0
    videos = read_csv(tmp_path / "out" / "videos.csv")[0]
    assert (videos["frames_read"], videos["frames_dropped"], videos["error"]) == ("40", "0", "")
