"""The training loader's workers live for the whole run (one `TrainLoader`, persistent workers): every epoch,
resumed or not, yields exactly what a loader made for that epoch alone yields."""

from __future__ import annotations

import pytest
import torch

from gastro_dist.config import DataConfig
from gastro_dist.data.loaders import TrainLoader
from gastro_dist.data.shard_index import load_shard_index


def _keys(batches) -> list[tuple[str, ...]]:
    return [tuple(batch["key"]) for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_loader_serves_every_epoch_and_resume_as_fresh_ones(synthetic_shards, num_workers):
    index = load_shard_index(synthetic_shards)
    cfg = DataConfig(image_size=48, batch_size=4, num_workers=num_workers, shuffle_buffer=8)

    def fresh() -> TrainLoader:
        return TrainLoader(index, cfg, seed=3, rank=0, world_size=1)

    loader = fresh()
    workers_before = None
    for epoch in (0, 1, 7):
        batches = list(loader.epoch(epoch))
        assert _keys(batches) == _keys(fresh().epoch(epoch)), epoch
        if num_workers:  # the same worker processes every epoch
            workers = {w.pid for w in loader.loader._iterator._workers}
            assert workers_before is None or workers == workers_before
            workers_before = workers
    # Resumed after 2 batches with the workers' positions, from the same long-lived loader: the rest of the epoch.
    whole = list(fresh().epoch(5))
    positions = [0] * max(num_workers, 1)
    for batch in whole[:2]:
        positions[int(batch["worker"][0])] = int(batch["position"].max()) + 1
    resumed = list(loader.epoch(5, resume_batches=2, resume_positions=positions))
    assert _keys(resumed) == _keys(whole[2:])
    assert all(torch.equal(a["augment"], b["augment"]) for a, b in zip(resumed, whole[2:]))
    # An epoch left after one batch (max_steps_per_epoch) does not leak into the next.
    next(loader.epoch(2))
    assert _keys(loader.epoch(3)) == _keys(fresh().epoch(3))
