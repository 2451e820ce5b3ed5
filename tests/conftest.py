"""Shared fixtures: one tiny synthetic shard set per test session, made with the project's own
synth and pack commands, and the overrides that shrink a training run to seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Both phases, a handful of steps, no tracker: a whole run in about a second on one core. ShuffleNet-V2 x0.5
# is a torchvision CNN like the paper's (BatchNorm, stages, a Linear head) with 0.35 M parameters: a run
# folder of ~13 MB where ResNet-18's is ~400 MB. Tests of ResNet-specific behaviour add model.name=resnet18.
TINY_TRAIN_OVERRIDES = [
    "model.name=shufflenet_v2_x0_5", "model.pretrained=none", "model.channels_last=false",
    "data.image_size=48", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
    "data.shuffle_buffer=16", "head.epochs=1", "finetune.epochs=1", "mixed_precision=no",
    "tracking.tracker=none", "tracking.log_every_steps=1",
]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: on a small CPU shared with DataLoader workers and subprocesses, torch's
    thread pool otherwise spins against them and the tests run several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the trainer's own thread choice steps aside for it
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    from gastro_dist.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth") / "images"
    generate_dataset(out, per_class=14, seed=3, size_range=(96, 128), images_per_patient=(1, 3), workers=1)
    return out


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_source, tmp_path_factory) -> Path:
    from gastro_dist.data.pack import PackSettings, pack_dataset

    out = tmp_path_factory.mktemp("shards") / "shards"
    settings = PackSettings(val_fraction=0.25, test_per_class=3, input_size=48, resize_short=56,
                            shard_size=8, workers=1, seed=0)
    pack_dataset(synthetic_source, out, settings, manifest=synthetic_source / "manifest.csv")
    return out


@pytest.fixture(scope="session")
def fold_shards(synthetic_source, tmp_path_factory) -> Path:
    """The synthetic source packed in 2 folds (and 3 test images per class): for cv and tune --cv."""
    from gastro_dist.data.pack import PackSettings, pack_dataset

    out = tmp_path_factory.mktemp("fold-shards") / "shards"
    settings = PackSettings(folds=2, test_per_class=3, input_size=48, resize_short=56, shard_size=8, workers=1, seed=0)
    pack_dataset(synthetic_source, out, settings, manifest=synthetic_source / "manifest.csv")
    return out


def write_untrained_run(folder: Path, classes: list[str], image_size: int, temperature: float = 1.0) -> Path:
    """A run folder holding only what inference reads (model.safetensors and model.json) of a seeded, untrained
    ShuffleNet-V2 x0.5: for tests of what is done with a model's outputs, not of what it learnt."""
    import torch
    from safetensors.torch import save_file

    from gastro_dist.config import ModelConfig
    from gastro_dist.models.backbones import build_model
    from gastro_dist.run_dir import ModelMeta, RunDir

    run = RunDir(folder)
    run.path.mkdir(parents=True)
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name="shufflenet_v2_x0_5", pretrained="none"), num_classes=len(classes),
                           load_pretrained=False, image_size=image_size)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(run.model_weights))
    ModelMeta(architecture="shufflenet_v2_x0_5", classes=classes, image_size=image_size, eval_crop_ratio=0.875,
              mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], temperature=temperature).write(run.model_json)
    return run.path
