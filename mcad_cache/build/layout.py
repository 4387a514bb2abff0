"""Build pass 0, the row layout: read keys and captions of every shard without decoding images, then create the
cache with every array at its final shape and write keys, captions and maps.

Shards are read in sorted path order, samples in tar order. Samples the data layer skips here (missing image or
caption, bad captions, duplicate keys, split samples, truncated shards) get no row; their counts go into the
manifest. Every other sample gets one image row and one text row per caption. A resumed build reads the rows back
from the store (:func:`rows_from_store`): the shards' sha256 are part of the fingerprint.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from mcad_cache.build.fingerprint import fused_rows_per_chunk, supports_itm
from mcad_cache.build.views import num_views, views_record
from mcad_cache.cache.manifest import code_version, utc_now
from mcad_cache.cache.schema import CacheLayout
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.config import BuildConfig, config_to_dict
from mcad_cache.data import SKIP_REASONS, DecodePolicy, SkipReport, iter_samples
from mcad_cache.data.transforms import image_size_hw
from mcad_cache.progress import ProgressFn
from mcad_cache.teachers.base import Teacher

MAX_SKIP_EXAMPLES = 100  # (shard, key, reason) examples kept in the manifest (our choice)


@dataclass
class Rows:
    """Pass-0 result: the row layout of the cache.

    Attributes:
        keys: [N_i] sample key of each image row.
        shard_of: [N_i] int32 index into the build's shards.
        captions: [N_i] lists of captions; text rows are these, flattened in order.
        report: pass-0 skips (None when the rows were read back from an existing cache).
        per_shard_rows: rows per shard.
    """

    keys: list[str]
    shard_of: np.ndarray
    captions: list[list[str]]
    report: SkipReport | None
    per_shard_rows: list[int]

    @property
    def offsets(self) -> np.ndarray:
        """[N_i + 1] int32 CSR offsets of each image's text rows."""
        counts = np.array([len(c) for c in self.captions], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def scan_rows(shards: list[str], *, policy: DecodePolicy, strict: bool, progress: ProgressFn) -> Rows:
    """Pass 0: the rows of ``shards`` from tar headers, keys and caption files (no image decoding).

    Raises:
        DataError: ``strict`` and a bad sample.
    """
    report = SkipReport(strict=strict)
    index = {s: i for i, s in enumerate(shards)}
    keys: list[str] = []
    shard_of: list[int] = []
    captions: list[list[str]] = []
    per_shard = [0] * len(shards)
    samples = iter_samples(shards, policy=policy, strict=strict, decode_images=False)
    for s in progress(samples, "pass 0: keys and captions", None):
        report.add(s)
        if s.skip is not None:
            continue
        keys.append(s.key)
        shard_of.append(index[s.shard])
        captions.append(list(s.captions))
        per_shard[index[s.shard]] += 1
    return Rows(keys, np.asarray(shard_of, dtype=np.int32), captions, report, per_shard)


def rows_from_store(writer: CacheWriter, *, num_shards: int) -> Rows:
    """The pass-0 layout of an existing cache (its shards' sha256 matched, so it is what pass 0 would find)."""
    g = writer.group
    keys = [str(k) for k in g["image_keys"][:].tolist()]
    shard_of = np.asarray(g["image_shard"][:], dtype=np.int32)
    offsets = np.asarray(g["img2txt_offsets"][:], dtype=np.int64)
    caps = [str(c) for c in g["captions"][:].tolist()]
    captions = [caps[offsets[i] : offsets[i + 1]] for i in range(len(keys))]
    per_shard = np.bincount(shard_of, minlength=num_shards).tolist() if len(keys) else [0] * num_shards
    return Rows(keys, shard_of, captions, None, per_shard)


@torch.no_grad()
def probe_dims(teacher: Teacher, device: torch.device) -> tuple[int, int]:
    """(ITC embedding dim D, fused [CLS] width C; 0 for a dual-stream teacher) from one dummy caption and image."""
    tokens = teacher.tokenize(["a"])
    emb_dim = int(teacher.encode_text(tokens).shape[-1])
    fused_dim = 0
    if teacher.kind == "single" and supports_itm(teacher):
        h, w = image_size_hw(teacher.preprocess_cfg["image_size"])
        image = torch.zeros(1, 3, h, w, device=device)
        _, fused = teacher.itm_from_tokens(teacher.image_tokens(image), tokens)
        fused_dim = int(fused.shape[-1])
    return emb_dim, fused_dim


def create_cache(
    out: Path,
    teacher: Teacher,
    *,
    config: BuildConfig,
    shards: list[str],
    hashes: list[str],
    rows: Rows,
    fingerprint: dict[str, Any],
    device: torch.device,
    precision: str,
) -> CacheWriter:
    """Create the cache at ``out`` for ``rows`` (every array at its final shape), write keys, captions and maps, and
    mark the ``layout`` stage done.

    Args:
        out: the cache directory (must not exist, or be empty).
        teacher: the teacher (dims probed here; name, kind and logit_scale go into the manifest).
        config: the build config (k, storage dtypes, rows per chunk; stored whole in the manifest).
        shards: shard paths in row order; hashes: their sha256.
        rows: the pass-0 rows (with their skip report).
        fingerprint: :func:`mcad_cache.build.fingerprint.build_fingerprint`'s result.
        device: the teacher's device; precision: the resolved precision (recorded).
    Returns:
        The writer of the new cache.
    """
    emb_dim, fused_dim = probe_dims(teacher, device)
    offsets = rows.offsets
    layout = CacheLayout(
        kind=teacher.kind,
        num_images=len(rows.keys),
        num_texts=int(offsets[-1]),
        emb_dim=emb_dim,
        k=config.k,
        fused_dim=fused_dim if config.fused_dtype != "none" else 0,
        emb_dtype=config.emb_dtype,
        fused_dtype=config.fused_dtype if teacher.kind == "single" else "none",
        rows_per_chunk=config.rows_per_chunk,
        fused_rows_per_chunk=fused_rows_per_chunk(config.rows_per_chunk),
        num_views=num_views(config),
    )
    assert rows.report is not None
    report = rows.report.to_dict()
    pass0_per_shard = Counter(item["shard"] for item in report["skipped"])  # exact up to SkipReport.max_listed
    manifest = {
        "fingerprint": fingerprint,
        "teacher": {"name": teacher.name, "kind": teacher.kind},
        "logit_scale": float(teacher.logit_scale),
        "skip_reasons": list(SKIP_REASONS),
        "shards": [
            {
                "path": os.path.abspath(s),
                "name": os.path.basename(s),
                "sha256": h,
                "num_rows": n,  # samples with a row (valid or not)
                "num_skipped_pass0": pass0_per_shard.get(s, 0),  # samples without a row
            }
            for s, h, n in zip(shards, hashes, rows.per_shard_rows, strict=True)
        ],
        "pass0_skips": {
            "counts": {r: c for r, c in report["counts"].items() if c},
            "examples": [
                [os.path.basename(s["shard"]), s["key"], s["reason"]] for s in report["skipped"][:MAX_SKIP_EXAMPLES]
            ],
        },
        "build": {
            "config": config_to_dict(config),
            "code_version": code_version(),
            "torch_version": torch.__version__,
            "zarr_version": zarr.__version__,
            "device": str(device),
            "precision": precision,
        },
        "started_at": utc_now(),
        **views_record(config),  # issue 16: V, augment spec, seed (build/views.py)
    }
    writer = CacheWriter.create(out, layout=layout, manifest=manifest)
    text_keys = [f"{k}#{j}" for k, caps in zip(rows.keys, rows.captions, strict=True) for j in range(len(caps))]
    counts = np.diff(offsets)
    writer.write("image_keys", 0, np.array(rows.keys, dtype=str))
    writer.write("image_shard", 0, rows.shard_of)
    writer.write("img2txt_offsets", 0, offsets)
    writer.write("text_keys", 0, np.array(text_keys, dtype=str))
    writer.write("captions", 0, np.array([c for caps in rows.captions for c in caps], dtype=str))
    writer.write("txt2img", 0, np.repeat(np.arange(len(rows.keys), dtype=np.int32), counts))
    writer.mark_done("layout", 0)
    return writer


__all__ = ["MAX_SKIP_EXAMPLES", "Rows", "create_cache", "probe_dims", "rows_from_store", "scan_rows"]
