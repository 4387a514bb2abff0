"""Build efficiency: cache-build throughput divided by the same teacher's bare forward throughput.

For each teacher (open_clip ViT-B/16 and ALBEF-base, random init, real sizes), in one process, interleaved:

- **bare**: the model work a cache needs, on pre-decoded, pre-tokenised tensors already in memory, same batch size,
  same device, same autocast: CLIP = image tower on every image + text tower on every caption. ALBEF = ViT once
  per image (ITC embedding from its tokens), text encoder once per caption, global top-k by ITC (a matmul), and the
  fusion layers + ITM head once per cached pair (k per image query, k per caption query).
- **build**: ``mcad_cache.pipelines.build_cache.run`` over the same samples stored as JPEG WebDataset shards (decode,
  resize, DataLoader workers, Zarr writes, global top-k, manifest), with the already-built teacher.

``efficiency = build throughput / bare throughput = bare seconds / build seconds`` per repetition; the median is
reported (target >= 0.9). Where the time goes: the build's own per-pass seconds, and the seconds spent inside the
teacher's model calls during the build (a timing proxy around the teacher), so that pipeline overhead (decode,
writes, orchestration) and extra model work (calls the bare path does not need) are separated.

Run: ``.venv/bin/python benchmarks/build_efficiency.py [--quick] [--teachers clip,albef]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from mcad_cache.runtime import autocast, resolve_precision  # noqa: E402

NAME = "build_efficiency"
TARGET = 0.9
HEADLINE_KEYS = {
    "clip_build_over_bare": "open_clip ViT-B/16: build throughput / bare forward throughput (median of per-repetition "
    "ratios); target >= 0.9",
    "albef_build_over_bare": "ALBEF-base: the same; target >= 0.9",
}
REQUIRED_FIELDS = ("benchmark", "machine", "target", "headline", "headline_keys", "settings", "teachers", "verdicts")
TEACHER_FIELDS = (
    "teacher",
    "model",
    "num_samples",
    "batch_size",
    "k",
    "reps",
    "bare_s",
    "build_s",
    "bare_samples_per_s",
    "build_samples_per_s",
    "efficiency",
    "efficiency_passes_only",
    "build_stage_s",
    "build_model_call_s",
    "build_model_s",
    "build_overhead_s",
    "extra_model_s",
    "model_busy_fraction",
    "meets_target",
)


def predecode(shards: list[str], teacher: Any) -> tuple[torch.Tensor, list[str]]:
    """Every sample's image through the teacher's own transform [N, 3, H, W] and its captions (flattened)."""
    from mcad_cache.data import iter_samples
    from mcad_cache.data.transforms import make_image_transform

    transform = make_image_transform(teacher.preprocess_cfg)
    images, captions = [], []
    for s in iter_samples(shards):
        if s.skip is None:
            images.append(transform(s.image))
            captions.extend(s.captions)
    return torch.stack(images), captions


def bare_clip(teacher: Any, images: torch.Tensor, tokens: list[dict[str, torch.Tensor]], *, batch_size: int,
              device: torch.device, precision: str) -> None:  # fmt: skip
    """Image tower on every image, text tower on every caption batch (inputs already in memory)."""
    with autocast(device, precision):
        for s in range(0, images.shape[0], batch_size):
            teacher.encode_image(images[s : s + batch_size].to(device))
        for tok in tokens:
            teacher.encode_text({k: v.to(device) for k, v in tok.items()})
    C.sync(device)


def bare_albef(teacher: Any, images: torch.Tensor, tokens: list[dict[str, torch.Tensor]], txt2img: torch.Tensor, *,
               batch_size: int, k: int, device: torch.device, precision: str) -> int:  # fmt: skip
    """The minimal single-stream work: ViT once per image, text encoder once per caption, top-k by ITC, fusion + ITM
    once per pair (k per image query, k per caption query). Returns the number of pairs scored."""
    with autocast(device, precision):
        img_tok, img_emb = [], []
        for s in range(0, images.shape[0], batch_size):
            t = teacher.image_tokens(images[s : s + batch_size].to(device))
            img_tok.append(t)
            img_emb.append(teacher.encode_image_from_tokens(t))
        txt_tok, txt_mask, txt_emb = [], [], []
        for tok in tokens:
            t = teacher.text_tokens(tok)
            txt_tok.append(t)
            txt_mask.append(tok["attention_mask"].to(device))
            txt_emb.append(teacher.encode_text_from_tokens(t))
        image_tokens, text_tokens, mask = torch.cat(img_tok), torch.cat(txt_tok), torch.cat(txt_mask)
        sims = torch.cat(img_emb) @ torch.cat(txt_emb).T  # [N_i, N_t]
        kk_t, kk_i = min(k, sims.shape[1]), min(k, sims.shape[0])
        i2t = sims.topk(kk_t, dim=1).indices  # [N_i, k]
        t2i = sims.T.topk(kk_i, dim=1).indices  # [N_t, k]
        pair_img = torch.cat([torch.arange(sims.shape[0], device=sims.device).repeat_interleave(kk_t), t2i.reshape(-1)])
        pair_txt = torch.cat([i2t.reshape(-1), torch.arange(sims.shape[1], device=sims.device).repeat_interleave(kk_i)])
        for s in range(0, pair_img.numel(), batch_size):
            pi, pt = pair_img[s : s + batch_size], pair_txt[s : s + batch_size]
            teacher.itm_from_text_tokens(image_tokens[pi], text_tokens[pt], mask[pt])
    C.sync(device)
    return int(pair_img.numel())


def run_teacher(name: str, args: argparse.Namespace, work: Path, device: torch.device) -> dict[str, Any]:
    from mcad_cache.config import BuildConfig
    from mcad_cache.pipelines.build_cache import run as build_run
    from mcad_cache.teachers import create_teacher

    quick = args.quick
    n = args.num_samples_clip if name == "clip" else args.num_samples_albef
    batch = min(args.batch_size, n) if args.batch_size > 0 else min(16, n)
    reps = args.reps_clip if name == "clip" else args.reps_albef
    if quick:
        n, batch, reps = 8, 8, 1
    model = {"clip": "tiny" if quick else "ViT-B-16", "albef": "tiny" if quick else "base"}[name]
    size = (64, 48) if quick else (320, 240)
    shards = C.make_shards(work / f"shards-{n}-{size[0]}", num_samples=n, per_shard=max(1, n // 2), image_size=size,
                           seed=args.seed)  # fmt: skip
    print(f"[{name}] creating teacher {model} (random init) ...", flush=True)
    t_create, teacher = C.timed(lambda: create_teacher(name, model=model, device=str(device)))
    teacher.fingerprint()  # hash the weights once (a build does it once per run)
    proxy = C.TimingProxy(teacher, device)
    registry_name = C.register_instance(f"{name}-{model}", proxy)
    precision = resolve_precision("auto", device)
    images, captions = predecode(shards, teacher)
    tokens = [teacher.tokenize(captions[s : s + batch]) for s in range(0, len(captions), batch)]
    txt2img = torch.arange(images.shape[0]).repeat_interleave(len(captions) // images.shape[0])
    num_params = sum(p.numel() for p in teacher.model.parameters())
    image_px = teacher.preprocess_cfg["image_size"]

    builds: list[dict[str, Any]] = []
    pairs = [0]

    def bare() -> None:
        if name == "clip":
            bare_clip(teacher, images, tokens, batch_size=batch, device=device, precision=precision)
        else:
            pairs[0] = bare_albef(teacher, images, tokens, txt2img, batch_size=batch, k=args.k, device=device,
                                  precision=precision)  # fmt: skip

    def build() -> None:
        out = work / f"cache-{name}"
        if out.exists():
            shutil.rmtree(out)
        proxy.reset()
        random = {"random_init": True} if "random_init" in BuildConfig.__dataclass_fields__ else {}  # random weights
        cfg = BuildConfig(teacher=registry_name, model=f"{name}-{model}", data=tuple(shards), out=str(out), k=args.k,
                          batch_size=batch, workers=args.workers, device=str(device), overwrite=True,
                          **random)  # fmt: skip
        t, res = C.timed(lambda: build_run(cfg))
        builds.append({"wall_s": t, "result": res.to_dict(), "model_call_s": dict(proxy.seconds),
                       "model_calls": dict(proxy.calls), "model_items": dict(proxy.items)})  # fmt: skip

    # warm-up (first-call costs: allocator, kernel selection) on two samples, not timed
    head_tokens = [teacher.tokenize(captions[:2])]
    if name == "clip":
        bare_clip(teacher, images[:2], head_tokens, batch_size=2, device=device, precision=precision)
    else:
        bare_albef(teacher, images[:2], head_tokens, txt2img[:2], batch_size=2, k=1, device=device, precision=precision)
    print(f"[{name}] {n} samples, batch {batch}, k {args.k}, {reps} repetition(s) of bare + build ...", flush=True)
    times = C.interleave({"bare": bare, "build": build}, reps=reps)
    eff = C.ratio_stats(times["bare"], times["build"])
    stage_keys = sorted({k for b in builds for k in b["result"]["stage_seconds"]})
    stage_s = {k: statistics.median(b["result"]["stage_seconds"].get(k, 0.0) for b in builds) for k in stage_keys}
    passes = [sum(v for kk, v in b["result"]["stage_seconds"].items() if kk.startswith("pass")) for b in builds]
    eff_passes = C.ratio_stats(times["bare"], passes)
    call_keys = sorted({k for b in builds for k in b["model_call_s"]})
    call_s = {k: statistics.median(b["model_call_s"].get(k, 0.0) for b in builds) for k in call_keys}
    model_s = [sum(v for kk, v in b["model_call_s"].items() if kk != "tokenize") for b in builds]
    bare_s, build_s = statistics.median(times["bare"]), statistics.median(times["build"])
    res = {
        "teacher": name,
        "model": model,
        "num_params": num_params,
        "image_px": image_px,
        "num_samples": int(images.shape[0]),
        "num_captions": len(captions),
        "batch_size": batch,
        "k": args.k,
        "workers": args.workers,
        "precision": precision,
        "reps": reps,
        "teacher_create_s": t_create,
        "bare_s": bare_s,
        "build_s": build_s,
        "bare_s_per_rep": times["bare"],
        "build_s_per_rep": times["build"],
        "bare_samples_per_s": images.shape[0] / bare_s,
        "build_samples_per_s": images.shape[0] / build_s,
        "efficiency": eff,
        "efficiency_passes_only": eff_passes,
        "build_stage_s": stage_s,
        "build_model_call_s": call_s,
        "build_model_calls": builds[-1]["model_calls"],
        "build_model_items": builds[-1]["model_items"],
        "build_model_s": statistics.median(model_s),
        "build_overhead_s": statistics.median(b["wall_s"] - m for b, m in zip(builds, model_s, strict=True)),
        # share of the build's wall time spent inside the teacher's model calls (1 = decode / write fully hidden)
        "model_busy_fraction": statistics.median(m / b["wall_s"] for b, m in zip(builds, model_s, strict=True)),
        "extra_model_s": statistics.median(model_s) - bare_s,
        "bare_pairs": pairs[0] if name == "albef" else 0,
        "meets_target": eff["median"] >= TARGET,
    }
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--teachers", default="clip,albef", help="comma list of clip, albef")
    parser.add_argument("--num-samples-clip", type=int, default=32)
    parser.add_argument("--num-samples-albef", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16, help="teacher batch size (both paths); 0 = min(16, N)")
    parser.add_argument("--reps-clip", type=int, default=5)
    parser.add_argument("--reps-albef", type=int, default=2)
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--workers", type=int, default=2, help="build DataLoader workers")
    args = parser.parse_args(argv)
    if args.quick:
        args.k, args.workers = 3, 0
    C.setup_run(args)
    device = C.resolve_device(args.device)
    work = C.scratch_dir(args, NAME + ("-quick" if args.quick else ""))
    info = C.machine_info()
    C.print_machine(info)
    results = [run_teacher(t.strip(), args, work, device) for t in args.teachers.split(",") if t.strip()]

    C.print_table(
        f"Build efficiency (target >= {TARGET}): build throughput / bare forward throughput, same batch and device",
        [
            "teacher",
            "N",
            "batch",
            "k",
            "reps",
            "bare s",
            "build s",
            "bare samples/s",
            "build samples/s",
            "efficiency (median)",
            "min..max",
            "passes only",
            "meets",
        ],  # fmt: skip
        [
            [
                r["teacher"] + ":" + r["model"],
                r["num_samples"],
                r["batch_size"],
                r["k"],
                r["reps"],
                r["bare_s"],
                r["build_s"],
                r["bare_samples_per_s"],
                r["build_samples_per_s"],
                r["efficiency"]["median"],
                f"{r['efficiency']['min']:.3f}..{r['efficiency']['max']:.3f}",
                r["efficiency_passes_only"]["median"],
                "yes" if r["meets_target"] else "NO",
            ]
            for r in results
        ],  # fmt: skip
    )
    rows = []
    for r in results:
        for k, v in r["build_stage_s"].items():
            rows.append([r["teacher"], "build stage", k, v])
        for k, v in r["build_model_call_s"].items():
            rows.append([r["teacher"], "model call in build", k, v])
        rows.append([r["teacher"], "sum", "model calls in build (no tokenize)", r["build_model_s"]])
        rows.append([r["teacher"], "sum", "build wall - model calls (pipeline overhead)", r["build_overhead_s"]])
        rows.append([r["teacher"], "sum", "model calls in build - bare (extra model work)", r["extra_model_s"]])
        rows.append([r["teacher"], "share", "model calls / build wall (model-busy fraction)", r["model_busy_fraction"]])
    C.print_table("Where the build's time goes (seconds, median over repetitions)", ["teacher", "what", "part", "s"],
                  rows)  # fmt: skip
    payload = {
        "benchmark": NAME,
        "machine": info,
        "target": {"efficiency_min": TARGET},
        "headline": {f"{r['teacher']}_build_over_bare": r["efficiency"]["median"] for r in results},
        "headline_keys": HEADLINE_KEYS,
        "settings": {k: v for k, v in vars(args).items()},
        "teachers": results,
        "verdicts": {r["teacher"]: "meets" if r["meets_target"] else "misses" for r in results},
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
