"""``verify_shards``: read every shard once and report everything that is wrong with it.

Checks, per shard: truncation (with the last good key), samples whose members are not adjacent (``split_sample``),
duplicate keys inside a shard and across shards (the first shard in sorted order owns the key), member names whose
extension is not recognised (a dot inside the name, an upper-case extension, an unknown type, no extension), and
every per-sample skip reason of :data:`mcad_cache.data.SKIP_REASONS` (images are fully decoded with the same
:func:`mcad_cache.data.decode.decode_image` as build, distill and eval). It also counts images by source PIL mode and
captions per sample. ``VerifyReport.ok`` is False as soon as anything is wrong.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mcad_cache.data.decode import DecodePolicy
from mcad_cache.data.skips import SKIP_REASONS
from mcad_cache.data.tar import KNOWN_EXTENSIONS, expand_shards, group_members, scan_shard
from mcad_cache.data.webdataset import iter_shard_samples, truncation_key
from mcad_cache.progress import no_progress

MAX_LISTED = 20  # problems listed per kind; counts stay exact


@dataclass
class ShardSummary:
    """What one shard holds."""

    path: str
    size_bytes: int = 0
    num_members: int = 0
    num_samples: int = 0  # keys seen (usable or not)
    num_ok: int = 0
    truncated: bool = False
    last_good_key: str | None = None  # the last key before the cut (truncated) or the last key (complete)
    cut_key: str | None = None  # the key whose member is incomplete (truncated shards), dropped as truncated_shard
    error: str = ""


@dataclass
class VerifyReport:
    """Result of :func:`verify_shards`. ``ok`` is False if any shard or sample has a problem."""

    shards: list[ShardSummary] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # skip reason -> samples
    unrecognised_members: int = 0
    problems: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # kind -> first MAX_LISTED entries
    image_modes: Counter[str] = field(default_factory=Counter)  # source PIL mode -> usable images
    captions_per_sample: Counter[int] = field(default_factory=Counter)
    num_samples: int = 0
    num_ok: int = 0
    time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.num_samples > 0 and not any(self.counts.values()) and self.unrecognised_members == 0

    def _note(self, kind: str, shard: str, key: str, detail: str) -> None:
        listed = self.problems.setdefault(kind, [])
        if len(listed) < MAX_LISTED:
            listed.append({"shard": shard, "key": key, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``mcad-cache data verify --json``)."""
        return {
            "ok": self.ok,
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
            "num_ok": self.num_ok,
            "num_captions": sum(n * c for n, c in self.captions_per_sample.items()),
            "counts": {r: self.counts.get(r, 0) for r in SKIP_REASONS},
            "unrecognised_members": self.unrecognised_members,
            "image_modes": dict(sorted(self.image_modes.items())),
            "captions_per_sample": {str(k): v for k, v in sorted(self.captions_per_sample.items())},
            "problems": self.problems,
            "shards": [vars(s) for s in self.shards],
            "time_s": round(self.time_s, 3),
        }


def verify_shards(
    shards: str | Iterable[str],
    *,
    policy: DecodePolicy | None = None,
    progress: Callable[..., Iterable[Any]] = no_progress,
) -> VerifyReport:
    """Stream every shard once (sorted order) and report every problem (module docstring).

    Args:
        shards: paths, globs or brace patterns.
        policy: decode policy (default ``DecodePolicy()``), the same one the build will use.
        progress: ``progress(iterable, description, total)`` wrapper over the shards.
    Returns:
        A :class:`VerifyReport`.
    Raises:
        ValueError: no shard matches.
    """
    start = time.perf_counter()
    policy = policy or DecodePolicy()
    report = VerifyReport()
    owner: dict[str, str] = {}
    paths = expand_shards(shards)
    for path in progress(paths, "verify", len(paths)):
        scan = scan_shard(path)
        summary = ShardSummary(
            path=path,
            size_bytes=scan.size_bytes,
            num_members=len(scan.members),
            truncated=scan.truncated or scan.unreadable,
            error=scan.error,
        )
        order, _, unrecognised = group_members(scan)
        summary.cut_key = truncation_key(scan, order)
        summary.last_good_key = next((k for k in reversed(order) if k != summary.cut_key), None)
        for m in unrecognised:
            report.unrecognised_members += 1
            why = (
                "no extension"
                if m.ext is None
                else (
                    "upper-case extension"
                    if m.ext.lower() in KNOWN_EXTENSIONS
                    else "dot inside the name"
                    if "." in m.ext
                    else "unknown extension"
                )
            )
            report._note("unrecognised_member", path, m.name, why)
        for sample in iter_shard_samples(scan, policy=policy, key_owner=owner):
            if sample.key:
                summary.num_samples += 1
                report.num_samples += 1
            if sample.skip is None:
                summary.num_ok += 1
                report.num_ok += 1
                report.image_modes[sample.source_mode] += 1
                report.captions_per_sample[len(sample.captions)] += 1
            else:
                report.counts[sample.skip] += 1
                report._note(sample.skip, path, sample.key, sample.detail)
        report.shards.append(summary)
    report.time_s = time.perf_counter() - start
    return report
