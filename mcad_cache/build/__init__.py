"""The cache-build engine: one teacher over WebDataset shards into a resumable Zarr v3 cache.

Modules: ``engine`` (:func:`build_cache`, the passes in order, finalize), ``fingerprint`` (config checks, teacher
abilities, fingerprint), ``coordination`` (file lock, resume-or-recreate, waits between ranks), ``units`` (unit
ownership, unit-aligned image batches, per-unit buffers), and one module per pass: ``layout`` (0 rows),
``embeddings`` (1), ``candidates`` (2 top-k), ``itm`` (3 ITM / fused features).
"""

from __future__ import annotations

from mcad_cache.build.engine import BuildResult, build_cache, open_candidate_source, resolve_shards
from mcad_cache.build.fingerprint import check_config, supports_itm

__all__ = ["BuildResult", "build_cache", "check_config", "open_candidate_source", "resolve_shards", "supports_itm"]
