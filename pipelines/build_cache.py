"""``mcad-cache build``: run one teacher over WebDataset shards into a resumable Zarr v3 cache; ``mcad-cache inspect``:
describe (and check) a built cache.

A thin run: check the config, set threads, resolve shards, device and precision, create the teacher, and hand them
to the library's engine (``mcad_cache.build``: one module per pass, unit bookkeeping, rank coordination; the result
is described in ``docs/cache-format.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mcad_cache.build import BuildResult, build_cache, check_config, resolve_shards
from mcad_cache.build.engine import refuse_foreign_out
from mcad_cache.cache import check_cache, describe_cache, open_cache
from mcad_cache.config import BuildConfig
from mcad_cache.errors import ConfigError
from mcad_cache.integrate import describe_derived, is_derived, open_derived
from mcad_cache.preflight import check_input_file, check_writable_dir, check_writable_file, looks_like_path
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import resolve_device, resolve_precision
from mcad_cache.teachers import create_teacher
from mcad_cache.teachers.base import weights_source
from mcad_cache.torchrun import build_ranks, process_group, torchrun_env


def preflight(config: BuildConfig) -> None:
    """Path checks before any model loads: ``--out`` is a cache, new or empty (never a user's folder) and writable;
    ``--pretrained`` (when it is a path) and ``--candidate-source`` exist.

    Raises:
        OutputPathError: ``--out`` is not a cache, lies under a file, or cannot be written.
        InputPathError: a ``--pretrained`` path or ``--candidate-source`` that does not exist.
    """
    out = Path(config.out)
    if config.rank == 0:
        refuse_foreign_out(out)
    if out.exists():
        check_writable_dir(out, option="--out")
    else:  # names --out itself, creates only its parent
        check_writable_file(out, option="--out")
    if config.pretrained and looks_like_path(config.pretrained):
        check_input_file(config.pretrained, option="--pretrained", allow_dir=True)
    if config.candidate_source:
        check_input_file(config.candidate_source, option="--candidate-source", allow_dir=True)


def run(config: BuildConfig, *, progress: ProgressFn = no_progress) -> BuildResult:
    """Build (or resume, or confirm) the cache ``config.out`` of teacher ``config.teacher`` over ``config.data``.

    Args:
        config: the resolved build config.
        progress: ``progress(iterable, description, total)`` wrapper for progress bars (identity by default).
    Returns:
        A :class:`~mcad_cache.build.BuildResult` (``status`` "built", "resumed", "complete" when there was nothing
        to do, or "rank-done" for a rank > 0).
    Raises:
        ConfigError: an invalid config value (also a precision this device cannot run), or a teacher without
            weights and no ``random_init``.
        OutputPathError, InputPathError: as :func:`preflight` (before any model loads).
        DataSourceError: ``--data`` matches no shard, or the shards hold no usable sample.
        DeviceError: the device is not available.
        UnknownModelError: an unknown teacher name.
        CacheMismatchError, BuildLockedError, DataError, NonFiniteError: as :func:`mcad_cache.build.build_cache`.
        BuildRankError: under torchrun or with --world-size > 1, ranks that cannot meet (names ranks and units).
    """
    env = torchrun_env(os.environ)  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or None
    config = build_ranks(config, env)
    with process_group(env, device=config.device, timeout_s=config.wait_timeout_s):
        return _build(config, progress=progress)


def _build(config: BuildConfig, *, progress: ProgressFn) -> BuildResult:
    """:func:`run` with its ranks resolved, inside torchrun's process group when there is one."""
    check_config(config)
    preflight(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    shards = resolve_shards(config.data)
    device = resolve_device(config.device)
    try:
        precision = resolve_precision(config.precision, device)
    except ValueError as err:
        raise ConfigError(f"--precision {config.precision!r}: {err}") from err
    teacher = create_teacher(
        config.teacher, model=config.model or None, pretrained=config.pretrained or None, device=str(device)
    )
    if weights_source(teacher) == "random" and not config.random_init:
        raise ConfigError(
            f"--teacher {config.teacher}: no weights were loaded (no --pretrained); pass --pretrained with a checkpoint"
            " file, tag or folder, or --random-init to build with random weights (recorded as weights_source: random)"
        )
    teacher.to(device)
    teacher.eval()
    return build_cache(config, teacher=teacher, shards=shards, device=device, precision=precision, progress=progress)


def inspect(path: str, *, check: bool = False) -> tuple[dict[str, Any], list[str] | None]:
    """``(describe_cache(...), check_cache(...) or None)`` of the cache at ``path``: the manifest, arrays, bytes per
    sample and statistics; with ``check``, the consistency problems (empty list: OK).

    Raises:
        CacheNotFoundError: no cache at ``path``.
        CacheSchemaError: another schema version or a malformed cache.
    """
    if is_derived(path):  # a derived target cache (mcad-cache integrate): its manifest and diagnostics
        derived = open_derived(path)
        return describe_derived(derived), (([] if derived.complete else ["incomplete"]) if check else None)
    reader = open_cache(path)
    return describe_cache(reader), (check_cache(reader) if check else None)


__all__ = ["BuildResult", "inspect", "preflight", "run"]
