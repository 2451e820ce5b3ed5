"""The training and evaluation DataLoaders over shards: `ShardSamples`, one rank's samples for one
epoch as the epoch plan gives them, read by the shard reader, decoded and augmented in the workers,
with skipped samples reported and exact resume inside an epoch (shards/README.md)."""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from gastro_dist import UserError
from gastro_dist.config import DataConfig
from gastro_dist.data.augmentation import TrainAugmentation, eval_transform, train_transform
from gastro_dist.data.decode import CorruptSample, decode_stored, stored_image_header
from gastro_dist.data.epoch_plan import (Chunk, eval_worker_chunks, even_split, shuffled_shards, train_steps_per_epoch,
                                         train_worker_chunks, whole_shards)
from gastro_dist.data.shard_index import ShardIndex
from gastro_dist.data.shard_reader import ShardReadError, TarSample, iter_shard_samples, parse_label


class ShardSamples(IterableDataset):
    """One rank's samples for one epoch; each DataLoader worker reads its own chunks.

    `worker_chunks[w]` are worker w's shard chunks. Yields dicts with `image`, `label`, (training:
    `augment`, see `TrainAugmentation`), `key`, `worker`, `position` (the sample's index in the
    worker's raw stream, what resume skips to) and `skipped` (the broken samples passed over since
    the previous item, as a list of reasons).
    A broken sample (unreadable tar data, undecodable image, missing member, a label outside the
    classes, a key that is not a plain name, an oversized member) is skipped and reported, or raises
    `CorruptSample` when `strict`. In training (`planned_per_worker` given) a worker that lost samples
    refills from further passes over `refill_chunks` (the whole split), so that every rank still
    yields exactly its planned number of batches and DDP stays in step; a refill pass that yields
    nothing means nothing in the split is usable, and stops the run. Problems are reported from the
    first pass only: refill passes meet the same ones again.
    """

    def __init__(self, worker_chunks: list[list[Chunk]], transform, *, num_classes: int, max_member_bytes: int,
                 decode_short_side: int, stored_short_side: int = 0, shuffle_buffer: int = 0, seed: int = 0,
                 epoch: int = 0, rank: int = 0, planned_per_worker: list[int] | None = None,
                 refill_chunks: list[Chunk] | None = None, skip_positions: list[int] | None = None,
                 with_meta: bool = False, strict: bool = False, first_slot: int = 0, decode_on_device: bool = False):
        self.worker_chunks = worker_chunks
        self.transform = transform
        self.num_classes, self.max_member_bytes = num_classes, max_member_bytes
        self.decode_short_side, self.stored_short_side = decode_short_side, stored_short_side
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.planned_per_worker = planned_per_worker
        self.refill_chunks = refill_chunks or [c for chunks in worker_chunks for c in chunks]
        self.skip_positions = skip_positions or [0] * len(worker_chunks)
        self.with_meta = with_meta
        self.strict = strict
        self.first_slot = first_slot
        self.decode_on_device = decode_on_device

    def _report(self, reason: str, problems: _Problems | None) -> None:
        if self.strict:
            raise CorruptSample(f"{reason} (data.strict=true; set data.strict=false to skip broken samples)")
        if problems is not None:
            problems.add(reason)

    def _raw_samples(self, chunks: list[Chunk], problems: _Problems | None) -> Iterator[tuple[str, TarSample]]:
        """(shard name, sample) of each chunk in order; problems go to `problems` (None: not reported)."""
        for chunk in chunks:
            name, num_read = chunk.shard.path.name, 0
            try:
                for sample in iter_shard_samples(chunk.shard.path, self.max_member_bytes,
                                                  listed_bytes=chunk.shard.num_bytes):
                    if num_read >= chunk.stop:
                        break
                    if num_read >= chunk.start:
                        yield name, sample
                    num_read += 1
            except ShardReadError as error:
                self._report(f"{name}: {error}", problems)
            if num_read < chunk.stop:
                self._report(f"{name}: ended after {num_read} samples, index.json lists {chunk.shard.count}", problems)

    def _shuffled(self, chunks: list[Chunk], worker: int, pass_index: int,
                  problems: _Problems | None) -> Iterator[tuple[str, TarSample]]:
        stream = self._raw_samples(chunks, problems)
        if self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                 seed=f"{self.seed}:samples:{self.epoch}:{self.rank}:{worker}:{pass_index}")(stream)
        return stream

    def _decode(self, sample: TarSample) -> dict:
        """`image` and `label`, and for training the `augment` params the device half needs."""
        if sample.problem:
            raise ValueError(sample.problem)
        image_bytes = sample.members.get("jpg") or sample.members.get("png")
        if image_bytes is None or "cls" not in sample.members:
            raise ValueError("sample has no image or no cls member")
        label = parse_label(sample.members["cls"], self.num_classes)
        if self.decode_on_device:
            return {**self._undecoded(image_bytes), "label": label}
        transformed = self.transform(decode_stored(image_bytes, self.decode_short_side, self.stored_short_side))
        if isinstance(self.transform, TrainAugmentation):
            image, augment = transformed
            return {"image": image, "augment": augment, "label": label}
        return {"image": transformed, "label": label}

    def _undecoded(self, image_bytes: bytes) -> dict:
        """`data.decode_on=device`: only the JPEG header is read here, for the size the crop is drawn for."""
        width, height, image_format = stored_image_header(image_bytes)
        if image_format != "JPEG":
            raise ValueError(f"a {image_format} member: data.decode_on=device decodes JPEGs only; use data.decode_on=workers")
        box, params, _ = self.transform.draw(width, height)
        return {"jpeg": torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8),
                "crop_box": torch.tensor(box), "augment": params}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        if num_workers != len(self.worker_chunks):
            raise RuntimeError(f"planned for {len(self.worker_chunks)} workers, running with {num_workers}")
        # `worker` is the plan's slot; the DataLoader's worker 0 serves slot `first_slot`, so that a
        # resumed epoch continues the round-robin where the interrupted one stopped.
        worker = ((info.id if info is not None else 0) + self.first_slot) % num_workers
        planned = None if self.planned_per_worker is None else self.planned_per_worker[worker]
        if planned == 0:
            return
        problems = _Problems()
        yielded, position = 0, 0
        for pass_index in itertools.count():
            chunks = self.worker_chunks[worker] if pass_index == 0 else self.refill_chunks
            reported = problems if pass_index == 0 else None
            yielded_in_pass = resumed_in_pass = 0
            for shard_name, sample in self._shuffled(chunks, worker, pass_index, reported):
                position += 1
                if position <= self.skip_positions[worker]:  # consumed before the checkpoint
                    resumed_in_pass += 1
                    continue
                try:
                    with _augmentation_seed(hash((self.seed, self.epoch, self.rank, worker, position - 1)), info is None):
                        item = self._decode(sample)
                except Exception as error:  # any broken sample: PIL, missing member, bad label
                    self._report(f"{shard_name}#{sample.key}: {type(error).__name__}: {error}", reported)
                    continue
                item.update(key=sample.key, worker=worker, position=position - 1, skipped=problems.take())
                if self.with_meta:
                    item["meta"] = sample.members.get("json", b"{}").decode("utf-8", errors="replace")
                yield item
                yielded += 1
                yielded_in_pass += 1
                if planned is not None and yielded >= planned:
                    return
            if planned is None:
                return
            if pass_index > 0 and yielded_in_pass == resumed_in_pass == 0:
                shards = sorted({c.shard.path.name for c in self.refill_chunks})
                raise CorruptSample(f"no usable training sample in {', '.join(shards)} (first problem: "
                                    f"{problems.first or 'none recorded'}); run `gastro-dist verify` on the shard "
                                    "folder and re-pack the data")


