"""A retrieval index over a gallery of image embeddings, on faiss: exact (``IndexFlatIP``) or IVF (``IndexIVFFlat``).

Folder layout (``SearchIndex.save`` / ``SearchIndex.open``)::

    INDEX/index.json       kind, nlist, nprobe, embed_dim, num_items, encoder source, shards, measured recall, timings
    INDEX/embeddings.npy   [N, D] float32 image_emb, L2-normalised (the exact store; IVF recall is measured against it)
    INDEX/items.json       per row: {"key", "shard", "captions"} (the WebDataset ``__key__`` and its captions)
    INDEX/ivf.faiss        the trained IVF index (kind "ivf" only; "flat" is rebuilt from embeddings.npy on open)

Scores are inner products of L2-normalised embeddings, i.e. cosine in [-1, 1] (sims, not logits).

``kind="auto"`` (our choice): exact below ``IVF_MIN_ITEMS`` items (an exact scan of 20k x 256 float32 is ~1 ms per
query on one core), IVF above. IVF defaults (our choice, faiss wiki "Guidelines to choose an index": nlist between
4 sqrt(N) and 16 sqrt(N)): ``nlist = 4 * sqrt(N)`` rounded, at least 1 and at most N / 39 (faiss warns below 39
training points per centroid), ``nprobe = max(1, nlist // 8)``. ``recall_vs_exact`` is measured at build time and
stored in ``index.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mcad_cache.errors import McadError

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.json"
IVF_FILE = "ivf.faiss"
INDEX_VERSION = 1
KINDS = ("auto", "flat", "ivf")
IVF_MIN_ITEMS = 20_000  # auto: exact below this many items (our choice)
MAX_QUERY_CHARS = 1000  # longer text queries are refused (our choice; captions are ~10-20 words)


class SearchIndexError(McadError, ValueError):
    """A bad index folder or index request (missing files, wrong dimension, unknown kind)."""


class QueryError(McadError, ValueError):
    """A query that cannot be run: empty text, text over ``MAX_QUERY_CHARS``, an unreadable image, k out of range."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise SearchIndexError("search needs faiss: pip install 'mcad-cache[faiss]'") from err
    return faiss


