"""The training stream: deterministic, seeded batches of usable samples per epoch (resume re-reads the same ones)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.webdataset import SampleDataset, SkipReport, collate_samples


class EpochStream:
    """Deterministic batches of usable samples for one epoch: WebDataset shards through a DataLoader, a seeded
    sample shuffle buffer in the main process, batches of exactly ``batch_size`` (a final partial batch is dropped,
    so every in-batch loss sees the same B). Skipped samples are counted in ``report``, never trained on.

    The order depends on (seed, epoch, shards, worker count), not on timing, so a resumed run re-reads the same
    batches.
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
    ) -> None:
        self.dataset = SampleDataset(shards, image_transform=transform, policy=policy)
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.shuffle_buffer = shuffle_buffer
        self.report = report

    def __call__(self, epoch: int) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.workers,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        rng = random.Random(self.seed * 7919 + epoch)
        buffer: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []

        def emit(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
            batch.append(item)
            if len(batch) == self.batch_size:
                out = collate_samples(batch)
                batch.clear()
                yield out

        for sample in loader:
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
