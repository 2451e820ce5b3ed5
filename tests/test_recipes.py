"""Training recipes, all off by default: mixup/CutMix (soft, label-smoothed targets), RandAugment and
TrivialAugment on the device batch, weight EMA (validated, kept as the best when it wins, resumed
exactly) and gradient checkpointing (less activation memory, the same gradients)."""

from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import REPO, TINY_TRAIN_OVERRIDES
from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.config import DataConfig, EmaConfig, ModelConfig, TrainConfig, describe_config, load_config
from gastro_dist.data.augmentation import DeviceAugmentation, step_seed
from gastro_dist.models.backbones import build_model, head_spec
from gastro_dist.models.checkpointing import enable_grad_checkpointing
from gastro_dist.training import ema, trainer
from gastro_dist.training.distributed import PreemptionWatch
from gastro_dist.training.predict import accuracy_summary

NUM_CLASSES = 3
NO_WORKER_AUGMENTATION = {"hflip": False, "vflip": False, "rotation_deg": 0.0, "color_jitter": 0.0}


def _batch(batch_size: int = 8, size: int = 32, seed: int = 0) -> dict:
    """A TrainLoader-like batch: uint8 HWC crops, identity augmentation rows, labels 0, 1, 2, 0, ..."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
    identity = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0]).repeat(batch_size, 1)
    return {"image": images, "augment": identity, "label": torch.arange(batch_size) % NUM_CLASSES}


def _augmented(seed: int = 5, batch: dict | None = None, **data) -> tuple[torch.Tensor, torch.Tensor]:
    augment = DeviceAugmentation(DataConfig(image_size=32, **NO_WORKER_AUGMENTATION, **data), num_classes=NUM_CLASSES)
    images, targets, _ = augment.training_batch(batch or _batch(), torch.device("cpu"), channels_last=False, seed=seed)
    return images, targets


# ---------------------------------------------------------------- config
def test_recipes_are_off_by_default_and_explained_in_config_show():
    config = TrainConfig()
    assert (config.data.mixup_alpha, config.data.cutmix_alpha, config.data.auto_augment) == (0.0, 0.0, "none")
    assert config.ema.decay == 0.0 and config.model.grad_checkpointing is False
    shown = describe_config(config)
    for key in ("mixup_alpha: 0.0  # Mixup", "cutmix_alpha: 0.0  # CutMix", "mixup_prob:", "mixup_switch_prob:",
                "auto_augment: none  # Random augmentation policy", "auto_augment_magnitude:", "ema:  # Weight EMA",
                "decay: 0.0  # Exponential moving average", "grad_checkpointing: false  # Gradient checkpointing"):
        assert key in shown


@pytest.mark.parametrize("override, message", [
    ("data.mixup_alpha=-0.2", "mixup_alpha and cutmix_alpha must be >= 0"),
    ("data.cutmix_alpha=-1", "mixup_alpha and cutmix_alpha must be >= 0"),
    ("data.mixup_prob=1.5", "mixup_prob and mixup_switch_prob must be in [0, 1]"),
    ("data.auto_augment=autoaugment", "auto_augment must be none, randaugment, trivialaugment"),
    ("data.auto_augment_magnitude=31", "auto_augment_magnitude must be in [0, 30]"),
    ("ema.decay=1", "decay must be in [0, 1)"),
    ("ema.decay=-0.5", "decay must be in [0, 1)"),
])
def test_recipe_mistakes_are_one_line(override, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_a_run_folder_from_before_a_key_existed_continues_at_its_default():
    from gastro_dist.config import changed_training_keys, to_dict

    saved = to_dict(TrainConfig())
    del saved["ema"], saved["data"]["mixup_alpha"]
    assert changed_training_keys(saved, TrainConfig()) == []
    assert changed_training_keys(saved, load_config(None, ["ema.decay=0.99"])) == ["ema.decay was 0.0, now 0.99"]


# ---------------------------------------------------------------- mixup / CutMix
@pytest.mark.parametrize("recipe", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixing_mixes_images_and_targets_reproducibly_per_step(recipe):
    plain, labels = _augmented()
    images, targets = _augmented(**recipe)
    assert targets.shape == (8, NUM_CLASSES) and torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets > 0).sum(1).max() == 2  # each target mixes its label with its neighbour's
    assert not torch.equal(images, plain)
    lam = targets[0, labels[0]]  # image 0 is mixed with image 7 (torchvision pairs each with the previous one)
    if "mixup_alpha" in recipe:
        assert torch.allclose(images[0], lam * plain[0] + (1 - lam) * plain[7], atol=1e-5)
    else:  # a box of image 7 pasted into image 0, its area the share of image 7's label
        from_other = (images[0] == plain[7]).all(0) & (images[0] != plain[0]).any(0)
        assert abs(from_other.float().mean() - (1 - lam)) < 0.02
    same_images, same_targets = _augmented(**recipe)
    assert torch.equal(same_images, images) and torch.equal(same_targets, targets)  # a resumed step repeats it
    assert not torch.equal(_augmented(seed=6, **recipe)[1], targets)  # another step draws anew


def test_mixup_prob_leaves_some_batches_unmixed_with_one_hot_targets():
    unmixed = [seed for seed in range(20)
               if torch.equal(_augmented(seed, mixup_alpha=0.4, mixup_prob=0.5)[1],
                              F.one_hot(torch.arange(8) % NUM_CLASSES, NUM_CLASSES).float())]
    assert 3 <= len(unmixed) <= 17


def test_label_smoothing_applies_to_the_mixed_targets():
    _, targets = _augmented(mixup_alpha=0.4)
    logits = torch.randn(8, NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    smoothing = 0.1
    loss = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, targets)
    smoothed = targets * (1 - smoothing) + smoothing / NUM_CLASSES
    assert torch.allclose(loss, -(smoothed * logits.log_softmax(1)).sum(1).mean())


# ---------------------------------------------------------------- RandAugment / TrivialAugment
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_auto_augment_alters_each_image_on_the_device_with_its_own_draw(policy):
    batch = _batch()
    batch["image"][:] = batch["image"][0]  # eight copies of one image
    plain, _ = _augmented(batch=batch)
    rng_before = torch.get_rng_state()
    images, labels = _augmented(batch=batch, auto_augment=policy, auto_augment_magnitude=15)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the step's own randomness (dropout) untouched
    assert torch.equal(labels, batch["label"])
    changed = [not torch.equal(image, plain[0]) for image in images]
    assert sum(changed) >= 4
    assert len({image.sum().item() for image in images}) >= 4  # not one draw for the whole batch
    assert torch.equal(_augmented(batch=batch, auto_augment=policy, auto_augment_magnitude=15)[0], images)
    assert not torch.equal(_augmented(seed=6, batch=batch, auto_augment=policy, auto_augment_magnitude=15)[0], images)


def test_step_seeds_differ_per_step_and_rank_and_repeat_on_resume():
    seeds = {step_seed(0, epoch, step, rank) for epoch in (0, 1, 100_000) for step in range(50) for rank in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert step_seed(3, 1, 7, 2) == step_seed(3, 1, 7, 2)


# ---------------------------------------------------------------- EMA
def test_ema_averages_the_live_weights():
    model = torch.nn.Linear(4, 2)
    average = ema.make_ema(model, EmaConfig(decay=0.5, warmup=False))
    assert ema.make_ema(model, EmaConfig()) is None
    for step in range(1, 4):
        before = average.module.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update(model, step=step)
        expected = model.weight if step == 1 else 0.5 * before + 0.5 * model.weight  # the first step copies
        assert torch.allclose(average.module.weight, expected)
    assert not torch.equal(average.module.weight, model.weight)


def _train(run, *extra: str) -> int:
    return main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--shards", str(run.shards), "--out",
                 str(run.out), *TINY_TRAIN_OVERRIDES, *ALL_RECIPES, *extra])


ALL_RECIPES = ["data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "data.auto_augment=randaugment", "ema.decay=0.9",
               "model.grad_checkpointing=true"]


class _Run:
    def __init__(self, shards, out):
        self.shards, self.out = shards, out

    def weights(self, relative: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / relative))

    def final_ema(self) -> dict[str, torch.Tensor]:
        return self.weights("checkpoints/state-1-finetune-done/ema.safetensors")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_recipes_train_through_the_cli_and_the_winning_ema_is_the_model(synthetic_shards, tmp_path, monkeypatch):
    """Every second validation of an epoch is the EMA's: scored higher here, it must become the best
    checkpoint and the final model, and model.json must say so. A second run, stopped after its first step and
    resumed, ends with the same weights and EMA: the recipes' randomness and the EMA resume exactly."""
    calls = itertools.count(1)

    def ema_scores_higher(labels, probs, classes):
        scores = accuracy_summary(labels, probs, classes)
        return {**scores, "macro_accuracy": scores["macro_accuracy"] + 1} if next(calls) % 2 == 0 else scores

    monkeypatch.setattr(trainer, "accuracy_summary", ema_scores_higher)
    whole = _Run(synthetic_shards, tmp_path / "whole")
    assert _train(whole) == 0
    model_json = json.loads((whole.out / "model.json").read_text())
    summary = json.loads((whole.out / "summary.json").read_text())
    assert model_json["weights"] == "ema" and summary["phases"]["finetune"]["best_weights"] == "ema"
    best = whole.weights("checkpoints/finetune-best/model.safetensors")
    live = whole.weights("checkpoints/finetune-last/model.safetensors")
    assert _equal(best, whole.final_ema()) and not _equal(best, live)  # one epoch: the best is the final EMA
    assert _equal(whole.weights("model.safetensors"), best)
    events = [json.loads(line)["event"] for line in (whole.out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("val_ema") == events.count("val") == 2

    stops = itertools.count(1)
    monkeypatch.setattr(PreemptionWatch, "agreed", lambda self: next(stops) == 2)  # before the second step
    resumed = _Run(synthetic_shards, tmp_path / "resumed")
    assert _train(resumed) == 75
    monkeypatch.setattr(PreemptionWatch, "agreed", lambda self: False)
    assert _train(resumed) == 0
    assert json.loads((resumed.out / "summary.json").read_text())["resumes"][0]["step"] == 1
    assert _equal(resumed.final_ema(), whole.final_ema())
    assert _equal(resumed.weights("checkpoints/finetune-last/model.safetensors"), live)


# ---------------------------------------------------------------- gradient checkpointing
def _activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes of the tensors one forward pass keeps for the backward pass (each storage once, weights aside), as
    autograd's saved-tensor hooks see them (a checkpointed block's input included); then the backward pass."""
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    kept: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)  # the same dropout masks in both models
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        output = model(images)
    output.sum().backward()
    return sum(kept.values())


class _TinyVgg(nn.Module):
    """VGG's layout (plain convolutions between max-pools in `features`, a Linear/ReLU/Dropout classifier with a
    1000-way last layer) at a size a test can train: torchvision's VGGs hold 100 M+ parameters."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16 * 16, 64), nn.ReLU(inplace=True),
                                        nn.Dropout(), nn.Linear(64, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _model_and_head(name: str):
    if name == "vgg-like":
        model = _TinyVgg()
        return model, head_spec(model)
    return build_model(ModelConfig(name=name, pretrained="none"), num_classes=NUM_CLASSES, image_size=64)


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "vgg-like", "timm:test_convnext"])
def test_grad_checkpointing_lowers_activation_memory_and_keeps_the_gradients(name):
    torch.manual_seed(0)
    plain, spec = _model_and_head(name)
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed, spec)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # weights files stay interchangeable
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # evaluation runs the plain forward
        torch.testing.assert_close(checkpointed.eval()(images), plain.eval()(images), rtol=0, atol=0)
    plain_bytes = _activation_bytes(plain.train(), images)
    checkpointed_bytes = _activation_bytes(checkpointed.train(), images)
    print(f"{name}: {plain_bytes} bytes of activations, {checkpointed_bytes} with checkpointing")
    assert checkpointed_bytes < 0.6 * plain_bytes
    for (param_name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=param_name)


def test_grad_checkpointing_refuses_a_timm_model_without_it():
    model, spec = build_model(ModelConfig(name="timm:dla46_c", pretrained="none"), num_classes=NUM_CLASSES)
    with pytest.raises(UserError, match="has no gradient checkpointing; set model.grad_checkpointing=false"):
        enable_grad_checkpointing(model, spec)