def ivf_params(num_items: int, *, nlist: int | None = None, nprobe: int | None = None) -> tuple[int, int]:
    """``(nlist, nprobe)`` for an IVF index over ``num_items`` rows (module docstring); explicit values win."""
    if nlist is None:
        nlist = max(1, min(round(4 * math.sqrt(num_items)), num_items // 39))
    if nprobe is None:
        nprobe = max(1, nlist // 8)
    return int(nlist), int(min(nprobe, nlist))


def build_faiss(emb: np.ndarray, *, kind: str, nlist: int = 1, nprobe: int = 1, seed: int = 0) -> Any:
    """A faiss index over ``emb`` ([N, D] float32, L2-normalised), inner-product metric.

    Args:
        kind: ``"flat"`` (exact) or ``"ivf"`` (``IndexIVFFlat``, k-means trained on ``emb`` with ``seed``).
    Raises:
        SearchIndexError: unknown kind, or faiss missing.
    """
    faiss = _faiss()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    dim = emb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(emb)
        index.nprobe = nprobe
    else:
        raise SearchIndexError(f"index kind {kind!r} is not known; use flat or ivf")
    index.add(emb)
    return index


def recall_vs_exact(approx: Any, exact: Any, queries: np.ndarray, *, k: int) -> float:
    """Mean fraction of the exact top-``k`` that ``approx`` also returns (recall@k of an ANN index vs exact search).

    Args:
        approx, exact: faiss indexes over the same rows.
        queries: ``[Q, D]`` float32.
    Returns:
        Recall in [0, 1].
    """
    _, idx_exact = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    _, idx_approx = approx.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(idx_approx, idx_exact, strict=True)]
    return float(np.mean(hits) / k)


@dataclass
class SearchIndex:
    """An in-memory index: embeddings, items, the faiss index and its description.

    Attributes:
        emb: ``[N, D]`` float32 image_emb, L2-normalised.
        items: N dicts ``{"key", "shard", "captions"}``.
        meta: the ``index.json`` dict (kind, nlist, nprobe, source, recall, timings).
    """

    emb: np.ndarray
    items: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    faiss_index: Any = None

    @classmethod
    def create(
        cls,
        emb: np.ndarray,
        items: list[dict[str, Any]],
        *,
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        recall_queries: int = 1000,
        k: int = 10,
        meta: dict[str, Any] | None = None,
    ) -> SearchIndex:
        """Build the faiss index; for IVF, measure recall@``k`` against exact search on ``recall_queries`` gallery
        rows used as queries (seeded choice).

        Raises:
            SearchIndexError: unknown kind, a row count that differs between ``emb`` and ``items``, or no rows.
        """
        if kind not in KINDS:
            raise SearchIndexError(f"--kind {kind!r} is not known; use one of {' | '.join(KINDS)}")
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or len(emb) != len(items) or len(items) == 0:
            raise SearchIndexError(
                f"index needs [N, D] embeddings for N >= 1 items; got {emb.shape} for {len(items)} items"
            )
        if kind == "auto":
            kind = "flat" if len(emb) < IVF_MIN_ITEMS else "ivf"
        info: dict[str, Any] = {"version": INDEX_VERSION, "kind": kind, "num_items": len(emb),
                                "embed_dim": int(emb.shape[1])}  # fmt: skip
        if kind == "ivf":
            nlist, nprobe = ivf_params(len(emb), nlist=nlist, nprobe=nprobe)
            index = build_faiss(emb, kind="ivf", nlist=nlist, nprobe=nprobe)
            rng = np.random.default_rng(0)
            rows = rng.choice(len(emb), size=min(recall_queries, len(emb)), replace=False)
            exact = build_faiss(emb, kind="flat")
            info |= {"nlist": nlist, "nprobe": nprobe,
                     f"recall@{k}_vs_exact": recall_vs_exact(index, exact, emb[rows], k=min(k, len(emb))),
                     "recall_queries": len(rows)}  # fmt: skip
        else:
            index = build_faiss(emb, kind="flat")
        return cls(emb=emb, items=list(items), meta=(meta or {}) | info, faiss_index=index)

    def save(self, folder: str | Path) -> Path:
        """Write the folder (module docstring); returns it."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / EMBEDDINGS_FILE, self.emb)
        (out / ITEMS_FILE).write_text(json.dumps(self.items) + "\n")
        if self.meta["kind"] == "ivf":
            _faiss().write_index(self.faiss_index, str(out / IVF_FILE))
        (out / INDEX_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        return out

    @classmethod
    def open(cls, folder: str | Path) -> SearchIndex:
        """Load an index folder.

        Raises:
            SearchIndexError: not an index folder, or its files disagree in row count.
        """
        path = Path(folder)
        if not (path / INDEX_FILE).is_file():
            raise SearchIndexError(f"{path} is not a search index: no {INDEX_FILE} (build one with `mcad-cache index`)")
        meta = json.loads((path / INDEX_FILE).read_text())
        emb = np.load(path / EMBEDDINGS_FILE)
        items = json.loads((path / ITEMS_FILE).read_text())
        if len(emb) != len(items) or len(emb) != meta["num_items"]:
            raise SearchIndexError(
                f"{path}: {len(emb)} embeddings, {len(items)} items, index.json says {meta['num_items']}"
            )
        if meta["kind"] == "ivf":
            index = _faiss().read_index(str(path / IVF_FILE))
            index.nprobe = int(meta["nprobe"])
        else:
            index = build_faiss(emb, kind="flat")
        return cls(emb=emb, items=items, meta=meta, faiss_index=index)

    def search(self, query_emb: np.ndarray, *, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery rows per query.

        Args:
            query_emb: ``[Q, D]`` float32, L2-normalised (text_emb for t2i, image_emb for i2i).
            k: results per query, 1 <= k; capped at N.
        Returns:
            ``(sims [Q, k'] float32 cosine, idx [Q, k'] int64)``, best first; k' = min(k, N).
        Raises:
            QueryError: k < 1 or a query dimension that is not the index's D.
        """
        if k < 1:
            raise QueryError(f"-k must be >= 1, got {k}")
        q = np.ascontiguousarray(np.atleast_2d(query_emb), dtype=np.float32)
        if q.shape[1] != self.emb.shape[1]:
            raise QueryError(f"query embedding has D={q.shape[1]}, the index D={self.emb.shape[1]}: another encoder?")
        return self.faiss_index.search(q, min(k, len(self.items)))


def check_text_query(text: str, *, max_chars: int = MAX_QUERY_CHARS) -> str:
    """The stripped query, or a ``QueryError`` naming the problem (empty, or over ``max_chars`` characters)."""
    query = (text or "").strip()
    if not query:
        raise QueryError("the text query is empty: type a few words, e.g. 'a red bicycle'")
    if len(query) > max_chars:
        raise QueryError(f"the text query has {len(query)} characters; the limit is {max_chars}")
    return query
