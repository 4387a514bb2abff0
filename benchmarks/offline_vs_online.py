"""Offline vs online distillation: a step whose targets come from running both teachers online, against the cached step.

The cached step is ``distill_overhead``'s MCAD step with ``--candidates bank`` (join with a CLIP-sized and an
ALBEF-sized cache + one optimiser step of the default student, batch 16, k = 11; the bank's initial fill is
amortised over one epoch). The online step computes the same targets with the real teachers (open_clip ViT-B/16 at
224 px and ALBEF-base at 384 px, random init): both image towers on every image the step involves (anchors and
candidate images), both text towers on every caption (anchors and candidate captions), ALBEF's fusion layers + ITM
head on every top-k pair of both directions; then the same student step (online distillation as in open_clip
``--distill-model``, TinyCLIP and CLIP-KD runs the teacher every step; candidates are given to it for free and its
student step is the cached run's bank step, which favours online).

On a CPU a real-size online step takes many minutes, so its teacher part is composed from measured unit costs:
each teacher call (image tower on a batch of images, text tower on a batch of captions, fusion on a batch of pairs)
is timed at a fixed batch, interleaved with the cached steps in the same process, and multiplied by the counts of
images, captions and pairs of each timed batch (per repetition, so that machine drift cancels in the ratio).

Total for N student experiments over one epoch of a dataset: online N x (teachers + student) against offline
1 x build + N x cached student; the build's cost per sample is the bare teacher work per sample (one image, its
captions, 2k ALBEF pairs) divided by the build efficiency measured by ``build_efficiency.py`` when its JSON exists.

Run: ``.venv/bin/python benchmarks/offline_vs_online.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "offline_vs_online"
TARGET = 50.0  # online step / cached step (issue 11)
HEADLINE_KEYS = {
    "online_over_cached": "online step (both teachers composed from unit costs + the student step) / cached step "
    "(--candidates bank, fill amortised over one epoch); median of per-repetition ratios; target >= 50",
    "online_over_cached_no_fill": "the same without the bank's initial fill (a run of many epochs: the fill is one "
    "eval-mode pass over the candidate rows, paid once)",
    "online_over_offline_5_experiments": "total time of 5 student experiments over one epoch, online / offline "
    "(1 build + 5 cached runs)",
}
COCO_TRAIN_IMAGES = 118_287  # COCO 2017 train images (Karpathy train + restval: 113,287)
REQUIRED_FIELDS = (
    "benchmark",
    "machine",
    "target",
    "headline",
    "headline_keys",
    "settings",
    "batch",
    "unit_costs_s",
    "step_s",
    "ratio_online_vs_cached",
    "experiments",
    "verdict",
)


def teacher_units(clip: Any, albef: Any, images_clip: torch.Tensor, images_albef: torch.Tensor, captions: list[str],
                  *, device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Callables timing one batch of each teacher operation on inputs already in memory."""
    clip_tok = clip.tokenize(captions)
    albef_tok = albef.tokenize(captions)
    n_pairs = len(captions)
    with torch.no_grad():
        img_tokens = albef.image_tokens(images_albef[:1].to(device)).expand(n_pairs, -1, -1).contiguous()
        txt_tokens = albef.text_tokens(albef_tok)
    mask = albef_tok["attention_mask"].to(device)

    def run(fn: Any) -> Any:
        def call() -> None:
            with torch.no_grad():
                fn()
            C.sync(device)

        return call

    return {
        "clip_image": run(lambda: clip.encode_image(images_clip.to(device))),
        "clip_text": run(lambda: clip.encode_text({k: v.to(device) for k, v in clip_tok.items()})),
        "albef_image": run(lambda: albef.encode_image_from_tokens(albef.image_tokens(images_albef.to(device)))),
        "albef_text": run(lambda: albef.encode_text_from_tokens(albef.text_tokens(albef_tok))),
        "albef_pairs": run(lambda: albef.itm_from_text_tokens(img_tokens, txt_tokens, mask)),
    }


