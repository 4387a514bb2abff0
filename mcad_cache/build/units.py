"""Unit bookkeeping of the cache build: which units a rank owns, image batches that never cross unit borders, and
per-unit buffers that are flushed when every batch of the unit is in.

A *unit* is ``rows_per_chunk`` rows along one dimension (images or texts), committed by one writer with a done
marker (``mcad_cache.cache.writer.STAGES``). Unit u of every stage belongs to rank ``u % world_size`` (our choice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mcad_cache.data import DecodePolicy, SampleDataset
from mcad_cache.errors import CacheSchemaError
from mcad_cache.progress import ProgressFn


def owned_units(mask: np.ndarray, *, rank: int, world_size: int) -> list[int]:
    """Units set in ``mask`` ([num_units] bool) that belong to ``rank`` (unit u belongs to rank u % world_size)."""
    return [int(u) for u in np.nonzero(mask)[0] if int(u) % world_size == rank]


def slots_in_unit(unit: int, *, stop: int, rows_per_unit: int, batch_size: int) -> int:
    """Number of batch slots of ``unit``, whose rows are ``[unit * rows_per_unit, stop)``."""
    return -(-(stop - unit * rows_per_unit) // batch_size)


class UnitBatcher:
    """Collects decoded images by row and releases them in fixed batches that never cross unit borders.

    Batches of a unit are rows ``[start + j * batch_size, ...)``, so a batch's content depends only on the rows, not
    on worker interleaving or on which units a resumed build still has to do.
    """

    def __init__(self, *, rows_per_unit: int, batch_size: int, num_rows: int, todo_units: Iterable[int]) -> None:
        self.rpu, self.bs, self.n = rows_per_unit, batch_size, num_rows
        self.todo = set(todo_units)
        self.pending: dict[tuple[int, int], dict[int, Any]] = {}

    def slot(self, row: int) -> tuple[int, int]:
        """(unit, batch slot) of ``row``."""
        unit = row // self.rpu
        return unit, (row - unit * self.rpu) // self.bs

    def slot_rows(self, unit: int, j: int) -> range:
        """Rows of batch slot ``j`` of ``unit``."""
        start = unit * self.rpu + j * self.bs
        return range(start, min(start + self.bs, (unit + 1) * self.rpu, self.n))

    def add(self, row: int, item: Any) -> tuple[int, int, list[int], list[Any]] | None:
        """Add one row's item (a tensor, or None for an invalid image); return a completed slot, if any."""
        unit, j = self.slot(row)
        if unit not in self.todo:
            return None
        slot = self.pending.setdefault((unit, j), {})
        slot[row] = item
        rows = self.slot_rows(unit, j)
        if len(slot) < len(rows):
            return None
        del self.pending[(unit, j)]
        return unit, j, list(rows), [slot[r] for r in rows]

    def slots_per_unit(self, unit: int) -> int:
        """Number of batch slots of ``unit``."""
        start = unit * self.rpu
        n = min(self.rpu, self.n - start)
        return (n + self.bs - 1) // self.bs


