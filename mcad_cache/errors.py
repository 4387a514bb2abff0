"""Error classes. Each domain error also inherits the builtin a caller would naturally catch (zarr's errors.py)."""

from __future__ import annotations

import functools
from typing import Any


class McadError(Exception):
    """Root of every error mcad-cache raises on purpose. The CLI turns these into a one-line message, exit 1."""


class UnknownModelError(McadError, ValueError):
    """A teacher or student name that no registry knows; the message lists the known names."""


class CacheNotFoundError(McadError, FileNotFoundError):
    """No cache (Zarr group with an mcad-cache manifest) at the given path."""


class CacheSchemaError(McadError, ValueError):
    """A cache whose schema version, arrays, shapes or dtypes are not what this code reads, or a request (k, direction)
    the cache cannot serve."""


class CacheKeyError(McadError, KeyError):
    """Sample keys a cache does not hold; the message names them (the first few) and how many are missing."""

    def __str__(self) -> str:  # KeyError would show the message repr()-quoted
        return str(self.args[0]) if self.args else ""


class BuildLockedError(McadError, RuntimeError):
    """Another process holds the build lock of a cache (two builders must never write the same units)."""


class BuildRankError(McadError, RuntimeError):
    """A multi-rank build whose ranks cannot meet: another world size, or a rank that died or stopped; the message
    names the ranks and the units they have not committed."""


class CacheIncompleteError(McadError, RuntimeError):
    """A cache whose manifest is not marked complete (a build was interrupted: rerun it to resume)."""


class CacheCorruptError(McadError, ValueError):
    """A cache whose stored values fail the consistency checks of ``inspect --check`` (e.g. similarities that no
    longer match the embeddings); the message lists the first problems."""


class CacheMismatchError(McadError, ValueError):
    """A cache built with another teacher, preprocessing, tokenizer or data than the run uses; the message is a diff."""


class DataError(McadError, ValueError):
    """A bad sample or shard. Names the shard, the sample key and the reason (one of data.SKIP_REASONS)."""

    def __init__(self, reason: str, *, shard: str | None = None, key: str | None = None, detail: str = "") -> None:
        self.reason = reason
        self.shard = shard
        self.key = key
        self.detail = detail
        where = f"shard {shard!r}" if shard else "unknown shard"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled across processes (study --jobs): keep the keyword fields
        return (functools.partial(DataError, self.reason, shard=self.shard, key=self.key, detail=self.detail), ())


class DataSourceError(McadError, RuntimeError):
    """A dataset source that cannot be fetched or read (a failed apt-get download, a missing annotation file)."""


class CheckpointError(McadError, ValueError):
    """A checkpoint whose keys or shapes do not fit the architecture it is loaded into."""


class NonFiniteError(McadError, FloatingPointError):
    """A NaN or inf in a value that must be finite (a loss, a cached score); names where it happened."""


class OfflineAssetError(McadError, ModuleNotFoundError):
    """A package that ships pretrained weights for the offline demo teachers is not installed (names the package)."""


class ConfigError(McadError, ValueError):
    """A run config (JSON file or flags) that names an unknown field or gives a value of the wrong type."""


class UnknownImporterError(McadError, ValueError):
    """A ``data import --source`` that no importer is registered under; the message lists the known ones."""


class InputPathError(McadError, FileNotFoundError):
    """A user-given input path (weights, annotations, config) that does not exist or cannot be read."""


class OutputPathError(McadError, OSError):
    """A user-given output path that is a file, lies under a file, or cannot be created or written."""


class RunDirError(McadError, FileNotFoundError):
    """A path that is not what a command needs: not a distill run dir, student checkpoint, cache or eval result."""


class RunInterruptedError(McadError, KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a training run after its current step; a checkpoint was saved (rerun to resume)."""
