"""`gastro-dist bench loader` and `gastro-dist bench train` through the real CLI on the tiny synthetic
shard set: every JSON figure is there and positive (no timing assertions: CI machines are shared)."""

from __future__ import annotations

import json

import pytest
import torch

from gastro_dist.cli import main

TINY = ["--batch-size", "4", "--image-size", "48"]


def test_bench_loader_compares_shards_with_image_folder(synthetic_source, synthetic_shards, tmp_path):
    out = tmp_path / "loader.json"
    assert main(["bench", "loader", "--shards", str(synthetic_shards), "--source", str(synthetic_source),
                 "--workers", "1", "--batches", "3", *TINY, "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    for key in ("shards_images_per_s", "baseline_images_per_s", "ratio", "worker_cpu_ratio"):
        assert result[key] > 0, key
    assert result["workers"] == 1 and result["image_size"] == 48 and result["batch_size"] == 4
    for run in (result["shards"], result["baseline"]):
        assert run["batches"] >= 3 and run["images"] == 4 * run["batches"]
        assert run["images_per_s_per_worker"] > 0 and run["worker_cpu_ms_per_image"] > 0
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and len(machine["load_average"]) == 3
    assert machine["torch"] == torch.__version__ and machine["torchvision"] and machine["pillow"]


def test_bench_train_compute_only_and_end_to_end(synthetic_shards, tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--model", "resnet18", *TINY, "--precision", "no", "--steps", "2",
                 "--warmup", "1", "--shards", str(synthetic_shards), "--workers", "0", "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and result["end_to_end_images_per_s"] > 0
    assert result["model_flops_per_image"] > 0 and result["achieved_flops_per_s"] > 0
    assert (result["model"], result["batch_size"], result["image_size"], result["precision"]) == ("resnet18", 4, 48, "no")
    assert result["device"]
    if not torch.cuda.is_available():
        assert result["mfu"] is None and result["peak_memory_gib"] is None


def test_bench_commands_time_decoding_on_the_device(synthetic_shards, tmp_path):
    out = tmp_path / "loader.json"
    assert main(["bench", "loader", "--shards", str(synthetic_shards), "--workers", "1", "--batches", "3", *TINY,
                 "--decode-on", "device", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decode_on"] == "device" and result["shards_images_per_s"] > 0 and result["baseline"] is None
    assert main(["bench", "train", "--model", "resnet18", *TINY, "--precision", "no", "--steps", "2", "--warmup", "1",
                 "--shards", str(synthetic_shards), "--workers", "0", "--decode-on", "device", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decode_on"] == "device" and result["end_to_end_images_per_s"] > 0


def test_bench_train_refuses_fp16_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    assert main(["bench", "train", "--model", "resnet18", *TINY, "--precision", "fp16"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_train_measures_mfu_on_a_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--model", "resnet18", "--batch-size", "32", "--image-size", "224",
                 "--precision", "bf16", "--channels-last", "--steps", "5", "--warmup", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["mfu"] < 1 and result["matmul_flops_per_s"] > 1e12 and result["peak_memory_gib"] > 0


@pytest.mark.parametrize("backend, extra", [("torch", []), ("torch", ["--contiguous", "--precision", "bf16"]),
                                            ("onnx", [])])
def test_bench_infer_times_evaluates_forward_pass(tmp_path, backend, extra):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "infer.json"
    assert main(["bench", "infer", "--model", "resnet18", *TINY, "--backend", backend, "--batches", "2",
                 "--warmup", "1", *extra, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and result["ms_per_batch"] > 0 and result["backend"] == backend
    assert result["runs_on"] == ("CPUExecutionProvider" if backend == "onnx" else "cpu") or torch.cuda.is_available()
    assert result["channels_last"] == (None if backend == "onnx" else "--contiguous" not in extra)


def test_bench_infer_refuses_what_cannot_run(capsys):
    assert main(["bench", "infer", "--model", "resnet18", *TINY, "--backend", "onnx", "--precision", "bf16"]) == 2
    assert "fp32" in capsys.readouterr().err
