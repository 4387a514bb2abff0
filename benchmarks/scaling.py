"""Scaling: build, global top-k and retrieval-eval time and peak memory as N grows; the COCO-5k eval in a memory bound.

- **top-k**: ``cache.topk.chunked_topk`` of N image rows against N text rows (256-d, k = 11, one direction; a build
  does it twice). Synthetic unit vectors.
- **eval**: ``metrics.retrieval_ranks_from_embeddings`` (both directions) on N images x N captions, 256-d.
- **build**: ``pipelines.build_cache.run`` with a cheap synthetic dual-stream teacher (256-d) over N tiny PNG samples
  (decode, DataLoader, Zarr writes, both top-k directions, manifest): the pipeline's own cost without a model's.
- **COCO-5k eval**: 5,000 images x 25,000 captions (5 per image) through ``retrieval_ranks_from_embeddings``.

Above ``--full-limit`` rows, top-k and eval time the first ``--sample-rows`` query rows of each direction against
the *full* gallery and scale the time by (rows / timed rows): both process queries in independent chunks of equal
cost, so this measures the per-chunk cost at full size exactly; peak memory is that of the full-size gallery and a
full chunk, i.e. the real peak. Such rows are marked ``"extrapolated": true``. Builds above ``--build-full-limit``
are not run; their time is projected (top-k measured at that size x 2 directions + the linear passes scaled from the
largest measured build) and marked ``"projected": true``.

Peak memory: the process's resident-set high-water mark during the operation minus its RSS before (VmHWM, reset
through /proc/self/clear_refs); DataLoader worker processes of the build are not included.

Run: ``.venv/bin/python benchmarks/scaling.py [--quick] [--sizes 1000,10000,100000]``
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "scaling"
REQUIRED_FIELDS = ("benchmark", "machine", "settings", "topk", "eval", "build", "growth", "coco5k_eval")
DIM, K = 256, 11


def measure(fn: Any) -> tuple[float, dict[str, Any]]:
    gc.collect()
    with C.PeakMemory() as mem:
        seconds, _ = C.timed(fn)
    return seconds, mem.to_dict()


def topk_point(n: int, *, sample_rows: int, full_limit: int, chunk_size: int, seed: int) -> dict[str, Any]:
    from mcad_cache.cache.topk import chunked_topk

    rng = np.random.default_rng(seed)
    q, g = C.random_unit(n, DIM, rng), C.random_unit(n, DIM, rng)
    rows = n if n <= full_limit else min(n, max(chunk_size, sample_rows))
    seconds, mem = measure(lambda: chunked_topk(q[:rows], g, k=K, chunk_size=chunk_size))
    return {"n": n, "timed_query_rows": rows, "extrapolated": rows < n, "seconds": seconds * n / rows,
            "measured_seconds": seconds, "memory": mem, "chunk_size": chunk_size}  # fmt: skip


def eval_ranks_subset(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor, *, rows: int,
                      chunk_size: int) -> None:  # fmt: skip
    """The query loop of ``metrics.retrieval_ranks_from_embeddings`` for the first ``rows`` queries of each direction
    against the full galleries (public chunk functions of ``metrics``)."""
    from mcad_cache.metrics import caption_table, i2t_ranks_chunk, t2i_ranks_chunk

    captions = caption_table(txt2img, image_emb.shape[0])
    for s in range(0, min(rows, image_emb.shape[0]), chunk_size):
        scores = image_emb[s : s + chunk_size] @ text_emb.T
        i2t_ranks_chunk(scores, torch.arange(s, min(s + chunk_size, image_emb.shape[0])), txt2img, captions=captions)
    for s in range(0, min(rows, text_emb.shape[0]), chunk_size):
        scores = text_emb[s : s + chunk_size] @ image_emb.T
        t2i_ranks_chunk(scores, txt2img[s : s + chunk_size])


def eval_point(n_images: int, captions_per_image: int, *, sample_rows: int, full_limit: int, chunk_size: int,
               seed: int) -> dict[str, Any]:  # fmt: skip
    from mcad_cache.metrics import retrieval_ranks_from_embeddings

    rng = np.random.default_rng(seed)
    n_t = n_images * captions_per_image
    img = torch.from_numpy(C.random_unit(n_images, DIM, rng))
    txt = torch.from_numpy(C.random_unit(n_t, DIM, rng))
    t2i = torch.arange(n_images).repeat_interleave(captions_per_image)
    inputs_bytes = (img.numel() + txt.numel()) * 4
    if max(n_images, n_t) <= full_limit:
        seconds, mem = measure(lambda: retrieval_ranks_from_embeddings(img, txt, t2i, chunk_size=chunk_size))
        rows, measured = max(n_images, n_t), seconds
    else:
        rows = max(chunk_size, sample_rows)
        measured, mem = measure(lambda: eval_ranks_subset(img, txt, t2i, rows=rows, chunk_size=chunk_size))
        # i2t chunks cost ~ N_t each, t2i chunks ~ N_i each: scale each direction by its own query count
        timed_i, timed_t = min(rows, n_images), min(rows, n_t)
        seconds = measured * (n_images * n_t + n_t * n_images) / (timed_i * n_t + timed_t * n_images)
    chunk_scores_bytes = chunk_size * max(n_images, n_t) * 4
    return {"n_images": n_images, "n_texts": n_t, "timed_query_rows": rows, "extrapolated": rows < max(n_images, n_t),
            "seconds": seconds, "measured_seconds": measured, "memory": mem, "chunk_size": chunk_size,
            "inputs_bytes": inputs_bytes, "chunk_scores_bytes": chunk_scores_bytes,
            "increase_over_chunk_scores": mem["increase_bytes"] / chunk_scores_bytes}  # fmt: skip


def build_point(n: int, work: Path, *, device: torch.device, workers: int, seed: int) -> dict[str, Any]:
    from mcad_cache.config import BuildConfig
    from mcad_cache.pipelines.build_cache import run as build_run

    shards = C.make_shards(work / f"shards-{n}", num_samples=n, per_shard=max(1, min(10_000, n // 2)),
                           image_size=(32, 24), fmt_ext="png", seed=seed)  # fmt: skip
    C.create_synthetic_teacher("small-dual")
    out = work / f"cache-{n}"
    if out.exists():
        shutil.rmtree(out)
    cfg = BuildConfig(teacher="bench-synthetic", model="small-dual", data=tuple(shards), out=str(out), k=K,
                      batch_size=256, workers=workers, device=str(device))  # fmt: skip
    box: dict[str, Any] = {}
    seconds, mem = measure(lambda: box.setdefault("res", build_run(cfg)))
    res = box["res"]
    disk = C.dir_bytes(out)
    shutil.rmtree(out)
    return {"n": n, "seconds": seconds, "memory": mem, "stage_seconds": res.stage_seconds, "bytes_on_disk": disk,
            "projected": False}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--sizes", default="1000,10000,100000", help="N for top-k, eval and build")
    parser.add_argument("--full-limit", type=int, default=10_000, help="largest N computed in full (top-k, eval)")
    parser.add_argument("--build-full-limit", type=int, default=10_000, help="largest N built in full")
    parser.add_argument("--sample-rows", type=int, default=8192, help="query rows timed above the full limit")
    parser.add_argument("--chunk-size-topk", type=int, default=4096, help="BuildConfig.chunk_size default")
    parser.add_argument("--chunk-size-eval", type=int, default=1024, help="EvalConfig.chunk_size default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--coco-images", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.full_limit, args.build_full_limit, args.sample_rows = "200,1000,3000", 1000, 1000, 512
        args.chunk_size_topk, args.chunk_size_eval, args.workers, args.coco_images = 256, 256, 0, 400
    C.setup_run(args)
    device = C.resolve_device(args.device)
    work = C.scratch_dir(args, NAME + ("-quick" if args.quick else ""))
    info = C.machine_info()
    C.print_machine(info)
    sizes = [int(s) for s in args.sizes.split(",")]

    topk, evals, builds = [], [], []
    topk_point(64, sample_rows=64, full_limit=64, chunk_size=64, seed=args.seed)  # warm-up: first-call allocations
    eval_point(64, 1, sample_rows=64, full_limit=64, chunk_size=64, seed=args.seed)
    for n in sizes:
        print(f"top-k N={n} ...", flush=True)
        topk.append(topk_point(n, sample_rows=args.sample_rows, full_limit=args.full_limit,
                               chunk_size=args.chunk_size_topk, seed=args.seed))  # fmt: skip
        print(f"eval N={n} ...", flush=True)
        evals.append(eval_point(n, 1, sample_rows=args.sample_rows, full_limit=args.full_limit,
                                chunk_size=args.chunk_size_eval, seed=args.seed))  # fmt: skip
    for n in sizes:
        if n <= args.build_full_limit:
            print(f"build N={n} ...", flush=True)
            builds.append(build_point(n, work, device=device, workers=args.workers, seed=args.seed))
    measured_builds = [b for b in builds if not b["projected"]]
    for n in sizes:
        if n > args.build_full_limit and measured_builds:
            ref = measured_builds[-1]
            linear = ref["seconds"] - ref["stage_seconds"].get("pass2_topk", 0.0)
            tk = next(t for t in topk if t["n"] == n)
            builds.append(
                {
                    "n": n,
                    "seconds": linear * n / ref["n"] + 2 * tk["seconds"],
                    "memory": None,
                    "stage_seconds": {},
                    "bytes_on_disk": None,
                    "projected": True,
                    "projection": f"(build - top-k) at N={ref['n']} scaled linearly + 2 x top-k at N={n}",
                }
            )
    print(f"COCO-size eval {args.coco_images} x {5 * args.coco_images} ...", flush=True)
    coco = eval_point(args.coco_images, 5, sample_rows=0, full_limit=10**9, chunk_size=args.chunk_size_eval,
                      seed=args.seed)  # fmt: skip
    # stated bound: inputs + 4 x one chunk's float32 scores (the scores, the comparison mask, ranks' temporaries)
    coco["stated_bound_bytes"] = coco["inputs_bytes"] + 4 * coco["chunk_scores_bytes"]
    coco["within_bound"] = coco["memory"]["increase_bytes"] <= coco["stated_bound_bytes"]

    def exponent(points: list[dict[str, Any]], key: str = "seconds", nkey: str = "n") -> float | None:
        return C.fit_growth_exponent([p[nkey] for p in points], [p[key] for p in points])

    growth = {
        "topk_time": exponent(topk),
        "eval_time": exponent(evals, nkey="n_images"),
        "build_time_measured": exponent(measured_builds),
        "topk_peak_increase": C.fit_growth_exponent([t["n"] for t in topk],
                                                    [t["memory"]["increase_bytes"] for t in topk]),  # fmt: skip
        "eval_peak_increase": C.fit_growth_exponent([e["n_images"] for e in evals],
                                                    [e["memory"]["increase_bytes"] for e in evals]),  # fmt: skip
        "build_peak_increase": C.fit_growth_exponent([b["n"] for b in measured_builds],
                                                     [b["memory"]["increase_bytes"] for b in measured_builds]),
        "note": "slope of log(value) vs log(N): 1 = linear, 2 = quadratic",
    }  # fmt: skip

    mib = 1 / 2**20
    C.print_table(
        f"Global top-k, one direction ({DIM}-d, k={K}, chunk {args.chunk_size_topk})",
        ["N", "seconds", "timed query rows", "extrapolated", "peak increase MiB"],
        [
            [t["n"], t["seconds"], t["timed_query_rows"], t["extrapolated"], t["memory"]["increase_bytes"] * mib]
            for t in topk
        ],  # fmt: skip
    )
    C.print_table(
        f"Retrieval eval ranks, both directions ({DIM}-d, chunk {args.chunk_size_eval})",
        ["N images x N texts", "seconds", "timed query rows", "extrapolated", "peak increase MiB"],
        [
            [
                f"{e['n_images']} x {e['n_texts']}",
                e["seconds"],
                e["timed_query_rows"],
                e["extrapolated"],
                e["memory"]["increase_bytes"] * mib,
            ]
            for e in evals
        ],  # fmt: skip
    )
    C.print_table(
        "Cache build, synthetic 256-d teacher (pipeline cost without a model)",
        ["N", "seconds", "projected", "peak increase MiB", "top-k s", "images s", "texts s", "disk MiB"],
        [
            [
                b["n"],
                b["seconds"],
                b["projected"],
                b["memory"]["increase_bytes"] * mib if b["memory"] else "-",
                b["stage_seconds"].get("pass2_topk", "-"),
                b["stage_seconds"].get("pass1_images", "-"),
                b["stage_seconds"].get("pass1_texts", "-"),
                b["bytes_on_disk"] * mib if b["bytes_on_disk"] else "-",
            ]
            for b in builds
        ],  # fmt: skip
    )
    C.print_table("Growth order (log-log slope)", ["quantity", "exponent"],
                  [[k, v] for k, v in growth.items() if k != "note"])  # fmt: skip
    C.print_table(
        f"COCO-size eval: {coco['n_images']} images x {coco['n_texts']} captions",
        ["seconds", "peak increase MiB", "stated bound MiB (inputs + 4 x chunk scores)", "within bound"],
        [
            [
                coco["seconds"],
                coco["memory"]["increase_bytes"] * mib,
                coco["stated_bound_bytes"] * mib,
                coco["within_bound"],
            ]
        ],  # fmt: skip
    )
    payload = {
        "benchmark": NAME,
        "machine": info,
        "settings": vars(args) | {"dim": DIM, "k": K},
        "topk": topk,
        "eval": evals,
        "build": builds,
        "growth": growth,
        "coco5k_eval": coco,
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
