"""Distillation overhead: an MCAD step from the cache against a plain contrastive step on the same anchors.

The user's question: how much does an MCAD student step cost beside the contrastive step they would otherwise run
on the same batch of pairs with the same student? Answered for both candidate sources (``--candidates``):
``bank`` (candidate embeddings read from the item-indexed bank of student embeddings, ``distill.bank``) and
``online`` (candidates encoded in the step with gradient: the exact reference).

Setup: JPEG WebDataset shards; a CLIP-sized (D=512) and an ALBEF-sized (D=256, fused [CLS] 768, fp16) cache built by
the real build pipeline with a cheap synthetic teacher (the targets' values do not change the step's cost; their
sizes do); the default student (``mobilevitv2_tinybert``: MobileViTv2-050 at 256 px + TinyBERT-4L-312) with the
full MCAD preset that trains from the teacher caches, k = 11, each run wired by ``mcad_cache.distill.create_distill``
(the pipeline's own factory; two runs with the same seed, so the same initial student).

Per repetition (one new stream batch each, the step kinds interleaved in rotating order, median of per-repetition
ratios):

- **mcad_bank**: join the batch with both caches (key checks, cache reads incl. fused features, candidate rows) +
  one optimiser step (student on the anchors, candidates read from the bank, all MCAD losses, backward, AdamW).
- **mcad_online**: the same join plus candidate captions and images fetched from the shards and decoded + one step
  that encodes anchors and candidates with gradient.
- **contrastive_anchors**: one contrastive step on the same B anchor pairs (the comparator).
- **contrastive_with_candidates**: a contrastive step over every image and caption of the online step (kept for the
  breakdown: it isolates the cost of encoding the candidates).

Headline (``headline`` in the JSON; keys in ``HEADLINE_KEYS``): MCAD / contrastive on the same anchors for bank
(target <= 1.3, aim 1.1) and online. The bank's initial fill (one eval-mode pass over every training item) is timed
once and reported amortised over an epoch, beside the headline. The breakdown (data, cache read, candidate fetch,
candidate encoding, losses) and the loader's delivery rate against the student's consumption are kept.

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
TARGET = 1.3  # MCAD step with --candidates bank / contrastive step on the same anchors (issue 11)
AIM = 1.1
HEADLINE_KEYS = {
    "mcad_bank_over_contrastive": "MCAD step (--candidates bank, join included) / contrastive step on the same "
    "anchors; median of per-repetition ratios; target <= 1.3",
    "mcad_online_over_contrastive": "the same with --candidates online (candidates encoded with gradient: exact)",
    "mcad_bank_fill_amortised_over_contrastive": "mcad_bank_over_contrastive with the bank's initial fill spread "
    "over one epoch's steps",
    "mcad_online_over_mcad_bank": "speed-up of the bank over online encoding (median step seconds)",
}
REQUIRED_FIELDS = (
    "benchmark",
    "machine",
    "target",
    "headline",
    "headline_keys",
    "settings",
    "batch",
    "step_s",
    "ratios",
    "breakdown_s",
    "loss_s",
    "bank",
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
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--student", default="mobilevitv2_tinybert")
    parser.add_argument("--loader-batches", type=int, default=0, help="0 = one epoch")
    parser.add_argument(
        "--skip-online",
        action="store_true",
        help="time only the bank step and its comparator (no online run: a fraction of the time and memory)",
    )
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
    common = dict(shards=shards, cache_paths=cache_paths, student=args.student, batch_size=args.batch_size, k=args.k,
                  workers=args.workers, device=device, seed=args.seed)  # fmt: skip
    bank = C.DistillSetup(**common, candidates="bank")
    online = bank if args.skip_online else C.DistillSetup(**common, candidates="online")
    raws = bank.raw_batches(args.reps + 1)
    joined_bank = [bank.join(r, i + 1) for i, r in enumerate(raws)]
    joined = joined_bank if args.skip_online else [online.join(r, i + 1) for i, r in enumerate(raws)]
    counts = [C.batch_counts(b, candidates=online.candidates) for b in joined]

    # the bank's initial fill (every training image and caption, eval mode), timed once; then warm-up steps
    t_fill, _ = C.timed(lambda: bank.run.bank.fill())
    C.sync(device)
    if not args.skip_online:
        online.step(joined[-1], which="mcad", step=1)
        online.step(joined[-1], which="contrastive", step=1)
    bank.step(joined_bank[-1], which="mcad", step=1)
    bank.step(C.anchors_only(joined_bank[-1]), which="contrastive", step=1)

    parts: dict[str, list[float]] = {"join_s": [], "candidate_fetch_s": [], "mcad_train_s": [], "bank_join_s": [],
                                     "bank_train_s": []}  # fmt: skip
    rep = [0]

    def mcad_online() -> None:
        r = rep[0]
        before = online.candidate_images.seconds
        t_join, batch = C.timed(lambda: online.join(raws[r], r + 1))
        parts["candidate_fetch_s"].append(online.candidate_images.seconds - before)
        t_train, _ = C.timed(lambda: online.step(batch, which="mcad", step=r + 2))
        parts["join_s"].append(t_join)
        parts["mcad_train_s"].append(t_train)

    def mcad_bank() -> None:
        r = rep[0]
        t_join, batch = C.timed(lambda: bank.join(raws[r], r + 1))
        t_train, _ = C.timed(lambda: bank.step(batch, which="mcad", step=r + 2))
        parts["bank_join_s"].append(t_join)
        parts["bank_train_s"].append(t_train)

    def con_anchors() -> None:
        bank.step(C.anchors_only(joined_bank[rep[0]]), which="contrastive", step=rep[0] + 2)

    def con_cands() -> None:
        online.step(joined[rep[0]], which="contrastive", step=rep[0] + 2)

    fns = {"mcad_bank": mcad_bank, "contrastive_anchors": con_anchors, "mcad_online": mcad_online,
           "contrastive_with_candidates": con_cands}  # fmt: skip
    if args.skip_online:
        fns = {n: fns[n] for n in ("mcad_bank", "contrastive_anchors")}
    print(f"timing {args.reps} repetition(s): {', '.join(fns)} ...", flush=True)
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(args.reps):
        rep[0] = r
        got = C.interleave({n: fns[n] for n in names[r % len(names) :] + names[: r % len(names)]}, reps=1)
        for n, v in got.items():
            times[n].extend(v)
    nan = float("nan")
    if args.skip_online:  # not measured: NaN through the arithmetic, None in the headline
        times.update({n: [nan] * args.reps for n in ("mcad_online", "contrastive_with_candidates")})
        parts.update({n: [nan] for n in ("join_s", "candidate_fetch_s", "mcad_train_s")})
    med = {n: statistics.median(v) for n, v in times.items()}
    r_bank = C.ratio_stats(times["mcad_bank"], times["contrastive_anchors"])
    r_online = C.ratio_stats(times["mcad_online"], times["contrastive_anchors"])
    r_cands = C.ratio_stats(times["mcad_online"], times["contrastive_with_candidates"])
    steps_per_epoch = max(1, args.num_samples // args.batch_size)
    fill_per_step = t_fill / steps_per_epoch
    r_fill = C.ratio_stats([t + fill_per_step for t in times["mcad_bank"]], times["contrastive_anchors"])
    join, fetch = statistics.median(parts["join_s"]), statistics.median(parts["candidate_fetch_s"])
    loss_fw = (
        dict.fromkeys(
            ("mcad_forward", "contrastive_forward", "mcad_forward_backward", "contrastive_forward_backward"), nan
        )
        if args.skip_online
        else loss_times(online, joined[0], reps=max(5, args.reps))
    )
    loader = loader_rate(online, args.loader_batches)
    consumption = {"online": args.batch_size / med["mcad_online"], "bank": args.batch_size / med["mcad_bank"]}
    losses_extra = loss_fw["mcad_forward_backward"] - loss_fw["contrastive_forward_backward"]
    breakdown = {
        "data_loader_s_per_batch": loader["s_per_batch"],
        "online": {
            "cache_read_and_join_s": join - fetch,
            "candidate_image_fetch_decode_s": fetch,
            "anchor_step_s": med["contrastive_anchors"],
            "candidate_encoding_s": med["contrastive_with_candidates"] - med["contrastive_anchors"],
            "losses_extra_s": losses_extra,
            "mcad_step_total_s": med["mcad_online"],
        },
        "bank": {
            "cache_read_join_and_rows_s": statistics.median(parts["bank_join_s"]),
            "anchor_step_s": med["contrastive_anchors"],
            "losses_extra_s": losses_extra,
            "bank_read_write_and_rest_s": statistics.median(parts["bank_train_s"]) - med["contrastive_anchors"]
            - losses_extra,
            "mcad_step_total_s": med["mcad_bank"],
            "initial_fill_s": t_fill,
            "initial_fill_per_step_over_one_epoch_s": fill_per_step,
        },
    }  # fmt: skip
    headline = {
        "mcad_bank_over_contrastive": r_bank["median"],
        "mcad_online_over_contrastive": None if args.skip_online else r_online["median"],
        "mcad_bank_fill_amortised_over_contrastive": r_fill["median"],
        "mcad_online_over_mcad_bank": None if args.skip_online else med["mcad_online"] / med["mcad_bank"],
    }
    mean_counts = {k: statistics.mean(c[k] for c in counts[: args.reps]) for k in counts[0]}

    C.print_table(
        f"Headline: MCAD step / contrastive step on the same {args.batch_size} anchors (student {args.student}, k "
        f"{args.k}, {args.reps} repetitions, median; target <= {TARGET} with --candidates bank)",
        ["step", "s", "MCAD / contrastive (median)", "min..max"],
        [
            ["contrastive, anchors only (the comparator)", med["contrastive_anchors"], 1.0, ""],
            ["mcad, --candidates bank", med["mcad_bank"], r_bank["median"],
             f"{r_bank['min']:.3f}..{r_bank['max']:.3f}"],
            ["mcad, --candidates bank + fill over 1 epoch", med["mcad_bank"] + fill_per_step, r_fill["median"],
             f"{r_fill['min']:.3f}..{r_fill['max']:.3f}"],
            ["mcad, --candidates online", med["mcad_online"], r_online["median"],
             f"{r_online['min']:.3f}..{r_online['max']:.3f}"],
            ["contrastive over anchors + candidates (breakdown only)", med["contrastive_with_candidates"],
             med["contrastive_with_candidates"] / med["contrastive_anchors"], ""],
        ],
    )  # fmt: skip
    C.print_table(
        "Per batch (mean over the timed batches)", ["what", "count"], [[k, v] for k, v in mean_counts.items()]
    )
    rows = [[f"{kind}: {k}", v, v / breakdown[kind]["mcad_step_total_s"]] for kind in ("online", "bank")
            for k, v in breakdown[kind].items()]  # fmt: skip
    C.print_table("Breakdown of the MCAD steps (seconds, medians)", ["part", "s", "share of that mcad step"], rows)
    C.print_table("Loss modules alone on fixed student outputs (s, median)", ["loss", "s"],
                  [[k, v] for k, v in loss_fw.items()])  # fmt: skip
    C.print_table(
        "Data loader delivery vs student consumption (samples/s)",
        ["loader (workers, no training)", "consumption online", "consumption bank", "loader / bank consumption"],
        [[loader["samples_per_s"], consumption["online"], consumption["bank"],
          loader["samples_per_s"] / consumption["bank"]]],
    )  # fmt: skip
    meets = r_bank["median"] <= TARGET
    payload = {
        "benchmark": NAME,
        "machine": info,
        "target": {"mcad_bank_over_contrastive_max": TARGET, "aim": AIM},
        "headline": headline,
        "headline_keys": HEADLINE_KEYS,
        "settings": vars(args)
        | {
            "student_params": online.num_params,
            "preset": online.run.config.preset,
            "cache_specs": list(specs),
            "caches_build_or_reuse_s": t_caches,
        },  # fmt: skip
        "batch": mean_counts,
        "step_s": {"median": med, "per_rep": times, "parts_per_rep": parts},
        "ratios": {
            "mcad_bank_over_contrastive": r_bank,
            "mcad_online_over_contrastive": r_online,
            "mcad_bank_fill_amortised_over_contrastive": r_fill,
            "mcad_online_over_contrastive_with_candidates": r_cands,
        },
        "breakdown_s": breakdown,
        "loss_s": loss_fw,
        "bank": {
            "initial_fill_s": t_fill,
            "initial_fill_rows": dict(getattr(bank.run.bank.encoder, "last_counts", {}) or {}),
            "steps_per_epoch": steps_per_epoch,
            "rows": {
                "images": int(bank.run.bank.bank.image_emb.shape[0]),
                "texts": int(bank.run.bank.bank.text_emb.shape[0]),
            },
        },  # fmt: skip
        "loader": loader
        | {
            "student_consumption_samples_per_s": consumption,
            "loader_over_bank_consumption": loader["samples_per_s"] / consumption["bank"],
        },  # fmt: skip
        "verdict": "meets" if meets else "misses",
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
