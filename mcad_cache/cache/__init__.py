"""Zarr v3 teacher caches: schema, writer / reader, global top-k (``docs/cache-format.md``)."""

from __future__ import annotations

from mcad_cache.cache.schema import SCHEMA_VERSION, CacheLayout, array_specs, validate
from mcad_cache.cache.store import CacheReader, CacheWriter, check_cache, describe_cache, open_cache
from mcad_cache.cache.topk import chunked_topk

__all__ = [
    "SCHEMA_VERSION",
    "CacheLayout",
    "CacheReader",
    "CacheWriter",
    "array_specs",
    "check_cache",
    "chunked_topk",
    "describe_cache",
    "open_cache",
    "validate",
]