class UnitAccumulator:
    """Per-unit buffers that fill batch by batch and are flushed when every batch slot of the unit is in."""

    def __init__(self, slots_needed: Callable[[int], int]) -> None:
        self.slots_needed = slots_needed
        self.buffers: dict[int, dict[str, Any]] = {}
        self.count: dict[int, int] = {}

    def get(self, unit: int, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The buffers of ``unit`` (created with ``make()`` on first use)."""
        if unit not in self.buffers:
            self.buffers[unit] = make()
            self.count[unit] = 0
        return self.buffers[unit]

    def slot_done(self, unit: int) -> dict[str, Any] | None:
        """Count one finished batch slot of ``unit``; return its buffers once every slot is in (else None)."""
        self.count[unit] += 1
        if self.count[unit] == self.slots_needed(unit):
            self.count.pop(unit)
            return self.buffers.pop(unit)
        return None


def collate_keep_order(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep items as a list (images stay per-row tensors; batches are regrouped by row in the main process)."""
    return [{"key": b["key"], "shard": b["shard"], "image": b["image"], "skip": b["skip"]} for b in batch]


ImageBatch = tuple[int, list[int], list[torch.Tensor | None], list[str | None]]


@dataclass(frozen=True)
class ImageSource:
    """Where the decoded images of the cache rows come from: the shards, read through a DataLoader.

    Attributes:
        shards: every shard of the build, in row order (sorted paths).
        keys: [N_i] sample key of each image row.
        shard_of: [N_i] int32 index into ``shards`` of each row's shard.
        transform: the teacher's own image transform (PIL -> [3, H, W] float32).
        policy: the decode policy (part of the fingerprint).
        workers: DataLoader decode workers.
        progress: progress wrapper.
    """

    shards: list[str]
    keys: list[str]
    shard_of: np.ndarray
    transform: Callable[..., torch.Tensor]
    policy: DecodePolicy
    workers: int
    progress: ProgressFn

    def batches(
        self, *, todo_units: list[int], rows_per_unit: int, batch_size: int, description: str
    ) -> Iterator[ImageBatch]:
        """Yield ``(unit, rows, images, skip reasons)`` batches in fixed row slots, for the units in ``todo_units``.

        ``images`` are [3, H, W] tensors, None for a row whose image failed to decode (its reason in ``skip
        reasons``). Only shards holding rows of those units are read. A sample whose shard is not the one that owns
        its key's row (a duplicate key), or whose key has no row (skipped in pass 0), is ignored here.

        Raises:
            CacheSchemaError: rows of these units never arrived from the shards (a shard changed during the build).
        """
        n = len(self.keys)
        todo = sorted(todo_units)
        if not todo:
            return
        key_to_row = {k: i for i, k in enumerate(self.keys)}
        need = np.zeros(n, dtype=bool)
        for u in todo:
            need[u * rows_per_unit : min((u + 1) * rows_per_unit, n)] = True
        shard_ids = sorted(set(self.shard_of[need].tolist()))
        read = [self.shards[i] for i in shard_ids]
        batcher = UnitBatcher(rows_per_unit=rows_per_unit, batch_size=batch_size, num_rows=n, todo_units=todo)
        # rank=0, world_size=1: the units already split the rows between ranks; every listed shard is read here
        ds = SampleDataset(read, image_transform=self.transform, policy=self.policy, rank=0, world_size=1)
        loader = DataLoader(
            ds, batch_size=batch_size, num_workers=min(self.workers, len(read)), collate_fn=collate_keep_order
        )
        shard_index = {s: i for i, s in enumerate(self.shards)}
        total_slots = sum(batcher.slots_per_unit(u) for u in todo)
        reasons: dict[int, str] = {}

        def completed() -> Iterator[ImageBatch]:
            for batch in loader:
                for item in batch:
                    row = key_to_row.get(item["key"])
                    if row is None or int(self.shard_of[row]) != shard_index.get(item["shard"], -1):
                        continue
                    if item["skip"] is not None:
                        reasons[row] = item["skip"]
                    got = batcher.add(row, item["image"] if item["skip"] is None else None)
                    if got is not None:
                        unit, _, slot_rows, images = got
                        yield unit, slot_rows, images, [reasons.pop(r, None) for r in slot_rows]

        seen = 0
        for out in self.progress(completed(), description, total_slots):
            seen += 1
            yield out
        if batcher.pending or seen != total_slots:
            missing = sum(len(batcher.slot_rows(u, j)) - len(v) for (u, j), v in batcher.pending.items())
            raise CacheSchemaError(
                f"{description}: {missing} row(s) of {len(batcher.pending)} batch(es) never arrived from the shards "
                "(did a shard change during the build?)"
            )


__all__ = [
    "ImageBatch",
    "ImageSource",
    "UnitAccumulator",
    "UnitBatcher",
    "collate_keep_order",
    "owned_units",
    "slots_in_unit",
]
