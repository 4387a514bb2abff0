"""The cache manifest: fingerprint comparison with readable diffs, and small helpers to fill it in.

The manifest is a JSON dict in the cache group's attributes (``schema.MANIFEST_ATTR``). Its ``fingerprint`` entry is
what makes two builds interchangeable: schema version, teacher identity (incl. weights sha256), preprocessing,
tokenizer, k, candidate rule, storage dtypes and layout, autocast precision, and the input shards' names and sha256.
Everything else (counts, skip reports, times, code version, paths, the resolved build config) describes the build
without defining it.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from mcad_cache.hashing import file_sha256  # re-exported for older importers; the one home is mcad_cache.hashing

_MISSING = object()


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds (``2026-01-31T12:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_version() -> str:
    """``mcad_cache.__version__`` (the package version the cache was built with)."""
    from mcad_cache import __version__

    return __version__


def to_jsonable(value: Any) -> Any:
    """Deep copy of ``value`` with tuples as lists and numpy scalars as Python numbers (what the attributes store)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        if not value and prefix:
            out[prefix] = {}
        for key in sorted(value, key=str):
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def fingerprint_diff(found: Mapping[str, Any], expected: Mapping[str, Any], *, subset: bool = False) -> list[str]:
    """Differences between two (nested) fingerprints, one readable line per differing leaf.

    Lists are compared whole (a changed shard list is one line). Both sides are normalised through JSON first, so a
    tuple equals a list.

    Args:
        found: what the cache holds.
        expected: what the caller wants.
        subset: only compare keys present in ``expected`` (a key missing from ``found`` still differs).
    Returns:
        Lines like ``"teacher.weights_sha256: cache has 'ab12..', expected 'cd34..'"``; empty if equal.
    """
    f = _flatten(to_jsonable(found))
    e = _flatten(to_jsonable(expected))
    keys = sorted(e) if subset else sorted(set(f) | set(e))
    lines = []
    for key in keys:
        a, b = f.get(key, _MISSING), e.get(key, _MISSING)
        if a != b:
            lines.append(f"{key}: cache has {_short(a)}, expected {_short(b)}")
    return lines


def _short(value: Any, limit: int = 160) -> str:
    if value is _MISSING:
        return "<missing>"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_diff(lines: list[str], *, limit: int = 30) -> str:
    """Join diff lines for an error message (at most ``limit`` lines, then a count)."""
    shown = lines[:limit]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n  " + "\n  ".join(shown) + more


__all__ = ["code_version", "file_sha256", "fingerprint_diff", "format_diff", "to_jsonable", "utc_now"]
