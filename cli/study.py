"""``mcad-cache study``: presets x paired seeds from the same caches; paired Δ RSUM with statistics (issue 12)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging, user_error
from mcad_cache.config import load_config


@app.command("study")
def study(
    cache: Annotated[
        list[str], typer.Option("--cache", help="teacher cache (repeat: one CLIP, one ALBEF/BLIP)")
    ] = None,
    targets: Annotated[
        str, typer.Option(help="derived cache (`mcad-cache integrate`) the fixed-target presets (mcad) read")
    ] = None,
    data: Annotated[list[str], typer.Option("--data", help="training shards (paths, globs, brace patterns)")] = None,
    test: Annotated[list[str], typer.Option("--test", help="test shards every run is evaluated on")] = None,
    val: Annotated[list[str], typer.Option("--val", help="val shards (frozen towers: the val curve)")] = None,
    out: Annotated[str, typer.Option(help="study folder (finished runs in it are reused)")] = None,
    frozen_towers: Annotated[
        bool, typer.Option("--frozen-towers/--no-frozen-towers", help="towers run once per split; projections train")
    ] = None,
    presets: Annotated[
        list[str], typer.Option("--preset", help="loss preset (repeat); default: the five core presets")
    ] = None,
    seeds: Annotated[int, typer.Option(help="paired seeds 0..N-1; a rerun with more adds only the new runs")] = None,
    target: Annotated[str, typer.Option(help="preset compared against every other one")] = None,
    baseline: Annotated[str, typer.Option(help="no-teacher preset of the first headline line")] = None,
    target_mde: Annotated[float, typer.Option(help="RSUM points to detect at 80 % power")] = None,
    student: Annotated[str, typer.Option(help="student config name or JSON path")] = None,
    k: Annotated[int, typer.Option("--k", help="top-k candidates used (<= the caches' k)")] = None,
    batch_size: Annotated[int, typer.Option(help="image-caption pairs per step")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps per run")] = None,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = None,
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast on CUDA only)")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = default)")] = None,
    loss: Annotated[str, typer.Option(help="LossConfig overrides as JSON for every preset")] = None,
    config: Annotated[str, typer.Option("--config", help="JSON with StudyConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train every preset once per paired seed, evaluate each on the test split, report paired Δ RSUM (95 % t-interval,
    Wilcoxon p, Holm), the minimal detectable Δ, plots and wall times (study.md, study.json)."""
    setup_logging(verbose)
    from mcad_cache.pipelines import study as pipeline

    try:
        loss_overrides = json.loads(loss) if loss else None
    except json.JSONDecodeError as err:
        raise user_error(ValueError(f"--loss is not valid JSON ({err}); e.g. '{{\"w_feat\": 0.5}}'")) from err
    cfg = call_pipeline(
        load_config, pipeline.StudyConfig, config, cache=cache or None, targets=targets, data=data or None, test=test or None,
        val=val or None, frozen_towers=frozen_towers, out=out, presets=presets or None, seeds=seeds, target=target,
        baseline=baseline, target_mde=target_mde,
        student=student, k=k, batch_size=batch_size, steps=steps, lr=lr, warmup_steps=warmup_steps,
        workers=workers, device=device, precision=precision, threads=threads, loss=loss_overrides,
    )  # fmt: skip
    summary = call_pipeline(pipeline.run, cfg, progress=progress)
    for line in summary["headline"]:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"report: {summary['report']['md']} ({summary['wall_s']:.0f} s)", highlight=False)
