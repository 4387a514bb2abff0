"""Global top-k by inner product, computed in chunks, with a deterministic tie rule.

The result is the same as a full-matrix ``torch.topk`` over ``query @ gallery.T`` with ties broken by the lower
gallery row (and the same for every chunk size): a stable order lets a rerun of a build (resume) reproduce the
candidates exactly. Similarities are accumulated in float64 and rounded to float32, so that a dot product does not
depend on the shape of the block it was computed in (a float32 blocked matmul can differ in the last ulp, which would
reorder exact ties, e.g. duplicated images, between chunkings).

``rescore_margin > 0`` selects a faster variant for accelerators whose float64 throughput is low: a float32 pass
keeps ``k + rescore_margin`` candidates per query, which are then re-scored in float64 and ordered by the same rule.
It returns the same result unless more than ``rescore_margin`` gallery rows lie within float32 rounding of the k-th
candidate (e.g. many duplicated images).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

_logger = logging.getLogger(__name__)


def _sort_desc_then_index(values: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by descending value, ties by ascending index (both [R, m])."""
    idx_sorted, perm = idx.sort(dim=1)
    values = values.gather(1, perm)
    values, perm = values.sort(dim=1, descending=True, stable=True)
    return values, idx_sorted.gather(1, perm)


def _block_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Deterministic top-k of each row of ``sims`` [R, G] (ties: lower column first). Returns ([R, k], [R, k] int64)."""
    values, idx = torch.topk(sims, k, dim=1, largest=True, sorted=True)
    # torch.topk may pick any of several elements tied at the k-th value: find rows where that can happen and
    # redo them with a stable full sort (rare with real data, common with duplicated embeddings).
    tied = (sims >= values[:, -1:]).sum(dim=1) > k
    values, idx = _sort_desc_then_index(values, idx)
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)[0]
        v, i = sims[rows].sort(dim=1, descending=True, stable=True)
        values[rows], idx[rows] = v[:, :k], i[:, :k]
    return values, idx


def chunked_topk(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray,
    *,
    k: int,
    chunk_size: int = 4096,
    gallery_chunk_size: int | None = None,
    query_valid: Tensor | np.ndarray | None = None,
    gallery_valid: Tensor | np.ndarray | None = None,
    device: torch.device | str | None = None,
    rescore_margin: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows by inner product for every query row, over the whole gallery, in chunks.

    Equivalent to ``torch.topk(query @ gallery.T, k)`` with ties ordered by the lower gallery row, but never holds
    more than ``chunk_size x gallery_chunk_size`` similarities. Invalid gallery rows are never returned; invalid
    query rows, and slots beyond the number of valid gallery rows, get id -1 and similarity NaN.

    Args:
        query: [N_q, D] embeddings (any float dtype; accumulated in float64, returned as float32). For
            L2-normalised inputs the similarities are ITC cosine similarities in [-1, 1].
        gallery: [N_g, D] embeddings.
        k: candidates per query, > 0 (the output has k columns even if fewer valid gallery rows exist).
        chunk_size: query rows per block.
        gallery_chunk_size: gallery rows per block (default ``chunk_size``).
        query_valid: [N_q] bool, rows to answer (default all).
        gallery_valid: [N_g] bool, rows that may be returned (default all). Invalid rows may hold NaN.
        device: where to compute (default: the query tensor's device).
        rescore_margin: 0 = float64 everywhere (exact); m > 0 = float32 retrieval of k + m candidates, then float64
            re-scoring of those (see the module docstring).
    Returns:
        ``(sims [N_q, k] float32, idx [N_q, k] int32)`` numpy arrays, each row sorted by descending similarity.
    Raises:
        ValueError: k <= 0, chunk sizes <= 0, or mismatched shapes.
    """
    q = torch.as_tensor(query)
    g = torch.as_tensor(gallery)
    if k <= 0 or chunk_size <= 0 or (gallery_chunk_size is not None and gallery_chunk_size <= 0):
        raise ValueError(f"k and chunk sizes must be > 0, got k={k}, chunk_size={chunk_size}, {gallery_chunk_size}")
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"query [N_q, D] and gallery [N_g, D] expected, got {tuple(q.shape)} and {tuple(g.shape)}")
    dev = torch.device(device) if device is not None else q.device
    n_q, n_g = q.shape[0], g.shape[0]
    qv = torch.ones(n_q, dtype=torch.bool) if query_valid is None else torch.as_tensor(query_valid).bool().cpu()
    gv = torch.ones(n_g, dtype=torch.bool) if gallery_valid is None else torch.as_tensor(gallery_valid).bool().cpu()
    if qv.shape != (n_q,) or gv.shape != (n_g,):
        raise ValueError("query_valid / gallery_valid must be [N_q] / [N_g]")
    gcs = gallery_chunk_size or chunk_size
    out_sims = np.full((n_q, k), np.nan, dtype=np.float32)
    out_idx = np.full((n_q, k), -1, dtype=np.int32)
    if rescore_margin < 0:
        raise ValueError(f"rescore_margin must be >= 0, got {rescore_margin}")
    # The gallery stays in its own dtype; each block is widened to float64 when used, so peak memory is the gallery
    # plus one block (a whole float64 copy was 2x a float32 gallery: 2 GB at 1M x 256). Invalid rows may hold NaN:
    # a similarity column depends on its gallery row only, and invalid columns are set to -inf before any top-k.
    g_dev = g.to(dev)
    g_invalid = (~gv).to(dev)
    k1 = k + rescore_margin
    for q0 in range(0, n_q, chunk_size):
        q1 = min(q0 + chunk_size, n_q)
        rows = qv[q0:q1].nonzero(as_tuple=True)[0]
        if rows.numel() == 0 or n_g == 0:
            continue
        qc = q[q0:q1][rows].double().to(dev)
        if rescore_margin:
            best_v, best_i = _rescored_topk(qc, g_dev, g_invalid, k=k, k1=k1, gcs=gcs)
            _store(out_sims, out_idx, rows + q0, best_v, best_i)
            continue
        best_v = torch.empty((rows.numel(), 0), dtype=torch.float32, device=dev)
        best_i = torch.empty((rows.numel(), 0), dtype=torch.int64, device=dev)
        for g0 in range(0, n_g, gcs):
            g1 = min(g0 + gcs, n_g)
            sims = (qc @ g_dev[g0:g1].double().T).float()
            sims.masked_fill_(g_invalid[g0:g1][None, :], float("-inf"))
            v, i = _block_topk(sims, min(k, g1 - g0))
            # Earlier blocks hold lower rows, so a stable sort of [best, block] keeps "ties: lower row first".
            v, perm = torch.cat([best_v, v], dim=1).sort(dim=1, descending=True, stable=True)
            i = torch.cat([best_i, i + g0], dim=1).gather(1, perm)
            best_v, best_i = v[:, :k], i[:, :k]
        _store(out_sims, out_idx, rows + q0, best_v, best_i)
    return out_sims, out_idx


