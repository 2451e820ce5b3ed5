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
