"""Packing DICOM objects: colour spaces and JPEG-baseline pixel data to RGB, multi-frame objects sampled like
videos, PatientID for grouping, and unusable objects rejected with a reason (tiny DICOMs made with pydicom)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from imagefactory import read_index, read_jsonl, save_image
from PIL import Image
pytest.importorskip("pydicom", reason="needs the [dicom] extra: pip install 'gastro-dist[dicom]'")
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    VLEndoscopicImageStorage,
    generate_uid,
)
from test_pack import pack, write_manifest
from test_pack_hostile import fails_after
from test_pack_video import assert_video_totals, frames_by_source, scene

from gastro_dist import UserError
from gastro_dist.data import dicom

LEFT, RIGHT = (200, 30, 40), (20, 180, 60)  # colours of the two halves of every test picture


def two_halves(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    rgb = np.zeros((size[1], size[0], 3), np.uint8)
    rgb[:, : size[0] // 2], rgb[:, size[0] // 2:] = LEFT, RIGHT
    return rgb


def jpeg_frames(frames: np.ndarray) -> bytes:
    """JPEG baseline with Pillow's default 4:2:0 subsampling (DICOM: YBR_FULL_422), encapsulated."""
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    return encapsulate(encoded)


def write_dicom(path: Path, frames: np.ndarray, photometric: str = "RGB", *, jpeg: bool = False, bits_stored: int = 8,
                patient_id: str | None = "P1", **attributes) -> Path:
    """A VL Endoscopic Image of one frame (frames shaped (h, w[, 3])) or several ((n, h, w[, 3]))."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = VLEndoscopicImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "ES"
    if patient_id is not None:
        dataset.PatientID = patient_id
    if jpeg:
        stack = frames if frames.ndim == 4 else frames[None]
        dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        dataset.Rows, dataset.Columns = stack.shape[1:3]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "YBR_FULL_422", 0
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        if len(stack) > 1:
            dataset.NumberOfFrames = len(stack)
        dataset.PixelData = jpeg_frames(stack)
        dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True
    else:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.set_pixel_data(frames, photometric, bits_stored)
    for name, value in attributes.items():
        setattr(dataset, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_colour_spaces_grey_levels_and_jpeg_baseline_become_rgb(tmp_path):
    src = tmp_path / "src"
    rgb = two_halves()
    write_dicom(src / "a" / "rgb.dcm", rgb)
    write_dicom(src / "a" / "ybr_full.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    write_dicom(src / "a" / "jpeg_baseline.dcm", rgb, jpeg=True)
    grey = np.where(np.arange(64) < 32, 200, 40).astype(np.uint8)[None].repeat(48, axis=0)
    write_dicom(src / "b" / "mono2.dcm", grey, "MONOCHROME2", patient_id="P2")
    write_dicom(src / "b" / "mono2_12bit.dcm", (grey.astype(np.uint32) * 4095 // 255).astype(np.uint16), "MONOCHROME2", bits_stored=12,
                patient_id="P2")
    write_dicom(src / "b" / "mono1.dcm", 255 - grey, "MONOCHROME1", patient_id="P3")
    save_image(src / "b" / "still.jpg", seed=3)
    pack(src, tmp_path / "out", settings=dict(val_fraction=0))

    frames = frames_by_source(tmp_path / "out")
    for name in ("a/rgb.dcm", "a/ybr_full.dcm", "a/jpeg_baseline.dcm"):
        (meta,) = frames[name]
        pixels = np.asarray(meta["img"], dtype=int)
        assert np.abs(pixels[24, 8] - LEFT).max() <= 12 and np.abs(pixels[24, 56] - RIGHT).max() <= 12, name
        assert (meta["source_kind"], meta["frame_index"], meta["frame_time_s"]) == ("dicom", None, None)
        assert meta["patient_id"] == "P1" and meta["orig_size"] == [64, 48]
    for name in ("b/mono2.dcm", "b/mono2_12bit.dcm", "b/mono1.dcm"):
        pixels = np.asarray(frames[name][0]["img"], dtype=int)
        assert np.abs(pixels[24, 8] - 200).max() <= 3 and np.abs(pixels[24, 56] - 40).max() <= 3, name
    assert frames["b/still.jpg"][0]["patient_id"] is None
    totals = assert_video_totals(tmp_path / "out")
    assert (totals["files_packed"], totals["videos_packed"], totals["packed"]) == (7, 0, 7)
    assert read_index(tmp_path / "out")["splits"]["train"]["patients"] == 3


def test_multi_frame_dicoms_are_sampled_like_videos_and_patient_ids_group_them(tmp_path):
    src = tmp_path / "src"
    timed = np.stack([np.asarray(scene(index // 2)) for index in range(8)])  # 2 frames per second, a scene per second
    write_dicom(src / "exam1" / "cine.dcm", timed, jpeg=True, patient_id="P7", FrameTime=500)
    untimed = np.stack([np.asarray(scene(20)), np.asarray(scene(21)), np.asarray(scene(21))])
    write_dicom(src / "exam1" / "untimed.dcm", untimed, patient_id="P7")
    write_dicom(src / "exam2" / "other.dcm", two_halves(), patient_id="P7")
    for number in range(4):
        write_dicom(src / "exam3" / f"still{number}.dcm", np.asarray(scene(40 + number)), patient_id=f"Q{number}")
    rows = [{"path": "exam1/cine.dcm", "label": "ulcer", "patient_id": ""},
            {"path": "exam1/untimed.dcm", "label": "normal", "patient_id": ""},
            {"path": "exam2/other.dcm", "label": "ulcer", "patient_id": "M1"}]  # the manifest's id wins
    rows += [{"path": f"exam3/still{number}.dcm", "label": ["normal", "ulcer"][number % 2], "patient_id": ""}
             for number in range(4)]
    pack(src, tmp_path / "out", manifest=write_manifest(tmp_path / "manifest.csv", rows),
         settings=dict(val_fraction=0.5))

    frames = frames_by_source(tmp_path / "out")
    cine = frames["exam1/cine.dcm"]
    assert [(meta["frame_index"], meta["frame_time_s"]) for meta in cine] == [(0, 0.0), (2, 1.0), (4, 2.0), (6, 3.0)]
    assert [(meta["frame_index"], meta["frame_time_s"]) for meta in frames["exam1/untimed.dcm"]] == [(0, None), (1, None)]
    assert {meta["source_kind"] for meta in cine} == {"dicom"}
    split_of_patient = defaultdict(set)
    for metas in frames.values():
        for meta in metas:
            split_of_patient[meta["patient_id"]].add(meta["split"])
    assert set(split_of_patient) == {"P7", "M1", "Q0", "Q1", "Q2", "Q3"}
    assert all(len(splits) == 1 for splits in split_of_patient.values())
    totals = assert_video_totals(tmp_path / "out")
    assert (totals["videos_packed"], totals["frames_from_videos"], totals["near_duplicate_frames_dropped"]) == (2, 6, 1)


def test_unusable_dicoms_are_rejected_with_reasons(tmp_path):
    src = tmp_path / "src"
    write_dicom(src / "a" / "good.dcm", two_halves())
    write_dicom(src / "b" / "good.dcm", two_halves()[::-1].copy())
    jpeg_ls = write_dicom(src / "a" / "jpeg_ls.dcm", two_halves(), jpeg=True)
    jpeg_ls.write_bytes(jpeg_ls.read_bytes().replace(JPEGBaseline8Bit.encode(), JPEGLSLossless.encode()))  # same length
    no_pixels = Dataset()
    no_pixels.file_meta = FileMetaDataset()
    no_pixels.file_meta.MediaStorageSOPClassUID = no_pixels.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a report
    no_pixels.file_meta.MediaStorageSOPInstanceUID = no_pixels.SOPInstanceUID = generate_uid()
    no_pixels.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_pixels.save_as(src / "a" / "report.dcm", enforce_file_format=True)
    (src / "a" / "random.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    cut = write_dicom(src / "b" / "cut.dcm", two_halves())
    cut.write_bytes(cut.read_bytes()[:-2000])
    write_dicom(src / "b" / "palette.dcm", np.zeros((48, 64), np.uint8), "MONOCHROME2",
                PhotometricInterpretation="PALETTE COLOR")
    write_dicom(src / "b" / "long.dcm", np.stack([np.asarray(scene(index)) for index in range(3)]))
    write_dicom(src / "b" / "claims_frames.dcm", two_halves(), NumberOfFrames=10**9)  # one frame's bytes
    write_dicom(src / "b" / "too_fast.dcm", np.stack([np.asarray(scene(index)) for index in range(2)]),
                FrameTime=0.001)  # a million frames per second
    with fails_after(30):
        pack(src, tmp_path / "out", settings=dict(max_frames_per_video=2))

    reasons = {entry["path"]: entry["reason"] for entry in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert reasons == {
        "a/jpeg_ls.dcm": "unsupported transfer syntax: JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)",
        "a/report.dcm": "DICOM without pixel data",
        "a/random.dcm": "not a DICOM file: no DICM prefix after the 128-byte preamble",
        "b/cut.dcm": reasons["b/cut.dcm"],
        "b/palette.dcm": "unsupported photometric interpretation: PALETTE COLOR",
        "b/long.dcm": "too many frames: more than 2 sampled (raise --max-frames-per-video or lower --video-fps)",
        "b/claims_frames.dcm": "corrupt DICOM: 1000000000 frames of 64x48 declared, the pixel data holds 9216 bytes",
        "b/too_fast.dcm": "corrupt DICOM: frame times give more than 240 frames per second",
    }
    assert reasons["b/cut.dcm"].startswith("corrupt DICOM")
    assert assert_video_totals(tmp_path / "out")["files_packed"] == 2


def test_without_pydicom_packing_dicom_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    write_dicom(tmp_path / "src" / "a" / "x.dcm", two_halves())
    monkeypatch.setattr(dicom, "pydicom", None)
    with pytest.raises(UserError, match=r"pip install 'gastro-dist\[dicom\]'"):
        pack(tmp_path / "src", tmp_path / "out")