def _store(out_sims: np.ndarray, out_idx: np.ndarray, rows: Tensor, best_v: Tensor, best_i: Tensor) -> None:
    keep = torch.isfinite(best_v)
    best_i = torch.where(keep, best_i, torch.full_like(best_i, -1))
    best_v = torch.where(keep, best_v, torch.full_like(best_v, float("nan")))
    m = best_v.shape[1]
    sel = rows.cpu().numpy()
    out_sims[sel, :m] = best_v.cpu().numpy()
    out_idx[sel, :m] = best_i.cpu().numpy().astype(np.int32)


def _rescored_topk(qc: Tensor, g: Tensor, g_invalid: Tensor, *, k: int, k1: int, gcs: int) -> tuple[Tensor, Tensor]:
    """float32 retrieval of k1 candidates per query row, then float64 re-scoring and the deterministic order."""
    q32 = qc.float()
    n_g = g.shape[0]
    cand_v = torch.empty((qc.shape[0], 0), dtype=torch.float32, device=qc.device)
    cand_i = torch.empty((qc.shape[0], 0), dtype=torch.int64, device=qc.device)
    for g0 in range(0, n_g, gcs):
        g1 = min(g0 + gcs, n_g)
        sims = q32 @ g[g0:g1].float().T
        sims.masked_fill_(g_invalid[g0:g1][None, :], float("-inf"))
        v, i = torch.topk(sims, min(k1, g1 - g0), dim=1)
        v, i = torch.cat([cand_v, v], dim=1), torch.cat([cand_i, i + g0], dim=1)
        v, pos = torch.topk(v, min(k1, v.shape[1]), dim=1)
        cand_v, cand_i = v, i.gather(1, pos)
    out_v, out_i = [], []
    for s in range(0, qc.shape[0], 1024):  # bounded memory for the [r, k1, D] float64 gather
        ci = cand_i[s : s + 1024]
        exact = torch.einsum("rd,rmd->rm", qc[s : s + 1024], g[ci].double()).float()
        exact = exact.masked_fill(~torch.isfinite(cand_v[s : s + 1024]) | g_invalid[ci], float("-inf"))
        v, i = _sort_desc_then_index(exact, ci)
        out_v.append(v[:, :k])
        out_i.append(i[:, :k])
    return torch.cat(out_v), torch.cat(out_i)


