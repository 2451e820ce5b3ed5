"""Pseudonymised packs: no patient id, name or path written by pack (or by a run trained and evaluated on its
shards) in plain text, stable pseudonyms for one key, splits still grouped by patient, and stored JPEGs that
carry pixels only."""

from __future__ import annotations

import csv
import io
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from imagefactory import noise_image, read_index, read_jsonl, save_image
from PIL import Image
pytest.importorskip("av", reason="needs the [video] extra: pip install 'gastro-dist[video]'")
pytest.importorskip("pydicom", reason="needs the [dicom] extra: pip install 'gastro-dist[dicom]'")
from test_pack import pack, write_manifest
from test_pack_dicom import write_dicom
from test_pack_hostile import one_line_error
from test_pack_video import assert_video_totals, frames_by_source, scene, write_video

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.data.pseudonym import KEY_FILE_VARIABLE, Pseudonymiser

KEY = b"9f1c2e7a5b3d4c6e8f0a1b2c3d4e5f60"
# (folder or file name, medical record number) of each fake patient
PATIENTS = [("Doe_John", "MRN-00471182"), ("Roe_Jane", "MRN-55501234"), ("Poe_Edgar", "MRN-99900011"),
            ("Loe_Lisa", "MRN-12312399"), ("Zoe_Anna", "MRN-31415926")]
DICOM_PATIENT = ("Moe^Max", "MRN-77712345")  # only inside the DICOM header: PatientName and PatientID
EXPORT = "Export_Hoe_Hanna"  # the source folder's own name


def identifying_texts() -> list[bytes]:
    texts = [EXPORT, *DICOM_PATIENT, "Doe John"]
    for name, mrn in PATIENTS:
        texts += [name, mrn, mrn.split("-")[1]]
    return [text.encode() for text in texts] + [text.lower().encode() for text in texts] + [KEY]


