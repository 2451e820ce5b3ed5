"""Packing endoscopy videos: frames sampled per second, near duplicates and dark or blurred frames dropped,
labelled segments, one split per video, and broken videos rejected with a reason (tiny videos made here)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="needs the [video] extra: pip install 'gastro-dist[video]'")
from imagefactory import make_class_tree, read_index, read_jsonl, read_split
from PIL import Image, ImageFilter
from test_pack import all_samples, pack, write_manifest
from test_pack_hostile import fails_after

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data import video
from gastro_dist.data.shard_index import SPLITS

FPS = 5  # recorded frames per second: enough to sample at 1 fps, few enough to write in milliseconds
CODECS = {".mp4": "mpeg4", ".avi": "mjpeg", ".mkv": "ffv1", ".mov": "mpeg4"}


def scene(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Sharp random 8-px blocks: a distinct perceptual hash per seed and a high Laplacian variance."""
    blocks = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def blurred(seed: int) -> Image.Image:
    return scene(seed).filter(ImageFilter.GaussianBlur(3))


def dark(seed: int) -> Image.Image:
    return Image.fromarray(np.asarray(scene(seed)) // 25)


def write_video(path: Path, seconds: list[Image.Image], fps: int = FPS, keyframe_every: int = 12) -> Path:
    """One picture per second of recording, each held for a second (the scope standing still)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = CODECS[path.suffix.lower()]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = seconds[0].size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.bit_rate, stream.codec_context.gop_size = 4_000_000, keyframe_every
        for picture in seconds:
            for _ in range(fps):
                container.mux(stream.encode(av.VideoFrame.from_image(picture)))
        container.mux(stream.encode())
    return path


def frames_by_source(out: Path) -> dict[str, list[dict]]:
    """Sample metadata per source, each list in frame time order, with the split added."""
    frames = defaultdict(list)
    for split, samples in all_samples(out).items():
        for sample in samples:
            frames[sample["meta"]["source"]].append({**sample["meta"], "split": split, "img": sample["img"]})
    return {source: sorted(metas, key=lambda meta: meta["frame_time_s"] or 0) for source, metas in frames.items()}


def assert_video_totals(out: Path) -> dict:
    """Every input is packed, rejected or skipped; every sample is a still or a kept video frame."""
    totals = read_index(out)["totals"]
    assert totals["files_seen"] == totals["files_packed"] + totals["rejected"] + totals["skipped"]
    assert totals["packed"] == totals["files_packed"] - totals["videos_packed"] + totals["frames_from_videos"]
    assert totals["rejected"] == len(read_jsonl(out / "rejected.jsonl"))
    skipped = read_jsonl(out / "skipped.jsonl")  # whole entries, and parts of packed inputs left out
    assert (totals["skipped"], totals["parts_skipped"]) == (sum("part" not in e for e in skipped),
                                                            sum("part" in e for e in skipped))
    return totals


def test_videos_in_class_folders_are_sampled_without_near_duplicates_and_stay_in_one_split(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"normal": 3, "ulcer": 3})
    # scenes change every 2 s: sampling at 1 fps sees each scene twice, the second time as a near duplicate
    for number, extension in enumerate(CODECS):
        write_video(src / ("normal" if number % 2 else "ulcer") / f"proc{number}{extension}",
                    [scene(10 * number + second // 2) for second in range(6)])
    result = pack(src, tmp_path / "out", settings=dict(val_fraction=0.3))

    frames = frames_by_source(tmp_path / "out")
    for number, extension in enumerate(CODECS):
        metas = frames[f"{'normal' if number % 2 else 'ulcer'}/proc{number}{extension}"]
        assert [meta["frame_time_s"] for meta in metas] == [0.0, 2.0, 4.0], extension
        assert [meta["frame_index"] for meta in metas] == [0, 10, 20]
        assert {meta["source_kind"] for meta in metas} == {"video"} and len({meta["split"] for meta in metas}) == 1
        assert all(meta["orig_size"] == [64, 48] and meta["segment_s"] is None for meta in metas)
        assert len({meta["sha256"] for meta in metas}) == 1
    stills = [metas[0] for metas in frames.values() if metas[0]["source_kind"] == "image"]
    assert len(stills) == 6 and all(meta["frame_index"] is None and meta["frame_time_s"] is None for meta in stills)
    totals = assert_video_totals(tmp_path / "out")
    assert (totals["files_seen"], totals["files_packed"], totals["videos_packed"]) == (10, 10, 4)
    assert (totals["frames_from_videos"], totals["near_duplicate_frames_dropped"], totals["packed"]) == (12, 12, 18)
    assert (result.packed, result.frames_from_videos) == (18, 12)
    assert sum(read_index(tmp_path / "out")["splits"]["val"]["per_class"].values()) >= 2
    assert not list((tmp_path / "out").glob(".spool*"))  # the encoded frames' spool is gone
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_near_duplicate_bits_zero_keeps_every_sampled_frame_and_fps_sets_the_rate(tmp_path):
    src = tmp_path / "src"
    write_video(src / "a" / "still.mp4", [scene(1)] * 3)
    write_video(src / "b" / "still.mp4", [scene(2)] * 3)
    pack(src, tmp_path / "out", settings=dict(val_fraction=0, near_duplicate_bits=0, video_fps=2))
    frames = frames_by_source(tmp_path / "out")
    assert [meta["frame_time_s"] for meta in frames["a/still.mp4"]] == [0.0, 0.6, 1.0, 1.6, 2.0, 2.6]
    assert assert_video_totals(tmp_path / "out")["near_duplicate_frames_dropped"] == 0


def test_drop_blurry_drops_dark_and_blurred_frames_only_when_asked(tmp_path):
    src = tmp_path / "src"
    write_video(src / "a" / "mixed.mkv", [scene(1), blurred(2), dark(3), scene(4)])
    write_video(src / "b" / "mixed.mkv", [scene(5), blurred(6), scene(7)])
    pack(src, tmp_path / "kept", settings=dict(val_fraction=0))
    assert len(frames_by_source(tmp_path / "kept")["a/mixed.mkv"]) == 4

    pack(src, tmp_path / "out", settings=dict(val_fraction=0, blur_threshold=50.0))
    assert [meta["frame_time_s"] for meta in frames_by_source(tmp_path / "out")["a/mixed.mkv"]] == [0.0, 3.0]
    totals = assert_video_totals(tmp_path / "out")
    assert (totals["frames_from_videos"], totals["dark_or_blurry_frames_dropped"]) == (4, 3)


def test_segments_label_parts_of_a_video_bad_rows_are_rejected_and_frames_labelled_twice_are_left_out(tmp_path):
    src = tmp_path / "src"
    write_video(src / "day1" / "procedure.mp4", [scene(second) for second in range(6)])
    write_video(src / "day2" / "other.avi", [scene(100 + second) for second in range(4)])
    (src / "day2" / "still.jpg").write_bytes(b"")
    rows = [
        {"video": "day1/procedure.mp4", "start_s": "0", "end_s": "2", "label": "normal", "patient_id": "P1"},
        {"video": "day1/procedure.mp4", "start_s": "2.5", "end_s": "5", "label": "ulcer", "patient_id": "P1"},
        {"video": "day1/procedure.mp4", "start_s": "4", "end_s": "6", "label": "normal", "patient_id": "P1"},
        {"video": "day2/other.avi", "start_s": "1", "end_s": "3", "label": "normal", "patient_id": "P2"},
        {"video": "day2/other.avi", "start_s": "3", "end_s": "4", "label": "ulcer", "patient_id": ""},
        {"video": "day2/other.avi", "start_s": "9", "end_s": "12", "label": "ulcer", "patient_id": "P2"},
        {"video": "day2/other.avi", "start_s": "x", "end_s": "1", "label": "ulcer", "patient_id": "P2"},
        {"video": "day2/other.avi", "start_s": "2", "end_s": "1", "label": "ulcer", "patient_id": "P2"},
        {"video": "day2/still.jpg", "start_s": "0", "end_s": "1", "label": "ulcer", "patient_id": "P2"},
    ]
    segments = write_manifest(tmp_path / "segments.csv", rows)
    assert main(["pack", str(src), "--out", str(tmp_path / "out"), "--segments", str(segments), "--workers", "1",
                 "--input-size", "32", "--resize-short", "48", "--val-fraction", "0", "--near-duplicate-bits", "0"]) == 0

    samples = [sample["meta"] for split in SPLITS for sample in read_split(tmp_path / "out", split)]
    times = defaultdict(list)
    for meta in samples:
        times[(meta["source"], meta["label"], tuple(meta["segment_s"]))].append(meta["frame_time_s"])
    assert {key: sorted(values) for key, values in times.items()} == {
        ("day1/procedure.mp4", "normal", (0.0, 2.0)): [0.0, 1.0],
        ("day1/procedure.mp4", "ulcer", (2.5, 5.0)): [2.6, 3.6],  # the first frame of each second from 2.5 s
        ("day1/procedure.mp4", "normal", (4.0, 6.0)): [5.0],  # 4-5 s is labelled twice: kept out of both
        ("day2/other.avi", "normal", (1.0, 3.0)): [1.0, 2.0],
        ("day2/other.avi", "ulcer", (3.0, 4.0)): [3.0],
    }
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [(entry["path"], entry.get("segment_s"), entry.get("segments_row"), entry["reason"]) for entry in rejected] == [
        ("day2/other.avi", None, 8, "bad segment: start_s 'x' and end_s '1' must be numbers of seconds"),
        ("day2/other.avi", None, 9, "bad segment: start_s 2 and end_s 1 must satisfy 0 <= start_s < end_s"),
        ("day2/other.avi", [9.0, 12.0], None, "no frames: nothing to decode (in the segment)"),
    ]
    assert read_jsonl(tmp_path / "out" / "skipped.jsonl") == [
        {"path": "day2/still.jpg", "reason": "not a video extension", "label": "ulcer"},
        {"path": "day1/procedure.mp4", "label": "normal", "patient_id": "P1", "segment_s": [4.0, 6.0], "part": "4-5 s",
         "reason": "label conflict: the same frames are labelled ulcer in day1/procedure.mp4 2.5-5 s; "
                   "kept out under both labels"},
        {"path": "day1/procedure.mp4", "label": "ulcer", "patient_id": "P1", "segment_s": [2.5, 5.0], "part": "4-5 s",
         "reason": "label conflict: the same frames are labelled normal in day1/procedure.mp4 4-6 s; "
                   "kept out under both labels"}]
    totals = assert_video_totals(tmp_path / "out")
    assert (totals["files_seen"], totals["files_packed"], totals["videos_packed"]) == (9, 5, 5)
    assert (totals["parts_skipped"], totals["label_conflicts"]) == (2, 1)


def test_a_segment_seconds_after_the_last_keyframe_is_read(tmp_path):
    """After seeking, the frames from the keyframe to the segment's start are decoded too: 300 here, more than
    the frames-per-second bound allows for one second, which must not count against the video."""
    write_video(tmp_path / "src" / "long_gop.mp4", [scene(second) for second in range(7)], fps=60, keyframe_every=600)
    segments = write_manifest(tmp_path / "segments.csv", [
        {"video": "long_gop.mp4", "start_s": "5", "end_s": "7", "label": "a"},
        {"video": "long_gop.mp4", "start_s": "0", "end_s": "1", "label": "b"}])
    pack(tmp_path / "src", tmp_path / "out", segments=segments, settings=dict(val_fraction=0))
    assert read_jsonl(tmp_path / "out" / "rejected.jsonl") == []
    times = sorted(meta["frame_time_s"] for meta in frames_by_source(tmp_path / "out")["long_gop.mp4"])
    assert times == [0.0, 5.0, 6.0]


def test_broken_or_oversized_videos_are_rejected_with_reasons_and_never_hang(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"a": 2, "b": 2})
    good = write_video(src / "a" / "good.mp4", [scene(1), scene(2)])
    (src / "a" / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (src / "a" / "empty.mov").write_bytes(b"")
    (src / "b" / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    write_video(src / "b" / "long.avi", [scene(second) for second in range(4)])
    (src / "b" / "huge.mkv").write_bytes(bytes(2_000_001))
    os.mkfifo(src / "b" / "pipe.mp4")
    with fails_after(30):
        pack(src, tmp_path / "out", settings=dict(max_frames_per_video=3, max_video_mb=2))

    reasons = {entry["path"]: entry["reason"] for entry in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert reasons["a/garbage.mp4"] == "not a video: InvalidDataError: Invalid data found when processing input"
    assert reasons["a/empty.mov"] == "empty file"
    assert reasons["b/cut.mp4"].startswith("not a video: ")
    assert reasons["b/long.avi"] == ("too many frames: more than 3 sampled "
                                    "(raise --max-frames-per-video or lower --video-fps)")
    assert reasons["b/huge.mkv"] == "file too large: 2000001 bytes, the limit is 2000000"
    assert {entry["path"]: entry["reason"] for entry in read_jsonl(tmp_path / "out" / "skipped.jsonl")} == {
        "b/pipe.mp4": "not a regular file: FIFO"}
    assert all(str(tmp_path) not in reason for reason in reasons.values())  # reasons never carry paths
    assert read_index(tmp_path / "out")["rejected_by_reason"] == {
        "not a video": 2, "empty file": 1, "too many frames": 1, "file too large": 1}
    assert assert_video_totals(tmp_path / "out")["videos_packed"] == 1


def test_without_pyav_packing_videos_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    write_video(tmp_path / "src" / "a" / "v.mp4", [scene(1)])
    monkeypatch.setattr(video, "av", None)
    with pytest.raises(UserError, match=r"pip install 'gastro-dist\[video\]'"):
        pack(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_review_decisions_on_a_videos_frames_move_or_leave_out_those_frames_only(tmp_path):
    """`pack --relabel` with label-issues' frame_index: one frame of a video relabelled, one excluded, a whole
    video excluded (no frame_index), and decisions about a frame not packed and a still's "frame" listed, not
    applied; the index counts each frame under its own class."""
    import csv

    src = tmp_path / "src"
    make_class_tree(src, {"normal": 2, "ulcer": 2})
    write_video(src / "normal" / "proc.mp4", [scene(second) for second in range(3)])
    write_video(src / "ulcer" / "other.mkv", [scene(50 + second) for second in range(2)])
    settings = dict(val_fraction=0, near_duplicate_bits=0)
    pack(src, tmp_path / "before", settings=settings)
    frames = frames_by_source(tmp_path / "before")
    assert [meta["frame_index"] for meta in frames["normal/proc.mp4"]] == [0, 5, 10]
    still = next(source for source in frames if source.endswith(".png") or source.endswith(".jpg"))
    sha = {source: metas[0]["sha256"] for source, metas in frames.items()}
    decisions = tmp_path / "decisions.csv"
    with decisions.open("w", newline="") as handle:
        csv.writer(handle).writerows([
            ["source", "sha256", "frame_index", "decision", "new_label"],
            ["normal/proc.mp4", sha["normal/proc.mp4"], "5", "relabel", "ulcer"],
            ["normal/proc.mp4", sha["normal/proc.mp4"], "10", "exclude", ""],
            ["normal/proc.mp4", sha["normal/proc.mp4"], "3", "keep", ""],  # not a sampled frame
            ["ulcer/other.mkv", sha["ulcer/other.mkv"], "", "exclude", ""],
            [still, sha[still], "0", "keep", ""]])
    pack(src, tmp_path / "after", settings=settings, relabel=decisions)

    after = frames_by_source(tmp_path / "after")
    assert [(meta["frame_index"], meta["label"]) for meta in after["normal/proc.mp4"]] == [(0, "normal"), (5, "ulcer")]
    assert "ulcer/other.mkv" not in after
    index = read_index(tmp_path / "after")
    per_class = index["splits"]["train"]["per_class"]
    packed = [meta["label"] for metas in after.values() for meta in metas if meta["split"] == "train"]
    assert per_class == {label: packed.count(label) for label in ("normal", "ulcer")}
    assert index["relabel"]["applied"] == {"keep": 0, "relabel": 1, "exclude": 2} and index["relabel"]["not_applied"] == 2
    skipped = read_jsonl(tmp_path / "after" / "skipped.jsonl")
    assert [(entry["path"], entry.get("part"), entry["reason"]) for entry in skipped] == [
        ("normal/proc.mp4", "frame 10", "excluded on review"), ("ulcer/other.mkv", None, "excluded on review")]
    unmatched = read_jsonl(tmp_path / "after" / "relabel_unmatched.jsonl")
    assert [(entry["source"], entry["frame_index"], entry["reason"].split(" (")[0]) for entry in unmatched] == [
        ("normal/proc.mp4", 3, "frame 3 is not among the frames packed from this recording"),
        (still, 0, "a frame_index for a still image, which has no frames")]
    totals = assert_video_totals(tmp_path / "after")
    assert (totals["videos_packed"], totals["frames_from_videos"], totals["parts_skipped"]) == (1, 2, 1)
    assert main(["verify", str(tmp_path / "after")]) == 0
