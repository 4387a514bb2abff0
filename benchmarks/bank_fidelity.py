"""Fidelity of the candidate bank: how close ``--candidates bank`` stays to the exact ``--candidates online`` path.

Two measurements, one process:

1. **Gradient cosine over a run.** A ``bank`` run trains for ``--steps`` steps. Before each of its optimiser steps,
   with the same weights and the same batch (same anchors), the gradient of the top-k terms (``topk_*_loss``) with
   respect to the student's parameters is computed twice, once with candidates from the bank and once with the
   candidates encoded exactly (an ``online`` run's join, weights copied in), both in eval mode (no dropout, BatchNorm
   on running statistics: deterministic). The cosine between the two flattened gradients is recorded per step, and
   the same for the full loss. (The measuring forward also writes its eval-mode anchors into the bank; the training
   step overwrites them with its own.) The gap is split in two by a third gradient, **exact values, candidate side
   detached** (the online candidates with their gradient cut, in-batch anchors kept live, as the bank does):
   ``*_detached_vs_exact`` is what dropping the candidate side's gradient costs, ``*_bank_vs_detached`` what the
   bank's stale values cost (1.0 = the bank's rows equal the current weights' embeddings).
2. **Recall of both.** A second student is trained with ``--candidates online`` from the same initial weights, the
   same seed and data; both are evaluated on the test shards (R@1/5/10, RSUM; ``eval.evaluate_dual``).

Default data: the demo's caches and shards when ``mcad-cache demo run`` has written them (``--demo``), else the
synthetic caches of ``distill_overhead.py`` (random teachers: the gradient cosine is meaningful, recall is not).

Run: ``.venv/bin/python benchmarks/bank_fidelity.py [--quick] [--cache C --cache A --data 'train/*.tar' --test
'test/*.tar'] [--steps N] [--seeds 0,1]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "bank_fidelity"
HEADLINE_KEYS = {
    "topk_grad_cosine_median": "median over steps (and seeds) of cos(bank top-k gradient, exact top-k gradient)",
    "loss_grad_cosine_median": "median over steps (and seeds) of cos(bank full-loss gradient, exact)",
    "topk_grad_cosine_bank_vs_detached_median": "median of cos(bank top-k gradient, exact values with the candidate "
    "side detached): the cost of the bank's stale values alone",
    "topk_grad_cosine_detached_vs_exact_median": "median of cos(exact values, candidate side detached; exact): the "
    "cost of giving the candidate side no gradient alone",
    "rsum_bank_minus_online": "mean over seeds of RSUM(bank student) - RSUM(online student) on the test shards",
}
REQUIRED_FIELDS = ("benchmark", "machine", "headline", "headline_keys", "settings", "per_seed")


def _grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


class DetachedOnlineCandidates:
    """The online candidate source with the candidate side's gradient cut: candidates encoded in the step (exact
    values) but detached, except in-batch ones (index < B: an anchor's live embedding, as ``BankCandidates`` keeps)."""

    online_images = True
    online_texts = True

    def __call__(self, batch: Any, image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[Any, Any]:
        from mcad_cache.distill.forward import ONLINE_CANDIDATES

        b = batch.num_pairs
        topk_text, topk_image = ONLINE_CANDIDATES(batch, image_emb, text_emb)

        def cut(emb: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
            if emb is None or index is None:
                return emb
            live = (index.to(emb.device) < b).unsqueeze(-1)
            return torch.where(live, emb, emb.detach())

        return cut(topk_text, batch.topk_text_index), cut(topk_image, batch.topk_image_index)


def gradients(run: Any, batch: Any, *, candidates: Any = None) -> dict[str, torch.Tensor]:
    """Student-parameter gradients of the top-k terms and of the full loss, eval mode, for one joined batch
    (``candidates``: another candidate source than the run's)."""
    from mcad_cache.distill.forward import distill_forward
    from mcad_cache.runtime import autocast

    def forward(model: Any, loss_module: Any, b: Any) -> dict[str, torch.Tensor]:
        if candidates is None:
            return run.forward(model, loss_module, b)
        return distill_forward(model, loss_module, b, candidates=candidates)

    out = {}
    for name, keep in (("topk", lambda k: k.startswith("topk_")), ("loss", lambda k: k == "loss")):
        run.model.eval()
        run.loss_module.eval()
        run.model.zero_grad(set_to_none=True)
        run.loss_module.zero_grad(set_to_none=True)
        with autocast(run.device, run.config.precision):
            losses = forward(run.model, run.loss_module, batch)
        total = sum(v for k, v in losses.items() if keep(k))
        total.backward()
        out[name] = _grad(run.model).detach().clone()
    run.model.zero_grad(set_to_none=True)
    run.loss_module.zero_grad(set_to_none=True)
    return out


def evaluate(model: Any, test: list[str], *, batch_size: int) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from mcad_cache.data.transforms import make_image_transform
    from mcad_cache.data.webdataset import SampleDataset, collate_samples
    from mcad_cache.eval import encode_retrieval_set, evaluate_dual

    model.eval()
    ds = SampleDataset(test, image_transform=make_image_transform(model.preprocess_cfg))
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_samples)
    return evaluate_dual(encode_retrieval_set(model, loader))["metrics"]


def train(run: Any, steps: int, *, measure: Any = None) -> list[dict[str, float]]:
    """``steps`` optimiser steps of ``run`` over its stream; ``measure(step, raw, batch)`` before each step."""
    from mcad_cache.distill import train_step

    done, epoch, rows = 0, 0, []
    while done < steps:
        for raw in run.stream(epoch):
            batch = run.join(raw, done + 1)
            if measure is not None:
                rows.append(measure(done + 1, raw, batch))
            train_step(run.model, run.loss_module, batch, forward=run.forward, optimizer=run.optimizer,
                       scheduler=run.scheduler, step=done + 1, keys=batch.keys, grad_clip=run.config.grad_clip,
                       device=run.device, precision=run.config.precision)  # fmt: skip
            done += 1
            if done == steps:
                break
        epoch += 1
    return rows


def one_seed(args: Any, seed: int, caches: list[str], data: list[str], test: list[str]) -> dict[str, Any]:
    from mcad_cache.config import DistillConfig
    from mcad_cache.distill import create_distill

    def config(candidates: str) -> DistillConfig:
        return DistillConfig(
            cache=tuple(caches), data=tuple(data), student=args.student, preset=args.preset or C.mcad_preset(),
            k=args.k, batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=min(10, args.steps),
            workers=args.workers, threads=torch.get_num_threads(), seed=seed, candidates=candidates,
            device=args.device, shuffle_buffer=256,
            allow_view_mismatch=True,  # a gradient comparison: the tiny student's view need not be the teachers'
        )  # fmt: skip

    bank = create_distill(config("bank"))
    probe = create_distill(config("online"))  # the exact path, weights copied from the bank run at every step

    def measure(step: int, raw: Any, batch: Any) -> dict[str, float]:
        probe.model.load_state_dict(bank.model.state_dict())
        probe.loss_module.load_state_dict(bank.loss_module.state_dict())
        exact_batch = probe.join(raw, step)
        exact = gradients(probe, exact_batch)
        detached = gradients(probe, exact_batch, candidates=DetachedOnlineCandidates())
        approx = gradients(bank, batch)

        def cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
            return {k: float(torch.nn.functional.cosine_similarity(a[k], b[k], dim=0)) for k in a}

        cos, stale, cut = cosines(exact, approx), cosines(detached, approx), cosines(exact, detached)
        src = bank.bank
        return {"step": step, "topk_cos": cos["topk"], "loss_cos": cos["loss"],
                "topk_cos_bank_vs_detached": stale["topk"], "loss_cos_bank_vs_detached": stale["loss"],
                "topk_cos_detached_vs_exact": cut["topk"], "loss_cos_detached_vs_exact": cut["loss"],
                "bank_age_image": src.last_age.get("image", float("nan")),
                "bank_age_text": src.last_age.get("text", float("nan"))}  # fmt: skip

    print(f"seed {seed}: {args.steps} bank steps with the exact gradient measured at each ...", flush=True)
    rows = train(bank, args.steps, measure=measure)
    out: dict[str, Any] = {"seed": seed, "per_step": rows}
    out["topk_grad_cosine_median"] = statistics.median(r["topk_cos"] for r in rows)
    out["loss_grad_cosine_median"] = statistics.median(r["loss_cos"] for r in rows)
    for name in ("topk_cos_bank_vs_detached", "topk_cos_detached_vs_exact", "loss_cos_bank_vs_detached",
                 "loss_cos_detached_vs_exact"):  # fmt: skip
        out[name + "_median"] = statistics.median(r[name] for r in rows)
    if test:
        del probe
        online = create_distill(config("online"))
        print(f"seed {seed}: {args.steps} online steps (the reference student) ...", flush=True)
        train(online, args.steps)
        out["metrics_bank"] = evaluate(bank.model, test, batch_size=64)
        out["metrics_online"] = evaluate(online.model, test, batch_size=64)
        out["rsum_bank_minus_online"] = out["metrics_bank"]["rsum"] - out["metrics_online"]["rsum"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--cache", action="append", default=[], help="teacher caches (default: see --demo)")
    parser.add_argument("--data", default="", help="training shards (glob)")
    parser.add_argument("--test", default="", help="test shards (glob; empty = no recall)")
    parser.add_argument("--demo", default=".work/demo", help="the demo's work folder (used when it has caches)")
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--preset", default="", help="default: the full MCAD preset on teacher caches")
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.k = 3, 4, 3
    C.setup_run(args)
    device = C.resolve_device(args.device)
    info = C.machine_info()
    C.print_machine(info)
    from mcad_cache.data import expand_shards

    caches, data, test, source = list(args.cache), args.data, args.test, "given"
    demo = Path(args.demo)
    if not caches and (demo / "caches").is_dir() and not args.quick:
        caches = sorted(str(p) for p in (demo / "caches").iterdir() if (p / "zarr.json").is_file())
        data, test, source = str(demo / "shards/train/*.tar"), str(demo / "shards/test/*.tar"), "demo"
    if not caches:
        work = C.scratch_dir(args, "distill-data" + ("-quick" if args.quick else ""))
        n = 48 if args.quick else 1024
        shards = C.make_shards(work / "shards", num_samples=n, per_shard=max(1, n // 4),
                               image_size=(64, 48) if args.quick else (320, 240), seed=args.seed)  # fmt: skip
        specs = ("small-dual", "small-single") if args.quick else ("clip-vit-b-16", "albef-base")
        caches = C.build_synthetic_caches(shards, work, k=args.k, device=device, workers=args.workers, specs=specs)
        data, test, source = str(work / "shards" / "*.tar"), "", "synthetic teachers (recall not measured)"
    data_shards = expand_shards(data)
    test_shards = expand_shards(test) if test else []
    args.device = str(device)
    per_seed = [one_seed(args, int(s), list(caches), data_shards, test_shards) for s in args.seeds.split(",")]
    headline = {
        "topk_grad_cosine_median": statistics.median(r["topk_grad_cosine_median"] for r in per_seed),
        "loss_grad_cosine_median": statistics.median(r["loss_grad_cosine_median"] for r in per_seed),
        "topk_grad_cosine_bank_vs_detached_median": statistics.median(
            r["topk_cos_bank_vs_detached_median"] for r in per_seed
        ),
        "topk_grad_cosine_detached_vs_exact_median": statistics.median(
            r["topk_cos_detached_vs_exact_median"] for r in per_seed
        ),
        "rsum_bank_minus_online": statistics.mean(r["rsum_bank_minus_online"] for r in per_seed)
        if test_shards
        else None,
    }
    rows = [
        [r["seed"], r["topk_grad_cosine_median"], r["topk_cos_bank_vs_detached_median"],
         r["topk_cos_detached_vs_exact_median"], r["loss_grad_cosine_median"],
         r.get("metrics_bank", {}).get("rsum"), r.get("metrics_online", {}).get("rsum")]
        for r in per_seed
    ]  # fmt: skip
    C.print_table(f"Bank fidelity ({source}; {args.steps} steps, batch {args.batch_size}, k {args.k})",
                  ["seed", "top-k grad cos bank vs exact (median)", "bank vs detached (stale values)",
                   "detached vs exact (no candidate grad)", "loss grad cos (median)", "RSUM bank", "RSUM online"],
                  rows)  # fmt: skip
    payload = {
        "benchmark": NAME,
        "machine": info,
        "headline": headline,
        "headline_keys": HEADLINE_KEYS,
        "settings": vars(args) | {"caches": list(caches), "data": data, "test": test, "source": source},
        "per_seed": per_seed,
    }
    C.write_json(NAME + ("_quick" if args.quick else ""), payload, out_dir=args.out or None)
    return payload


if __name__ == "__main__":
    main()
