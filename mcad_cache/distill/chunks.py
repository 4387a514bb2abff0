"""Worker-independent sample order: shards cut into chunks of consecutive samples, read by any number of workers.

``SampleDataset`` (``data.webdataset``) hands whole shards to DataLoader workers, and the DataLoader interleaves the
workers' outputs, so the training order changed with ``--workers`` (and the final loss with it: 7.6594 vs 7.6926 in
the issue-11 review). Here the unit of work is a **chunk**: up to ``chunk_size`` consecutive samples of one shard
(cut only where no sample's tar members straddle the cut). The canonical order is the chunks in (sorted shard, tar
order); chunk ``c`` belongs to rank ``c % world_size``, and the DataLoader workers of a rank take that rank's chunks
round-robin. Each chunk comes back whole, tagged with its position, and :func:`ordered_chunks` puts them back in
order, so the samples a rank sees, and their order, depend only on the data, the rank and the number of ranks, never
on the number of workers.

Per chunk the shard's header scan is cut to the chunk's members and read with ``data.webdataset.iter_shard_samples``
(the one decode and skip path): skip reasons, the cross-shard duplicate decision (made once, from all headers, in the
constructing process) and truncation (reported by the shard's last chunk) are those of a whole-shard read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.tar import ShardScan, expand_shards, scan_shard
from mcad_cache.data.webdataset import first_owner_of_keys, iter_shard_samples

_logger = logging.getLogger(__name__)

CHUNK_SIZE = 32  # samples per chunk (our choice: small enough to balance workers, large enough to amortise IPC)


@dataclass(frozen=True)
class Chunk:
    """Consecutive samples of one shard: members ``[lo, hi)`` of its header scan; ``last`` carries truncation."""

    index: int
    shard: str
    lo: int
    hi: int
    last: bool


def _cuts(scan: ShardScan, chunk_size: int) -> list[tuple[int, int]]:
    """Member ranges of about ``chunk_size`` samples, cut only where every earlier key's members lie before the cut."""
    members = scan.members
    if not members:
        return [(0, 0)]
    last_of: dict[Any, int] = {}
    for i, m in enumerate(members):
        last_of[m.key] = i
    ranges, lo, keys, reach = [], 0, 0, -1
    for i, m in enumerate(members):
        new_key = i == 0 or m.key != members[i - 1].key
        if new_key and i > lo and keys >= chunk_size and reach < i:
            ranges.append((lo, i))
            lo, keys = i, 0
        if new_key:
            keys += 1
        reach = max(reach, last_of[m.key])
    ranges.append((lo, len(members)))
    return ranges


def plan_chunks(shards: list[str], *, chunk_size: int = CHUNK_SIZE) -> list[Chunk]:
    """The canonical chunk list of ``shards`` (sorted shard order, tar order within a shard); headers only. A stream
    shard (``pipe:``, URL, ``.tar.gz``) is one chunk: it is read whole, so one worker reads it once per epoch."""
    out: list[Chunk] = []
    for shard in shards:
        scan = scan_shard(shard, keep_data=False)
        ranges = _cuts(scan, len(scan.members) + 1 if scan.stream else max(1, int(chunk_size)))
        for j, (lo, hi) in enumerate(ranges):
            out.append(Chunk(index=len(out), shard=shard, lo=lo, hi=hi, last=j == len(ranges) - 1))
    return out


class ChunkDataset(IterableDataset):
    """Samples of WebDataset shards in chunks, for a DataLoader with any number of workers (``batch_size=None``).

    Yields ``(position, samples)``: ``position`` is the chunk's place in this rank's chunk list, ``samples`` a list of
    dicts in the ``SampleDataset`` format (``key``, ``shard``, ``image``, ``captions``, ``skip``, ``detail``,
    ``source_mode``). Put them in order with :func:`ordered_chunks`.

    Args:
        shards: paths, globs or brace patterns.
        image_transform: ``PIL.Image -> Tensor [3, H, W]``, or None to keep the image.
        policy: decode policy.
        rank, world_size: this process's share of the chunks (chunk ``c`` belongs to rank ``c % world_size``).
        chunk_size: samples per chunk.
    Raises:
        ValueError: no shard matches.
    """

    def __init__(
        self,
        shards: str | Iterable[str],
        *,
        image_transform: Callable[[Any], torch.Tensor] | None = None,
        policy: DecodePolicy | None = None,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        self.image_transform = image_transform
        self.policy = policy or DecodePolicy()
        self.chunks = plan_chunks(self.shards, chunk_size=chunk_size)[rank::world_size]
        self.key_owner = first_owner_of_keys(self.shards)
        self.view_replay: Callable[..., Any] | None = None  # issue 16: distill.views.ViewReplay (crop / flip by key)
        self.epoch = 0  # the epoch being read (set by the stream; picks the replayed view)

    def __len__(self) -> int:
        return len(self.chunks)

    def read_chunk(self, chunk: Chunk, scan: ShardScan) -> list[dict[str, Any]]:
        """The samples of one chunk, decoded and transformed (skipped ones included, with ``image`` None)."""
        part = dataclasses.replace(
            scan,
            members=scan.members[chunk.lo : chunk.hi],
            truncated=scan.truncated and chunk.last,
            error=scan.error if chunk.last or scan.unreadable else "",
        )
        out = []
        for s in iter_shard_samples(part, policy=self.policy, key_owner=self.key_owner):
            image = s.image
            if image is not None and self.view_replay is not None:  # issue 16: the stored view, before the transform
                image = self.view_replay(s.key, image, epoch=self.epoch)
            if image is not None and self.image_transform is not None:
                image = self.image_transform(image)
            out.append({"key": s.key, "shard": s.shard, "image": image, "captions": s.captions, "skip": s.skip,
                        "detail": s.detail, "source_mode": s.source_mode})  # fmt: skip
        return out

    def __iter__(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        scan: ShardScan | None = None
        for position in range(worker_id, len(self.chunks), num_workers):
            chunk = self.chunks[position]
            if scan is None or scan.path != chunk.shard:
                scan = scan_shard(chunk.shard)
            yield position, self.read_chunk(chunk, scan)


def ordered_chunks(items: Iterable[tuple[int, list[dict[str, Any]]]]) -> Iterator[dict[str, Any]]:
    """Samples of ``(position, samples)`` items in position order (items may arrive out of order; held until due)."""
    due, held = 0, {}
    for position, samples in items:
        held[position] = samples
        while due in held:
            yield from held.pop(due)
            due += 1
    for position in sorted(held):  # only when positions are missing, which a complete epoch never has
        yield from held.pop(position)


def iter_chunk_samples(dataset: ChunkDataset, *, workers: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Every sample of ``dataset`` in canonical order, decoded by ``workers`` DataLoader processes (0 = inline).

    The DataLoader gets an explicit generator, so reading never draws from the global RNG.
    """
    loader = DataLoader(
        dataset, batch_size=None, num_workers=max(0, int(workers)), generator=torch.Generator().manual_seed(seed)
    )
    yield from ordered_chunks(loader)


__all__ = ["CHUNK_SIZE", "Chunk", "ChunkDataset", "iter_chunk_samples", "ordered_chunks", "plan_chunks"]
