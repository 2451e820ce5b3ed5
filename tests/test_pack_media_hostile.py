"""Hostile videos and DICOMs (issue 21): frames that grow past the pixel limit, files that expand past
--max-file-mb, copies and links of one video under other labels, and videos cut short or damaged inside.
Each is packed up to the damage or kept out, with a reason; memory stays under 1 GB (measured in a subprocess)."""

from __future__ import annotations

import fractions
import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="needs the [video] extra: pip install 'gastro-dist[video]'")
pytest.importorskip("pydicom", reason="needs the [dicom] extra: pip install 'gastro-dist[dicom]'")
from imagefactory import read_index, read_jsonl
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, VLEndoscopicImageStorage, generate_uid
from test_pack import write_manifest
from test_pack_dicom import two_halves, write_dicom
from test_pack_video import assert_video_totals, frames_by_source, scene, write_video

from gastro_dist.cli import main

REPO = Path(__file__).resolve().parents[1]
MAX_PEAK_BYTES = 1 << 30
FPS = 5


def flat_grey_jpeg(width_px: int, height_px: int) -> bytes:
    """A valid baseline JPEG of any size in a few bytes per 32 pixels: every 8x8 block is 'DC unchanged, end of
    block' under the standard tables (decoding it really allocates width x height)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="JPEG")
    small = buffer.getvalue()
    frame_header, scan_header = small.find(b"\xff\xc0"), small.find(b"\xff\xda")
    header = bytearray(small[:scan_header + 2 + int.from_bytes(small[scan_header + 2:scan_header + 4], "big")])
    header[frame_header + 5:frame_header + 9] = height_px.to_bytes(2, "big") + width_px.to_bytes(2, "big")
    num_blocks = -(-width_px // 8) * -(-height_px // 8)
    return bytes(header) + b"\x28\xa2\x8a" * (num_blocks // 4 + 1) + b"\xff\xd9"  # '00' '1010' per block


def jpeg_of(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_mjpeg(path: Path, pictures: list[bytes]) -> Path:
    """An MJPEG AVI whose packets are the given JPEGs as they are (their sizes may differ from the stream's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for number, picture in enumerate(pictures):
            packet = av.Packet(picture)
            packet.stream, packet.pts, packet.dts = stream, number, number
            packet.time_base = fractions.Fraction(1, FPS)
            container.mux(packet)
    return path


def growing_mjpeg(path: Path) -> Path:
    """3 s at 64x48 with one 16000x16000 frame at 1 s (3.5 GB of peak memory before the per-frame check)."""
    pictures = [jpeg_of(scene(number // FPS)) for number in range(3 * FPS)]
    pictures[5] = flat_grey_jpeg(16000, 16000)  # at 1.0 s: a sampled frame
    return write_mjpeg(path, pictures)


def deflated_bomb(path: Path, inflated_bytes: int) -> Path:
    """A deflated DICOM of a few MB whose data set inflates to `inflated_bytes` (pixel data of zeros)."""
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = VLEndoscopicImageStorage, generate_uid()
    dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = 48, 64, 1
    dataset.PhotometricInterpretation, dataset.PixelRepresentation = "MONOCHROME2", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    elements = DicomBytesIO()
    elements.is_little_endian, elements.is_implicit_VR = True, False
    write_dataset(elements, dataset)
    pixel_data_bytes = inflated_bytes - len(elements.getvalue()) - 12
    pixel_data_header = b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_data_bytes.to_bytes(4, "little")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(elements.getvalue() + pixel_data_header) + compressor.flush(zlib.Z_FULL_FLUSH)
    chunk_bytes = 1 << 20  # after a full flush nothing refers back: one compressed chunk can be repeated
    zeros = compressor.compress(bytes(chunk_bytes)) + compressor.flush(zlib.Z_FULL_FLUSH)
    body += zeros * (pixel_data_bytes // chunk_bytes) + compressor.compress(bytes(pixel_data_bytes % chunk_bytes))
    body += compressor.flush()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dataset.SOPClassUID, dataset.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta_bytes = DicomBytesIO()
    meta_bytes.is_little_endian, meta_bytes.is_implicit_VR = True, False
    write_file_meta_info(meta_bytes, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(128) + b"DICM" + meta_bytes.getvalue() + body)
    return path


def pack_in_subprocess(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """`gastro-dist pack` in a fresh process, reading in that process (--workers 1); returns its peak RSS in bytes.

    VmHWM is the peak of the process's own memory; getrusage's ru_maxrss would also count the test process's
    resident memory from before the exec (Linux keeps it across execve), gigabytes late in a test session."""
    code = ("import sys; from gastro_dist.cli import main; status = main(sys.argv[1:]); "
            "print('peak_rss_kb', next(line.split()[1] for line in open('/proc/self/status') "
            "if line.startswith('VmHWM:'))); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, "pack", *args, "--workers", "1"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    peak_kb = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("peak_rss_kb")]
    return result, peak_kb[0] * 1024 if peak_kb else -1


def test_growing_frames_and_expanding_dicoms_are_capped_before_allocation_under_1_gb(tmp_path):
    src = tmp_path / "src"
    growing_mjpeg(src / "a" / "grows.avi")
    write_video(src / "a" / "normal.mp4", [scene(20), scene(21)])
    deflated_bomb(src / "b" / "deflated.dcm", 2_500_000_000)
    write_dicom(src / "b" / "huge_declared.dcm", two_halves(), jpeg=True, Rows=60000, Columns=60000)
    write_dicom(src / "b" / "expands.dcm", two_halves(), jpeg=True, Rows=2000, Columns=1500)  # 9 MB decoded
    write_dicom(src / "b" / "normal.dcm", two_halves())
    larger = write_dicom(src / "b" / "jpeg_larger.dcm", two_halves(), jpeg=True)  # declares 64x48
    dataset = dcmread(larger)
    dataset.PixelData = encapsulate([flat_grey_jpeg(12000, 12000)])
    dataset.save_as(larger, enforce_file_format=True)
    assert (src / "b" / "deflated.dcm").stat().st_size < 5_000_000
    result, peak_bytes = pack_in_subprocess(str(src), "--out", str(tmp_path / "out"), "--max-file-mb", "5",
                                            "--val-fraction", "0", "--input-size", "32", "--resize-short", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 < peak_bytes < MAX_PEAK_BYTES, peak_bytes

    out = tmp_path / "out"
    rejected = {entry["path"]: entry["reason"] for entry in read_jsonl(out / "rejected.jsonl")}
    assert rejected == {
        "b/deflated.dcm": "file too large: its deflated data set inflates to more than 5000000 bytes, "
                          "the limit is 5000000",
        "b/huge_declared.dcm": "decompression bomb: 60000x60000 pixels exceeds the limit of 100000000",
        "b/expands.dcm": "file too large: a frame of 1500x2000 pixels expands to 9000000 bytes, the limit is 5000000",
        "b/jpeg_larger.dcm": "corrupt DICOM pixel data: frame 0 is a 12000x12000 JPEG, the header declares 64x48",
    }
    (part,) = [entry for entry in read_jsonl(out / "skipped.jsonl") if "part" in entry]
    assert part == {"path": "a/grows.avi", "label": "a", "patient_id": None, "part": "1 frame",
                    "reason": "decompression bomb: 1 frame above the limit of 100000000 pixels skipped, "
                              "the largest 16000x16000"}
    assert "a/grows.avi: decompression bomb: 1 frame above" in result.stderr
    frames = frames_by_source(out)
    assert [meta["frame_time_s"] for meta in frames["a/grows.avi"]] == [0.0, 1.2, 2.0]  # 1.2 s stands in for 1 s
    assert {meta["orig_size"][0] for meta in frames["a/grows.avi"]} == {64}
    assert set(frames) == {"a/grows.avi", "a/normal.mp4", "b/normal.dcm"}
    totals = assert_video_totals(out)
    assert (totals["parts_skipped"], totals["rejected"], totals["files_packed"]) == (1, 4, 3)


def test_a_deflated_dicom_within_the_cap_still_packs(tmp_path):
    """The inflation done here instead of pydicom's reads what pydicom reads."""
    path = write_dicom(tmp_path / "src" / "a" / "deflated.dcm", two_halves())
    dataset = dcmread(path)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    write_dicom(tmp_path / "src" / "b" / "plain.dcm", two_halves())
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--val-fraction", "0", "--input-size", "32", "--resize-short", "48"]) == 0
    frames = frames_by_source(tmp_path / "out")
    assert np.array_equal(np.asarray(frames["a/deflated.dcm"][0]["img"]), np.asarray(frames["b/plain.dcm"][0]["img"]))


def two_videos_and_their_copies(src: Path) -> tuple[Path, Path]:
    """day1/procedure.mp4 (6 distinct seconds), a byte-identical copy, a symlink and a hard link to it, and
    another video."""
    original = write_video(src / "day1" / "procedure.mp4", [scene(second) for second in range(6)])
    (src / "day2").mkdir()
    (src / "day2" / "copy.mp4").write_bytes(original.read_bytes())
    (src / "day2" / "link.mp4").symlink_to(original)
    os.link(original, src / "day2" / "hardlink.mp4")
    other = write_video(src / "day3" / "other.mp4", [scene(100 + second) for second in range(4)])
    return original, other


def test_a_copy_or_link_of_a_video_is_the_same_video_for_labels(tmp_path, capsys):
    src = tmp_path / "src"
    two_videos_and_their_copies(src)
    segments = write_manifest(tmp_path / "segments.csv", [
        {"video": "day1/procedure.mp4", "start_s": "0", "end_s": "4", "label": "normal"},
        {"video": "day2/copy.mp4", "start_s": "2", "end_s": "6", "label": "ulcer"},  # 2-4 s labelled twice
        {"video": "day2/link.mp4", "start_s": "0", "end_s": "4", "label": "normal"},  # the same frames again
        {"video": "day2/hardlink.mp4", "start_s": "0", "end_s": "2", "label": "normal"},  # inside the first row
        {"video": "day3/other.mp4", "start_s": "0", "end_s": "4", "label": "ulcer"},
    ])
    assert main(["pack", str(src), "--out", str(tmp_path / "out"), "--segments", str(segments), "--workers", "1",
                 "--val-fraction", "0", "--input-size", "32", "--resize-short", "48"]) == 0
    err = capsys.readouterr().err

    out = tmp_path / "out"
    frames = frames_by_source(out)
    assert [meta["frame_time_s"] for meta in frames["day1/procedure.mp4"]] == [0.0, 1.0]
    assert [meta["frame_time_s"] for meta in frames["day2/copy.mp4"]] == [4.0, 5.0]
    assert "day2/link.mp4" not in frames and "day2/hardlink.mp4" not in frames
    sha256 = frames["day1/procedure.mp4"][0]["sha256"]
    times_by_label = {}
    for metas in frames.values():
        for meta in metas:
            if meta["sha256"] == sha256:
                times_by_label.setdefault(meta["frame_time_s"], set()).add(meta["label"])
    assert all(len(labels) == 1 for labels in times_by_label.values())  # no frame under two labels
    assert {meta["split"] for metas in frames.values() for meta in metas if meta["sha256"] == sha256} == {"train"}

    rejected = {entry["path"]: entry for entry in read_jsonl(out / "rejected.jsonl")}
    assert set(rejected) == {"day2/link.mp4", "day2/hardlink.mp4"}
    assert {entry["duplicate_of"] for entry in rejected.values()} == {"day1/procedure.mp4"}
    parts = {(entry["path"], entry["part"]): entry["reason"] for entry in read_jsonl(out / "skipped.jsonl")}
    assert parts == {
        ("day1/procedure.mp4", "2-4 s"): "label conflict: the same frames are labelled ulcer in day2/copy.mp4 2-6 s; "
                                         "kept out under both labels",
        ("day2/copy.mp4", "2-4 s"): "label conflict: the same frames are labelled normal in day1/procedure.mp4 "
                                    "0-4 s; kept out under both labels",
    }
    (conflict,) = read_jsonl(out / "duplicates.jsonl")
    assert conflict["sha256"] == sha256 and conflict["seconds"] == [2.0, 4.0]
    assert "the same frames (2 s to 4 s of one recording) are labelled normal in day1/procedure.mp4 (0-4 s) and " \
           "ulcer in day2/copy.mp4 (2-6 s): kept out under both labels" in " ".join(err.split())
    totals = assert_video_totals(out)
    assert (totals["duplicates_dropped"], totals["label_conflicts"], totals["parts_skipped"]) == (2, 1, 2)


def test_whole_video_copies_in_class_folders_under_two_labels_are_kept_out(tmp_path):
    src = tmp_path / "src"
    write_video(src / "normal" / "v.mp4", [scene(1), scene(2)])
    (src / "ulcer").mkdir()
    (src / "ulcer" / "v_copy.mp4").write_bytes((src / "normal" / "v.mp4").read_bytes())
    (src / "normal" / "v_link.mp4").symlink_to(src / "normal" / "v.mp4")
    write_video(src / "normal" / "w.mp4", [scene(3)])
    write_video(src / "ulcer" / "x.mp4", [scene(4)])
    assert main(["pack", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0",
                 "--input-size", "32", "--resize-short", "48"]) == 0
    rejected = {entry["path"]: entry["reason"] for entry in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert rejected == {
        "normal/v.mp4": "label conflict: the same frames are labelled ulcer in ulcer/v_copy.mp4; "
                        "kept out under both labels",
        "normal/v_link.mp4": "duplicate of normal/v.mp4",  # the same label: one copy is enough
        "ulcer/v_copy.mp4": "label conflict: the same frames are labelled normal in normal/v.mp4; "
                            "kept out under both labels",
    }
    assert set(frames_by_source(tmp_path / "out")) == {"normal/w.mp4", "ulcer/x.mp4"}
    assert read_index(tmp_path / "out")["totals"]["label_conflicts"] == 1


def test_a_video_cut_short_or_damaged_inside_is_packed_up_to_the_damage_and_says_what_was_lost(tmp_path, capsys):
    src = tmp_path / "src"
    seconds = [scene(second) for second in range(10)]
    whole = write_video(src / "a" / "whole.mkv", seconds)
    data = whole.read_bytes()
    (src / "a" / "cut.mkv").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2: len(data) // 2 + 200] = bytes(200)
    (src / "b").mkdir()
    (src / "b" / "damaged.mkv").write_bytes(bytes(damaged))
    faststart = tmp_path / "faststart.mp4"  # the index at the front: a cut MP4 still opens
    with av.open(str(faststart), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for picture in seconds:
            for _ in range(FPS):
                container.mux(stream.encode(av.VideoFrame.from_image(picture)))
        container.mux(stream.encode())
    (src / "b" / "cut.mp4").write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    assert main(["pack", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0",
                 "--input-size", "32", "--resize-short", "48"]) == 0
    err = " ".join(capsys.readouterr().err.split())

    out = tmp_path / "out"
    frames = frames_by_source(out)
    assert [meta["frame_time_s"] for meta in frames["a/whole.mkv"]] == [float(second) for second in range(10)]
    assert [meta["frame_time_s"] for meta in frames["a/cut.mkv"]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(frames["b/damaged.mkv"]) >= 8 and frames["b/damaged.mkv"][-1]["frame_time_s"] == 9.0
    assert frames["b/cut.mp4"] and frames["b/cut.mp4"][0]["frame_time_s"] == 0.0
    parts = {entry["path"]: entry for entry in read_jsonl(out / "skipped.jsonl")}
    assert parts["a/cut.mkv"]["reason"] == "truncated video: decoded 4.8 s of 10.0 s the container declares"
    assert parts["a/cut.mkv"]["part"] == "4.8-10.0 s"
    assert parts["b/cut.mp4"]["reason"].startswith("truncated video: decoded ")
    assert parts["b/cut.mp4"]["reason"].endswith(" s of 10.0 s the container declares")
    assert parts["b/damaged.mkv"]["reason"].startswith("corrupt video: ")
    assert parts["b/damaged.mkv"]["reason"].endswith(" packets could not be decoded, skipped")
    assert "a/whole.mkv" not in parts
    assert "a/cut.mkv: truncated video: decoded 4.8 s of 10.0 s the container declares; packed without " \
           "4.8-10.0 s" in err
    assert read_index(out)["skipped_by_reason"] == {"truncated video": 2, "corrupt video": 1}
    assert assert_video_totals(out)["parts_skipped"] == 3


def test_normal_videos_pack_the_same_next_to_hostile_ones(tmp_path):
    """The per-packet checks change nothing for a normal video: its frames are the same, alone or not."""
    write_video(tmp_path / "alone" / "a" / "normal.avi", [scene(second) for second in range(4)])
    write_video(tmp_path / "alone" / "b" / "normal.mkv", [scene(10 + second) for second in range(4)])
    mixed = tmp_path / "mixed"
    for name in ("a/normal.avi", "b/normal.mkv"):
        (mixed / name).parent.mkdir(parents=True, exist_ok=True)
        (mixed / name).write_bytes((tmp_path / "alone" / name).read_bytes())
    growing_mjpeg(mixed / "a" / "grows.avi")
    for src in ("alone", "mixed"):
        assert main(["pack", str(tmp_path / src), "--out", str(tmp_path / f"{src}-out"), "--workers", "1",
                     "--val-fraction", "0", "--input-size", "32", "--resize-short", "48"]) == 0
    alone, mixed_frames = frames_by_source(tmp_path / "alone-out"), frames_by_source(tmp_path / "mixed-out")
    for name in ("a/normal.avi", "b/normal.mkv"):
        assert [(meta["frame_time_s"], meta["frame_index"], meta["img"].tobytes()) for meta in alone[name]] == \
               [(meta["frame_time_s"], meta["frame_index"], meta["img"].tobytes()) for meta in mixed_frames[name]]
    assert read_index(tmp_path / "alone-out")["totals"]["parts_skipped"] == 0
    assert read_jsonl(tmp_path / "alone-out" / "skipped.jsonl") == []
