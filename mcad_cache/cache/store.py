"""Former home of the cache's writer, reader, int8 codec and inspection, kept as re-exports for code outside the
cache package that still imports ``mcad_cache.cache.store`` (import from ``mcad_cache.cache`` or the split modules:
``writer``, ``reader``, ``codecs``, ``inspect``)."""

from __future__ import annotations

from mcad_cache.cache.codecs import dequantize_int8, quantize_int8
from mcad_cache.cache.inspect import check_cache, describe_cache
from mcad_cache.cache.reader import CacheReader, open_cache
from mcad_cache.cache.writer import STAGES, CacheWriter, num_units, unit_range

__all__ = [
    "STAGES",
    "CacheReader",
    "CacheWriter",
    "check_cache",
    "dequantize_int8",
    "describe_cache",
    "num_units",
    "open_cache",
    "quantize_int8",
    "unit_range",
]
