"""Storage: bytes per sample on disk, and the accuracy cost of int8 fused features.

Caches are written with the real ``CacheWriter`` (Zarr v3, the schema's chunking, sharding and codecs) from
synthetic arrays of the real sizes: L2-normalised fp16 embeddings (random directions, which compress like real
ones: hardly at all), random candidate ids, float32 similarities and ITM logits, COCO-length keys and captions.
"Bytes per sample" = all files of the store (metadata and build markers included) / number of samples (images);
the per-array split uses zarr's ``nbytes_stored`` (``describe_cache``).

int8 accuracy: fused [CLS] features [N, K, 768] shaped like BERT hidden states (unit-scale values plus a few
channels about 12x larger) are stored as fp16 and as int8 (absmax per vector), read back through ``CacheReader``, and
compared with the float32 originals (max / mean absolute error), and fed to the ``mcad`` loss (modified features use
the fused features) to give the loss difference against float32 targets, at the initial gate and at a large gate.

Run: ``.venv/bin/python benchmarks/storage.py [--quick]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "storage"
TARGET_NO_FUSED_BYTES = 2048
TARGET_INT8_BYTES = 20 * 1024
REQUIRED_FIELDS = ("benchmark", "machine", "target", "settings", "caches", "headline", "int8_accuracy", "verdicts")


def write_cache(
    path: Path,
    *,
    kind: str,
    num_images: int,
    captions_per_sample: int,
    emb_dim: int,
    k: int,
    fused_dim: int,
    fused_dtype: str,
    rng: np.random.Generator,
    fused_values: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a complete cache of synthetic values with ``CacheWriter`` (the builder's writer)."""
    from mcad_cache.cache import CacheWriter
    from mcad_cache.cache.schema import CacheLayout
    from mcad_cache.cache.topk import positives_i2t, positives_t2i

    if path.exists():
        shutil.rmtree(path)
    n_i, n_t = num_images, num_images * captions_per_sample
    layout = CacheLayout(kind=kind, num_images=n_i, num_texts=n_t, emb_dim=emb_dim, k=k,
                         fused_dim=fused_dim if fused_dtype != "none" else 0, emb_dtype="fp16",
                         fused_dtype=fused_dtype if kind == "single" else "none")  # fmt: skip
    manifest = {"fingerprint": {"teacher": {"name": "synthetic"}}, "logit_scale": 100.0, "teacher": {"kind": kind}}
    w = CacheWriter.create(path, layout=layout, manifest=manifest)
    keys = [f"coco_train2017_{i:012d}" for i in range(n_i)]
    offsets = np.arange(0, n_t + 1, captions_per_sample, dtype=np.int32)
    txt2img = np.repeat(np.arange(n_i, dtype=np.int32), captions_per_sample)
    w.write("image_keys", 0, np.array(keys, dtype=str))
    w.write("image_shard", 0, (np.arange(n_i) // 10_000).astype(np.int32))
    w.write("image_valid", 0, np.ones(n_i, bool))
    w.write("image_skip", 0, np.zeros(n_i, np.int8))
    w.write("img2txt_offsets", 0, offsets)
    w.write("image_emb", 0, C.random_unit(n_i, emb_dim, rng))
    w.write("text_keys", 0, np.array([f"{keys[i]}#{j}" for i in range(n_i) for j in range(captions_per_sample)]))
    w.write("captions", 0, np.array([C.caption_for(rng) for _ in range(n_t)], dtype=str))
    w.write("txt2img", 0, txt2img)
    w.write("text_valid", 0, np.ones(n_t, bool))
    w.write("text_emb", 0, C.random_unit(n_t, emb_dim, rng))
    for d, n_q, n_g in (("i2t", n_i, n_t), ("t2i", n_t, n_i)):
        idx = _distinct_ids(rng, n_q, n_g, k)
        sims = np.sort(rng.uniform(-0.1, 0.6, size=(n_q, k)).astype(np.float32), axis=1)[:, ::-1]
        pos = positives_i2t(idx, txt2img) if d == "i2t" else positives_t2i(idx, txt2img)
        w.write(f"{d}_idx", 0, idx)
        w.write(f"{d}_sims", 0, np.ascontiguousarray(sims), check=False)
        w.write(f"{d}_is_positive", 0, pos)
        if kind == "single":
            w.write(f"{d}_itm_logits", 0, rng.normal(0, 3, size=(n_q, k, 2)).astype(np.float32), check=False)
            if layout.has_fused:
                values = fused_values[d] if fused_values is not None else bert_like(rng, (n_q, k, fused_dim))
                w.write_fused(d, 0, values)
    w.mark_complete({"counts": {"num_images": n_i, "num_texts": n_t}})


def _distinct_ids(rng: np.random.Generator, n_q: int, n_g: int, k: int) -> np.ndarray:
    """[n_q, k] int32 candidate rows, distinct within a row (random; like real top-k ids they barely compress)."""
    if n_g <= k:
        return np.tile(np.arange(k, dtype=np.int32) % max(n_g, 1), (n_q, 1))
    base = rng.integers(0, n_g, size=(n_q, 1))
    steps = np.cumsum(rng.integers(1, max(2, n_g // (2 * k)), size=(n_q, k)), axis=1) - 1
    return ((base + steps) % n_g).astype(np.int32)


def bert_like(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 features of unit scale with a few large channels (every 128th channel x 12), like BERT-base hidden
    states, whose few outlier dimensions set the int8 absmax scale."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x[..., ::128] *= 12.0
    return x


def cache_sizes(path: Path) -> dict[str, Any]:
    from mcad_cache.cache import describe_cache, open_cache

    reader = open_cache(path)
    desc = describe_cache(reader)
    n = reader.num_images
    on_disk = C.dir_bytes(path)
    per_array = {name: a["stored_bytes"] / n for name, a in desc["arrays"].items()}
    return {
        "num_images": n,
        "num_texts": reader.num_texts,
        "bytes_on_disk": on_disk,
        "bytes_per_sample": on_disk / n,
        "stored_array_bytes_per_sample": desc["bytes_per_sample"],
        "per_array_bytes_per_sample": per_array,
        "fused_bytes_per_sample": sum(v for k, v in per_array.items() if "_fused" in k),
    }


def int8_accuracy(work: Path, *, n: int, k: int, fused_dim: int, batch: int, seed: int) -> dict[str, Any]:
    """Write the same float32 fused features as fp16 and as int8, read both back, compare; then the loss."""
    from mcad_cache.cache import open_cache

    rng = np.random.default_rng(seed)
    values = {d: bert_like(rng, (n, k, fused_dim)) for d in ("i2t", "t2i")}
    out: dict[str, Any] = {"num_queries": n, "k": k, "fused_dim": fused_dim}
    read: dict[str, dict[str, np.ndarray]] = {}
    for dtype in ("fp16", "int8"):
        path = work / f"acc-{dtype}"
        write_cache(path, kind="single", num_images=n, captions_per_sample=1, emb_dim=256, k=k, fused_dim=fused_dim,
                    fused_dtype=dtype, rng=np.random.default_rng(seed + 1), fused_values=values)  # fmt: skip
        reader = open_cache(path)
        read[dtype] = {d: reader.fused(d, np.arange(n)) for d in ("i2t", "t2i")}
        err = np.concatenate([np.abs(read[dtype][d] - values[d]).reshape(-1) for d in values])
        ref = np.concatenate([values[d].reshape(-1) for d in values])
        a = np.concatenate([read[dtype][d].reshape(-1, fused_dim) for d in values])
        b = np.concatenate([values[d].reshape(-1, fused_dim) for d in values])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[dtype] = {
            "max_abs_error": float(err.max()),
            "mean_abs_error": float(err.mean()),
            "max_abs_value": float(np.abs(ref).max()),
            "max_abs_error_over_max_abs_value": float(err.max() / np.abs(ref).max()),
            "min_cosine_to_fp32": float(cos.min()),
        }
    out["loss"] = loss_difference(values, read, k=k, fused_dim=fused_dim, batch=min(batch, n), seed=seed)
    return out


def loss_difference(values: dict[str, np.ndarray], read: dict[str, dict[str, np.ndarray]], *, k: int,
                    fused_dim: int, batch: int, seed: int) -> dict[str, Any]:  # fmt: skip
    """``mcad`` loss terms with fused targets from float32, fp16 and int8 storage, the same everything else."""
    import torch.nn.functional as F

    from mcad_cache.losses import MCADLoss, StudentOutputs, TeacherTargets, preset

    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    d_s, d_c = 256, 512
    student = StudentOutputs(image_emb=unit(batch, d_s), text_emb=unit(batch, d_s), logit_scale=torch.tensor(20.0),
                             topk_text_emb=unit(batch, k, d_s), topk_image_emb=unit(batch, k, d_s))  # fmt: skip
    base = {
        "clip_image_emb": unit(batch, d_c),
        "clip_text_emb": unit(batch, d_c),
        "clip_logit_scale": 100.0,
        "clip_topk_text_emb": unit(batch, k, d_c),
        "clip_topk_image_emb": unit(batch, k, d_c),
        "itm_logits_i2t": torch.randn(batch, k, 2, generator=g) * 3,
        "itm_logits_t2i": torch.randn(batch, k, 2, generator=g) * 3,
        "ss_logit_scale": 1 / 0.07,
        "valid_i2t": torch.ones(batch, k, dtype=torch.bool),
        "valid_t2i": torch.ones(batch, k, dtype=torch.bool),
    }
    result: dict[str, Any] = {"batch": batch}
    for gate_name, gate in (("gate_initial", None), ("gate_0.45", 0.45)):
        cfg = preset("mcad-online") if gate is None else preset("mcad-online", gate_init=gate)  # the online module
        torch.manual_seed(seed)
        loss_module = MCADLoss(cfg, student_dim=d_s, clip_dim=d_c, fused_dim=fused_dim).eval()
        losses = {}
        for source, fused in (("fp32", values), ("fp16", read["fp16"]), ("int8", read["int8"])):
            t = TeacherTargets(**base, fused_cls_i2t=torch.from_numpy(fused["i2t"][:batch]).float(),
                               fused_cls_t2i=torch.from_numpy(fused["t2i"][:batch]).float())  # fmt: skip
            with torch.no_grad():
                losses[source] = {kk: float(v) for kk, v in loss_module(student, t).items()}
        result[gate_name] = {
            "gate": cfg.gate_init,
            "loss_fp32": losses["fp32"],
            "abs_diff_fp16": {kk: abs(losses["fp16"][kk] - v) for kk, v in losses["fp32"].items()},
            "abs_diff_int8": {kk: abs(losses["int8"][kk] - v) for kk, v in losses["fp32"].items()},
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--num-samples", type=int, default=100_000, help="rows of the caches without fused features")
    parser.add_argument("--num-samples-fused", type=int, default=2_000, help="rows of the caches with fused features")
    parser.add_argument("--num-samples-5cap", type=int, default=20_000, help="rows of the 5-captions caches")
    parser.add_argument("--k", type=int, default=11)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.num_samples_fused, args.num_samples_5cap = 500, 64, 200
    C.setup_run(args)
    work = C.scratch_dir(args, NAME + ("-quick" if args.quick else ""))
    info = C.machine_info()
    C.print_machine(info)
    rng = np.random.default_rng(args.seed)
    scenarios = [
        # name, kind, emb_dim, captions/sample, fused dtype, rows
        ("single D256 no-fused 1cap", "single", 256, 1, "none", args.num_samples),
        ("dual D256 1cap", "dual", 256, 1, "none", args.num_samples),
        ("dual D512 (ViT-B/16) 1cap", "dual", 512, 1, "none", args.num_samples),
        ("single D256 no-fused 5cap", "single", 256, 5, "none", args.num_samples_5cap),
        ("dual D512 (ViT-B/16) 5cap", "dual", 512, 5, "none", args.num_samples_5cap),
        ("single D256 fused fp16 1cap", "single", 256, 1, "fp16", args.num_samples_fused),
        ("single D256 fused int8 1cap", "single", 256, 1, "int8", args.num_samples_fused),
        ("single D256 fused fp16 5cap", "single", 256, 5, "fp16", max(1, args.num_samples_fused // 5)),
        ("single D256 fused int8 5cap", "single", 256, 5, "int8", max(1, args.num_samples_fused // 5)),
    ]
    caches = []
    for name, kind, dim, caps, fused, rows in scenarios:
        path = work / name.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
        print(f"writing {name}: {rows} samples ...", flush=True)
        t0 = time.perf_counter()
        write_cache(path, kind=kind, num_images=rows, captions_per_sample=caps, emb_dim=dim, k=args.k, fused_dim=768,
                    fused_dtype=fused, rng=rng)  # fmt: skip
        t = time.perf_counter() - t0
        sizes = cache_sizes(path)
        caches.append({"name": name, "kind": kind, "emb_dim": dim, "captions_per_sample": caps, "fused_dtype": fused,
                       "k": args.k, "write_s": t, **sizes})  # fmt: skip
        shutil.rmtree(path)
    by = {c["name"]: c for c in caches}
    headline = {
        "no_fused_bytes_per_sample": by["single D256 no-fused 1cap"]["bytes_per_sample"],
        "fp16_fused_bytes_per_sample": by["single D256 fused fp16 1cap"]["bytes_per_sample"],
        "int8_fused_bytes_per_sample": by["single D256 fused int8 1cap"]["bytes_per_sample"],
        "no_fused_bytes_per_sample_5cap": by["single D256 no-fused 5cap"]["bytes_per_sample"],
        "int8_fused_bytes_per_sample_5cap": by["single D256 fused int8 5cap"]["bytes_per_sample"],
    }
    acc = int8_accuracy(work, n=min(args.num_samples_fused, 512), k=args.k, fused_dim=768, batch=32, seed=args.seed)

    C.print_table(
        f"Bytes per sample on disk (k={args.k}; sample = one image and its captions)",
        ["cache", "samples", "texts", "bytes/sample (files)", "arrays only", "fused part", "write s"],
        [
            [
                c["name"],
                c["num_images"],
                c["num_texts"],
                c["bytes_per_sample"],
                c["stored_array_bytes_per_sample"],
                c["fused_bytes_per_sample"],
                c["write_s"],
            ]
            for c in caches
        ],  # fmt: skip
    )
    main_cache = by["single D256 no-fused 1cap"]
    C.print_table(
        f"Per-array bytes per sample: {main_cache['name']}, {main_cache['num_images']} samples",
        ["array", "bytes/sample"],
        sorted(main_cache["per_array_bytes_per_sample"].items(), key=lambda kv: -kv[1]),
    )
    C.print_table(
        f"int8 / fp16 fused features vs float32 ({acc['num_queries']} queries x k {acc['k']} x {acc['fused_dim']})",
        ["storage", "max |err|", "mean |err|", "max |x|", "max|err| / max|x|", "min cosine"],
        [[d, acc[d]["max_abs_error"], acc[d]["mean_abs_error"], acc[d]["max_abs_value"],
          acc[d]["max_abs_error_over_max_abs_value"], acc[d]["min_cosine_to_fp32"]] for d in ("fp16", "int8")],
    )  # fmt: skip
    rows = []
    for gate_name in ("gate_initial", "gate_0.45"):
        r = acc["loss"][gate_name]
        for term, v in r["loss_fp32"].items():
            rows.append([gate_name, term, v, r["abs_diff_fp16"][term], r["abs_diff_int8"][term]])
    C.print_table("mcad loss with fused targets from fp32 / fp16 / int8 storage", ["gate", "term", "fp32 value",
                  "|fp16 - fp32|", "|int8 - fp32|"], rows)  # fmt: skip
    verdicts = {
        "no_fused_le_2KB": headline["no_fused_bytes_per_sample"] <= TARGET_NO_FUSED_BYTES,
        "int8_fused_le_20KB": headline["int8_fused_bytes_per_sample"] <= TARGET_INT8_BYTES,
    }
    payload = {
        "benchmark": NAME,
        "machine": info,
        "target": {
            "no_fused_bytes_per_sample_max": TARGET_NO_FUSED_BYTES,
            "int8_bytes_per_sample_max": TARGET_INT8_BYTES,
        },
        "settings": vars(args),
        "caches": caches,
        "headline": headline,
        "int8_accuracy": acc,
        "verdicts": verdicts,
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