def direct_online_step(setup: C.DistillSetup, raw: dict[str, Any], clip: Any, albef: Any, *, anchors: int,
                       step: int) -> dict[str, Any]:  # fmt: skip
    """One real online step on the first ``anchors`` samples of ``raw``: both teachers compute the targets of the
    join (every image and caption the step uses, every top-k pair) from decoded inputs, then the student step.
    Returns the seconds of each part and the batch's counts (to check the composed estimate)."""
    from mcad_cache.data.decode import DecodePolicy, decode_image
    from mcad_cache.data.transforms import make_image_transform

    small = {"key": raw["key"][:anchors], "captions": raw["captions"][:anchors], "image": raw["image"][:anchors]}
    from mcad_cache.data.index import ShardIndex

    batch = setup.join(small, step)
    counts = C.batch_counts(batch, candidates=setup.candidates)
    index = ShardIndex(setup.run.shards)  # the online teachers read every candidate image by key
    t = batch.targets
    valid_i2t, valid_t2i = t.valid_i2t, t.valid_t2i
    # image keys in the student's image order: anchors, then the fetched candidates (the joiner's order)
    extra_keys = sorted({str(setup.single.image_keys[r]) for r in _t2i_rows(setup, batch)} - set(batch.keys))
    keys = list(batch.keys) + extra_keys
    t0 = time.perf_counter()
    with torch.no_grad():
        policy = DecodePolicy()  # the run's (create_distill uses the default policy)
        raw_images = [decode_image(index.read_image_bytes(k), policy=policy) for k in keys]
        clip_in = torch.stack([make_image_transform(clip.preprocess_cfg)(im) for im in raw_images])
        albef_in = torch.stack([make_image_transform(albef.preprocess_cfg)(im) for im in raw_images])
        t_decode = time.perf_counter() - t0
        clip.encode_image(clip_in)
        clip.encode_text(clip.tokenize(batch.texts))
        t_clip = time.perf_counter() - t0 - t_decode
        img_tokens = albef.image_tokens(albef_in)
        albef.encode_image_from_tokens(img_tokens)
        tok = albef.tokenize(batch.texts)
        txt_tokens = albef.text_tokens(tok)
        albef.encode_text_from_tokens(txt_tokens)
        b_i, j_i = torch.nonzero(valid_i2t, as_tuple=True)
        b_t, j_t = torch.nonzero(valid_t2i, as_tuple=True)
        pair_img = torch.cat([b_i, batch.topk_image_index[b_t, j_t]])
        pair_txt = torch.cat([batch.topk_text_index[b_i, j_i], b_t])
        mask = tok["attention_mask"]
        for s in range(0, pair_img.numel(), 16):
            pi, pt = pair_img[s : s + 16], pair_txt[s : s + 16]
            albef.itm_from_text_tokens(img_tokens[pi], txt_tokens[pt], mask[pt])
        t_albef = time.perf_counter() - t0 - t_decode - t_clip
    t_student, _ = C.timed(lambda: setup.step(batch, which="mcad", step=step))
    return {"anchors": anchors, "counts": counts, "decode_s": t_decode, "clip_s": t_clip, "albef_s": t_albef,
            "student_step_s": t_student, "total_s": t_decode + t_clip + t_albef + t_student}  # fmt: skip


