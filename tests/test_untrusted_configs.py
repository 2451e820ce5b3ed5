"""Configs, overrides and the JSON others hand over (model.json, index.json, tracking.json) as hostile
input, and the bench, export and key-file mistakes a user makes: each is one line on stderr with its exit
status (2 usage, 1 run failure), fast and in bounded memory, and nothing is written outside the run."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist.cli import main
from gastro_dist.data.pseudonym import load_pseudonymiser

SMOKE = str(REPO / "configs" / "smoke.yaml")
KEY = b"9f1c2e7a5b3d4c6e8f0a1b2c3d4e5f60"
DEEP = 100_000  # levels: far past Python's recursion limit


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def billion_laughs(flow: bool) -> str:
    """~1 KB of YAML whose aliases expand to 9**9 (387 million) strings."""
    levels = [f"&a [{', '.join(['lol'] * 9)}]"]
    levels += [f"&{name} [{', '.join([f'*{below}'] * 9)}]" for below, name in zip("abcdefgh", "bcdefghi")]
    if flow:
        return f"[{', '.join(levels)}]"
    return "".join(f"l{n}: {level}\n" for n, level in enumerate(levels)) + "tracking:\n  tags: *i\n"


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("untrusted") / "run"
    assert main(["train", "--config", SMOKE, "--shards", str(synthetic_shards), "--out", str(run),
                 *TINY_TRAIN_OVERRIDES]) == 0
    return run


def run_copy(trained_run: Path, folder: Path, **model_json) -> Path:
    """A run folder with the trained weights and model.json's fields replaced by `model_json`."""
    run = folder / "run"
    run.mkdir()
    (run / "model.safetensors").symlink_to(trained_run / "model.safetensors")
    meta = json.loads((trained_run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, **model_json}))
    return run


# ---------------------------------------------------------------- YAML: aliases, depth, not a mapping
@pytest.mark.parametrize("where", ["file", "override"])
def test_a_billion_laughs_is_refused_at_once_in_bounded_memory(tmp_path, capsys, where):
    config = tmp_path / "laughs.yaml"
    config.write_text(billion_laughs(flow=False))
    args = [str(config)] if where == "file" else [SMOKE, f"tracking.tags={billion_laughs(flow=True)}"]
    assert main(["config", "check", SMOKE]) == 0  # the imports, outside what is measured
    capsys.readouterr()
    tracemalloc.start()
    started = time.perf_counter()
    status = main(["config", "check", *args])
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert status == 2
    assert "aliases are not accepted" in one_line(capsys)
    assert elapsed < 0.5 and peak < 5 * 2**20, (elapsed, peak)


def test_a_class_map_with_aliases_is_refused(tmp_path, capsys):
    Image.new("RGB", (64, 64), (90, 30, 30)).save(tmp_path / "frame.png")
    class_map = tmp_path / "map.yaml"
    class_map.write_text(billion_laughs(flow=False))

    assert main(["pack", str(tmp_path), "--out", str(tmp_path / "out"), "--class-map", str(class_map)]) == 2
    assert "aliases are not accepted" in one_line(capsys)


@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, capsys, where):
    nested = "[" * DEEP + "]" * DEEP
    config = tmp_path / "deep.yaml"
    config.write_text(f"tracking:\n  tags: {nested}\n")
    args = [str(config)] if where == "file" else [SMOKE, f"tracking.tags={nested}"]

    assert main(["config", "check", *args]) == 2
    assert "nested deeper than 32 levels" in one_line(capsys)


def test_an_override_key_cannot_nest_either(capsys):
    assert main(["config", "check", SMOKE, "model" + ".x" * 1000 + "=1"]) == 2
    assert "must look like key=value" in one_line(capsys)


@pytest.mark.parametrize("content", ["[]", "false", "42", "just text", "- head\n- finetune\n"])
def test_a_config_that_is_not_a_mapping_is_refused(tmp_path, capsys, content):
    config = tmp_path / "config.yaml"
    config.write_text(content)

    assert main(["config", "check", str(config)]) == 2
    assert "not a mapping of keys" in one_line(capsys)


def test_a_config_of_comments_only_is_the_defaults(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("# nothing set yet\n")
    assert main(["config", "check", str(config)]) == 0


def test_an_error_line_quotes_at_most_a_short_excerpt_of_a_value(capsys):
    assert main(["config", "check", SMOKE, "mixed_precision=" + "x" * 1_000_000]) == 2
    line = one_line(capsys)
    assert "mixed_precision" in line and len(line) < 300


@pytest.mark.parametrize("value", ["1e29", "100000000000000000000000000000", "-1", "4294967296"])
def test_a_seed_out_of_range_is_one_line_naming_it(capsys, value):
    assert main(["config", "check", SMOKE, f"seed={value}"]) == 2
    assert "seed" in one_line(capsys)


# ---------------------------------------------------------------- paths from configs and run files
@pytest.mark.parametrize("tracker", ["none", "wandb", "mlflow", "tensorboard"])
def test_a_tracking_project_cannot_write_outside_the_run(tmp_path, capsys, monkeypatch, tracker):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    run = tmp_path / "a" / "b" / "c" / "run"
    before = tree(tmp_path)
    for project in ("../../../X", str(tmp_path / "X")):
        assert main(["train", "--config", SMOKE, "--shards", str(tmp_path / "shards"), "--out", str(run),
                     *TINY_TRAIN_OVERRIDES, f"tracking.tracker={tracker}", f"tracking.project={project}"]) == 2
        assert "project must be a plain name" in one_line(capsys)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "tensorboard"])
