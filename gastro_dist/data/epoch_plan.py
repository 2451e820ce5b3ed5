"""The epoch plan: which DataLoader worker of which rank reads which shard samples. Pure functions of
the shard counts, the seed and the epoch, so that every rank computes the same plan on its own
(why not webdataset's splitters, and the rules: shards/README.md, "How an epoch is planned")."""

from __future__ import annotations

import random
from dataclasses import dataclass

from gastro_dist import UserError
from gastro_dist.data.shard_index import ShardFile


@dataclass(frozen=True)
class Chunk:
    """A contiguous run [start, stop) of one shard's samples."""
    shard: ShardFile
    start: int
    stop: int


def even_split(total: int, parts: int) -> list[int]:
    """`total` in `parts` whole shares differing by at most one, the larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def shuffled_shards(shards: list[ShardFile], seed: int, epoch: int) -> list[ShardFile]:
    """The epoch's shard order: a permutation seeded by (seed, epoch)."""
    order = list(shards)
    random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    return order


def whole_shards(shards: list[ShardFile]) -> list[Chunk]:
    return [Chunk(shard, 0, shard.count) for shard in shards if shard.count]


def _slice_sequence(shards: list[ShardFile], start: int, stop: int) -> list[Chunk]:
    """The shard chunks covering global positions [start, stop) of the concatenated shards."""
    chunks, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.count)
        if lo < hi:
            chunks.append(Chunk(shard, lo - offset, hi - offset))
        offset += shard.count
    return chunks


def train_steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    steps = num_samples // (world_size * batch_size)
    if steps == 0:
        raise UserError(f"the training split has {num_samples} samples, fewer than one batch per process "
                        f"({world_size} processes x batch_size {batch_size}); lower data.batch_size or use fewer processes")
    return steps


def train_worker_chunks(shards: list[ShardFile], *, seed: int, epoch: int, rank: int, world_size: int,
                        batch_size: int, num_workers: int) -> list[list[Chunk]]:
    """Per DataLoader worker of `rank`, the shard chunks it reads this epoch: whole batches each (the
    DataLoader yields its workers' batches round-robin), every rank the same number of batches."""
    steps = train_steps_per_epoch(sum(s.count for s in shards), world_size, batch_size)
    ordered = shuffled_shards(shards, seed, epoch)
    start = rank * steps * batch_size
    result = []
    for num_batches in even_split(steps, num_workers):
        stop = start + num_batches * batch_size
        result.append(_slice_sequence(ordered, start, stop))
        start = stop
    return result


def eval_worker_chunks(shards: list[ShardFile], *, rank: int, world_size: int, num_workers: int) -> list[list[Chunk]]:
    """Every sample exactly once across all ranks and workers, in shard order."""
    rank_sizes = even_split(sum(s.count for s in shards), world_size)
    start = sum(rank_sizes[:rank])
    result = []
    for size in even_split(rank_sizes[rank], num_workers):
        result.append(_slice_sequence(shards, start, start + size))
        start += size
    return result


def eval_batches_per_rank(num_samples: int, world_size: int, num_workers: int, batch_size: int) -> list[int]:
    """Number of (possibly partial) batches each rank's evaluation loader yields."""
    return [sum(-(-n // batch_size) for n in even_split(rank_n, num_workers))
            for rank_n in even_split(num_samples, world_size)]