def leaks(folder: Path) -> dict[str, list[bytes]]:
    """Every file under `folder` that holds an identifying text, byte for byte (tar members, JPEGs included)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits = [text for text in identifying_texts() if text in data]
            if hits:
                found[str(path.relative_to(folder))] = hits
    return found


def clinical_export(root: Path) -> tuple[Path, Path, Path]:
    """Stills in patient folders (JPEGs whose EXIF and comment name the patient), a procedure video with labelled
    segments, a DICOM, a broken video, a duplicate and a text file; returns (src, manifest, segments)."""
    src = root / EXPORT
    rows = []
    for number, (name, mrn) in enumerate(PATIENTS):
        for shot in range(3):
            label = ("polyp", "normal")[(number + shot) % 2]
            path = f"{label}/{name}/{mrn}_{shot}.jpg"
            exif = Image.Exif()
            exif[0x013B], exif[0x010E] = name.replace("_", " "), mrn  # Artist, ImageDescription
            save_image(src / path, size=(80, 64), seed=10 * number + shot, exif=exif.tobytes(),
                       comment=f"{name} {mrn}".encode())
            rows.append({"path": path, "label": label, "patient_id": mrn})
    (src / "polyp" / "Doe_John" / "copy.jpg").write_bytes((src / rows[0]["path"]).read_bytes())
    rows.append({"path": "polyp/Doe_John/copy.jpg", "label": rows[0]["label"], "patient_id": "MRN-00471182"})
    write_dicom(src / "dicom" / "Moe_Max.dcm", np.asarray(scene(70).resize((80, 64))), patient_id=DICOM_PATIENT[1],
                PatientName=DICOM_PATIENT[0])
    rows.append({"path": "dicom/Moe_Max.dcm", "label": "polyp", "patient_id": ""})  # PatientID groups it
    (src / "broken" / "Poe_Edgar_MRN-99900011.mp4").parent.mkdir(parents=True)
    (src / "broken" / "Poe_Edgar_MRN-99900011.mp4").write_bytes(b"not a video")
    rows.append({"path": "broken/Poe_Edgar_MRN-99900011.mp4", "label": "normal", "patient_id": "MRN-99900011"})
    (src / "notes" / "Loe_Lisa.txt").parent.mkdir(parents=True)
    (src / "notes" / "Loe_Lisa.txt").write_text("MRN-12312399\n")
    rows.append({"path": "notes/Loe_Lisa.txt", "label": "normal", "patient_id": "MRN-12312399"})
    manifest = write_manifest(root / "Roe_Jane_labels.csv", rows)
    write_video(src / "video" / "Roe_Jane_MRN-55501234.mp4", [scene(80 + second) for second in range(6)])
    segments = write_manifest(root / "segments.csv", [
        {"video": "video/Roe_Jane_MRN-55501234.mp4", "start_s": "0", "end_s": "3", "label": "normal",
         "patient_id": "MRN-55501234"},
        {"video": "video/Roe_Jane_MRN-55501234.mp4", "start_s": "3", "end_s": "6", "label": "polyp",
         "patient_id": "MRN-55501234"}])
    return src, manifest, segments


def pack_args(src: Path, manifest: Path, segments: Path, out: Path) -> list[str]:
    return ["pack", str(src), "--out", str(out), "--manifest", str(manifest), "--segments", str(segments),
            "--workers", "1", "--input-size", "48", "--resize-short", "56", "--val-fraction", "0.3", "--seed", "1"]


def test_nothing_written_by_pack_or_a_run_on_its_shards_names_a_patient(tmp_path, monkeypatch):
    src, manifest, segments = clinical_export(tmp_path)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    out = tmp_path / "shards"
    assert main([*pack_args(src, manifest, segments, out), "--pseudonymise", str(key_file)]) == 0

    assert leaks(out) == {}
    index = read_index(out)
    totals = assert_video_totals(out)
    assert (totals["files_seen"], totals["files_packed"], totals["rejected"], totals["skipped"]) == (21, 18, 2, 1)
    pseudonyms = Pseudonymiser(KEY)
    assert index["pseudonymisation"]["key_fingerprint"] == pseudonyms.key_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", index["source"]) and re.fullmatch(r"[0-9a-f]{16}\.csv", index["manifest"])
    frames = frames_by_source(out)
    metas = [meta for source_frames in frames.values() for meta in source_frames]
    assert all(meta["pseudonymised"] for meta in metas)
    assert all(re.fullmatch(r"[0-9a-f]{16}\.(jpg|dcm|mp4)", meta["source"]) for meta in metas)
    assert {meta["patient_id"] for meta in metas} == {pseudonyms.patient_id(mrn) for _, mrn in
                                                      [*PATIENTS, DICOM_PATIENT]}
    split_of_patient = defaultdict(set)
    for meta in metas:
        split_of_patient[meta["patient_id"]].add(meta["split"])
    assert all(len(splits) == 1 for splits in split_of_patient.values())  # grouping survives pseudonymisation
    assert index["rejected_by_reason"] == {"duplicate": 1, "not a video": 1}
    duplicate = next(entry for entry in read_jsonl(out / "rejected.jsonl") if "duplicate_of" in entry)
    assert duplicate["reason"] == f"duplicate of {duplicate['duplicate_of']}"
    assert re.fullmatch(r"[0-9a-f]{16}\.jpg", duplicate["duplicate_of"])

    # the same key, given through the environment: the same pseudonyms, byte-identical shards
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(key_file))
    assert main(pack_args(src, manifest, segments, tmp_path / "again")) == 0
    assert read_index(tmp_path / "again")["splits"] == index["splits"]
    monkeypatch.delenv(KEY_FILE_VARIABLE)

    run = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", str(out), "--out", str(run),
                 *TINY_TRAIN_OVERRIDES, "finetune.epochs=0"]) == 0
    assert main(["evaluate", "--run", str(run), "--shards", str(out), "--split", "val", "--out", str(run / "eval"),
                 "--bootstrap", "0", "--workers", "0"]) == 0
    with (run / "eval" / "predictions.csv").open(newline="") as handle:
        predicted_ids = {row["patient_id"] for row in csv.DictReader(handle)}
    assert predicted_ids and predicted_ids <= {meta["patient_id"] for meta in metas}
    assert leaks(run) == {}


def test_without_a_key_the_originals_are_kept_and_another_key_gives_other_pseudonyms(tmp_path):
    src, manifest, segments = clinical_export(tmp_path)
    assert main(pack_args(src, manifest, segments, tmp_path / "plain")) == 0
    plain = read_index(tmp_path / "plain")
    assert plain["pseudonymisation"] is None and plain["source"] == str(src)
    assert {"index.json", "rejected.jsonl", "skipped.jsonl"} <= set(leaks(tmp_path / "plain"))  # the check can fail
    patient_ids = {meta["patient_id"] for frames in frames_by_source(tmp_path / "plain").values() for meta in frames}
    assert DICOM_PATIENT[1] in patient_ids and "MRN-00471182" in patient_ids

    other_key = tmp_path / "other-key"
    other_key.write_text("another key of at least sixteen bytes")
    assert main([*pack_args(src, manifest, segments, tmp_path / "other"), "--pseudonymise", str(other_key)]) == 0
    other_ids = {meta["patient_id"] for frames in frames_by_source(tmp_path / "other").values() for meta in frames}
    assert len(other_ids) == len(patient_ids) and Pseudonymiser(KEY).patient_id("MRN-00471182") not in other_ids
    assert leaks(tmp_path / "other") == {}


def jpeg_markers(data: bytes) -> list[int]:
    """The marker codes of a JPEG's header segments, up to the start of scan."""
    markers, position = [], 2
    while data[position + 1] != 0xDA:
        markers.append(data[position + 1])
        position += 2 + int.from_bytes(data[position + 2: position + 4], "big")
    return markers


