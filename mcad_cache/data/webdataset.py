"""Reading WebDataset shards: shard patterns, the streaming sample reader, a DataLoader dataset, skip accounting.

A sample is one image plus 1..n captions under one ``__key__`` (``docs/data.md``). Reading a shard:

1. :func:`mcad_cache.data.tar.scan_shard` reads the tar headers and detects truncation.
2. Members are grouped by key. A key whose members are not adjacent is a ``split_sample``; a key with a repeated
   extension, or seen in an earlier shard, is a ``duplicate_key``; the sample at a truncation point is
   ``truncated_shard``. Such samples are dropped whole (never half a sample).
3. Captions are parsed and cleaned, the image decoded by :func:`mcad_cache.data.decode.decode_image`.

Nothing is dropped silently: every skipped sample is *yielded* with ``skip`` set to one of :data:`SKIP_REASONS`, so
counts survive DataLoader workers and end up in :class:`SkipReport` and the run report.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mcad_cache.data.captions import CAPTION_EXTENSIONS, parse_captions
from mcad_cache.data.decode import DecodePolicy, decode_image_with_header, probe_image
from mcad_cache.data.skips import SKIP_REASONS, SampleSkip
from mcad_cache.data.tar import (
    IMAGE_EXTENSIONS,
    Member,
    ShardScan,
    expand_shards,
    group_members,
    read_member,
    scan_shard,
)
from mcad_cache.errors import DataError

__all__ = [
    "SKIP_REASONS",
    "Sample",
    "SampleDataset",
    "SampleSkip",
    "SkipReport",
    "collate_samples",
    "expand_shards",
    "iter_samples",
    "iter_shard_samples",
    "truncation_key",
]

_logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One sample read from a shard. ``skip`` is None for a usable sample, else one of :data:`SKIP_REASONS`.

    Attributes:
        key: WebDataset ``__key__`` ("" for a shard-level problem: ``unreadable_shard``).
        shard: path of the shard it came from.
        image: decoded 8-bit RGB ``PIL.Image`` (``decode_images=True``), the encoded bytes (False), or None if skipped.
        captions: cleaned captions, in stored order (caption ids elsewhere are ``f"{key}#{j}"``); [] if skipped.
        skip: the skip reason or None.
        detail: human-readable detail for a skip ("" otherwise).
        source_mode: PIL mode of the stored image (e.g. "RGBA", "P", "I;16"); "" if not decoded.
    """

    key: str
    shard: str
    image: Image.Image | bytes | None
    captions: list[str]
    skip: str | None = None
    detail: str = ""
    source_mode: str = ""


def _skipped(key: str, shard: str, reason: str, detail: str) -> Sample:
    return Sample(key=key, shard=shard, image=None, captions=[], skip=reason, detail=detail)


def _structure_problem(key_runs: list[list[Member]]) -> tuple[str, str] | None:
    exts = [m.ext for run in key_runs for m in run]
    repeated = sorted({e for e in exts if exts.count(e) > 1})
    if repeated:
        return "duplicate_key", f"extension(s) {repeated} appear more than once in this shard"
    if len(key_runs) > 1:
        return "split_sample", f"members in {len(key_runs)} non-adjacent groups: " + " | ".join(
            ",".join(str(m.ext) for m in run) for run in key_runs
        )
    return None


def _read_sample(shard: str, key: str, members: list[Member], policy: DecodePolicy, decode_images: bool) -> Sample:
    by_ext = {m.ext: m for m in members if m.recognised}
    images = [e for e in IMAGE_EXTENSIONS if e in by_ext]
    other = sorted(m.name for m in members if not m.recognised)
    note = f" (unrecognised members: {other})" if other else ""
    if not images:
        return _skipped(key, shard, "missing_image", f"members {sorted(m.name for m in members)}{note}")
    if len(images) > 1:
        return _skipped(key, shard, "multiple_images", f"image members {images}")
    caption_exts = [e for e in CAPTION_EXTENSIONS if e in by_ext]
    if not caption_exts:
        return _skipped(key, shard, "missing_caption", f"members {sorted(m.name for m in members)}{note}")
    try:
        captions = parse_captions(read_member(shard, by_ext[caption_exts[0]]), ext=caption_exts[0])
        data = read_member(shard, by_ext[images[0]])
        if decode_images:
            image, header = decode_image_with_header(data, policy=policy)
            return Sample(key, shard, image, captions, source_mode=header.mode)
        header = probe_image(data, policy=policy)  # header-level checks only: format, size limits
        return Sample(key, shard, data, captions, source_mode=header.mode)
    except SampleSkip as skip:
        return _skipped(key, shard, skip.reason, skip.detail)
    except OSError as err:  # the file vanished or became unreadable after the header scan
        return _skipped(key, shard, "unreadable_shard", f"reading {key}: {type(err).__name__}: {err}")