def faiss_topk(
    query: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int,
    query_valid: np.ndarray | None = None,
    gallery_valid: np.ndarray | None = None,
    chunk_size: int = 4096,
    margin: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with an exact FAISS index (``IndexFlatIP``), re-scored with the rule of
    :func:`chunked_topk`.

    FAISS retrieves ``k + margin`` candidates per query in float32; they are re-scored with float64 accumulation and
    ordered by descending similarity, ties to the lower row. The result equals :func:`chunked_topk` unless more than
    ``margin`` gallery rows tie with the k-th candidate (then FAISS may have returned other tied rows).

    Args:
        query: [N_q, D] float embeddings.
        gallery: [N_g, D] float embeddings.
        k: candidates per query.
        query_valid: [N_q] bool (default all); invalid rows get -1 / NaN.
        gallery_valid: [N_g] bool (default all); invalid rows are never returned.
        chunk_size: queries per FAISS search call.
        margin: extra candidates retrieved for the exact re-scoring.
    Returns:
        ``(sims [N_q, k] float32, idx [N_q, k] int32)`` like :func:`chunked_topk`.
    Raises:
        ImportError: faiss is not installed (``pip install 'mcad-cache[faiss]'``).
    """
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError("topk_backend='faiss' needs faiss-cpu: pip install 'mcad-cache[faiss]'") from err
    q = np.asarray(query, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    qv = np.ones(len(q), bool) if query_valid is None else np.asarray(query_valid, bool)
    gv = np.ones(len(g), bool) if gallery_valid is None else np.asarray(gallery_valid, bool)
    sims_out = np.full((len(q), k), np.nan, np.float32)
    idx_out = np.full((len(q), k), -1, np.int32)
    gi = np.nonzero(gv)[0]
    if gi.size == 0:
        return sims_out, idx_out
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(np.ascontiguousarray(g[gi]))
    m = min(gi.size, k + margin)
    qi = np.nonzero(qv)[0]
    for s in range(0, qi.size, chunk_size):
        rows = qi[s : s + chunk_size]
        _, found = index.search(np.ascontiguousarray(q[rows]), m)
        cand = np.sort(gi[np.maximum(found, 0)], axis=1)  # [r, m] gallery rows, ascending
        dots = np.einsum("rd,rmd->rm", q[rows].astype(np.float64), g[cand].astype(np.float64)).astype(np.float32)
        values, order = _sort_desc_then_index(torch.from_numpy(dots), torch.from_numpy(cand))
        kk = min(k, m)
        sims_out[rows, :kk] = values[:, :kk].numpy()
        idx_out[rows, :kk] = order[:, :kk].numpy().astype(np.int32)
    return sims_out, idx_out


def positives_i2t(idx_i2t: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
    """is_positive [N_i, K] bool: candidate text ``idx_i2t[i, j]`` is a caption of image i (``-1`` -> False)."""
    rows = np.arange(idx_i2t.shape[0])[:, None]
    safe = np.where(idx_i2t >= 0, idx_i2t, 0)
    return (idx_i2t >= 0) & (txt2img[safe] == rows)


def positives_t2i(idx_t2i: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
    """is_positive [N_t, K] bool: candidate image ``idx_t2i[t, j]`` is the image of caption t (``-1`` -> False)."""
    return (idx_t2i >= 0) & (idx_t2i == txt2img[:, None])


def force_positives(
    sims: np.ndarray,
    idx: np.ndarray,
    positives: list[np.ndarray],
    positive_sims: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Put each query's ground-truth positives into its candidate list, dropping the lowest-ranked non-positives.

    If a query has more positives than K slots, its K most similar positives are kept. The result is re-sorted by
    descending similarity, ties by lower row (the rule of :func:`chunked_topk`).

    Args:
        sims: [N_q, K] float32 similarities from :func:`chunked_topk` (NaN for empty slots).
        idx: [N_q, K] int32 candidate rows (-1 for empty slots).
        positives: per query, the int array of its positive gallery rows (valid ones only).
        positive_sims: per query, their similarities (same order), float32.
    Returns:
        ``(sims, idx)`` new arrays, same shapes and dtypes.
    """
    sims, idx = sims.copy(), idx.copy()
    k = idx.shape[1]
    for q, (pos, pos_sims) in enumerate(zip(positives, positive_sims, strict=True)):
        if len(pos) == 0 or np.isin(pos, idx[q]).all():
            continue
        cand = {int(i): float(s) for i, s in zip(idx[q], sims[q], strict=True) if i >= 0}
        pos_set = {int(p): float(s) for p, s in zip(pos, pos_sims, strict=True)}
        ordered_pos = sorted(pos_set.items(), key=lambda t: (-t[1], t[0]))[:k]
        others = sorted(((i, s) for i, s in cand.items() if i not in pos_set), key=lambda t: (-t[1], t[0]))
        chosen = ordered_pos + others[: k - len(ordered_pos)]
        chosen.sort(key=lambda t: (-t[1], t[0]))
        idx[q] = -1
        sims[q] = np.nan
        idx[q, : len(chosen)] = [c[0] for c in chosen]
        sims[q, : len(chosen)] = [c[1] for c in chosen]
    return sims, idx


__all__ = ["chunked_topk", "faiss_topk", "force_positives", "positives_i2t", "positives_t2i"]
