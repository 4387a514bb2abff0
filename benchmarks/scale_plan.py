"""The costed plan of docs/scale.md: cache bytes, teacher GPU-hours, top-k cost, ITM pairs and student step cost for
COCO, CC3M, DataComp-12M and 1B pairs, from per-item costs measured here and GPU figures stated as assumptions.

Measured here (this script): FLOPs of one forward of each teacher part and of the default student, counted by
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) on random-init models of the real
architectures (open_clip ViT-B-16; ALBEF-base = ViT-B/16 at 384 px + BERT-base 6 text + 6 fusion layers; student
``mobilevitv2_tinybert``). Read from earlier measurements: bytes per sample (docs/benchmarks.md section 4,
``benchmarks/storage.py``) and FAISS / exact top-k per-query times (``benchmarks/topk_scale.py`` JSON, optional).

Assumptions (each marked in the output): the GPU's peak rates (NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16,
67 TFLOP/s FP32 / FP64 tensor) and the fraction of peak reached (``--mfu-teacher``, ``--mfu-student``,
``--topk-efficiency``: our choice, not measured: no GPU was available to this session).

JSON ``headline``: per dataset, ``cache_bytes_*`` (variants), ``clip_gpu_hours``, ``albef_gpu_hours``,
``itm_pairs``, ``exact_topk_flops(...)``, ``exact_topk_gpu_hours(...)``, ``gathered_fp32_bytes(...)``,
``exact_topk_rank_bytes(...)``, ``ivfpq_index_bytes``, ``*_cpu_core_hours``, ``student_*``,
``candidate_bank_bytes``; plus the counted ``flops`` per item.

Run: ``.venv/bin/python benchmarks/scale_plan.py [--topk-json .work/benchmarks/topk_scale.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "scale_plan"
REQUIRED_FIELDS = ("benchmark", "machine", "assumptions", "flops", "datasets", "headline")

# name: (images, captions). COCO: Karpathy train split (113,287 images, 566,747 captions); CC3M: the released
# training list (3,318,333 pairs; fewer images are still downloadable); DataComp-12M: the 12.8M-pair pool of
# DataComp "small" used by MobileCLIP's DataCompDR-12M; 1B: a round billion pairs.
DATASETS = {
    "COCO": (113_287, 566_747),
    "CC3M": (3_318_333, 3_318_333),
    "DataComp-12M": (12_800_000, 12_800_000),
    "1B pairs": (1_000_000_000, 1_000_000_000),
}
# Bytes per image and per caption of a cache, from docs/benchmarks.md section 4 (storage.py, k = 11): the 1-caption
# and 5-caption rows give base (per image) and per-caption bytes: per_caption = (b5 - b1) / 4, base = b1 - per_caption.
STORAGE_B = {
    "dual 512-d (CLIP B/16), no fused": (2_045, 6_148),
    "single 256-d (ALBEF), no fused": (1_268, 3_817),
    "single 256-d, int8 fused": (18_232, 54_732),
    "single 256-d, fp16 fused": (35_050, 105_184),
}
H100 = {"bf16_dense_tflops": 989.0, "fp32_tflops": 67.0, "fp64_tensor_tflops": 67.0, "hbm_bytes": 80e9}


def count(fn: Any, *modules: torch.nn.Module) -> int:
    """FLOPs of one call of ``fn`` (FlopCounterMode: matmul / conv / attention, 2 FLOPs per multiply-add).

    Counted with ``modules`` in training mode and SDPA on its math backend: in eval mode ``nn.MultiheadAttention``
    takes a fused fast path and CPU SDPA a fused kernel, neither of which FlopCounterMode counts (ViT-B/16 read 22.5
    instead of 35.1 GFLOP). No dropout or batch-norm state matters for a count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    for m, _ in modes:
        m.training = True
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            fn()
    finally:
        for m, was in modes:
            m.training = was
    return int(fc.get_total_flops())