def iter_shard_samples(
    scan: ShardScan,
    *,
    policy: DecodePolicy,
    decode_images: bool = True,
    key_owner: dict[str, str] | Mapping[str, str] | None = None,
) -> Iterator[Sample]:
    """Samples of one scanned shard, skipped ones included (never raises for bad data).

    Args:
        scan: the shard's headers from :func:`mcad_cache.data.tar.scan_shard`.
        policy: decode policy.
        decode_images: decode to RGB (True) or return the encoded bytes (False).
        key_owner: the shard that owns each key (first occurrence wins). A mutable dict is updated as shards are
            read; a key owned by another shard is a ``duplicate_key``. None: no cross-shard check.
    """
    shard = scan.path
    if scan.unreadable:
        yield _skipped("", shard, "unreadable_shard", scan.error)
        return
    order, runs, _ = group_members(scan)
    cut_key = truncation_key(scan, order)
    last_good = next((k for k in reversed(order) if k != cut_key), None)
    for key in order:
        owner = key_owner.get(key, shard) if key_owner is not None else shard
        if owner != shard:
            yield _skipped(key, shard, "duplicate_key", f"key already read from shard {owner}")
            continue
        if isinstance(key_owner, dict):
            key_owner[key] = shard  # the first shard holding the key owns it, even if its copy is unusable
        if key == cut_key:
            yield _skipped(key, shard, "truncated_shard", f"{scan.error}; last good key {last_good!r}")
            continue
        problem = _structure_problem(runs[key])
        if problem is not None:
            yield _skipped(key, shard, *problem)
            continue
        yield _read_sample(shard, key, runs[key][0], policy, decode_images)
    if scan.truncated and cut_key is not None and cut_key not in runs:  # the sample's first member is cut
        yield _skipped(cut_key, shard, "truncated_shard", f"{scan.error}; last good key {last_good!r}")
    elif scan.truncated and cut_key is None:
        yield _skipped("", shard, "truncated_shard", f"{scan.error}; no complete member, last good key None")


def truncation_key(scan: ShardScan, order: list[str]) -> str | None:
    """The key dropped as ``truncated_shard`` in a truncated shard, or None (not truncated, or nothing to name).

    When the cut falls inside a member's data, that member's key (``scan.cut_key``): every sample before it is
    complete and kept (WebDataset samples are runs of adjacent members). Otherwise (a corrupt header, no
    end-of-archive block) the last key read, whose completeness cannot be proven.
    """
    if not scan.truncated:
        return None
    if scan.cut_key is not None:
        return scan.cut_key
    return order[-1] if order else None


def iter_samples(
    shards: str | Iterable[str],
    *,
    policy: DecodePolicy | None = None,
    strict: bool = False,
    decode_images: bool = True,
    key_owner: dict[str, str] | Mapping[str, str] | None = None,
) -> Iterator[Sample]:
    """Stream every sample of the shards in order (sorted shards, tar order), skipped samples included.

    Args:
        shards: paths, globs or brace patterns (:func:`expand_shards`).
        policy: decode policy (default ``DecodePolicy()``).
        strict: raise on the first skipped sample instead of yielding it.
        decode_images: decode images to RGB (True) or yield the encoded bytes (False; the header is still read, so
            ``too_many_pixels``, ``extreme_aspect`` and unreadable headers are caught, but not corrupt pixel data).
        key_owner: cross-shard duplicate check. None (default): keys are tracked across the shards read here, the
            first occurrence wins. Pass a precomputed mapping to share one decision between workers.
    Yields:
        :class:`Sample` objects; skipped ones have ``skip`` set and no image.
    Raises:
        ValueError: no shard matches.
        DataError: in strict mode, the first skipped sample (names shard, key and reason).
    """
    policy = policy or DecodePolicy()
    owner: dict[str, str] | Mapping[str, str] = {} if key_owner is None else key_owner
    for shard in expand_shards(shards):
        for sample in iter_shard_samples(
            scan_shard(shard), policy=policy, decode_images=decode_images, key_owner=owner
        ):
            if sample.skip is not None and strict:
                raise DataError(sample.skip, shard=sample.shard, key=sample.key, detail=sample.detail)
            yield sample


def first_owner_of_keys(shards: Iterable[str]) -> dict[str, str]:
    """Map every key to the first shard (in the given order) that holds it, from tar headers only."""
    owner: dict[str, str] = {}
    for shard in shards:
        for m in scan_shard(shard, keep_data=False).members:
            if m.key is not None:
                owner.setdefault(m.key, shard)
    return owner


