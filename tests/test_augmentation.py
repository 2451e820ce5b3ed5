"""The training augmentation, split between the data workers (`TrainAugmentation`) and the training
device (`DeviceAugmentation`): torchvision's steps and distributions on faster kernels, seeded per
sample, within its ranges; and the shard decoder it reads from."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from gastro_dist import UserError
from gastro_dist.config import DataConfig
from gastro_dist.data.augmentation import AUGMENT_PARAMS, DeviceAugmentation, eval_transform, train_transform
from gastro_dist.data.decode import CorruptSample, batched_resized_crops, decode_crops_on_device, decode_stored
from gastro_dist.data.loaders import TrainLoader, collate_samples
from gastro_dist.data.shard_index import load_shard_index


def _test_pixels(size: int = 96, seed: int = 0) -> torch.Tensor:
    """HWC uint8 noise away from 0 and 255, so that no jitter step saturates."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(30, 220, (size, size, 3), dtype=torch.uint8, generator=generator)


def _params(hflip=0.0, vflip=0.0, angle=0.0, factors=(1.0, 1.0, 1.0), steps=(0, 1, 2)) -> torch.Tensor:
    return torch.tensor([[hflip, vflip, angle, *factors, *steps]], dtype=torch.float32)


def test_worker_crop_is_torchvisions_antialiased_resize_for_pil_and_tensor_input():
    augment = train_transform(DataConfig(image_size=64))
    pixels = _test_pixels()
    reference = TF.resize(pixels.permute(2, 0, 1)[:, 7:90, 5:85], [64, 64], antialias=True).permute(1, 2, 0)
    from_pil = augment._resized_crop(Image.fromarray(pixels.numpy()), (5, 7, 85, 90))
    from_tensor = augment._resized_crop(pixels.permute(2, 0, 1), (5, 7, 85, 90))
    assert torch.equal(from_pil, reference) and torch.equal(from_tensor, reference)
    assert from_tensor.is_contiguous() and from_tensor.dtype == torch.uint8


def test_the_resize_filter_follows_data_interpolation_in_training_and_evaluation():
    """Bicubic-trained weights (most timm models) get bicubic crops and evaluation resizes."""
    pixels, box = _test_pixels(), (5, 7, 85, 90)
    crop = pixels.permute(2, 0, 1)[:, 7:90, 5:85]
    resized = {}
    for mode, torchvision_mode in (("bilinear", TF.InterpolationMode.BILINEAR), ("bicubic", TF.InterpolationMode.BICUBIC)):
        cfg = DataConfig(image_size=64, interpolation=mode)
        reference = TF.resize(crop, [64, 64], interpolation=torchvision_mode, antialias=True)
        resized[mode] = train_transform(cfg)._resized_crop(pixels.permute(2, 0, 1), box)
        assert torch.equal(resized[mode], reference.permute(1, 2, 0))
        resize_step = next(t for t in eval_transform(cfg).transforms if isinstance(t, v2.Resize))
        assert resize_step.interpolation == torchvision_mode
    assert not torch.equal(resized["bilinear"], resized["bicubic"])
    # data.decode_on=device: the same filter on the decoded JPEG, to within the kernels' rounding
    jpeg = _encoded(pixels)
    batch = {"jpeg": torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), "jpeg_lengths": torch.tensor([len(jpeg)]),
             "crop_box": torch.tensor([box]), "key": ["k"]}
    decoded = decode_stored(jpeg, 96).unsqueeze(0)  # what a worker would crop
    for mode in ("bilinear", "bicubic"):
        on_device, _, _ = decode_crops_on_device(batch, 64, torch.device("cpu"), mode)
        in_worker = train_transform(DataConfig(image_size=64, interpolation=mode))._resized_crop(decoded[0], box)
        assert (on_device[0] - in_worker.permute(2, 0, 1).float()).abs().max() <= 1
    assert DataConfig().resize_mode == "bilinear"  # unset: torchvision's weights' filter
    with pytest.raises(UserError, match="interpolation must be bilinear or bicubic"):
        DataConfig(interpolation="nearest")


@pytest.mark.parametrize("hflip, vflip, angle", [(0, 0, 9.0), (1, 0, -12.0), (1, 1, 14.5), (0, 1, 0.0)])
def test_device_warp_is_torchvisions_flips_then_rotation(hflip, vflip, angle):
    pixels = _test_pixels(64).permute(2, 0, 1)
    expected = TF.vertical_flip(pixels) if vflip else pixels
    expected = TF.rotate(TF.horizontal_flip(expected) if hflip else expected, angle)
    params = _params(hflip, vflip, angle)
    warped = DeviceAugmentation._flip_rotate(pixels.unsqueeze(0).float(), params[:, 0], params[:, 1], params[:, 2])
    same = (warped[0].to(torch.uint8) == expected).all(dim=0).float().mean()
    assert same > 0.999  # nearest-neighbour ties may round the other way


