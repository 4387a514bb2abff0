"""Build pass 2, top-k candidates: for each image the k most similar captions (i2t) and for each caption the k most
similar images (t2i) over all valid rows, by the teacher's ITC cosine similarity of the *stored* embeddings (so a
resumed build computes the same candidates), chunked, ties to the lower row (``mcad_cache.cache.topk``). Ground-truth
positives are flagged, and forced in with ``force_positives``. Or the candidates of another cache (same rows),
re-scored with this teacher's embeddings.

Sharded by rank: each rank computes the top-k of **its own query rows** (the rows of the top-k units it owns, unit u
belongs to rank u % world_size) against the whole gallery, read from the cache once every rank has committed its
embeddings (the store is the all-gather). Each query row's result depends only on that row and the gallery, so the
cache equals a one-process build, array by array. Memory per rank: the gallery [N, D] float32 plus
``chunk_size`` x gallery similarities (``chunked_topk``), not the W x N x N of every rank computing everything.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mcad_cache.build.fingerprint import rescore_margin
from mcad_cache.build.units import owned_units
from mcad_cache.cache.reader import CacheReader
from mcad_cache.cache.topk import chunked_topk, faiss_topk, force_positives
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.errors import CacheMismatchError
from mcad_cache.progress import ProgressFn

_logger = logging.getLogger(__name__)


def pass_topk(
    writer: CacheWriter,
    *,
    source: CacheReader | None,
    topk_backend: str,
    chunk_size: int,
    force_positive_candidates: bool,
    device: torch.device,
    progress: ProgressFn,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Pass 2: write ``{i2t,t2i}_idx`` [N, k] int32 (-1 = empty), ``_sims`` [N, k] float32 ITC cosine (NaN = empty)
    and ``_is_positive`` [N, k] bool for every top-k unit of this rank not yet done, computing only those units'
    query rows (against every gallery row). Needs both embedding stages done by every rank.

    Args:
        writer: the cache.
        source: a complete cache whose candidates to use (its rows equal this build's), or None (own ITC).
        topk_backend: ``torch`` (chunked matmul, :func:`chunked_topk`) or ``faiss`` (:func:`faiss_topk`).
        chunk_size: query rows per similarity chunk.
        force_positive_candidates: put every valid ground-truth positive into its query's list
            (:func:`force_positives`).
        device: where the torch backend multiplies (CUDA: float32 retrieval of k + 16, float64 re-scoring).
        progress: progress wrapper; rank, world_size: which units (and so which query rows) to compute.
    Raises:
        CacheMismatchError: the source cache's keys differ from this build's rows.
    """
    todo = {d: owned_units(~writer.done(f"topk_{d}"), rank=rank, world_size=world_size) for d in ("i2t", "t2i")}
    if not todo["i2t"] and not todo["t2i"]:
        return
    g = writer.group
    img = np.asarray(g["image_emb"][:], dtype=np.float32)
    txt = np.asarray(g["text_emb"][:], dtype=np.float32)
    iv = np.asarray(g["image_valid"][:], dtype=bool)
    tv = np.asarray(g["text_valid"][:], dtype=bool)
    txt2img = np.asarray(g["txt2img"][:], dtype=np.int64)
    offsets = np.asarray(g["img2txt_offsets"][:], dtype=np.int64)
    k = writer.layout.k
    for direction, q, gal, qv, gv in (("i2t", img, txt, iv, tv), ("t2i", txt, img, tv, iv)):
        stage = f"topk_{direction}"
        units = todo[direction]
        if not units:
            continue
        ranges = [writer.unit_range(stage, u) for u in units]
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])  # this rank's query rows, ascending
        _logger.info(
            "rank %d of %d: top-k %s for %d of %d query rows (%d units) against %d gallery rows",
            rank, world_size, direction, rows.size, q.shape[0], len(units), gal.shape[0],
        )  # fmt: skip
        if source is not None:
            sims, idx = source_candidates(
                source, writer, direction=direction, query=q, gallery=gal, query_valid=qv, gallery_valid=gv, k=k,
                rows=rows,
            )  # fmt: skip
        elif topk_backend == "faiss":
            sims, idx = faiss_topk(q[rows], gal, k=k, query_valid=qv[rows], gallery_valid=gv, chunk_size=chunk_size)
        else:
            sims, idx = chunked_topk(
                q[rows],
                gal,
                k=k,
                chunk_size=chunk_size,
                query_valid=qv[rows],
                gallery_valid=gv,
                device=device,
                rescore_margin=rescore_margin(device),
            )
        if force_positive_candidates:
            if direction == "i2t":
                pos = [
                    np.arange(offsets[i], offsets[i + 1])[tv[offsets[i] : offsets[i + 1]]]
                    if iv[i]
                    else np.zeros(0, np.int64)
                    for i in rows
                ]
            else:
                pos = [np.array([txt2img[t]]) if tv[t] else np.zeros(0, np.int64) for t in rows]
            pos_sims = [dots(q[i], gal[p]) for i, p in zip(rows, pos, strict=True)]
            sims, idx = force_positives(sims, idx, pos, pos_sims)
        flags = positive_flags(direction, idx, rows=rows, txt2img=txt2img)
        start = 0
        for unit, (a, b) in progress(
            list(zip(units, ranges, strict=True)), f"pass 2: top-k {direction} (rank {rank})", len(units)
        ):
            n = b - a
            writer.write(f"{direction}_idx", a, idx[start : start + n])
            writer.write(f"{direction}_sims", a, sims[start : start + n], check=False)
            writer.write(f"{direction}_is_positive", a, flags[start : start + n])
            writer.mark_done(stage, unit)
            start += n


