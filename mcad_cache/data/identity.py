"""Shard identity by content: which shards a cache was built on, and how the run's shards differ from them.

A shard is identified by its sha256 (``mcad_cache.hashing.file_sha256``), never by its file name: every importer
names each split's first shard ``shard-000000.tar``, so names alone confuse the train and test splits of one import,
or the same split of two imports. For messages each shard also carries its path relative to its **data root**: the
nearest folder above it that holds an importer's ``index.json`` (so ``train/shard-000000.tar`` and
``test/shard-000000.tar`` stay apart), else the shards' common folder. Our choice.

A stream shard (``pipe:``, ``http(s)://``, ``.tar.gz``; ``data.tar.is_stream``) is identified by the sha256 of its
uncompressed tar bytes, read once more for the hash (``data.tar.shard_sha256``): ``pipe:cat shard.tar`` and
``shard.tar.gz`` match a cache built on ``shard.tar``. Its recorded ``path`` is the URL as given (a local
``.tar.gz`` is a file and gets a relative path like any shard).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcad_cache.data.tar import is_stream, shard_sha256

INDEX_FILE = "index.json"  # written by every importer at the root of its output (mcad_cache.data.importers)
_ROOT_SEARCH_LEVELS = 3  # folders above the common folder searched for an index.json (OUT/<split>/shard: 1 level)


def _is_remote(spec: str) -> bool:
    """A stream that is not a local file (``pipe:``, ``http(s)://``, ...)."""
    return is_stream(spec) and not os.path.exists(spec)


def _index_root(path: Path) -> Path | None:
    """The nearest folder above ``path`` (at most :data:`_ROOT_SEARCH_LEVELS` + 1 levels) holding an importer's
    ``index.json``, or None."""
    for folder in path.parents[: _ROOT_SEARCH_LEVELS + 1]:
        if (folder / INDEX_FILE).is_file():
            return folder
    return None


def data_root(shards: Sequence[str | os.PathLike[str]]) -> Path:
    """The folder shard paths without an importer's ``index.json`` above them are reported relative to: the shards'
    common folder.

    Args:
        shards: shard file paths (at least one).
    Raises:
        ValueError: ``shards`` is empty.
    """
    if not shards:
        raise ValueError("data_root needs at least one shard path")
    local = [os.fspath(s) for s in shards if not _is_remote(os.fspath(s))]
    if not local:  # only URLs: they are recorded as given
        return Path.cwd()
    paths = [os.path.abspath(s) for s in local]
    common = Path(os.path.commonpath(paths))
    return common.parent if len(paths) == 1 or common.is_file() else common


def shard_path(shard: str | os.PathLike[str], *, fallback_root: Path) -> str:
    """``shard``'s path relative to its import's root (the folder of the nearest ``index.json`` above it, so
    ``train/shard-000000.tar``), else relative to ``fallback_root``; POSIX separators. A URL stays as given."""
    if _is_remote(os.fspath(shard)):
        return os.fspath(shard)
    path = Path(os.path.abspath(os.fspath(shard)))
    root = _index_root(path) or fallback_root
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def shard_records(shards: Sequence[str], hashes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``[{"name", "path", "sha256"}]`` per shard, in the given order (``path``: :func:`shard_path`).

    Args:
        shards: shard file paths; hashes: their sha256 in the same order (computed when ``None``).
    """
    hashes = list(hashes) if hashes is not None else [shard_sha256(s) for s in shards]
    if not shards:
        return []
    root = data_root(shards)
    return [
        {"name": os.path.basename(s), "path": shard_path(s, fallback_root=root), "sha256": h}
        for s, h in zip(shards, hashes, strict=True)
    ]


def _label(record: dict[str, Any]) -> str:
    return str(record.get("path") or record.get("name") or "?")


def shard_records_diff(recorded: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]) -> list[str]:
    """Readable lines for how ``current`` shards differ from ``recorded`` ones, matched by sha256 (content).

    A shard moved or renamed with the same content matches. Unmatched shards are paired by relative path, so a
    rewritten file says "content differs"; the rest are "only in the cache" / "only in the run's data".

    Args:
        recorded: the cache's records (``fingerprint["data"]["shards"]``; older caches lack ``path``).
        current: :func:`shard_records` of the run's shards.
    Returns:
        One line per difference (empty: the same content).
    """
    left = [r for r in recorded if r.get("sha256")]
    right = list(current)
    pool: dict[str, list[dict[str, Any]]] = {}
    for r in right:
        pool.setdefault(str(r.get("sha256")), []).append(r)
    unmatched_cache = []
    for r in left:
        same = pool.get(str(r["sha256"]))
        if same:
            same.pop()
        else:
            unmatched_cache.append(r)
    unmatched_run = [r for group in pool.values() for r in group]
    by_path = {_label(r): r for r in unmatched_run}
    lines = []
    for r in unmatched_cache:
        other = by_path.pop(_label(r), None)
        if other is None:  # the same file under another root depth: one path ends with the other
            near = [p for p in by_path if p.endswith("/" + _label(r)) or _label(r).endswith("/" + p)]
            other = by_path.pop(near[0]) if len(near) == 1 else None
        if other is not None:
            lines.append(
                f"{_label(r)}: content differs (sha256 {str(r['sha256'])[:12]}... in the cache, "
                f"{str(other['sha256'])[:12]}... now): the file was rewritten or is another import's"
            )
        else:
            lines.append(f"{_label(r)} (sha256 {str(r['sha256'])[:12]}...): in the cache, not in the run's data")
    for label, r in sorted(by_path.items()):
        lines.append(f"{label} (sha256 {str(r['sha256'])[:12]}...): in the run's data, not in the cache")
    return lines


__all__ = ["INDEX_FILE", "data_root", "shard_path", "shard_records", "shard_records_diff"]