class SampleDataset(IterableDataset):
    """Samples of WebDataset shards for a ``torch.utils.data.DataLoader``; shards are split across workers and ranks.

    Global worker ``g = rank * num_workers + worker_id`` reads shards ``g, g + W, g + 2W, ...`` of the sorted list
    (``W = world_size * num_workers``), so each shard is read exactly once per epoch. Cross-shard duplicate keys are
    decided once, in the constructing process, from the tar headers (first shard in sorted order wins), so the
    outcome does not depend on the worker count. Skipped samples are yielded (``image`` None) for the main process
    to count with :class:`SkipReport`; workers never raise for bad data.

    Args:
        shards: paths, globs or brace patterns.
        image_transform: ``PIL.Image -> Tensor [3, H, W]`` (e.g. ``data.transforms.make_image_transform(cfg)``);
            None keeps the RGB ``PIL.Image``.
        policy: decode policy.
        rank, world_size: this process's place among distributed ranks; None = from ``torch.distributed`` when it
            is initialised, else 0 and 1.
        check_cross_shard_duplicates: scan all headers up front to skip keys seen in an earlier shard.
    Raises:
        ValueError: no shard matches.
    """

    def __init__(
        self,
        shards: str | Iterable[str],
        *,
        image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        policy: DecodePolicy | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        check_cross_shard_duplicates: bool = True,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        self.image_transform = image_transform
        self.policy = policy or DecodePolicy()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        self.key_owner = first_owner_of_keys(self.shards) if check_cross_shard_duplicates else None

    def shards_for_worker(self, worker_id: int, num_workers: int) -> list[str]:
        """The shards one DataLoader worker of this rank reads."""
        total = self.world_size * num_workers
        g = self.rank * num_workers + worker_id
        return self.shards[g::total]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards_for_worker(worker_id, num_workers)
        if not mine:
            _logger.warning(
                "worker %d of rank %d has no shard (%d shards for %d workers x %d ranks)",
                worker_id,
                self.rank,
                len(self.shards),
                num_workers,
                self.world_size,
            )
        for shard in mine:
            scan = scan_shard(shard)
            for s in iter_shard_samples(scan, policy=self.policy, key_owner=self.key_owner):
                image = s.image
                if image is not None and self.image_transform is not None:
                    image = self.image_transform(image)
                yield {
                    "key": s.key,
                    "shard": s.shard,
                    "image": image,
                    "captions": s.captions,
                    "skip": s.skip,
                    "detail": s.detail,
                    "source_mode": s.source_mode,
                }


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`SampleDataset` items; skipped items go to ``"skipped"`` so the main process can count them.

    Returns:
        ``{"key": list[str], "shard": list[str], "captions": list[list[str]], "image": Tensor [B, 3, H, W] (stacked
        when the items are tensors), list[PIL.Image] (no transform) or None (B == 0), "skipped": list[dict]}`` where
        B counts the usable items and ``skipped`` holds ``{"key", "shard", "skip", "detail"}`` of the others.
    """
    good = [b for b in batch if b["skip"] is None]
    skipped = [{k: b[k] for k in ("key", "shard", "skip", "detail")} for b in batch if b["skip"] is not None]
    images: Any = [b["image"] for b in good]
    if not images:
        images = None
    elif all(isinstance(im, torch.Tensor) for im in images):
        images = torch.stack(images)
    return {
        "key": [b["key"] for b in good],
        "shard": [b["shard"] for b in good],
        "captions": [list(b["captions"]) for b in good],
        "image": images,
        "skipped": skipped,
    }


class SkipReport:
    """Counts usable and skipped samples by reason, listing the shard and key of each skip (for run reports).

    Args:
        strict: raise :class:`mcad_cache.errors.DataError` on the first skip instead of counting it.
        max_listed: keep at most this many (shard, key, reason, detail) entries; the counts stay exact.
    """

    def __init__(self, *, strict: bool = False, max_listed: int = 100_000) -> None:
        self.strict = strict
        self.max_listed = max_listed
        self.num_ok = 0
        self._counts: Counter[str] = Counter()
        self._listed: list[tuple[str, str, str, str]] = []

    def add(self, sample: Sample | Mapping[str, Any]) -> None:
        """Count one sample (a :class:`Sample` or a dict with ``key``, ``shard``, ``skip``, ``detail``).

        Raises:
            DataError: in strict mode, when the sample is skipped.
        """
        get = (lambda k: sample.get(k, "")) if isinstance(sample, Mapping) else (lambda k: getattr(sample, k))
        reason = get("skip")
        if reason is None:
            self.num_ok += 1
            return
        if self.strict:
            raise DataError(reason, shard=get("shard"), key=get("key"), detail=get("detail"))
        self._counts[reason] += 1
        _logger.debug("skipped %s in %s: %s (%s)", get("key"), get("shard"), reason, get("detail"))
        if len(self._listed) < self.max_listed:
            self._listed.append((get("shard"), get("key"), reason, get("detail")))

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Count a :func:`collate_samples` batch: its usable items and its ``skipped`` list."""
        self.num_ok += len(batch["key"])
        for item in batch["skipped"]:
            self.add(item)

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, every reason of :data:`SKIP_REASONS` present (0 when none)."""
        return {r: self._counts.get(r, 0) for r in SKIP_REASONS}

    @property
    def num_skipped(self) -> int:
        return sum(self._counts.values())

    @property
    def examples(self) -> list[tuple[str, str, str]]:
        """(shard, key, reason) of the listed skips, in the order they were seen."""
        return [(s, k, r) for s, k, r, _ in self._listed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``num_ok``, ``num_skipped``, ``counts``, ``skipped`` (list of dicts), ``num_unlisted``."""
        return {
            "num_ok": self.num_ok,
            "num_skipped": self.num_skipped,
            "counts": self.counts,
            "skipped": [{"shard": s, "key": k, "reason": r, "detail": d} for s, k, r, d in self._listed],
            "num_unlisted": self.num_skipped - len(self._listed),
        }