class _Problems:
    """Reasons for skipped samples: `pending` until the next yielded item carries them away, and the
    `first` one, for the error of a worker that finds nothing usable."""

    def __init__(self):
        self.pending: list[str] = []
        self.first: str | None = None

    def add(self, reason: str) -> None:
        self.pending.append(reason)
        self.first = self.first or reason

    def take(self) -> list[str]:
        taken, self.pending = self.pending, []
        return taken


class _augmentation_seed:
    """Seed the augmentation of one sample from its position, so a resumed epoch is augmented
    exactly like an uninterrupted one. In the main process (num_workers=0) the global RNG is
    restored afterwards, so the training step's own randomness (dropout) is untouched."""

    def __init__(self, seed: int, restore: bool):
        self.seed, self.restore = seed & 0x7FFF_FFFF, restore

    def __enter__(self):
        if self.restore:
            self.saved = torch.random.get_rng_state()
        # Only the CPU generator: torch.manual_seed would also queue a lazy CUDA seeding, with a
        # formatted stack trace, for every sample (a tenth of a millisecond each).
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self.restore:
            torch.random.set_rng_state(self.saved)
        return False


def collate_samples(items: list[dict]) -> dict:
    """torch's default collation, except that the skip reasons of all items become one flat list, and
    JPEG bytes of different lengths (`data.decode_on=device`) become one byte tensor and their
    lengths: one shared-memory block per batch, not one per image."""
    skipped = [reason for item in items for reason in item.pop("skipped", [])]
    jpegs = [item.pop("jpeg") for item in items] if "jpeg" in items[0] else None
    batch = default_collate(items)
    batch["skipped"] = skipped
    if jpegs is not None:
        batch["jpeg"], batch["jpeg_lengths"] = torch.cat(jpegs), torch.tensor([len(j) for j in jpegs])
    return batch


