"""Zarr v3 teacher caches (``docs/cache-format.md``): ``schema`` (arrays, layout, validation), ``writer``
(``CacheWriter``, build stages), ``reader`` (``CacheReader``, ``open_cache``), ``codecs`` (int8 per-vector),
``inspect`` (``describe_cache``, ``check_cache``), ``topk`` (global top-k), ``manifest`` (fingerprint diffs)."""

from __future__ import annotations

from mcad_cache.cache.codecs import dequantize_int8, quantize_int8
from mcad_cache.cache.inspect import check_cache, describe_cache
from mcad_cache.cache.reader import CacheReader, open_cache
from mcad_cache.cache.schema import SCHEMA_VERSION, CacheLayout, array_specs, validate
from mcad_cache.cache.topk import chunked_topk
from mcad_cache.cache.writer import STAGES, CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "STAGES",
    "CacheLayout",
    "CacheReader",
    "CacheWriter",
    "array_specs",
    "check_cache",
    "chunked_topk",
    "dequantize_int8",
    "describe_cache",
    "open_cache",
    "quantize_int8",
    "validate",
]
