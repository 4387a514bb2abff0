"""``mcad-cache integrate``: train the integration module once on two teacher caches, write a derived target cache.

A thin run: threads and device, then the library's stage (``mcad_cache.integrate.integrate``), then the run's
report files beside the derived cache: ``<out>.diagnostics.json`` and ``<out>.diagnostics.png`` (outside the Zarr
store, which lists only its own members; docs/cache-format.md, "Derived target caches").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mcad_cache.integrate.config import IntegrateConfig
from mcad_cache.integrate.diagnostics import plot_diagnostics
from mcad_cache.integrate.engine import IntegrateResult, integrate
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import resolve_device

DIAGNOSTICS_JSON = ".diagnostics.json"  # suffix after the derived cache's folder name
DIAGNOSTICS_PLOT = ".diagnostics.png"


def run(config: IntegrateConfig, *, progress: ProgressFn = no_progress) -> IntegrateResult:
    """Write (or reuse) the derived cache ``config.out`` from the parents in ``config.cache``.

    Args:
        config: the resolved integrate config.
        progress: ``progress(iterable, description, total)`` wrapper for progress bars.
    Returns:
        The :class:`~mcad_cache.integrate.engine.IntegrateResult` (``status`` "written" or "complete").
    Raises:
        ConfigError, DeviceError, CacheNotFoundError, CacheIncompleteError, CacheSchemaError, CacheMismatchError,
        OutputPathError: see :func:`mcad_cache.integrate.engine.integrate`.
    """
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    result = integrate(config, device=device, progress=progress)
    out = Path(result.path)
    out.with_name(out.name + DIAGNOSTICS_JSON).write_text(
        json.dumps(result.diagnostics, indent=2, default=float) + "\n"
    )
    plot_diagnostics(result.diagnostics, out.with_name(out.name + DIAGNOSTICS_PLOT))
    return result


__all__ = ["DIAGNOSTICS_JSON", "DIAGNOSTICS_PLOT", "IntegrateConfig", "IntegrateResult", "run"]
