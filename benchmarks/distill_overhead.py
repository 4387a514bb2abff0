"""Distillation overhead: an MCAD step from the cache against plain contrastive steps of the same student.

Setup: JPEG WebDataset shards; a CLIP-sized (D=512) and an ALBEF-sized (D=256, fused [CLS] 768, fp16) cache built by
the real build pipeline with a cheap synthetic teacher (the targets' values do not change the step's cost; their
sizes do); the default student (``mobilevitv2_tinybert``: MobileViTv2-050 at 256 px + TinyBERT-4L-312) with the
``mcad`` loss preset, k = 11, wired by ``mcad_cache.distill.create_distill`` (the pipeline's factory).

Per repetition (one new stream batch each, interleaved, median of per-repetition ratios):

- **mcad**: join the batch with both caches (key checks, cache reads incl. fused features, candidate ids -> caption
  strings and candidate images fetched from the shards and decoded) + one optimiser step (student forward on anchors
  and candidates, all MCAD losses, backward, AdamW).
- **contrastive_with_candidates**: one step of the same student over the same images and captions (anchors and
  candidates, already decoded), contrastive loss only.
- **contrastive_anchors**: one step on the B anchor pairs alone.

Ratios: mcad / contrastive_with_candidates (target <= 1.1) and mcad / contrastive_anchors with a breakdown (data,
cache read, candidate image fetch, candidate encoding, losses). Because the steps are long and the machine shared,
a second estimate adds the MCAD-only work, measured directly (join, candidate fetch, the MCAD losses' extra
forward + backward on fixed student outputs), to the contrastive step with candidates. The data loader's delivery
rate (``EpochStream`` with DataLoader workers, no training) is compared with the student's consumption rate
(samples per MCAD step second).

Run: ``.venv/bin/python benchmarks/distill_overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "distill_overhead"
TARGET = 1.1
REQUIRED_FIELDS = (
    "benchmark",
    "machine",
    "target",
    "settings",
    "batch",
    "step_s",
    "ratio_mcad_vs_contrastive_with_candidates",
    "ratio_mcad_vs_contrastive_anchors",
    "breakdown_s",
    "loss_s",
    "ratio_from_components",
    "loader",
    "verdict",
)


def loss_times(setup: C.DistillSetup, batch: Any, reps: int) -> dict[str, float]:
    """Time of the two loss modules alone on fixed student outputs, median of ``reps`` interleaved repetitions:
    forward only, and forward + backward (into the student outputs, as leaves, and the loss modules' own
    parameters: feature heads, integration module)."""
    from mcad_cache.losses import StudentOutputs

    model, dev = setup.model, setup.device
    with torch.no_grad():
        images = batch.images if batch.extra_images is None else torch.cat([batch.images, batch.extra_images])
        image_emb, image_feat = model.forward_image(images.to(dev))
        tok = model.tokenize(batch.texts)
        text_emb, text_feat = model.forward_text(tok["input_ids"].to(dev), tok["attention_mask"].to(dev))
    b = batch.num_pairs
    targets = batch.targets.to(dev)

    def outputs(grad: bool) -> StudentOutputs:
        ie, te = image_emb.clone().requires_grad_(grad), text_emb.clone().requires_grad_(grad)
        return StudentOutputs(image_emb=ie[:b], text_emb=te[:b], logit_scale=model.logit_scale.detach().clone(),
                              image_feat=image_feat[:b], text_feat=text_feat[:b],
                              topk_text_emb=te[batch.topk_text_index.to(dev)],
                              topk_image_emb=ie[batch.topk_image_index.to(dev)])  # fmt: skip

    def forward(loss_module: Any) -> None:
        with torch.no_grad():
            loss_module(outputs(False), targets)
        C.sync(dev)

    def forward_backward(loss_module: Any) -> None:
        loss_module.zero_grad(set_to_none=True)
        loss_module(outputs(True), targets)["loss"].backward()
        C.sync(dev)

    times = C.interleave(
        {
            "mcad_forward": lambda: forward(setup.mcad_loss),
            "contrastive_forward": lambda: forward(setup.con_loss),
            "mcad_forward_backward": lambda: forward_backward(setup.mcad_loss),
            "contrastive_forward_backward": lambda: forward_backward(setup.con_loss),
        },
        reps=reps,
    )
    return {k: statistics.median(v) for k, v in times.items()}


def loader_rate(setup: C.DistillSetup, num_batches: int) -> dict[str, Any]:
    """Batches and samples per second that ``EpochStream`` (DataLoader workers decode and resize, the main process
    shuffles and collates) delivers over ``num_batches`` batches (0 = one epoch), no training. The time includes
    worker start-up and the shuffle buffer's fill."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in setup.stream(1):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
        if n == num_batches:
            break
    total = time.perf_counter() - t0
    return {
        "batches": n,
        "first_batch_s": first,
        "total_s": total,
        "s_per_batch": total / max(1, n),
        "samples_per_s": n * setup.batch_size / total,
        "workers": setup.stream.workers,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--num-samples", type=int, default=1024, help="dataset size (sets how many candidates repeat)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--student", default="mobilevitv2_tinybert")
    parser.add_argument("--loader-batches", type=int, default=0, help="0 = one epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.batch_size, args.k, args.reps, args.workers = 48, 4, 3, 1, 0
        args.student, args.loader_batches = "tiny", 0
    C.setup_run(args)
    device = C.resolve_device(args.device)
    work = C.scratch_dir(args, "distill-data" + ("-quick" if args.quick else ""))  # shared with offline_vs_online
    info = C.machine_info()
    C.print_machine(info)

    size = (64, 48) if args.quick else (320, 240)
    shards = C.make_shards(work / "shards", num_samples=args.num_samples, per_shard=max(1, args.num_samples // 4),
                           image_size=size, seed=args.seed)  # fmt: skip
    specs = ("small-dual", "small-single") if args.quick else ("clip-vit-b-16", "albef-base")
    print(f"building synthetic caches {specs} over {args.num_samples} samples (reused when present) ...", flush=True)
    t_caches, cache_paths = C.timed(lambda: C.build_synthetic_caches(shards, work, k=args.k, device=device,
                                                                     workers=args.workers, specs=specs))  # fmt: skip
    setup = C.DistillSetup(shards=shards, cache_paths=cache_paths, student=args.student, batch_size=args.batch_size,
                           k=args.k, workers=args.workers, device=device, seed=args.seed)  # fmt: skip
    raws = setup.raw_batches(args.reps + 1)
    joined = [setup.join(r, i + 1) for i, r in enumerate(raws)]
    counts = [C.batch_counts(b) for b in joined]

    # warm-up: one step of each kind (optimiser state allocation, first-call costs), not timed
    setup.step(joined[-1], which="mcad", step=1)
    setup.step(joined[-1], which="contrastive", step=1)
    setup.step(C.anchors_only(joined[-1]), which="contrastive", step=1)

    parts: dict[str, list[float]] = {"join_s": [], "candidate_fetch_s": [], "mcad_train_s": []}
    rep = [0]

    def mcad() -> None:
        r = rep[0]
        before = setup.candidate_images.seconds
        t_join, batch = C.timed(lambda: setup.join(raws[r], r + 1))
        fetch = setup.candidate_images.seconds - before
        t_train, _ = C.timed(lambda: setup.step(batch, which="mcad", step=r + 2))
        parts["join_s"].append(t_join)
        parts["candidate_fetch_s"].append(fetch)
        parts["mcad_train_s"].append(t_train)

    def con_cands() -> None:
        setup.step(joined[rep[0]], which="contrastive", step=rep[0] + 2)

    def con_anchors() -> None:
        setup.step(C.anchors_only(joined[rep[0]]), which="contrastive", step=rep[0] + 2)

    print(f"timing {args.reps} repetition(s): mcad step, contrastive with candidates, contrastive anchors ...",
          flush=True)  # fmt: skip
    times: dict[str, list[float]] = {"mcad": [], "contrastive_with_candidates": [], "contrastive_anchors": []}
    fns = {"mcad": mcad, "contrastive_with_candidates": con_cands, "contrastive_anchors": con_anchors}
    for r in range(args.reps):
        rep[0] = r
        got = C.interleave({n: fns[n] for n in list(fns)[r % 3 :] + list(fns)[: r % 3]}, reps=1)
        for n, v in got.items():
            times[n].extend(v)
    r_cands = C.ratio_stats(times["mcad"], times["contrastive_with_candidates"])
    r_anchors = C.ratio_stats(times["mcad"], times["contrastive_anchors"])
    med = {n: statistics.median(v) for n, v in times.items()}
    join, fetch = statistics.median(parts["join_s"]), statistics.median(parts["candidate_fetch_s"])
    loss_fw = loss_times(setup, joined[0], reps=max(5, args.reps))
    loader = loader_rate(setup, args.loader_batches)
    consumption = args.batch_size / med["mcad"]
    breakdown = {
        "data_loader_s_per_batch": loader["s_per_batch"],
        "cache_read_and_join_s": join - fetch,
        "candidate_image_fetch_decode_s": fetch,
        "anchor_step_s": med["contrastive_anchors"],
        "candidate_encoding_s": med["contrastive_with_candidates"] - med["contrastive_anchors"],
        "losses_extra_s": loss_fw["mcad_forward_backward"] - loss_fw["contrastive_forward_backward"],
        "mcad_step_total_s": med["mcad"],
    }
    # The MCAD-only work measured directly (small, so hardly touched by machine noise): cache read + join, candidate
    # image fetch, and the MCAD losses' extra forward + backward. Added to the contrastive step with candidates, it
    # gives a second, low-noise estimate of the ratio.
    mcad_only = join + breakdown["losses_extra_s"]
    ratio_components = (med["contrastive_with_candidates"] + mcad_only) / med["contrastive_with_candidates"]
    mean_counts = {k: statistics.mean(c[k] for c in counts[: args.reps]) for k in counts[0]}

    C.print_table(
        f"Distillation step (batch {args.batch_size}, k {args.k}, student {args.student}, dataset "
        f"{args.num_samples} samples, {args.reps} repetitions, median)",
        ["step", "s", "ratio mcad / this (median)", "min..max"],
        [
            ["mcad (join + step)", med["mcad"], 1.0, ""],
            [
                "contrastive, same images + captions (candidates incl.)",
                med["contrastive_with_candidates"],
                r_cands["median"],
                f"{r_cands['min']:.3f}..{r_cands['max']:.3f}",
            ],
            [
                "contrastive, anchors only",
                med["contrastive_anchors"],
                r_anchors["median"],
                f"{r_anchors['min']:.3f}..{r_anchors['max']:.3f}",
            ],
        ],  # fmt: skip
    )
    C.print_table(
        "Per batch (mean over the timed batches)", ["what", "count"], [[k, v] for k, v in mean_counts.items()]
    )
    C.print_table("Breakdown of the MCAD step (seconds, medians)", ["part", "s", "share of mcad step"],
                  [[k, v, v / med["mcad"]] for k, v in breakdown.items()])  # fmt: skip
    C.print_table("Loss modules alone on fixed student outputs (s, median)", ["loss", "s"],
                  [[k, v] for k, v in loss_fw.items()])  # fmt: skip
    C.print_table(
        "Low-noise estimate: contrastive step with candidates + MCAD-only work measured directly",
        ["MCAD-only s (join + fetch + extra loss fwd/bwd)", "contrastive with candidates s", "estimated ratio"],
        [[mcad_only, med["contrastive_with_candidates"], ratio_components]],
    )
    C.print_table(
        "Data loader delivery vs student consumption (samples/s)",
        ["loader (workers, no training)", "student consumption (mcad steps)", "loader / consumption"],
        [[loader["samples_per_s"], consumption, loader["samples_per_s"] / consumption]],
    )
    meets = r_cands["median"] <= TARGET
    payload = {
        "benchmark": NAME,
        "machine": info,
        "target": {"ratio_mcad_vs_contrastive_with_candidates_max": TARGET},
        "settings": vars(args)
        | {
            "student_params": setup.num_params,
            "cache_specs": list(specs),
            "caches_build_or_reuse_s": t_caches,
        },  # fmt: skip
        "batch": mean_counts,
        "step_s": {"median": med, "per_rep": times, "mcad_parts_per_rep": parts},
        "ratio_mcad_vs_contrastive_with_candidates": r_cands,
        "ratio_mcad_vs_contrastive_anchors": r_anchors,
        "breakdown_s": breakdown,
        "loss_s": loss_fw,
        "mcad_only_s": mcad_only,
        "ratio_from_components": ratio_components,
        "loader": loader
        | {
            "student_consumption_samples_per_s": consumption,
            "loader_over_consumption": loader["samples_per_s"] / consumption,
        },  # fmt: skip
        "verdict": "meets" if meets else "misses",
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