def test_a_tracking_json_handed_over_cannot_write_outside_the_run(trained_run, synthetic_shards, tmp_path, capsys,
                                                                  monkeypatch, tracker):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    run = run_copy(trained_run, tmp_path)
    for saved, expected in (({"project": "../../../X"}, "project must be a plain name"),
                            ({"project": str(tmp_path / "X")}, "project must be a plain name"),
                            ({"project": "p", "wandb_run_id": "../../../X"}, "wandb_run_id")):
        if "wandb_run_id" in saved and tracker != "wandb":
            continue
        (run / "tracking.json").write_text(json.dumps({"trackers": [tracker], **saved}))
        before = tree(tmp_path)
        assert main(["evaluate", "--run", str(run), "--shards", str(synthetic_shards), "--out", str(run / "eval"),
                     "--bootstrap", "0", "--workers", "0"]) == 1
        assert expected in one_line(capsys)
        assert {path for path in tree(tmp_path) - before if not path.startswith("run/")} == set()
        assert not (tmp_path / "X").exists()


# ---------------------------------------------------------------- JSON handed over: model.json, index.json
def test_deeply_nested_model_json_is_one_line(trained_run, tmp_path, capsys):
    run = run_copy(trained_run, tmp_path)
    (run / "model.json").write_text('{"classes": ' + "[" * DEEP + "]" * DEEP + "}")
    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 64), (90, 30, 30)).save(image)

    assert main(["predict", "--run", str(run), str(image), "--out", str(tmp_path / "p.csv")]) == 2
    assert "nested deeper than 32 levels" in one_line(capsys)


@pytest.mark.parametrize("image_size", [200_000, 4097, 48.5, "48"])
@pytest.mark.parametrize("command", ["cam", "export"])
def test_an_absurd_image_size_in_model_json_is_refused_before_anything_is_allocated(trained_run, tmp_path, capsys,
                                                                                    command, image_size):
    run = run_copy(trained_run, tmp_path, image_size=image_size)
    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 64), (90, 30, 30)).save(image)
    args = ([str(image), "--out", str(tmp_path / "cams")] if command == "cam"
            else ["--format", "onnx", "--out", str(tmp_path / "m.onnx")])

    assert main([command, "--run", str(run), *args]) == 2
    assert "image_size must be a whole number of pixels in [32, 4096]" in one_line(capsys)
    assert not (tmp_path / "cams").exists() and not (tmp_path / "m.onnx").exists()


def test_deeply_nested_index_json_is_one_line(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text("[" * DEEP + "]" * DEEP)

    assert main(["train", "--config", SMOKE, "--shards", str(shards), "--out", str(tmp_path / "run"),
                 *TINY_TRAIN_OVERRIDES]) == 1
    assert "nested deeper than 32 levels" in one_line(capsys)


# ---------------------------------------------------------------- bench, export, key file
@pytest.mark.parametrize("args, option", [
    (["loader", "--batches", "0"], "--batches"),
    (["loader", "--workers", "-3"], "--workers"),
    (["loader", "--image-size", "0"], "--image-size"),
    (["loader", "--batch-size", "1000000000"], "--batch-size 1000000000"),
    (["train", "--model", "resnet18", "--image-size", "0"], "--image-size"),
    (["train", "--model", "resnet18", "--batch-size", "0"], "--batch-size"),
    (["train", "--model", "resnet18", "--batch-size", "1000000000"], "GiB for the input batch alone"),
    (["train", "--model", "resnet18", "--steps", "0"], "--steps"),
    (["infer", "--model", "resnet18", "--image-size", "200000"], "--image-size"),
])
def test_bench_option_mistakes_are_one_line_usage_errors(tmp_path, capsys, args, option):
    shards = ["--shards", str(tmp_path / "shards")] if args[0] == "loader" else []
    assert main(["bench", *args, *shards]) == 2
    assert option in one_line(capsys)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_to_a_path_that_cannot_be_written_is_one_line(trained_run, capsys, fmt):
    pytest.importorskip("onnx")
    out = f"/proc/self/x.{fmt}"
    assert main(["export", "--run", str(trained_run), "--format", fmt, "--out", out]) == 1
    assert out in one_line(capsys)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o640, True), (0o600, False), (0o400, False)])
def test_a_key_file_others_can_read_is_warned_about(tmp_path, capsys, mode, warned):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    key_file.chmod(mode)

    assert load_pseudonymiser(key_file, frozenset(), tmp_path / "out").enabled
    err = capsys.readouterr().err
    assert ("chmod 600" in err) == warned, err
    if warned:
        assert len(err.strip().splitlines()) == 1 and err.startswith("warning: ")