def _t2i_rows(setup: C.DistillSetup, batch: Any) -> list[int]:
    """Single-stream cache rows of the batch's t2i candidate images (valid slots)."""
    import numpy as np

    text_keys = [f"{k}#0" for k in batch.keys]
    rows = setup.single.text_rows(text_keys)
    top = setup.single.topk("t2i", rows, k=setup.k, fused=False)
    return [int(x) for x in np.asarray(top["idx"])[np.asarray(top["valid"])].tolist()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--student", default="mobilevitv2_tinybert")
    parser.add_argument("--unit-images", type=int, default=4, help="images per timed teacher image batch")
    parser.add_argument("--unit-texts", type=int, default=16, help="captions (and pairs) per timed teacher batch")
    parser.add_argument("--experiments", default="1,5,20")
    parser.add_argument("--candidates", default="bank", help="the cached run's candidate source: bank | online")
    parser.add_argument("--dataset-size", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--build-json", default="", help="build_efficiency JSON (default .work/benchmarks/...)")
    parser.add_argument(
        "--direct-anchors",
        type=int,
        default=2,
        help="also run one real online step with this many anchors (0 = off) to check the composition",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.batch_size, args.k, args.reps, args.workers = 48, 4, 3, 1, 0
        args.student, args.unit_images, args.unit_texts, args.direct_anchors = "tiny", 2, 4, 0
    C.setup_run(args)
    device = C.resolve_device(args.device)
    from mcad_cache.data import iter_samples
    from mcad_cache.data.transforms import make_image_transform
    from mcad_cache.teachers import create_teacher

    work = C.scratch_dir(args, "distill-data" + ("-quick" if args.quick else ""))
    info = C.machine_info()
    C.print_machine(info)
    size = (64, 48) if args.quick else (320, 240)
    shards = C.make_shards(work / "shards", num_samples=args.num_samples, per_shard=max(1, args.num_samples // 4),
                           image_size=size, seed=args.seed)  # fmt: skip
    specs = ("small-dual", "small-single") if args.quick else ("clip-vit-b-16", "albef-base")
    print(f"building synthetic caches {specs} over {args.num_samples} samples (reused when present) ...", flush=True)
    cache_paths = C.build_synthetic_caches(shards, work, k=args.k, device=device, workers=args.workers, specs=specs)
    setup = C.DistillSetup(shards=shards, cache_paths=cache_paths, student=args.student, batch_size=args.batch_size,
                           k=args.k, workers=args.workers, device=device, seed=args.seed,
                           candidates=args.candidates)  # fmt: skip
    raws = setup.raw_batches(args.reps + 1)
    joined = [setup.join(r, i + 1) for i, r in enumerate(raws)]
    counts = [C.batch_counts(b, candidates=args.candidates) for b in joined]
    t_fill = 0.0
    if setup.run.bank is not None:
        t_fill, _ = C.timed(lambda: setup.run.bank.fill())
    fill_per_step = t_fill / max(1, args.num_samples // args.batch_size)
    setup.step(joined[-1], which="mcad", step=1)  # warm-up

    models = {"clip": "tiny" if args.quick else "ViT-B-16", "albef": "tiny" if args.quick else "base"}
    print(f"creating teachers {models} (random init) ...", flush=True)
    clip = create_teacher("clip", model=models["clip"], device=str(device))
    albef = create_teacher("albef", model=models["albef"], device=str(device))
    samples = [s for s in iter_samples(shards) if s.skip is None][: max(args.unit_images, 1)]
    images_clip = torch.stack([make_image_transform(clip.preprocess_cfg)(s.image) for s in samples])
    images_albef = torch.stack([make_image_transform(albef.preprocess_cfg)(s.image) for s in samples])
    captions = [c for b in joined for c in b.texts][: args.unit_texts]
    units = teacher_units(clip, albef, images_clip, images_albef, captions, device=device)
    for fn in units.values():  # warm-up
        fn()
    unit_sizes = {"clip_image": images_clip.shape[0], "clip_text": len(captions), "albef_image": images_albef.shape[0],
                  "albef_text": len(captions), "albef_pairs": len(captions)}  # fmt: skip

    rep = [0]
    parts: dict[str, list[float]] = {"join_s": [], "candidate_fetch_s": [], "train_s": []}

    def cached() -> None:
        r = rep[0]
        before = setup.candidate_images.seconds
        t_join, batch = C.timed(lambda: setup.join(raws[r], r + 1))
        parts["candidate_fetch_s"].append(setup.candidate_images.seconds - before)
        t_train, _ = C.timed(lambda: setup.step(batch, which="mcad", step=r + 2))
        parts["join_s"].append(t_join)
        parts["train_s"].append(t_train + fill_per_step)  # the bank's fill, spread over one epoch

    print(f"timing {args.reps} repetition(s) of the cached step and one batch of each teacher operation ...",
          flush=True)  # fmt: skip
    fns = {"cached_step": cached, **units}
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(args.reps):
        rep[0] = r
        got = C.interleave({n: fns[n] for n in names[r % len(names) :] + names[: r % len(names)]}, reps=1)
        for n, v in got.items():
            times[n].extend(v)

    per_item = {n: [t / unit_sizes[n] for t in times[n]] for n in units}  # seconds per image / caption / pair
    online, teacher_part = [], []
    for r in range(args.reps):
        c = counts[r]
        teach = (
            c["images"] * (per_item["clip_image"][r] + per_item["albef_image"][r])
            + c["texts"] * (per_item["clip_text"][r] + per_item["albef_text"][r])
            + (c["pairs_i2t"] + c["pairs_t2i"]) * per_item["albef_pairs"][r]
        )
        teacher_part.append(teach)
        online.append(teach + parts["train_s"][r] + parts["candidate_fetch_s"][r])
    cached_steps = [t + fill_per_step for t in times["cached_step"]]
    ratio = C.ratio_stats(online, cached_steps)
    ratio_no_fill = C.ratio_stats(online, times["cached_step"])
    med_item = {n: statistics.median(v) for n, v in per_item.items()}

    # N experiments over one epoch of `dataset_size` samples (one caption per sample per epoch)
    build_eff = {"clip": 1.0, "albef": 1.0}
    build_json = Path(args.build_json) if args.build_json else C.OUT_DIR / "build_efficiency.json"
    eff_source = "none found: efficiency 1.0 assumed (the build as fast as the bare model)"
    if build_json.is_file() and not args.quick:
        data = json.loads(build_json.read_text())
        for t in data.get("teachers", []):
            build_eff[t["teacher"]] = t["efficiency"]["median"]
        eff_source = str(build_json)
    build_per_sample = (med_item["clip_image"] + med_item["clip_text"]) / build_eff["clip"] + (
        med_item["albef_image"] + med_item["albef_text"] + 2 * args.k * med_item["albef_pairs"]
    ) / build_eff["albef"]
    online_per_sample = statistics.median(online) / args.batch_size
    cached_per_sample = statistics.median(cached_steps) / args.batch_size
    experiments = []
    for n in [int(x) for x in args.experiments.split(",")]:
        on = n * args.dataset_size * online_per_sample
        off = args.dataset_size * build_per_sample + n * args.dataset_size * cached_per_sample
        experiments.append({"experiments": n, "online_s": on, "offline_s": off, "online_over_offline": on / off,
                            "offline_build_share": args.dataset_size * build_per_sample / off})  # fmt: skip

    direct = None
    if args.direct_anchors > 0:
        print(f"one real online step with {args.direct_anchors} anchors ...", flush=True)
        direct = direct_online_step(setup, raws[-1], clip, albef, anchors=args.direct_anchors, step=99)
        c = direct["counts"]
        direct["composed_teacher_s"] = (
            c["images"] * (med_item["clip_image"] + med_item["albef_image"])
            + c["texts"] * (med_item["clip_text"] + med_item["albef_text"])
            + (c["pairs_i2t"] + c["pairs_t2i"]) * med_item["albef_pairs"]
        )
        direct["measured_teacher_s"] = direct["clip_s"] + direct["albef_s"]
        direct["measured_over_composed"] = direct["measured_teacher_s"] / direct["composed_teacher_s"]

    mean_counts = {k: statistics.mean(c[k] for c in counts[: args.reps]) for k in counts[0]}
    C.print_table("Teacher unit costs (s per item, median)", ["operation", "s per item", "batch timed"],
                  [[n, med_item[n], unit_sizes[n]] for n in units])  # fmt: skip
    C.print_table(
        "Per batch (mean over the timed batches)", ["what", "count"], [[k, v] for k, v in mean_counts.items()]
    )
    C.print_table(
        f"Online vs cached step (batch {args.batch_size}, k {args.k}, student {args.student}; target >= {TARGET}x)",
        ["step", "s (median)", "online / cached (median)", "min..max"],
        [
            [
                f"cached (join + student step, --candidates {args.candidates}; bank fill over 1 epoch)",
                statistics.median(cached_steps),
                "",
                "",
            ],
            ["cached, without the bank fill", statistics.median(times["cached_step"]), "", ""],
            ["online: teachers (composed)", statistics.median(teacher_part), "", ""],
            [
                "online: teachers + student step + candidate fetch",
                statistics.median(online),
                ratio["median"],
                f"{ratio['min']:.1f}..{ratio['max']:.1f}",
            ],
            [
                "  the same / cached without the fill",
                "",
                ratio_no_fill["median"],
                f"{ratio_no_fill['min']:.1f}..{ratio_no_fill['max']:.1f}",
            ],
        ],  # fmt: skip
    )
    C.print_table(
        f"N student experiments, one epoch of {args.dataset_size} samples (hours on this machine)",
        ["N", "online h", "offline h (1 build + N cached)", "online / offline", "build share of offline"],
        [
            [
                e["experiments"],
                e["online_s"] / 3600,
                e["offline_s"] / 3600,
                e["online_over_offline"],
                e["offline_build_share"],
            ]
            for e in experiments
        ],  # fmt: skip
    )
    if direct is not None:
        C.print_table(
            f"Check of the composition: one real online step with {direct['anchors']} anchors",
            ["images", "captions", "pairs", "teachers measured s", "composed s", "measured / composed"],
            [
                [
                    direct["counts"]["images"],
                    direct["counts"]["texts"],
                    direct["counts"]["pairs_i2t"] + direct["counts"]["pairs_t2i"],
                    direct["measured_teacher_s"],
                    direct["composed_teacher_s"],
                    direct["measured_over_composed"],
                ]
            ],  # fmt: skip
        )
    meets = ratio["median"] >= TARGET
    five = [e for e in experiments if e["experiments"] == 5]
    headline = {
        "online_over_cached": ratio["median"],
        "online_over_cached_no_fill": ratio_no_fill["median"],
        "online_over_offline_5_experiments": five[0]["online_over_offline"] if five else None,
    }
    payload = {
        "benchmark": NAME,
        "machine": info,
        "target": {"ratio_online_vs_cached_min": TARGET},
        "headline": headline,
        "headline_keys": HEADLINE_KEYS,
        "settings": vars(args) | {"teachers": models, "cache_specs": list(specs)},
        "batch": mean_counts,
        "unit_costs_s": {"per_item_median": med_item, "per_item_per_rep": per_item, "batch_timed": unit_sizes},
        "step_s": {
            "cached": cached_steps,
            "cached_without_fill": times["cached_step"],
            "bank_fill_s": t_fill,
            "bank_fill_rows": dict(getattr(getattr(setup.run.bank, "encoder", None), "last_counts", {}) or {}),
            "bank_fill_per_step_s": fill_per_step,
            "online_composed": online,
            "online_teacher_part": teacher_part,
            "cached_parts": parts,
        },  # fmt: skip
        "ratio_online_vs_cached": ratio,
        "ratio_online_vs_cached_no_fill": ratio_no_fill,
        "experiments": {
            "per_sample_s": {
                "online": online_per_sample,
                "cached_student": cached_per_sample,
                "build": build_per_sample,
            },
            "build_efficiency_used": build_eff,
            "build_efficiency_source": eff_source,
            "dataset_size": args.dataset_size,
            "epochs": 1,
            "totals": experiments,
        },  # fmt: skip
        "direct_online_check": direct,
        "verdict": "meets" if meets else "misses",
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