def count_model_flops(*, quick: bool) -> dict[str, int]:
    """Forward FLOPs per item: CLIP image / caption, ALBEF image / caption / ITM pair, student image / caption."""
    from mcad_cache.student import create_student
    from mcad_cache.teachers import create_teacher

    caption = "a man riding a red bike next to a bus on a city street"
    clip = create_teacher("clip", model="tiny" if quick else "ViT-B-16", device="cpu")
    s = clip.preprocess_cfg["image_size"]
    out = {"clip_image": count(lambda: clip.encode_image(torch.zeros(1, 3, s, s)), clip.model),
           "clip_caption": count(lambda: clip.encode_text(clip.tokenize([caption])), clip.model)}  # fmt: skip
    albef = create_teacher("albef", model="tiny" if quick else "base", device="cpu")
    s = albef.preprocess_cfg["image_size"]
    image = torch.zeros(1, 3, s, s)
    tok = albef.tokenize([caption])
    with torch.no_grad():
        img_tokens, txt_tokens = albef.image_tokens(image), albef.text_tokens(tok)
    out["albef_image"] = count(lambda: albef.encode_image_from_tokens(albef.image_tokens(image)), albef.model)
    out["albef_caption"] = count(lambda: albef.encode_text_from_tokens(albef.text_tokens(tok)), albef.model)
    out["albef_pair"] = count(
        lambda: albef.itm_from_text_tokens(img_tokens, txt_tokens, tok["attention_mask"]), albef.model
    )
    student = create_student("tiny" if quick else "mobilevitv2_tinybert").eval()
    s = student.preprocess_cfg["image_size"]
    stok = student.tokenize([caption])
    out["student_image"] = count(lambda: student.forward_image(torch.zeros(1, 3, s, s)), student)
    out["student_caption"] = count(lambda: student.forward_text(stok["input_ids"], stok["attention_mask"]), student)
    return out


def topk_rates(path: str) -> dict[str, Any]:
    """Per-query seconds of the exact and IVF methods at the largest measured N (clustered data), from a
    ``topk_scale.py`` JSON; empty when the file is absent."""
    if not path or not Path(path).exists():
        return {}
    points = [p for p in json.loads(Path(path).read_text())["points"] if p["distribution"] == "clustered"]
    p = max(points, key=lambda q: q["n"])
    m = p["methods"]
    nprobe = max(m["ivf-pq-refine"]["nprobe"], key=int)
    return {"n": p["n"], "nlist": p["nlist"], "nprobe": int(nprobe), "source": path,
            "exact_per_query_s": m["exact"]["per_query_s"], "exact_faiss_per_query_s": m["exact-faiss"]["per_query_s"],
            "ivfpq_per_query_s": m["ivf-pq"]["nprobe"][nprobe]["per_query_s"],
            "ivfpq_refine_per_query_s": m["ivf-pq-refine"]["nprobe"][nprobe]["per_query_s"],
            "ivfpq_refine_recall_at_k": m["ivf-pq-refine"]["nprobe"][nprobe]["recall_at_k"],
            "ivfflat_recall_at_k": m["ivf-flat"]["nprobe"][nprobe]["recall_at_k"]}  # fmt: skip


