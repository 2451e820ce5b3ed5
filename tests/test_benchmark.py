"""`gastro-dist bench loader` and `gastro-dist bench train` through the real CLI on the tiny synthetic
shard set: every JSON figure is there and positive (no timing assertions: CI machines are shared);
and the fast training augmentation they measure: torchvision's steps, seeded, within its ranges."""

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


# ---------------------------------------------------------------- the training augmentation it measures
def _test_image(size: int = 96):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(30, 220, (size, size, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def test_train_augmentation_is_torchvision_steps_on_faster_kernels():
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from gastro_dist.config import DataConfig
    from gastro_dist.data.pipeline import train_transform

    cfg = DataConfig(image_size=64)
    augment = train_transform(cfg)
    image = _test_image()
    resized = augment._resized_crop(image, (5, 7, 85, 90))
    reference = TF.resize(TF.pil_to_tensor(image)[:, 7:90, 5:85], [64, 64], antialias=True).permute(1, 2, 0)
    assert torch.equal(resized, reference)

    pil = Image.fromarray(resized.numpy())
    for hflip, vflip, angle in [(False, False, 9.0), (True, False, -12.0), (True, True, 14.5)]:
        flipped = TF.vertical_flip(pil) if vflip else pil
        expected = TF.rotate(TF.horizontal_flip(flipped) if hflip else flipped, angle)
        warped = augment._flip_rotate(resized, hflip=hflip, vflip=vflip, angle_deg=angle)
        same = (TF.pil_to_tensor(warped) == TF.pil_to_tensor(expected)).all(dim=0).float().mean()
        assert same > 0.999, (hflip, vflip, angle)  # nearest-neighbour ties may round the other way

    x = torch.rand(3, 20, 20) * 0.5 + 0.25  # no step saturates: the fused jitter is exact
    for order in ([0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.2, 0.3, 0.1]):
        matrix, offset = augment._jitter_matrix((x * 255).reshape(3, -1), [0.9, 0.2, 0.6], order)
        brightness, contrast, saturation = (0.9 + 0.2 * u for u in (0.9, 0.2, 0.6))
        y = x
        for step in sorted(range(3), key=order.__getitem__):
            y = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation][step](
                y, [brightness, contrast, saturation][step])
        fused = torch.addmm(offset, matrix, (x * 255).reshape(3, -1)).view(3, 20, 20)
        assert torch.allclose(fused, TF.normalize(y, cfg.mean, cfg.std), atol=1e-5)


def test_train_augmentation_is_seeded_and_keeps_its_ranges():
    from gastro_dist.config import DataConfig
    from gastro_dist.data.pipeline import train_transform

    cfg = DataConfig(image_size=48, crop_scale_min=0.35)
    augment, image = train_transform(cfg), _test_image()
    torch.manual_seed(5)
    first = augment(image)
    torch.manual_seed(5)
    assert torch.equal(first, augment(image)) and first.shape == (3, 48, 48) and first.dtype == torch.float32
    for _ in range(200):
        left, top, right, bottom = augment._crop_box(96, 96, torch.rand(40).tolist())
        area, ratio = (right - left) * (bottom - top) / 96**2, (right - left) / (bottom - top)
        assert 0 <= left < right <= 96 and 0 <= top < bottom <= 96
        assert 0.33 <= area <= 1.0 and 0.72 <= ratio <= 1.39
