"""The training stream: deterministic, seeded batches of usable samples per epoch (resume re-reads the same ones).

The order depends only on the seed, the epoch, the data and the number of ranks, never on the number of DataLoader
workers (:mod:`mcad_cache.distill.chunks`: shards are read in chunks of consecutive samples and put back in order).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.webdataset import SkipReport, collate_samples
from mcad_cache.distill.chunks import CHUNK_SIZE, ChunkDataset, iter_chunk_samples


class EpochStream:
    """Deterministic batches of usable samples for one epoch: WebDataset shards read in chunks by DataLoader workers,
    put back in canonical order (sorted shards, tar order), a seeded sample shuffle buffer in the main process,
    batches of exactly ``batch_size`` (a final partial batch is dropped, so every in-batch loss sees the same B).
    Skipped samples are counted in ``report``, never trained on.

    The order depends on (seed, epoch, shards, rank, world size), not on the worker count or timing, so a resumed
    run re-reads the same batches and ``--workers`` changes only the speed.

    Args:
        shards: the training shards (expanded paths).
        transform: the student's image transform.
        policy: decode policy.
        batch_size: samples per batch (per rank).
        workers: DataLoader decode processes (0 = in the main process).
        seed: the run's seed.
        shuffle_buffer: samples held for shuffling (<= 1: stream order).
        report: where skipped samples are counted.
        rank, world_size: this process's share of the chunks under DDP.
        chunk_size: samples per chunk (the unit a worker reads).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        transform: Callable[[Any], torch.Tensor],
        policy: DecodePolicy,
        batch_size: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
        report: SkipReport,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.dataset = ChunkDataset(
            shards, image_transform=transform, policy=policy, rank=rank, world_size=world_size, chunk_size=chunk_size
        )
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.shuffle_buffer = shuffle_buffer
        self.report = report

    @property
    def keys(self) -> dict[str, str]:
        """Every sample key of the shards (from the tar headers), mapped to the shard that owns it."""
        return self.dataset.key_owner

    def __call__(self, epoch: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed * 7919 + epoch)
        self.dataset.epoch = epoch  # issue 16: replayed views are chosen per (seed, epoch, key)
        buffer: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []

        def emit(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
            batch.append(item)
            if len(batch) == self.batch_size:
                out = collate_samples(batch)
                out["epoch"] = epoch  # issue 16: the join takes the targets of the views chosen for this epoch
                batch.clear()
                yield out

        for sample in iter_chunk_samples(self.dataset, workers=self.workers, seed=self.seed * 1_000_003 + epoch):
            self.report.add(sample)
            if sample["skip"] is not None:
                continue
            if self.shuffle_buffer <= 1:
                yield from emit(sample)
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield from emit(buffer.pop())
        while buffer:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield from emit(buffer.pop())


__all__ = ["EpochStream"]