@pytest.mark.parametrize("steps", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_device_jitter_is_torchvisions_colour_steps_in_their_order_then_normalisation(steps):
    cfg = DataConfig()
    pixels = (_test_pixels(20) // 2 + 60).permute(2, 0, 1)  # mid-range: no step saturates, so fusing is exact
    brightness, contrast, saturation = 1.08, 0.92, 1.1
    expected = pixels.float() / 255
    for step in steps:
        expected = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation][step](
            expected, [brightness, contrast, saturation][step])
    out = DeviceAugmentation(cfg)(pixels.unsqueeze(0).float(), _params(factors=(brightness, contrast, saturation), steps=steps))
    assert out.shape == (1, 3, 20, 20) and out.dtype == torch.float32
    assert torch.allclose(out[0], TF.normalize(expected, cfg.mean, cfg.std), atol=1e-5)


def test_device_augmentation_treats_each_image_of_a_batch_with_its_own_params_and_clamps():
    cfg = DataConfig()
    augment = DeviceAugmentation(cfg)
    images = torch.stack([_test_pixels(32, seed) for seed in range(3)]).permute(0, 3, 1, 2).float()
    params = torch.cat([_params(1, 0, 10.0, (1.1, 0.9, 1.0), (2, 0, 1)), _params(),
                        _params(0, 1, -5.0, (1.3, 1.2, 0.8), (1, 2, 0))])
    batch = augment(images, params)
    for i in range(3):
        assert torch.allclose(batch[i], augment(images[i:i + 1], params[i:i + 1])[0], atol=1e-5)
    plain = TF.normalize(images[1] / 255, cfg.mean, cfg.std)
    assert torch.allclose(batch[1], plain, atol=1e-5)  # identity params: normalisation only
    bright = augment(torch.full((1, 3, 8, 8), 250.0), _params(factors=(1.5, 1.0, 1.0)))
    assert torch.allclose(bright, TF.normalize(torch.ones(1, 3, 8, 8), cfg.mean, cfg.std), atol=1e-5)


def test_worker_half_is_seeded_and_draws_within_its_ranges():
    cfg = DataConfig(image_size=48, crop_scale_min=0.35, rotation_deg=15.0, color_jitter=0.1)
    augment, pixels = train_transform(cfg), _test_pixels().permute(2, 0, 1)
    torch.manual_seed(5)
    image, params = augment(pixels)
    torch.manual_seed(5)
    again, params_again = augment(pixels)
    assert torch.equal(image, again) and torch.equal(params, params_again)
    assert image.shape == (48, 48, 3) and image.dtype == torch.uint8 and params.shape == (len(AUGMENT_PARAMS),)
    draws = torch.stack([augment(pixels)[1] for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {0.0, 1.0} and set(draws[:, 1].tolist()) == {0.0, 1.0}
    assert draws[:, 2].abs().max() <= 15.0 and draws[:, 2].abs().max() > 10.0
    assert ((draws[:, 3:6] >= 0.9) & (draws[:, 3:6] <= 1.1)).all()
    assert all(sorted(row) == [0.0, 1.0, 2.0] for row in draws[:, 6:].tolist())
    for _ in range(200):
        left, top, right, bottom = augment._crop_box(96, 96, torch.rand(40).tolist())
        area, ratio = (right - left) * (bottom - top) / 96**2, (right - left) / (bottom - top)
        assert 0 <= left < right <= 96 and 0 <= top < bottom <= 96
        assert 0.33 <= area <= 1.0 and 0.72 <= ratio <= 1.39


def test_disabled_steps_draw_identity_params():
    cfg = DataConfig(image_size=32, hflip=False, vflip=False, rotation_deg=0.0, color_jitter=0.0)
    _, params = train_transform(cfg)(_test_pixels().permute(2, 0, 1))
    assert params[:6].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def _encoded(pixels: torch.Tensor, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    image = Image.fromarray(pixels.numpy())
    buffer = io.BytesIO()
    (image if mode == "RGB" else image.convert(mode)).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def test_decode_stored_gives_rgb_chw_for_jpeg_png_and_grayscale_and_shrinks_large_jpegs():
    pixels = _test_pixels(96)
    for data in (_encoded(pixels), _encoded(pixels, fmt="PNG"), _encoded(pixels, mode="L")):
        decoded = decode_stored(data, 96)
        assert decoded.shape == (3, 96, 96) and decoded.dtype == torch.uint8
    assert torch.equal(decode_stored(_encoded(pixels, fmt="PNG"), 96), pixels.permute(2, 0, 1))
    shrunk = decode_stored(_encoded(_test_pixels(400)), 96)  # DCT-downscaled 1/4, still >= 96 on the short side
    assert shrunk.shape == (3, 100, 100)
    # the index says no stored image reaches twice the needed size: straight to the full decoder
    assert decode_stored(_encoded(_test_pixels(400)), 96, stored_short_side=150).shape == (3, 400, 400)
    with pytest.raises(Exception):
        decode_stored(_encoded(pixels)[:200], 96)  # truncated: the caller skips and reports the sample


def test_eval_transform_takes_a_pil_image_or_the_decoded_tensor_alike():
    cfg = DataConfig(image_size=48)
    data = _encoded(_test_pixels(80), fmt="PNG")
    from_pil = eval_transform(cfg)(Image.open(io.BytesIO(data)).convert("RGB"))
    from_tensor = eval_transform(cfg)(decode_stored(data, 55))
    assert from_pil.shape == (3, 48, 48) and torch.equal(from_pil, from_tensor)


# ---------------------------------------------------------------- data.decode_on=device
def _first_batch(shards, **overrides):
    cfg = DataConfig(image_size=48, batch_size=6, num_workers=0, shuffle_buffer=4, **overrides)
    loader = TrainLoader(load_shard_index(shards), cfg, seed=1, rank=0, world_size=1)
    return cfg, next(loader.epoch(0))


def test_decoding_on_the_device_feeds_what_the_workers_would(synthetic_shards):
    cfg, on_workers = _first_batch(synthetic_shards)
    _, on_device = _first_batch(synthetic_shards, decode_on="device")
    assert "image" not in on_device and on_device["jpeg"].dtype == torch.uint8
    assert on_device["jpeg_lengths"].sum() == on_device["jpeg"].numel() and on_device["crop_box"].shape == (6, 4)
    assert on_device["key"] == on_workers["key"] and torch.equal(on_device["augment"], on_workers["augment"])
    augment = DeviceAugmentation(cfg)
    from_workers, labels, _ = augment.training_batch(on_workers, torch.device("cpu"), channels_last=True)
    from_device, device_labels, problems = augment.training_batch(on_device, torch.device("cpu"), channels_last=True)
    assert problems == [] and torch.equal(labels, device_labels)
    assert from_device.shape == (6, 3, 48, 48) and from_device.is_contiguous(memory_format=torch.channels_last)
    # The device resizes the whole batch at once (`batched_resized_crops`), the workers with the uint8 kernel:
    # the float and the uint8 kernels round some values the other way, by one grey level
    pixels, _, _ = decode_crops_on_device(on_device, 48, torch.device("cpu"), cfg.resize_mode)
    pixel_difference = (pixels - on_workers["image"].permute(0, 3, 1, 2).float()).abs()
    assert pixel_difference.max() <= 1 and (pixel_difference > 0).float().mean() < 0.25
    # which the jitter (factors up to 1.1 each) may stretch a little
    assert (from_device - from_workers).abs().max() <= 1.5 / 255 / min(cfg.std)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_batched_crops_are_the_per_image_antialiased_resize(mode):
    """Frames of different sizes, boxes from a fifth to all of a frame (up- and downscaling): the batched
    crop and resize is `interpolate(antialias=True)` per crop, to float rounding (one grey level after rounding)."""
    generator = torch.Generator().manual_seed(0)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    images, boxes, reference = [], [], []
    for k in range(12):
        height, width = draw(60, 120), draw(60, 120)
        # smooth content, as mucosa is: coarse noise enlarged (pixel noise would test aliasing, not the resize)
        coarse = _test_pixels(12, seed=k).permute(2, 0, 1)[None].float()
        pixels = F.interpolate(coarse, size=(height, width), mode="bicubic").round().clamp(0, 255)[0].to(torch.uint8)
        side = draw(min(height, width) // 5, min(height, width) + 1)
        left, top = draw(0, width - side + 1), draw(0, height - side + 1)
        images.append(pixels.contiguous())
        boxes.append([left, top, left + side, top + side])
        crop = pixels[:, top:top + side, left:left + side][None].float()
        reference.append(F.interpolate(crop, size=(40, 40), mode=mode, antialias=True).round().clamp(0, 255))
    crops = batched_resized_crops(images, torch.tensor(boxes, dtype=torch.float32), 40, mode).round().clamp(0, 255)
    difference = (crops - torch.cat(reference)).abs()
    assert crops.shape == (12, 3, 40, 40)
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01, difference.max()


def test_an_image_the_device_cannot_decode_is_dropped_and_reported():
    cfg = DataConfig(image_size=32, decode_on="device")
    good, broken = _encoded(_test_pixels(64)), _encoded(_test_pixels(64, seed=1))[:300]  # header intact, data cut
    items = [{"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "crop_box": torch.tensor([0, 0, 64, 64]),
              "augment": _params()[0], "label": label, "key": f"k{label}"}
             for label, data in enumerate([good, broken, good])]
    batch = collate_samples(items)
    pixels, kept, problems = decode_crops_on_device(batch, 32, torch.device("cpu"), cfg.resize_mode)
    assert kept == [0, 2] and pixels.shape == (2, 3, 32, 32) and len(problems) == 1 and "k1" in problems[0]
    images, labels, reasons = DeviceAugmentation(cfg).training_batch(batch, torch.device("cpu"), channels_last=False)
    assert images.shape[0] == 2 and labels.tolist() == [0, 2] and reasons == problems
    with pytest.raises(CorruptSample, match="data.strict"):
        DeviceAugmentation(DataConfig(image_size=32, decode_on="device", strict=True)).training_batch(
            batch, torch.device("cpu"), channels_last=False)


def test_decode_on_settings_are_checked():
    with pytest.raises(UserError, match="decode_on"):
        DataConfig(decode_on="gpu")
    with pytest.raises(UserError, match="hue_jitter"):
        DataConfig(decode_on="device", hue_jitter=0.1)
