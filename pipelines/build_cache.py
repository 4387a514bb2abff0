"""``mcad-cache build``: run one teacher over WebDataset shards into a resumable Zarr v3 cache.

A thin run: check the config, set threads, resolve shards, device and precision, create the teacher, and hand them
to the library's engine (``mcad_cache.build``: one module per pass, unit bookkeeping, rank coordination; the result
is described in ``docs/cache-format.md``).
"""

from __future__ import annotations

import torch

from mcad_cache.build import BuildResult, build_cache, check_config, resolve_shards
from mcad_cache.config import BuildConfig
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import resolve_device, resolve_precision
from mcad_cache.teachers import create_teacher


def run(config: BuildConfig, *, progress: ProgressFn = no_progress) -> BuildResult:
    """Build (or resume, or confirm) the cache ``config.out`` of teacher ``config.teacher`` over ``config.data``.

    Args:
        config: the resolved build config.
        progress: ``progress(iterable, description, total)`` wrapper for progress bars (identity by default).
    Returns:
        A :class:`~mcad_cache.build.BuildResult` (``status`` "built", "resumed", "complete" when there was nothing
        to do, or "rank-done" for a rank > 0).
    Raises:
        ConfigError: an invalid config value.
        DataSourceError: ``--data`` matches no shard, or the shards hold no usable sample.
        DeviceError: the device is not available.
        UnknownModelError: an unknown teacher name.
        CacheMismatchError, BuildLockedError, DataError, NonFiniteError: as :func:`mcad_cache.build.build_cache`.
    """
    check_config(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    shards = resolve_shards(config.data)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    teacher = create_teacher(
        config.teacher, model=config.model or None, pretrained=config.pretrained or None, device=str(device)
    )
    teacher.to(device)
    teacher.eval()
    return build_cache(config, teacher=teacher, shards=shards, device=device, precision=precision, progress=progress)


__all__ = ["BuildResult", "resolve_precision", "run"]
