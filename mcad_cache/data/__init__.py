"""Data layer: the one decode path, caption rules, WebDataset shard reading, random access, importers, verify."""

from __future__ import annotations

from mcad_cache.data.captions import clean_caption, parse_captions
from mcad_cache.data.decode import DecodePolicy, decode_image, probe_image
from mcad_cache.data.index import ShardIndex
from mcad_cache.data.skips import SKIP_REASONS, SampleSkip
from mcad_cache.data.tar import scan_shard
from mcad_cache.data.webdataset import (
    Sample,
    SampleDataset,
    SkipReport,
    collate_samples,
    expand_shards,
    iter_samples,
)

__all__ = [
    "SKIP_REASONS",
    "DecodePolicy",
    "Sample",
    "SampleDataset",
    "SampleSkip",
    "ShardIndex",
    "SkipReport",
    "clean_caption",
    "collate_samples",
    "decode_image",
    "expand_shards",
    "iter_samples",
    "parse_captions",
    "probe_image",
    "scan_shard",
]
