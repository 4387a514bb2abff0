"""Top-k at scale: the exact chunked top-k the build uses against FAISS IVF-Flat and IVF-PQ, at 100k and 1M rows.

For each gallery size N (synthetic L2-normalised embeddings, 256-d like ALBEF's ITC space, k = 11 like the build's
default), one direction (N query rows against N gallery rows; a build does it twice):

- **exact**: ``mcad_cache.cache.topk.chunked_topk`` (float64 accumulation, deterministic ties), the build's default;
- **exact-faiss**: ``mcad_cache.cache.topk.faiss_topk`` (``IndexFlatIP`` + float64 re-scoring), the build's
  ``topk_backend="faiss"``;
- **ivf-flat**: ``faiss.IndexIVFFlat`` (inner product, ``nlist`` lists, ``nprobe`` lists searched), approximate;
- **ivf-pq**: ``faiss.IndexIVFPQ`` (``m`` sub-quantizers x 8 bits = m bytes per vector), approximate;
- **ivf-pq-refine**: IVF-PQ retrieving ``refine_factor x k`` candidates, re-ranked by exact inner product with the
  stored float32 vectors (``faiss.IndexRefineFlat``).

Only the first ``--query-rows`` query rows are searched by every method (the same rows). Times at full size are
**extrapolated** and marked so: ``setup_s`` (index training and adding, or for the exact methods the gallery
preparation measured as a call that answers no query) + ``(search_s - setup part) x N / query_rows``; queries are
independent, so the per-query cost measured against the full-size gallery is the real one. Recall@k of a method =
mean over the searched queries of |its top-k ids intersect the exact top-k ids| / k (exact = ``chunked_topk``).

Peak memory: the resident-set high-water mark during the setup and search minus the RSS before
(``_common.PeakMemory``), plus the index's own size in bytes (``faiss.serialize_index``).

Data (``--distribution``): ``clustered`` (our choice, a stand-in for real embeddings, which are far from uniform):
N / 100 centres uniform on the sphere, each row = normalize(centre + ``sigma`` * z / sqrt(D)), z ~ N(0, I); queries
drawn the same way from the same centres (a query and a gallery row of its cluster have cosine ~ 1 / (1 + sigma^2)).
``uniform``: rows uniform on the sphere (no structure: the worst case for IVF, where a query's neighbours are barely
closer than random rows).

JSON ``headline`` (one entry per N and distribution, key ``"<distribution>_<N>"``): ``exact_s`` (extrapolated
seconds for the whole direction), ``exact_peak_bytes``, and per approximate method ``<method>_s``,
``<method>_peak_bytes``, ``<method>_index_bytes``, ``<method>_recall_at_k``, ``<method>_speedup`` (exact_s /
method s).

Run: ``.venv/bin/python benchmarks/topk_scale.py [--quick] [--sizes 100000,1000000] [--distributions clustered]``
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from mcad_cache.cache.topk import chunked_topk, faiss_topk  # noqa: E402
from mcad_cache.runtime import resolve_device  # noqa: E402

NAME = "topk_scale"
REQUIRED_FIELDS = ("benchmark", "machine", "settings", "points", "headline")
APPROX_METHODS = ("ivf-flat", "ivf-pq", "ivf-pq-refine")


# ----------------------------------------------------------------------------------------------------- data


def make_embeddings(n: int, d: int, *, distribution: str, sigma: float, centres: np.ndarray | None,
                    rng: np.random.Generator, block: int = 65_536) -> np.ndarray:  # fmt: skip
    """[n, d] float32 L2-normalised rows, ``uniform`` on the sphere or ``clustered`` around ``centres`` [C, d]
    (see the module docstring). Generated in blocks so that the float64 temporaries stay small."""
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        x = rng.standard_normal((e - s, d), dtype=np.float32)
        if distribution == "clustered":
            assert centres is not None
            x *= sigma / math.sqrt(d)
            x += centres[rng.integers(0, len(centres), e - s)]
        elif distribution != "uniform":
            raise ValueError(f"distribution must be clustered or uniform, got {distribution!r}")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:e] = x
    return out


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean over queries of |approx top-k ids intersect exact top-k ids| / k; ids are [Q, k] int (-1 = empty slot,
    never counted as a hit)."""
    k = exact_idx.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx_idx, exact_idx, strict=True)]
    return float(np.mean(hits) / k)


def default_nlist(n: int) -> int:
    """IVF lists: ``sqrt(n)`` rounded to a power of two, at least 16 (the FAISS wiki's "guidelines to choose an
    index" give 4..16 x sqrt(N) for best speed at a given recall; we take the low end because k-means training on
    one shared CPU core is the limit here)."""
    return max(16, 2 ** round(math.log2(math.sqrt(n))))


# ----------------------------------------------------------------------------------------------------- methods


