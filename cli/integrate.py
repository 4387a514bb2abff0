"""``mcad-cache integrate``: the offline integration stage between ``build`` and ``distill`` (docs/losses.md)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging, user_error
from mcad_cache.config import load_config
from mcad_cache.pipelines import integrate as pipeline


@app.command("integrate")
def integrate(
    cache: Annotated[list[str], typer.Option("--cache", help="parent cache (twice: one CLIP, one ALBEF/BLIP)")] = None,
    out: Annotated[str, typer.Option(help="derived target cache to write (reused if made the same way)")] = None,
    integration: Annotated[
        str, typer.Option(help="modified-features | logit-fusion | mixture | none (CLIP-only control)")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="candidates per query written (0 = the parents' k)")] = None,
    force_positive: Annotated[
        bool, typer.Option("--force-positive/--no-force-positive", help="best-ITM positive into a list without one")
    ] = None,
    steps: Annotated[int, typer.Option(help="max optimiser steps of the module")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the module")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay of the module")] = None,
    batch_size: Annotated[int, typer.Option(help="anchor pairs per step")] = None,
    holdout_fraction: Annotated[float, typer.Option(help="image rows held out for early stopping")] = None,
    eval_every: Annotated[int, typer.Option(help="steps between held-out evaluations")] = None,
    patience: Annotated[int, typer.Option(help="evaluations without improvement before stopping")] = None,
    seed: Annotated[int, typer.Option(help="split, batch order, module init")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = default)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a derived cache made differently")] = None,
    loss: Annotated[str, typer.Option(help="integration fields of LossConfig as JSON, e.g. '{\"tau_itm\": 2}'")] = None,
    config: Annotated[str, typer.Option("--config", help="JSON with IntegrateConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the integration module once on the cached teacher quantities and write its targets as a derived cache
    (then: distill --preset mcad --cache OUT). Prints the diagnostics: gates, KL to CLIP-only, ITM agreement."""
    setup_logging(verbose)
    try:
        loss_overrides = json.loads(loss) if loss else None
    except json.JSONDecodeError as err:
        raise user_error(ValueError(f"--loss is not valid JSON ({err}); e.g. '{{\"tau_itm\": 2.0}}'")) from err
    cfg = call_pipeline(
        load_config, pipeline.IntegrateConfig, config, cache=tuple(cache) if cache else None, out=out,
        integration=integration, k=k, force_positive=force_positive, steps=steps, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, holdout_fraction=holdout_fraction, eval_every=eval_every, patience=patience, seed=seed,
        device=device, threads=threads, overwrite=overwrite, loss=loss_overrides,
    )  # fmt: skip
    result = call_pipeline(pipeline.run, cfg, progress=progress)
    d = result.diagnostics
    if result.status == "complete":
        console.print(f"derived cache {result.path} is already complete for these parents and settings")
    table = Table(title=f"integrate {d.get('integration')} -> {result.path} ({result.status}, {result.seconds:.1f} s)")
    for col in ("", "i2t", "t2i"):
        table.add_column(col)
    for label, key in (
        ("KL(target ‖ CLIP-only)", "kl_target_clip"),
        ("KL(CLIP-only ‖ ITM) before", "kl_clip_itm"),
        ("KL(target ‖ ITM) after", "kl_target_itm"),
        ("top-1 = ITM top-1 before", "top1_agree_before"),
        ("top-1 = ITM top-1 after", "top1_agree_after"),
        ("Spearman with ITM before", "spearman_before"),
        ("Spearman with ITM after", "spearman_after"),
        ("forced positives", "forced_positives"),
    ):
        table.add_row(label, *(_fmt(d.get(dd, {}).get(key)) for dd in ("i2t", "t2i")))
    console.print(table)
    if "gate_image" in d:
        console.print(
            f"gates: image {d['gate_image']:.4f}, text {d['gate_text']:.4f}; steps {d['steps_run']} "
            f"(best held-out at {d['best_step']}{', stopped early' if d['stopped_early'] else ''})"
        )
    typer.echo(json.dumps({"path": str(result.path), "status": result.status}))


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))