def positive_flags(direction: str, idx: np.ndarray, *, rows: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
    """is_positive [n, K] bool of the candidates ``idx`` [n, K] (-1 = empty) of query rows ``rows`` [n]: i2t, the
    candidate caption belongs to the query image; t2i, the candidate image is the query caption's image
    (``cache.topk.positives_i2t`` / ``positives_t2i`` for a subset of query rows)."""
    safe = np.where(idx >= 0, idx, 0)
    if direction == "i2t":
        return (idx >= 0) & (txt2img[safe] == rows[:, None])
    return (idx >= 0) & (idx == txt2img[rows][:, None])


def dots(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """float32 dot products of one query [D] with gallery rows [n, D] -> [n], accumulated in float64 like
    :func:`chunked_topk`."""
    return (gallery.astype(np.float64) @ query.astype(np.float64)).astype(np.float32)


def source_candidates(
    source: CacheReader,
    writer: CacheWriter,
    *,
    direction: str,
    query: np.ndarray,
    gallery: np.ndarray,
    query_valid: np.ndarray,
    gallery_valid: np.ndarray,
    k: int,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates chosen by another cache's ITC (same rows), re-scored with this teacher's stored embeddings.

    Args:
        query: [Nq, D] float32 embeddings; gallery: [Ng, D]; query_valid / gallery_valid: [Nq] / [Ng] bool.
        rows: the query rows [n] to return (None: all Nq).
    Returns:
        ``(sims [n, k] float32, idx [n, k] int32)``: the source's order, invalid candidates dropped, empty slots
        (-1 / NaN) last.
    Raises:
        CacheMismatchError: the source's image or text keys differ from this build's.
    """
    for name in ("image_keys", "text_keys"):
        if not np.array_equal(np.asarray(source.array(name)[:]), np.asarray(writer.group[name][:])):
            raise CacheMismatchError(
                f"candidate source {source.path}: its {name} differ from this build's rows (built on other data?)"
            )
    rows = np.arange(query.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    query, qv, gv = query[rows], query_valid[rows], gallery_valid
    idx = np.asarray(source.array(f"{direction}_idx")[:, :k])[rows].astype(np.int32)
    idx = np.where((idx >= 0) & qv[:, None] & gv[np.where(idx >= 0, idx, 0)], idx, -1)
    at, slots = np.nonzero(idx >= 0)
    sims = np.full(idx.shape, np.nan, np.float32)
    products = np.einsum("nd,nd->n", query[at].astype(np.float64), gallery[idx[at, slots]].astype(np.float64))
    sims[at, slots] = products.astype(np.float32)
    # keep the source's order (its ranking) but move empty slots last
    order = np.argsort(idx < 0, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


__all__ = ["dots", "pass_topk", "positive_flags", "source_candidates"]