def plan(n_img: int, n_txt: int, *, flops: dict[str, int], args: argparse.Namespace, rates: dict[str, Any]) -> dict:
    """Every figure of one dataset (see the module docstring); ``V = args.views`` image views."""
    k, v = args.k, args.views
    teacher_rate = H100["bf16_dense_tflops"] * 1e12 * args.mfu_teacher  # FLOP/s, assumption
    out: dict[str, Any] = {"images": n_img, "captions": n_txt, "k": k, "views": v}
    for name, (b1, b5) in STORAGE_B.items():
        per_cap = (b5 - b1) / 4
        base = b1 - per_cap
        # V views: the image side (embedding, i2t candidates, their ITM / fused) scales with V; captions do not.
        out[f"cache_bytes({name})"] = base * n_img * v + per_cap * n_txt
    out["itm_pairs"] = (n_img * v + n_txt) * k  # i2t: each image view's k captions; t2i: each caption's k images
    clip = n_img * v * flops["clip_image"] + n_txt * flops["clip_caption"]
    # The build runs ALBEF's ViT once per image for the ITC embedding and again in pass 3a for the fusion's image
    # tokens (docs/benchmarks.md section 1): 2 image passes, counted as such.
    albef = (
        2 * n_img * v * flops["albef_image"] + n_txt * flops["albef_caption"] + out["itm_pairs"] * flops["albef_pair"]
    )
    out["clip_gpu_hours"] = clip / teacher_rate / 3600
    out["albef_gpu_hours"] = albef / teacher_rate / 3600
    out["albef_itm_share"] = out["itm_pairs"] * flops["albef_pair"] / albef
    n_q = n_img * v  # image rows (queries of i2t, gallery of t2i)
    for name, d in (("clip", 512), ("albef", 256)):
        f = 2 * 2 * n_q * n_txt * d  # i2t and t2i each score N_i x N_t pairs; 2 FLOPs per multiply-add
        out[f"exact_topk_flops({name})"] = f
        out[f"exact_topk_gpu_hours({name})"] = f / (H100["fp32_tflops"] * 1e12 * args.topk_efficiency) / 3600
        # What one rank holds for the exact top-k today: both modalities' embeddings gathered as float32, plus
        # chunked_topk's float64 copy of the larger gallery (cache/topk.py), plus one chunk of scores (small).
        out[f"gathered_fp32_bytes({name})"] = (n_q + n_txt) * d * 4
        out[f"exact_topk_rank_bytes({name})"] = (n_q + n_txt) * d * 4 + max(n_q, n_txt) * d * 8
    out["ivfpq_index_bytes"] = (n_q + n_txt) * (args.pq_m + 8)  # both galleries: PQ codes + int64 ids
    if rates:
        # CPU core-seconds per query measured against rates["n"] gallery rows, scaled to each direction's gallery:
        # exact cost per query grows with the gallery; IVF with nlist ~ sqrt(N) scans nprobe / nlist of the gallery,
        # i.e. ~ sqrt(N) rows per query (our model, not measured beyond rates["n"]).
        m = rates["n"]
        out["exact_topk_cpu_core_hours"] = 2 * n_q * n_txt / m * rates["exact_faiss_per_query_s"] / 3600
        ivf = n_q * math.sqrt(n_txt / m) + n_txt * math.sqrt(n_q / m)
        out["ivfpq_refine_cpu_core_hours"] = ivf * rates["ivfpq_refine_per_query_s"] / 3600
    # Student, one epoch over the pairs: forward + backward ~ 3 x forward FLOPs (our rule of thumb). MCAD step per
    # anchor pair: the anchor image and caption, its k candidate captions (i2t) and k candidate images (t2i).
    per_pair_anchor = 3 * (flops["student_image"] + flops["student_caption"])
    per_pair_mcad = per_pair_anchor * (1 + k)
    student_rate = H100["bf16_dense_tflops"] * 1e12 * args.mfu_student
    out["student_flops_per_pair_contrastive"] = per_pair_anchor
    out["student_flops_per_pair_mcad"] = per_pair_mcad
    out["student_epoch_gpu_hours_contrastive"] = n_txt * per_pair_anchor / student_rate / 3600
    out["student_epoch_gpu_hours_mcad"] = n_txt * per_pair_mcad / student_rate / 3600
    out["candidate_bank_bytes"] = (n_img * v + n_txt) * 256 * 2  # student embeddings of every row, fp16, 256-d
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--k", type=int, default=11, help="candidates per query (the build's default)")
    parser.add_argument("--views", type=int, default=1, help="V image views per image (today's caches: 1)")
    parser.add_argument("--pq-m", type=int, default=32, help="IVF-PQ bytes per vector (topk_scale.py default)")
    parser.add_argument("--mfu-teacher", type=float, default=0.35, help="ASSUMPTION: teacher fraction of bf16 peak")
    parser.add_argument("--mfu-student", type=float, default=0.10, help="ASSUMPTION: student fraction of bf16 peak")
    parser.add_argument("--topk-efficiency", type=float, default=0.5, help="ASSUMPTION: top-k fraction of FP32 peak")
    parser.add_argument("--topk-json", default=str(C.OUT_DIR / "topk_scale.json"), help="topk_scale.py output")
    args = parser.parse_args(argv)
    C.setup_run(args)
    info = C.machine_info()
    flops = count_model_flops(quick=args.quick)
    rates = topk_rates(args.topk_json)
    datasets = {name: plan(*sizes, flops=flops, args=args, rates=rates) for name, sizes in DATASETS.items()}
    assumptions = {"gpu": "NVIDIA H100 SXM (datasheet peaks)", **H100, "mfu_teacher": args.mfu_teacher,
                   "mfu_student": args.mfu_student, "topk_efficiency_of_fp32_peak": args.topk_efficiency,
                   "note": "peaks from the datasheet; fractions of peak are our choice, not measured"}  # fmt: skip
    C.print_table("Forward GFLOPs per item (FlopCounterMode, counted here)", ["item", "GFLOP"],
                  [[k, v / 1e9] for k, v in flops.items()])  # fmt: skip
    keys = list(next(iter(datasets.values())))
    C.print_table("Costed plan", ["quantity", *datasets], [[key, *(d.get(key, "-") for d in datasets.values())]
                                                          for key in keys])  # fmt: skip
    headline = {name: {key: d[key] for key in keys if not key.startswith(("images", "captions"))}
                for name, d in datasets.items()}  # fmt: skip
    payload = {"benchmark": NAME, "machine": info, "settings": vars(args), "assumptions": assumptions,
               "flops": flops, "topk_rates": rates, "datasets": datasets, "headline": headline}  # fmt: skip
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
