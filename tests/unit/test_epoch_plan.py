"""The epoch plan on its own: every sample exactly once per epoch where promised, equal steps on
every rank, for odd shard counts and world sizes 1 to 8."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from gastro_dist import UserError
from gastro_dist.data.epoch_plan import (Chunk, eval_batches_per_rank, eval_worker_chunks, even_split, shuffled_shards,
                                         train_steps_per_epoch, train_worker_chunks)
from gastro_dist.data.shard_index import ShardFile

SHARD_COUNTS = [(7,), (5, 3, 11), (1, 1, 1, 1, 1, 2), (13, 0, 9, 4, 6, 2, 8)]


def _shards(counts: tuple[int, ...]) -> list[ShardFile]:
    return [ShardFile(Path(f"train-{i:06d}.tar"), n) for i, n in enumerate(counts)]


def _positions(chunks: list[Chunk]) -> list[tuple[str, int]]:
    return [(chunk.shard.path.name, i) for chunk in chunks for i in range(chunk.start, chunk.stop)]


@pytest.mark.parametrize("parts", range(1, 9))
@pytest.mark.parametrize("total", [0, 1, 7, 8, 29])
def test_even_split_sums_and_differs_by_at_most_one(total, parts):
    shares = even_split(total, parts)
    assert len(shares) == parts and sum(shares) == total and max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)


@pytest.mark.parametrize("counts", SHARD_COUNTS)
@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_evaluation_reads_every_sample_exactly_once(counts, world_size, num_workers):
    shards = _shards(counts)
    seen: Counter = Counter()
    for rank in range(world_size):
        per_worker = eval_worker_chunks(shards, rank=rank, world_size=world_size, num_workers=num_workers)
        assert len(per_worker) == num_workers
        seen.update(p for chunks in per_worker for p in _positions(chunks))
    expected = {(s.path.name, i) for s in shards for i in range(s.count)}
    assert set(seen) == expected and set(seen.values()) <= {1}
    batches = eval_batches_per_rank(sum(counts), world_size, num_workers, batch_size=4)
    assert len(batches) == world_size and max(batches) - min(batches) <= num_workers


@pytest.mark.parametrize("counts", SHARD_COUNTS)
@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_training_gives_every_rank_the_same_full_batches_without_repeats(counts, world_size, num_workers):
    shards, batch_size = _shards(counts), 2
    total = sum(counts)
    if total < world_size * batch_size:
        with pytest.raises(UserError, match="fewer than one batch per process"):
            train_steps_per_epoch(total, world_size, batch_size)
        return
    steps = train_steps_per_epoch(total, world_size, batch_size)
    seen: Counter = Counter()
    for rank in range(world_size):
        per_worker = train_worker_chunks(shards, seed=3, epoch=1, rank=rank, world_size=world_size,
                                         batch_size=batch_size, num_workers=num_workers)
        sizes = [len(_positions(chunks)) for chunks in per_worker]
        assert all(size % batch_size == 0 for size in sizes), "a worker got a partial batch"
        assert sum(sizes) == steps * batch_size, f"rank {rank} does not run {steps} steps"
        seen.update(p for chunks in per_worker for p in _positions(chunks))
    assert set(seen.values()) <= {1}, "a sample was planned twice in one epoch"
    assert len(seen) == steps * batch_size * world_size  # only the remainder, under one global batch, is left out
    assert total - len(seen) < world_size * batch_size


def test_shard_order_changes_with_the_epoch_and_is_the_same_on_every_rank():
    shards = _shards((1,) * 12)
    assert shuffled_shards(shards, 0, 1) == shuffled_shards(shards, 0, 1)
    assert shuffled_shards(shards, 0, 1) != shuffled_shards(shards, 0, 2)
    assert sorted(shuffled_shards(shards, 0, 1), key=lambda s: s.path) == shards
