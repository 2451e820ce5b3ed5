"""Nothing surprises silently: a pack without patient ids says so (and index.json records it), training on
images enlarged beyond their stored size warns or stops, a run folder re-run with other settings is refused
naming them, and `train --check` finds every such mistake without training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from imagefactory import make_class_tree, read_index

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.data.pack import PackSettings, pack_dataset
from gastro_dist.data.synth import generate_dataset

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, "--shards", str(shards), "--out", str(out), *TINY_TRAIN_OVERRIDES, *extra]


def test_pack_without_patient_ids_warns_and_records_it(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"a": 3, "b": 3})
    pack_dataset(tmp_path / "src", tmp_path / "out", PackSettings(input_size=32, resize_short=48, workers=1,
                                                                   val_fraction=0.0))
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "have no patient id" in line]
    assert len(warning) == 1 and "6 stills of 6 inputs" in warning[0] and "patient_id column" in warning[0]
    index = read_index(tmp_path / "out")
    assert index["without_patient_id"] == {"stills": 6, "videos": 0} and index["synthetic"] is None


def test_synth_data_is_recorded_as_synthetic_and_ids_from_its_manifest(tmp_path, capsys):
    generate_dataset(tmp_path / "src", per_class=2, seed=4, size_range=(64, 64), images_per_patient=(1, 1), workers=1)
    pack_dataset(tmp_path / "src", tmp_path / "out", PackSettings(input_size=32, resize_short=48, workers=1,
                                                                   val_fraction=0.0),
                 manifest=tmp_path / "src" / "manifest.csv")
    assert "have no patient id" not in capsys.readouterr().err
    index = read_index(tmp_path / "out")
    assert index["without_patient_id"] == {"stills": 0, "videos": 0}
    assert index["synthetic"] == {"generator": "gastro-dist synth", "seed": 4, "per_class": 2, "style": "default"}
    # A file of that name that synth did not write is not taken for its marker.
    (tmp_path / "src" / "synthetic.json").write_text(json.dumps({"generator": "someone else"}))
    pack_dataset(tmp_path / "src", tmp_path / "out2", PackSettings(input_size=32, resize_short=48, workers=1,
                                                                    val_fraction=0.0),
                 manifest=tmp_path / "src" / "manifest.csv")
    assert read_index(tmp_path / "out2")["synthetic"] is None


def test_training_on_enlarged_images_warns_then_stops(synthetic_shards, tmp_path, capsys):
    """The shards store 56 px for 48 px crops (evaluation resizes to 48 / 0.875 = 55)."""
    assert main(_train_args(synthetic_shards, tmp_path / "a", "data.image_size=56", "--check")) == 0
    out = capsys.readouterr().out
    assert "enlarged 1.14x" in out and "re-pack with --input-size 56" in out and "check passed" in out
    assert main(_train_args(synthetic_shards, tmp_path / "b", "data.image_size=96", "--check")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "enlarged 1.96x, more than data.max_upsampling=1.5" in err
    assert "data.max_upsampling=1.96" in err  # how to train anyway
    assert main(_train_args(synthetic_shards, tmp_path / "c", "data.image_size=96", "data.max_upsampling=2",
                            "--check")) == 0


def test_a_run_folder_rerun_with_other_settings_is_refused_naming_them(synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, "finetune.epochs=0")) == 0
    capsys.readouterr()
    assert main(_train_args(synthetic_shards, run, "finetune.epochs=0", "head.lr=0.01", "label_smoothing=0")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a finished run trained with other settings" in err
    assert "head.lr was 0.003, now 0.01" in err and "label_smoothing was 0.05, now 0.0" in err  # smoke.yaml
    assert "nothing to do" not in err
    # How it runs and reports may change: the finished run has nothing more to do.
    assert main(_train_args(synthetic_shards, run, "finetune.epochs=0", "tracking.log_every_steps=5",
                            "data.num_workers=1")) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_train_check_finds_mistakes_without_training(synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(synthetic_shards, run, "--check")) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("check passed: shufflenet_v2_x0_5 at 48 px") and "1 process x batch 8" in line
    assert not run.exists()  # nothing written
    index = json.loads((synthetic_shards / "index.json").read_text())
    processes = index["splits"]["train"]["count"] // 8 + 1  # more processes than batches of 8
    for args, expected in ((["--processes", str(processes)], "fewer than one batch per process"),
                           (["model.name=resnet18", "model.pretrained=imagenet"], "resnet18-f37072fd.pth"),
                           (["head.lr=fast"], "head.lr"), (["data.fold=1"], "fold")):
        code = main(_train_args(synthetic_shards, run, *args, "--check"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, (args, err)


def test_launch_script_runs_the_check_first(synthetic_shards, tmp_path):
    """launch/train.sh on a machine without a GPU says so; the check itself is what the SLURM scripts run first
    (tests/test_slurm.py submits a job that fails it)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    result = subprocess.run(["bash", str(REPO / "launch" / "train.sh"), "--config", SMOKE, "--shards",
                             str(synthetic_shards), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                                                                  "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "no GPU visible" in result.stderr and "Traceback" not in result.stderr
