"""Where users trip: each mistake gets one line naming what to do instead (exit 2), and the commands say
what a user needs to see (evaluate's headline, the epoch line, the run's first line)."""

from __future__ import annotations

import json

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_training_on_an_image_folder_suggests_packing_into_a_new_folder(synthetic_source, tmp_path, capsys):
    assert main(["train", "--config", SMOKE, "--shards", str(synthetic_source), "--out", str(tmp_path / "run")]) == 2
    err = _one_line(capsys)
    assert "holds images, not shards" in err and f"--out {synthetic_source.parent / 'images-shards'}" in err
    assert f"--out {synthetic_source} " not in err + " "  # never into the source


def test_run_one_level_down_and_cam_on_a_folder(synthetic_shards, synthetic_source, tmp_path, capsys):
    runs = tmp_path / "compare"
    assert main(["train", "--config", SMOKE, "--shards", str(synthetic_shards), "--out", str(runs / "smoke"),
                 *TINY_TRAIN_OVERRIDES, "finetune.epochs=0"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("gastro-dist train: cpu (CPU), 1 process on 1 machine, precision no |"), first
    epoch = next(line for line in out.splitlines() if line.startswith("head epoch 1/1"))
    for part in ("train loss ", "val loss ", " acc ", " lr ", " s | "):
        assert part in epoch, epoch
    assert main(["evaluate", "--run", str(runs), "--shards", str(synthetic_shards), "--out", str(tmp_path / "e")]) == 2
    assert f"pass --run {runs / 'smoke'}" in _one_line(capsys)
    frame = next(synthetic_source.rglob("*.jpg"))
    assert main(["cam", "--run", str(runs / "smoke"), str(frame.parent), "--out", str(tmp_path / "cams")]) == 2
    err = _one_line(capsys)
    assert "is a folder" in err and "gastro-dist predict" in err and not (tmp_path / "cams").exists()
    # evaluate prints the headline: accuracy with its interval, then each class's sensitivity and specificity
    assert main(["evaluate", "--run", str(runs / "smoke"), "--shards", str(synthetic_shards), "--out",
                 str(tmp_path / "eval"), "--bootstrap", "20", "--workers", "0", "--no-track"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    interval = metrics["ci"]["accuracy"]
    assert (f"recognised {100 * metrics['accuracy']:.1f}% ({100 * interval['lower']:.1f}% – "
            f"{100 * interval['upper']:.1f}%) of the") in printed
    assert "  Gastric cancer: sensitivity " in printed and "specificity" in printed


def test_compare_takes_configs_spaced_or_comma_separated(synthetic_shards, tmp_path, capsys):
    """The same --configs as slurm/compare.sbatch; a missing second file is named (checked before training)."""
    assert main(["compare", "--configs", f"{SMOKE},{tmp_path / 'missing.yaml'}", "--shards", str(synthetic_shards),
                 "--out", str(tmp_path / "c"), "--no-track"]) == 2
    assert "missing.yaml not found" in _one_line(capsys)