@pytest.mark.parametrize("resize_short", [0, 48])
def test_stored_jpegs_carry_pixels_only(tmp_path, resize_short):
    exif = Image.Exif()
    exif[0x013B] = "Doe John"
    buffer = io.BytesIO()
    noise_image((64, 48), 1).save(buffer, format="JPEG", exif=exif.tobytes(), comment=b"MRN-00471182",
                                  icc_profile=b"\0" * 128, xmp=b"<x:xmpmeta>Doe John</x:xmpmeta>")
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "tagged.jpg").write_bytes(buffer.getvalue())
    save_image(tmp_path / "src" / "b" / "plain.jpg", seed=2)
    pack(tmp_path / "src", tmp_path / "out", settings=dict(resize_short=resize_short, val_fraction=0))
    stored = [path.read_bytes() for path in (tmp_path / "out").glob("*.tar")]
    assert stored and not any(text in data for data in stored for text in (b"Doe John", b"MRN-00471182", b"Exif"))
    for path in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    markers = jpeg_markers(tar.extractfile(member).read())
                    assert set(markers) <= {0xE0, 0xDB, 0xC0, 0xC4}, [hex(marker) for marker in markers]


@pytest.mark.parametrize("problem", ["short", "missing", "inside-out"])
def test_unusable_key_files_are_one_line_user_errors(tmp_path, capsys, problem):
    save_image(tmp_path / "src" / "a" / "x.jpg", seed=1)
    save_image(tmp_path / "src" / "b" / "y.jpg", seed=2)
    key_file = {"short": tmp_path / "key", "missing": tmp_path / "none", "inside-out": tmp_path / "out" / "key"}[problem]
    if problem != "missing":
        key_file.parent.mkdir(exist_ok=True)
        key_file.write_bytes(b"too short" if problem == "short" else KEY)
    assert main(["pack", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--pseudonymise", str(key_file)]) == 2
    err = one_line_error(capsys)
    assert {"short": "must hold 16 to 4096 bytes", "missing": "cannot read the pseudonym key file",
            "inside-out": "inside --out"}[problem] in err
    assert not (tmp_path / "out" / "index.json").exists()