def _loader(dataset: ShardSamples, batch_size: int, num_workers: int, pin_memory: bool,
            persistent: bool = False) -> DataLoader:
    # Its own generator: creating the iterator would otherwise draw from the global RNG, so a
    # resumed epoch (iterator created after the RNG state is restored) would get other dropout masks.
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=persistent and num_workers > 0, prefetch_factor=4 if num_workers else None,
                      collate_fn=collate_samples, generator=torch.Generator().manual_seed(0))


class EpochShardSamples(ShardSamples):
    """`ShardSamples` for any epoch of one rank: the epoch (its seed) and where it resumes are read, as each
    worker starts an epoch, from a tensor in shared memory that `TrainLoader.epoch` sets, so that the same
    worker processes serve every epoch and phase of a run; each worker then plans its part of the epoch
    (`plan_epoch`) exactly as a loader made for that epoch alone would."""

    def __init__(self, index: ShardIndex, cfg: DataConfig, *, seed: int, rank: int, world_size: int):
        num_slots = max(cfg.num_workers, 1)
        super().__init__([[] for _ in range(num_slots)], train_transform(cfg), num_classes=len(index.classes),
                         max_member_bytes=cfg.max_member_mb << 20, decode_short_side=cfg.image_size,
                         stored_short_side=index.stored_short_side, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                         rank=rank, strict=cfg.strict, decode_on_device=cfg.decode_on == "device")
        self.index, self.cfg, self.world_size = index, cfg, world_size
        # the epoch, the batches of it already done, then each slot's position in its raw stream
        self.state = torch.zeros(2 + num_slots, dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[dict]:
        epoch, resume_batches, *positions = (int(v) for v in self.state)
        self.plan_epoch(epoch, resume_batches, positions)
        return super().__iter__()

    def plan_epoch(self, epoch: int, resume_batches: int, positions: list[int]) -> None:
        """This rank's chunks of `epoch` and, after the first `resume_batches` batches (0: the whole epoch),
        how many samples each slot still yields; `positions[w]` is how far slot w's raw stream was consumed."""
        cfg, num_slots = self.cfg, len(self.worker_chunks)
        self.worker_chunks = train_worker_chunks(self.index.shards("train"), seed=self.seed, epoch=epoch,
                                                 rank=self.rank, world_size=self.world_size,
                                                 batch_size=cfg.batch_size, num_workers=num_slots)
        batches = even_split(train_steps_per_epoch(self.index.count("train"), self.world_size, cfg.batch_size),
                             num_slots)
        # The DataLoader yields slots round-robin, so the first `resume_batches` came from each slot in turn.
        consumed = even_split(resume_batches, num_slots)
        self.planned_per_worker = [(total - done) * cfg.batch_size for total, done in zip(batches, consumed)]
        self.refill_chunks = whole_shards(shuffled_shards(self.index.shards("train"), self.seed, epoch))
        self.skip_positions, self.first_slot, self.epoch = positions, resume_batches % num_slots, epoch


class TrainLoader:
    """One rank's training batches for a whole run: one DataLoader whose workers live across epochs and
    phases (`persistent_workers`) instead of a fresh set of processes every epoch. `epoch(...)` gives the
    batches of one epoch, resumed inside it exactly as a loader of its own would."""

    def __init__(self, index: ShardIndex, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 pin_memory: bool = False):
        self.num_slots = max(cfg.num_workers, 1)
        self.dataset = EpochShardSamples(index, cfg, seed=seed, rank=rank, world_size=world_size)
        self.loader = _loader(self.dataset, cfg.batch_size, cfg.num_workers, pin_memory, persistent=True)

    def epoch(self, epoch: int, resume_batches: int = 0, resume_positions: list[int] | None = None) -> Iterator[dict]:
        """The rest of this rank's `train_steps_per_epoch(...)` full batches of `epoch`, after the first
        `resume_batches`; `resume_positions[w]` is how far slot w's raw stream was consumed (both from the
        checkpoint)."""
        positions = resume_positions or [0] * self.num_slots
        if len(positions) != self.num_slots:
            raise UserError(f"the checkpoint was written with {len(positions)} data workers per process and this run "
                            f"has {self.num_slots}; resume with data.num_workers={len(positions)}")
        self.dataset.state.copy_(torch.tensor([epoch, resume_batches, *positions], dtype=torch.int64))
        return iter(self.loader)  # the workers read the state as they start this epoch


def eval_loader(index: ShardIndex, cfg: DataConfig, split: str, *, rank: int, world_size: int,
                pin_memory: bool = False, with_meta: bool = False) -> DataLoader:
    """Every sample of `split` exactly once across ranks, in a fixed order, with eval preprocessing."""
    num_slots = max(cfg.num_workers, 1)
    chunks = eval_worker_chunks(index.shards(split), rank=rank, world_size=world_size, num_workers=num_slots)
    dataset = ShardSamples(chunks, eval_transform(cfg), num_classes=len(index.classes),
                           max_member_bytes=cfg.max_member_mb << 20,
                           decode_short_side=round(cfg.image_size / cfg.eval_crop_ratio),
                           stored_short_side=index.stored_short_side, with_meta=with_meta, strict=cfg.strict)
    return _loader(dataset, cfg.eval_batch_size, cfg.num_workers, pin_memory)


def check_stored_resolution(data: DataConfig, index: ShardIndex) -> str | None:
    """How much larger than stored the model would see the images: a warning (returned) above 1, a
    UserError above data.max_upsampling. The stored short side is pack's --resize-short (0: originals
    kept, nothing to check)."""
    stored = index.stored_short_side
    needed = round(data.image_size / data.eval_crop_ratio)
    if not stored or needed <= stored:
        return None
    factor = needed / stored
    what = (f"data.image_size={data.image_size} needs images with a short side of {needed} px and {index.root} "
            f"stores {stored} px: the model sees them enlarged {factor:.2f}x")
    if factor > data.max_upsampling:
        raise UserError(f"{what}, more than data.max_upsampling={data.max_upsampling:g}; re-pack with --input-size "
                        f"{data.image_size} into a new folder, or set data.max_upsampling={factor:.2f} to train anyway")
    return f"{what} (re-pack with --input-size {data.image_size} for full detail)"
