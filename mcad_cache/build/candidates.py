"""Build pass 2, top-k candidates: for each image the k most similar captions (i2t) and for each caption the k most
similar images (t2i) over all valid rows, by the teacher's ITC cosine similarity of the *stored* embeddings (so a
resumed build computes the same candidates), chunked, ties to the lower row (``mcad_cache.cache.topk``). Ground-truth
positives are flagged, and forced in with ``force_positives``. Or the candidates of another cache (same rows),
re-scored with this teacher's embeddings.

Each rank writes the units it owns; today every rank computes the full top-k and writes its own rows. Computing only
the own query rows (``query rows of owned units`` against the whole gallery) is a change inside
:func:`pass_topk`'s loop over directions.
"""

from __future__ import annotations

import numpy as np
import torch

from mcad_cache.build.fingerprint import rescore_margin
from mcad_cache.build.units import owned_units
from mcad_cache.cache.reader import CacheReader
from mcad_cache.cache.topk import chunked_topk, faiss_topk, force_positives, positives_i2t, positives_t2i
from mcad_cache.cache.writer import CacheWriter
from mcad_cache.errors import CacheMismatchError
from mcad_cache.progress import ProgressFn


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
    and ``_is_positive`` [N, k] bool for every top-k unit of this rank not yet done. Needs both embedding stages done.

    Args:
        writer: the cache.
        source: a complete cache whose candidates to use (its rows equal this build's), or None (own ITC).
        topk_backend: ``torch`` (chunked matmul, :func:`chunked_topk`) or ``faiss`` (:func:`faiss_topk`).
        chunk_size: query rows per similarity chunk.
        force_positive_candidates: put every valid ground-truth positive into its query's list
            (:func:`force_positives`).
        device: where the torch backend multiplies (CUDA: float32 retrieval of k + 16, float64 re-scoring).
        progress: progress wrapper; rank, world_size: which units to write.
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
        if not todo[direction]:
            continue
        if source is not None:
            sims, idx = source_candidates(
                source, writer, direction=direction, query=q, gallery=gal, query_valid=qv, gallery_valid=gv, k=k
            )
        elif topk_backend == "faiss":
            sims, idx = faiss_topk(q, gal, k=k, query_valid=qv, gallery_valid=gv, chunk_size=chunk_size)
        else:
            sims, idx = chunked_topk(
                q,
                gal,
                k=k,
                chunk_size=chunk_size,
                query_valid=qv,
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
                    for i in range(len(iv))
                ]
            else:
                pos = [np.array([txt2img[t]]) if tv[t] else np.zeros(0, np.int64) for t in range(len(tv))]
            pos_sims = [dots(q[i], gal[p]) for i, p in enumerate(pos)]
            sims, idx = force_positives(sims, idx, pos, pos_sims)
        flags = positives_i2t(idx, txt2img) if direction == "i2t" else positives_t2i(idx, txt2img)
        for unit in progress(todo[direction], f"pass 2: top-k {direction}", len(todo[direction])):
            a, b = writer.unit_range(stage, unit)
            writer.write(f"{direction}_idx", a, idx[a:b])
            writer.write(f"{direction}_sims", a, sims[a:b], check=False)
            writer.write(f"{direction}_is_positive", a, flags[a:b])
            writer.mark_done(stage, unit)


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
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates chosen by another cache's ITC (same rows), re-scored with this teacher's stored embeddings.

    Args:
        query: [Nq, D] float32 embeddings; gallery: [Ng, D]; query_valid / gallery_valid: [Nq] / [Ng] bool.
    Returns:
        ``(sims [Nq, k] float32, idx [Nq, k] int32)``: the source's order, invalid candidates dropped, empty slots
        (-1 / NaN) last.
    Raises:
        CacheMismatchError: the source's image or text keys differ from this build's.
    """
    for name in ("image_keys", "text_keys"):
        if not np.array_equal(np.asarray(source.array(name)[:]), np.asarray(writer.group[name][:])):
            raise CacheMismatchError(
                f"candidate source {source.path}: its {name} differ from this build's rows (built on other data?)"
            )
    qv, gv = query_valid, gallery_valid
    idx = np.asarray(source.array(f"{direction}_idx")[:, :k]).astype(np.int32)
    idx = np.where((idx >= 0) & qv[:, None] & gv[np.where(idx >= 0, idx, 0)], idx, -1)
    rows, slots = np.nonzero(idx >= 0)
    sims = np.full(idx.shape, np.nan, np.float32)
    products = np.einsum("nd,nd->n", query[rows].astype(np.float64), gallery[idx[rows, slots]].astype(np.float64))
    sims[rows, slots] = products.astype(np.float32)
    # keep the source's order (its ranking) but move empty slots last
    order = np.argsort(idx < 0, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


__all__ = ["dots", "pass_topk", "source_candidates"]
