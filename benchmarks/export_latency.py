"""Latency and memory of exported students (issue 14): text query (tokenize + encode + top-10 search) p50 / p95,
image encode latency, peak RSS of the text-query process, and index build throughput, with onnxruntime on 1 CPU
thread, for the demo student and the paper-size student, over galleries of 1k, 10k and 100k synthetic embeddings.

Students (random weights: only shapes matter for timing; nothing is downloaded):

- ``demo``: the demo's student (``minilm_efficientnet`` at 64 px: timm tf_efficientnet_lite0 + MiniLM-L6-shaped BERT).
- ``paper``: ``mobilevitv2_tinybert`` (timm mobilevitv2_050 at 256 px + TinyBERT-4L-312-shaped BERT), the MCAD
  student's shape; ``--paper-image-model mobilevitv2_100`` for the wider MobileViTv2.

The text-query process is a fresh Python process that imports only numpy, tokenizers, onnxruntime and faiss (what an
app needs; ``mcad_cache.export.runtime`` imports no torch), loads the text encoder, tokenizer and gallery, and runs
the queries; its peak RSS is ``ru_maxrss``. Search: exact ``IndexFlatIP`` for 1k and 10k; for 100k both exact and
IVF (``mcad-cache index``'s defaults), with IVF recall@10 vs exact.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_latency.py`` (about 5 minutes on 2 shared cores);
results: ``.work/benchmarks/export_latency.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".work" / "benchmarks" / "export"
QUERIES = [
    "a red bicycle leaning against a wall", "two dogs running on the beach", "a man riding a bus down the street",
    "a bowl of fruit on a wooden table", "a cat sleeping on a sofa", "people walking in the rain with umbrellas",
    "a plane flying over the mountains", "a child playing with a ball in the park",
]  # fmt: skip


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident set size (``VmRSS``) or its peak (``VmHWM``, per address space, so not inherited from the parent
    the way ``ru_maxrss`` is across fork + exec) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def query_process(export: str, gallery: str, kind: str, num_queries: int) -> dict:
    """Body of the text-query process (run in a fresh interpreter by ``--query-process``)."""
    t0 = time.perf_counter()
    rss = {"python": _rss_mb()}
    import faiss
    import onnxruntime as ort

    from mcad_cache.export.runtime import load_tokenizer, read_manifest

    assert "torch" not in sys.modules, "the query process must not import torch"
    rss["imports"] = _rss_mb()
    manifest = read_manifest(export)
    tok = load_tokenizer(Path(export) / "tokenizer", context_length=manifest["context_length"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(
        str(Path(export) / manifest["files"]["text"]), opts, providers=["CPUExecutionProvider"]
    )
    rss["session"] = _rss_mb()
    emb = np.load(gallery)
    faiss.omp_set_num_threads(1)
    if kind == "flat":
        index = faiss.IndexFlatIP(emb.shape[1])
    else:
        nlist = max(1, min(round(4 * np.sqrt(len(emb))), len(emb) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(emb.shape[1]), emb.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = max(1, nlist // 8)
    index.add(emb)
    del emb
    rss["index"] = _rss_mb()
    load_s = time.perf_counter() - t0
    parts = {"tokenize": [], "encode": [], "search": [], "total": []}
    cpu = {"tokenize": [], "encode": [], "search": [], "total": []}  # thread CPU time: robust to a busy machine
    for i in range(num_queries + 5):
        text = QUERIES[i % len(QUERIES)]
        a, ca = time.perf_counter(), time.process_time()
        enc = tok.encode(text)
        feeds = {
            "input_ids": np.asarray([enc.ids], np.int64),
            "attention_mask": np.asarray([enc.attention_mask], np.int64),
        }
        b, cb = time.perf_counter(), time.process_time()
        q = session.run(None, feeds)[0]
        c, cc = time.perf_counter(), time.process_time()
        index.search(q, 10)
        d, cd = time.perf_counter(), time.process_time()
        if i >= 5:  # warm-up excluded
            for name, v, w in (("tokenize", b - a, cb - ca), ("encode", c - b, cc - cb), ("search", d - c, cd - cc),
                               ("total", d - a, cd - ca)):  # fmt: skip
                parts[name].append(1000 * v)
                cpu[name].append(1000 * w)
    out = {
        name: {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95))}
        for name, v in parts.items()
    }
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    out["cpu_ms_per_query"] = {k: float(np.median(v)) for k, v in cpu.items()}
    out["rss_mb"] = rss
    out["load_s"] = load_s
    return out


def _export(name: str, student, quantize: str) -> Path:
    import mcad_cache.pipelines.export as export

    run = WORK / name
    if not (run / "final" / "student_config.json").is_file():
        student.save(run / "final")
    out = run / f"onnx-{quantize}"
    if not (out / "manifest.json").is_file():
        export.run(export.ExportConfig(run=str(run), format="onnx", quantize=quantize, out=str(out), overwrite=True))
    return out


def image_latency(export: Path, runs: int) -> dict:
    """Preprocess (numpy) + image encoder for one 640x480 RGB image, 1 thread; p50 / p95 in ms."""
    from PIL import Image

    from mcad_cache.export.preprocess import preprocess_image
    from mcad_cache.export.runtime import ExportedEncoder

    enc = ExportedEncoder(export, threads=1)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
    pre, total, cpu = [], [], []
    for i in range(runs + 3):
        a, ca = time.perf_counter(), time.process_time()
        x = preprocess_image(img, enc.preprocess_cfg)
        b = time.perf_counter()
        enc.encode_arrays(x[None])
        c, cc = time.perf_counter(), time.process_time()
        if i >= 3:  # warm-up excluded
            pre.append(1000 * (b - a))
            total.append(1000 * (c - a))
            cpu.append(1000 * (cc - ca))
    return {"p50_ms": float(np.percentile(total, 50)), "p95_ms": float(np.percentile(total, 95)),
            "preprocess_p50_ms": float(np.percentile(pre, 50)), "cpu_p50_ms": float(np.percentile(cpu, 50)),
            "images_per_s": 1000 / float(np.mean(total))}  # fmt: skip


def index_build(dim: int, sizes: list[int]) -> dict:
    """faiss build time (flat add; IVF train + add) for synthetic galleries, 1 thread."""
    import faiss

    from mcad_cache.search.index import build_faiss, ivf_params

    faiss.omp_set_num_threads(1)
    out = {}
    for n in sizes:
        emb = _gallery(n, dim)
        a = time.perf_counter()
        build_faiss(emb, kind="flat")
        b = time.perf_counter()
        nlist, nprobe = ivf_params(n)
        build_faiss(emb, kind="ivf", nlist=nlist, nprobe=nprobe)
        c = time.perf_counter()
        out[str(n)] = {"flat_s": b - a, "ivf_s": c - b, "nlist": nlist, "nprobe": nprobe}
    return out


def _gallery(n: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query-process", nargs=4, metavar=("EXPORT", "GALLERY", "KIND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--paper-image-model", default="mobilevitv2_050")
    args = parser.parse_args()
    if args.query_process:
        export, gallery, kind, n = args.query_process
        print(json.dumps(query_process(export, gallery, kind, int(n))))
        return
    import torch

    from mcad_cache.student import create_student

    torch.set_num_threads(1)
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    students = {
        "demo": lambda: create_student("minilm_efficientnet", image_size=64),
        "paper": lambda: create_student("mobilevitv2_tinybert", image_model=args.paper_image_model),
    }
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()}, "students": {}}  # fmt: skip
    for name, make in students.items():
        student = make()
        dim = student.embed_dim
        entry = {"params": student.num_params(), "exports": {}}
        for quantize in ("none", "int8"):
            export = _export(name, student, quantize)
            sizes_mb = {f: (export / f).stat().st_size / 2**20 for f in ("image_encoder.onnx", "text_encoder.onnx")}
            q = {"file_mb": sizes_mb, "image": image_latency(export, 30), "text_query": {}}
            for n in sizes:
                gallery = WORK / f"gallery_{n}_{dim}.npy"
                if not gallery.is_file():
                    np.save(gallery, _gallery(n, dim))
                for kind in ("flat", "ivf") if n >= 100_000 else ("flat",):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--query-process",
                        str(export),
                        str(gallery),
                        kind,
                        str(args.queries),
                    ]
                    env = dict(os.environ, OMP_NUM_THREADS="1")
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    q["text_query"][f"{n}_{kind}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            entry["exports"][quantize] = q
            print(f"{name} {quantize}: {json.dumps(q)}", flush=True)
        entry["index_build"] = index_build(dim, sizes)
        results["students"][name] = entry
    out = ROOT / ".work" / "benchmarks" / "export_latency.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
