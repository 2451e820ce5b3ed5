"""`predict` and `cam` on inputs that are not plain images: a FIFO, a link to /dev/zero, a broken link, an
empty PNG, a folder without images, a missing path. Each input gets exactly one outcome, its CSV row (predict)
or its overlay or stderr line (cam), nothing blocks, and the exit status is 1 when some input got no result.

The run is an untrained tiny model written as a run folder (model.json and model.safetensors): what is
tested is the input handling, which does not depend on what the weights learned, and no training is needed."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from gastro_dist.cli import main

CLASSES = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from gastro_dist.config import ModelConfig
    from gastro_dist.models.backbones import build_model
    from gastro_dist.run_dir import ModelMeta, RunDir

    folder = RunDir(tmp_path_factory.mktemp("untrained") / "run")
    folder.path.mkdir()
    model, _ = build_model(ModelConfig(name="shufflenet_v2_x0_5", pretrained="none"), num_classes=len(CLASSES),
                           load_pretrained=False, image_size=48)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(folder.model_weights))
    ModelMeta(architecture="shufflenet_v2_x0_5", classes=CLASSES, image_size=48, eval_crop_ratio=0.875,
              mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]).write(folder.model_json)
    return folder.path


@pytest.fixture(autouse=True)
def never_blocks():
    """A FIFO opened for reading blocks until a writer comes: fail after a minute instead of hanging."""
    def hung(*_):
        raise TimeoutError("blocked on an input")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def odd_inputs(folder: Path) -> dict[Path, str | None]:
    """Inputs in `folder`, each with the error its outcome must give (None: predicted)."""
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 60, 60)).save(folder / "good.png")
    os.mkfifo(folder / "pipe.png")
    os.symlink("/dev/zero", folder / "zero.png")
    os.symlink(folder / "absent.png", folder / "broken.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    return {folder / "good.png": None, folder / "pipe.png": "not a regular file: FIFO",
            folder / "zero.png": "not a regular file: character device",
            folder / "broken.png": "unreadable file: No such file or directory",
            folder / "empty.png": "", folder / "text.png": ""}  # "": any reason the decoder gives


def test_predict_gives_every_input_one_row(run, tmp_path, capsys):
    expected = odd_inputs(tmp_path / "images")
    nested = tmp_path / "images" / "sub"
    nested.mkdir()
    Image.new("RGB", (50, 70), (20, 160, 60)).save(nested / "deeper.jpg")
    (nested / "notes.txt").write_text("not an input: no image extension")
    expected[nested / "deeper.jpg"] = None
    no_images = tmp_path / "no-images"
    no_images.mkdir()
    (no_images / "readme.txt").write_text("nothing to predict")
    direct = {tmp_path / "images" / "pipe.png": "not a regular file: FIFO",
              tmp_path / "images" / "zero.png": "not a regular file: character device",
              no_images: "folder holds no image file", tmp_path / "absent.jpg": "No such file or directory"}
    out = tmp_path / "p.csv"

    status = main(["predict", "--run", str(run), str(tmp_path / "images"), *map(str, direct), "--out", str(out)])

    assert status == 1  # some inputs got no prediction
    assert "Traceback" not in capsys.readouterr().err
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # A file given directly and again through its folder has two rows, one per time it was given.
    wanted = [*map(str, expected), *map(str, direct)]
    assert sorted(row["path"] for row in rows) == sorted(wanted)
    error_of = {str(path): error for path, error in [*expected.items(), *direct.items()]}
    for row in rows:
        error = error_of[row["path"]]
        if error is None:
            assert row["predicted_label"] in CLASSES and not row["error"], row
        else:
            assert row["error"] and error in row["error"] and not row["predicted_label"], row


def test_cam_gives_every_input_an_overlay_or_a_line(run, tmp_path, capsys):
    expected = odd_inputs(tmp_path / "images")
    out = tmp_path / "cams"
    capsys.readouterr()

    status = main(["cam", "--run", str(run), *map(str, expected), str(tmp_path / "absent.jpg"), "--out", str(out)])

    assert status == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    failed = [path for path, error in expected.items() if error is not None] + [tmp_path / "absent.jpg"]
    assert len(lines) == len(failed) and "Traceback" not in err
    for path in failed:
        (line,) = [line for line in lines if line.startswith(f"error: {path}: ")]
        assert expected.get(path, "No such file or directory") in line
    assert sorted(p.name for p in out.iterdir()) == ["good_cam.png"]