def ivf_index(method: str, gallery: np.ndarray, *, nlist: int, pq_m: int, train_rows: int,
              rng: np.random.Generator) -> Any:  # fmt: skip
    """A trained FAISS IVF index (``ivf-flat`` or ``ivf-pq``) over ``gallery`` [N, D] float32, inner product.
    ``train_rows`` random gallery rows train the coarse quantizer (and the PQ codebooks)."""
    import faiss  # type: ignore[import-not-found]

    d = gallery.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    if method == "ivf-flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    train = gallery[np.sort(rng.choice(len(gallery), size=min(len(gallery), train_rows), replace=False))]
    index.train(np.ascontiguousarray(train))
    index.add(gallery)
    return index


def refine(query: np.ndarray, gallery: np.ndarray, cand: np.ndarray, *, k: int) -> np.ndarray:
    """Re-rank candidate ids [Q, k'] (-1 = none) by exact inner product with the float32 gallery rows (float64
    accumulation), keep the best k: what ``faiss.IndexRefineFlat`` does. Returns ids [Q, k] int64 (-1 = none)."""
    safe = np.maximum(cand, 0)
    dots = np.einsum("qd,qmd->qm", query.astype(np.float64), gallery[safe].astype(np.float64))
    dots[cand < 0] = -np.inf
    order = np.argsort(-dots, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(cand, order, axis=1)
    return np.where(np.take_along_axis(dots, order, axis=1) > -np.inf, out, -1)


def index_bytes(index: Any) -> int:
    import faiss  # type: ignore[import-not-found]

    return int(faiss.serialize_index(index).size)


def set_nprobe(index: Any, nprobe: int) -> None:
    import faiss  # type: ignore[import-not-found]

    faiss.extract_index_ivf(index).nprobe = nprobe


# ----------------------------------------------------------------------------------------------------- one point


def run_point(n: int, *, distribution: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """All methods at gallery size ``n`` on the first ``query_rows`` queries (see the module docstring)."""
    rng = np.random.default_rng(args.seed)
    d, k = args.dim, args.k
    centres = make_embeddings(max(1, n // 100), d, distribution="uniform", sigma=0, centres=None, rng=rng)
    gallery = make_embeddings(n, d, distribution=distribution, sigma=args.sigma, centres=centres, rng=rng)
    rows = min(n, args.query_rows)
    query = make_embeddings(rows, d, distribution=distribution, sigma=args.sigma, centres=centres, rng=rng)
    none_valid = np.zeros(1, dtype=bool)
    point: dict[str, Any] = {"n": n, "distribution": distribution, "query_rows": rows, "extrapolated": rows < n,
                             "gallery_bytes": gallery.nbytes, "methods": {}}  # fmt: skip

    def exact_method(name: str, fn: Any) -> np.ndarray:
        with C.PeakMemory() as mem:
            setup_s, _ = C.timed(lambda: fn(query[:1], query_valid=none_valid))  # the gallery preparation alone
            search_s, (_, idx) = C.timed(lambda: fn(query))
        per_query = max(0.0, search_s - setup_s) / rows
        point["methods"][name] = {"setup_s": setup_s, "search_s": search_s, "per_query_s": per_query,
                                  "seconds": setup_s + per_query * n, "memory": mem.to_dict(),
                                  "index_bytes": 0}  # fmt: skip
        return idx

    gc.collect()
    exact_idx = exact_method(
        "exact", lambda q, **kw: chunked_topk(q, gallery, k=k, chunk_size=args.chunk_size, device=device, **kw)
    )
    point["methods"]["exact"]["recall_at_k"] = 1.0
    gc.collect()
    flat_idx = exact_method(
        "exact-faiss", lambda q, **kw: faiss_topk(q, gallery, k=k, chunk_size=args.chunk_size, **kw)
    )
    point["methods"]["exact-faiss"]["recall_at_k"] = recall_at_k(flat_idx, exact_idx)
    point["methods"]["exact-faiss"]["identical_to_exact"] = bool(np.array_equal(flat_idx, exact_idx))

    nlist = args.nlist or default_nlist(n)
    train_rows = min(n, max(args.train_per_list * nlist, 39 * 256))  # FAISS asks >= 39 rows per centroid (PQ: 256)
    point.update(nlist=nlist, train_rows=train_rows)
    for method in ("ivf-flat", "ivf-pq"):
        gc.collect()
        with C.PeakMemory() as mem:
            setup_s, index = C.timed(lambda m=method: ivf_index(m, gallery, nlist=nlist, pq_m=args.pq_m,
                                                                train_rows=train_rows, rng=rng))  # fmt: skip
            runs: dict[str, dict[str, dict[str, Any]]] = {method: {}, "ivf-pq-refine": {}}
            for nprobe in args.nprobe:
                set_nprobe(index, nprobe)
                search_s, (_, idx) = C.timed(lambda ix=index: ix.search(query, k))
                runs[method][str(nprobe)] = {"search_s": search_s, "idx": idx}
                if method == "ivf-pq":  # IVF-PQ for refine_factor x k candidates, exact re-ranking of those
                    s_r, idx_r = C.timed(lambda ix=index, kk=args.refine_factor * k: refine(
                        query, gallery, ix.search(query, kk)[1], k=k))  # fmt: skip
                    runs["ivf-pq-refine"][str(nprobe)] = {"search_s": s_r, "idx": idx_r}
        size = index_bytes(index)
        for name, per in runs.items():
            if not per:
                continue
            # ivf-pq-refine keeps the float32 gallery beside the PQ index for the re-ranking
            extra = gallery.nbytes if name == "ivf-pq-refine" else 0
            by_nprobe = {nprobe: {"search_s": r["search_s"], "per_query_s": r["search_s"] / rows,
                                  "seconds": setup_s + r["search_s"] / rows * n,
                                  "recall_at_k": recall_at_k(r["idx"], exact_idx),
                                  "ids_valid": bool(((r["idx"] >= -1) & (r["idx"] < n)).all())}
                         for nprobe, r in per.items()}  # fmt: skip
            point["methods"][name] = {"setup_s": setup_s, "memory": mem.to_dict(), "index_bytes": size + extra,
                                      "nprobe": by_nprobe}  # fmt: skip
        del index
    return point


def headline_of(point: dict[str, Any], *, nprobe: int) -> dict[str, Any]:
    """The documented headline keys (module docstring) of one point, approximate methods at ``nprobe``."""
    m = point["methods"]
    out: dict[str, Any] = {
        "n": point["n"],
        "query_rows": point["query_rows"],
        "extrapolated": point["extrapolated"],
        "nprobe": nprobe,
        "nlist": point["nlist"],
        "exact_s": m["exact"]["seconds"],
        "exact_peak_bytes": m["exact"]["memory"]["increase_bytes"],
        "exact_faiss_s": m["exact-faiss"]["seconds"],
        "exact_faiss_recall_at_k": m["exact-faiss"]["recall_at_k"],
    }
    for method in APPROX_METHODS:
        r = m[method]["nprobe"][str(nprobe)]
        key = method.replace("-", "_")
        out[f"{key}_s"] = r["seconds"]
        out[f"{key}_peak_bytes"] = m[method]["memory"]["increase_bytes"]
        out[f"{key}_index_bytes"] = m[method]["index_bytes"]
        out[f"{key}_recall_at_k"] = r["recall_at_k"]
        out[f"{key}_speedup"] = m["exact"]["seconds"] / r["seconds"] if r["seconds"] > 0 else None
    return out


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--sizes", default="100000,1000000", help="gallery rows N, comma-separated")
    parser.add_argument("--distributions", default="clustered,uniform", help="clustered and/or uniform")
    parser.add_argument("--query-rows", type=int, default=1024, help="query rows every method searches (recall, time)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension D (ALBEF ITC: 256; CLIP B/16: 512)")
    parser.add_argument("--k", type=int, default=11, help="top-k (the build's default)")
    parser.add_argument("--sigma", type=float, default=1.0, help="cluster spread of the clustered distribution")
    parser.add_argument("--chunk-size", type=int, default=1024, help="query rows per block of the exact methods")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = sqrt(N) rounded to a power of 2)")
    parser.add_argument("--nprobe", default="8,32", help="IVF lists searched per query, comma-separated")
    parser.add_argument("--pq-m", type=int, default=32, help="IVF-PQ sub-quantizers (bytes per vector at 8 bits)")
    parser.add_argument(
        "--refine-factor", type=int, default=10, help="IVF-PQ-refine: candidates re-ranked = factor x k"
    )
    parser.add_argument("--train-per-list", type=int, default=40, help="k-means training rows per IVF list")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.distributions, args.query_rows, args.dim, args.nprobe = "3000", "clustered", 128, 64, "4,64"
        args.pq_m = 8  # 8 B codes: PQ training is most of the quick run
    args.nprobe = [int(x) for x in str(args.nprobe).split(",")] if isinstance(args.nprobe, str) else args.nprobe
    C.setup_run(args)
    import faiss  # type: ignore[import-not-found]

    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = C.machine_info() | {"faiss_version": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}
    C.print_machine(info)

    points = []
    for dist in args.distributions.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            print(f"{dist} N={n} ...", flush=True)
            points.append(run_point(n, distribution=dist, args=args, device=device))
            headline = {f"{p['distribution']}_{p['n']}": headline_of(p, nprobe=max(args.nprobe)) for p in points}
            payload = {"benchmark": NAME, "machine": info, "settings": vars(args) | {"device": str(device)},
                       "points": points, "headline": headline, "complete": False}  # fmt: skip
            C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)  # partial

    mib = 1 / 2**20
    rows = []
    for p in points:
        for name, m in p["methods"].items():
            for nprobe, r in m["nprobe"].items() if "nprobe" in m else [("-", m)]:
                rows.append([p["distribution"], p["n"], name, nprobe, m["setup_s"], r["per_query_s"] * 1e3,
                             r["seconds"], m["memory"]["increase_bytes"] * mib, m["index_bytes"] * mib,
                             r["recall_at_k"]])  # fmt: skip
    C.print_table(
        f"Top-k, one direction, {args.dim}-d, k={args.k}; full-size s extrapolated from {args.query_rows} queries",
        ["data", "N", "method", "nprobe", "setup s", "ms / query", "s, all N queries", "peak +MiB", "index MiB",
         f"recall@{args.k}"],
        rows,
    )  # fmt: skip
    payload["complete"] = True
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
