"""What identifies a cache build: the config checks made before any work, the teacher abilities a build needs, and
the fingerprint (teacher, preprocessing, data, candidate rule, storage, precision) that a resume must match.

The fingerprint's format: ``docs/cache-format.md`` ("Manifest").
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, TypeGuard

import torch

from mcad_cache.build.views import check_views_config, views_record
from mcad_cache.cache.schema import EMB_DTYPES, FUSED_DTYPES, SCHEMA_VERSION
from mcad_cache.config import BuildConfig
from mcad_cache.data import DecodePolicy
from mcad_cache.data.identity import shard_records
from mcad_cache.errors import ConfigError
from mcad_cache.teachers.base import SingleStreamTeacher, Teacher

CANDIDATE_RULE = (
    "global top-k over all valid rows by ITC cosine similarity of the stored embeddings (float64 accumulation, "
    "float32 result), descending, ties to the lower row"
)
RESCORE_MARGIN_CUDA = 16  # on CUDA: float32 top-(k + 16) retrieval, float64 re-scoring (fast where float64 is slow)
FUSED_ROWS_PER_CHUNK = 4  # fused arrays: 4 rows per chunk (measured: docs/cache-format.md, "Read speed")
TOPK_BACKENDS = ("torch", "faiss")


def check_config(config: BuildConfig) -> None:
    """Check the build config's values before any work starts.

    Raises:
        ConfigError: every problem found, in one message (k, sizes, dtypes, top-k backend, shards, rank).
    """
    problems = []
    if config.k <= 0:
        problems.append(f"k must be > 0, got {config.k}")
    if config.batch_size <= 0 or config.workers < 0 or config.chunk_size <= 0 or config.rows_per_chunk <= 0:
        problems.append("batch_size, chunk_size, rows_per_chunk must be > 0 and workers >= 0")
    if config.fused_dtype not in FUSED_DTYPES:
        problems.append(f"fused_dtype must be one of {FUSED_DTYPES}, got {config.fused_dtype!r}")
    if config.emb_dtype not in EMB_DTYPES:
        problems.append(f"emb_dtype must be one of {EMB_DTYPES}, got {config.emb_dtype!r}")
    if config.topk_backend not in TOPK_BACKENDS:
        problems.append(f"topk_backend must be torch | faiss, got {config.topk_backend!r}")
    elif config.topk_backend == "faiss" and importlib.util.find_spec("faiss") is None:
        problems.append("topk_backend=faiss needs faiss-cpu: pip install 'mcad-cache[faiss]'")
    if not config.data:
        problems.append("no --data shards given")
    if not config.token_scratch_gib >= 0:  # also refuses NaN
        problems.append(f"--token-scratch-gib must be >= 0 (0 = off), got {config.token_scratch_gib}")
    check_views_config(config)  # issue 16: --views / --augment (raises ConfigError)
    if config.world_size < 1 or not 0 <= config.rank < config.world_size:
        problems.append(f"need 0 <= rank < world_size, got rank={config.rank}, world_size={config.world_size}")
    if problems:
        raise ConfigError("build config: " + "; ".join(problems))


def supports_itm(teacher: Teacher) -> TypeGuard[SingleStreamTeacher]:
    """True when ``teacher`` has the single-stream abilities pass 3 needs (``image_tokens``, ``itm_from_tokens``,
    ...: the ``SingleStreamTeacher`` protocol). The one place the build asks for them."""
    return isinstance(teacher, SingleStreamTeacher)


def rescore_margin(device: torch.device) -> int:
    """Extra candidates retrieved in float32 before float64 re-scoring: 16 on CUDA, 0 (plain float64) elsewhere."""
    return RESCORE_MARGIN_CUDA if device.type == "cuda" else 0


def scoring_rule(*, candidate_source: str, topk_backend: str, device: torch.device) -> str:
    """How the top-k similarities are computed (part of the fingerprint: a resume must score the same way)."""
    if candidate_source:
        return "source cache's candidates, re-scored in float64"
    if topk_backend == "faiss":
        return "faiss IndexFlatIP retrieval of k+16, float64 re-scoring"
    m = rescore_margin(device)
    return f"float32 retrieval of k+{m}, float64 re-scoring" if m else "float64"


def fused_rows_per_chunk(rows_per_chunk: int) -> int:
    """Rows per chunk of the fused arrays: a divisor of ``rows_per_chunk`` (so a unit is whole chunks), at most 4."""
    return math.gcd(FUSED_ROWS_PER_CHUNK, rows_per_chunk)


def build_fingerprint(
    teacher: Teacher,
    *,
    config: BuildConfig,
    shards: list[str],
    hashes: list[str],
    policy: DecodePolicy,
    precision: str,
    device: torch.device,
    source_fingerprint: dict[str, Any] | None,
) -> dict[str, Any]:
    """The fingerprint of this build (compared key by key with an existing cache's before resuming it).

    Args:
        teacher: the teacher (its ``fingerprint()``, kind, preprocessing and tokenizer are recorded).
        config: the build config (k, candidate options, storage dtypes, rows per chunk).
        shards: shard paths in row order; hashes: their sha256, same order.
        policy: the decode policy.
        precision: the resolved precision (fp32 | bf16 | fp16).
        device: the device (decides the scoring rule).
        source_fingerprint: the candidate source cache's fingerprint, or None (own ITC).
    Returns:
        A JSON-able dict.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher.fingerprint(),
        "kind": teacher.kind,
        "preprocess": teacher.preprocess_cfg,
        "tokenizer": teacher.tokenizer_cfg,
        "decode_policy": policy.to_dict(),
        "k": config.k,
        "candidates": {
            "rule": CANDIDATE_RULE,
            "source": "own_itc" if not config.candidate_source else "cache",
            "source_cache": source_fingerprint,
            "force_positives": config.force_positives,
            "scoring": scoring_rule(
                candidate_source=config.candidate_source, topk_backend=config.topk_backend, device=device
            ),
            "pool": "all valid rows",
        },
        "storage": {
            "emb_dtype": config.emb_dtype,
            "fused_dtype": config.fused_dtype if teacher.kind == "single" else "none",
            "rows_per_chunk": config.rows_per_chunk,
            "fused_rows_per_chunk": fused_rows_per_chunk(config.rows_per_chunk),
        },
        "precision": precision,
        "data": {"shards": shard_records(shards, hashes)},  # content + path under the data root (data.identity)
        **views_record(config),  # issue 16: V, augment spec, seed ({} without views: fingerprint unchanged)
    }


__all__ = [
    "CANDIDATE_RULE",
    "FUSED_ROWS_PER_CHUNK",
    "RESCORE_MARGIN_CUDA",
    "build_fingerprint",
    "check_config",
    "fused_rows_per_chunk",
    "rescore_margin",
    "scoring_rule",
    "supports_itm",
]
