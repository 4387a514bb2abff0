"""``mcad-cache study``: presets x paired seeds from the same caches; paired Δ RSUM with statistics (issue 12)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging, user_error
from mcad_cache.cli.options import (
    FORMAT_HELP,
    PRECISION,
    Format,
    choice,
    device_option,
    explicit_flags,
    print_json,
    render_rows,
)
from mcad_cache.config import load_config
from mcad_cache.pipelines.study import StudyConfig

S = StudyConfig()  # defaults shown in --help; a --config file overrides them, typed flags override both

ROW_COLUMNS = ("arm", "runs", "rsum_mean", "rsum_std", "delta", "ci_low", "ci_high", "wilcoxon_p", "holm_p", "mde")


def summary_rows(summary: dict) -> list[dict]:
    """One row per arm: mean ± std RSUM over its seeds and its paired Δ against the target (the target's row has no
    Δ), in the study's order; numbers rounded for reading (study.json keeps them whole)."""
    comps = {c["b"]: c for c in summary["comparisons"]}
    rows = []
    for name, arm in summary["presets"].items():
        rsum = arm["metrics"][summary["metric"]]
        row = {
            "arm": name,
            "runs": arm["num_runs"],
            "rsum_mean": round(rsum["mean"], 2),
            "rsum_std": round(rsum["std"], 2),
        }
        c = comps.get(name)
        if c is not None:  # Δ = target − this arm
            row |= {k: round(c[src], 2) for k, src in (("delta", "mean_delta"), ("ci_low", "ci_low"),
                                                      ("ci_high", "ci_high"), ("mde", "mde"))}  # fmt: skip
            row |= {"wilcoxon_p": f"{c['wilcoxon_p']:.3g}", "holm_p": f"{c['wilcoxon_p_holm']:.3g}"}
        rows.append(row)
    return rows


@app.command("study")
def study(
    ctx: typer.Context,
    cache: Annotated[
        list[str], typer.Option("--cache", help="teacher cache (repeat: one CLIP, one ALBEF/BLIP)")
    ] = None,
    targets: Annotated[
        str, typer.Option(help="derived cache (`mcad-cache integrate`) the fixed-target presets (mcad) read")
    ] = None,
    data: Annotated[list[str], typer.Option("--data", help="training shards (paths, globs, brace patterns)")] = None,
    test: Annotated[list[str], typer.Option("--test", help="test shards every run is evaluated on")] = None,
    val: Annotated[list[str], typer.Option("--val", help="val shards (frozen towers: the val curve)")] = None,
    out: Annotated[str, typer.Option(help="study folder (finished runs in it are reused)")] = S.out,
    frozen_towers: Annotated[
        bool, typer.Option("--frozen-towers/--no-frozen-towers", help="towers run once per split; projections train")
    ] = S.frozen_towers,
    presets: Annotated[
        list[str],
        typer.Option(
            "--preset",
            "--arm",
            help="arm (repeat): a loss preset, or [LABEL=]PRESET@KEY=VALUE,... (a preset plus loss / run overrides, "
            "e.g. clip-kd@views=4, bank=clip-kd@w_topk_i2t=0.5,candidates=bank); default: the five core presets",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(help="paired seeds 0..N-1; a rerun with more adds only the new runs")] = S.seeds,
    target: Annotated[str, typer.Option(help="preset compared against every other one")] = S.target,
    baseline: Annotated[str, typer.Option(help="no-teacher preset of the first headline line")] = S.baseline,
    target_mde: Annotated[float, typer.Option(help="RSUM points to detect at 80 % power")] = S.target_mde,
    student: Annotated[str, typer.Option(help="student config name or JSON path")] = S.student,
    k: Annotated[int, typer.Option("--k", help="top-k candidates used (<= the caches' k)")] = S.k,
    batch_size: Annotated[int, typer.Option(help="image-caption pairs per step")] = S.batch_size,
    steps: Annotated[int, typer.Option(help="optimiser steps per run")] = S.steps,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = S.lr,
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = S.warmup_steps,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = S.workers,
    device: Annotated[str, device_option("where the students train")] = S.device,
    precision: Annotated[str, choice(PRECISION, "autocast precision (CUDA only; auto = bf16 there)")] = S.precision,
    threads: Annotated[int, typer.Option(help="torch threads per run (0 = default; --jobs: cpus/jobs)")] = S.threads,
    jobs: Annotated[int, typer.Option(help="runs at a time, in worker processes (same results)")] = S.jobs,
    loss: Annotated[str, typer.Option(help="LossConfig overrides as JSON for every preset")] = None,
    config: Annotated[str, typer.Option("--config", help="JSON with StudyConfig fields")] = None,
    fmt: Annotated[
        Format, typer.Option("--format", help=FORMAT_HELP + "; table/csv/md: one row per arm")
    ] = Format.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train every arm (a preset, or a preset with overrides) once per paired seed, evaluate each on the test split,
    report paired Δ RSUM of the target against every other arm (95 % t-interval, Wilcoxon p, Holm), the minimal
    detectable Δ, plots and wall times (study.md, study.json). The result is on stdout (--format), logs on stderr."""
    setup_logging(verbose)
    from mcad_cache.pipelines import study as pipeline

    try:
        loss_overrides = json.loads(loss) if loss else None
    except json.JSONDecodeError as err:
        raise user_error(ValueError(f"--loss is not valid JSON ({err}); e.g. '{{\"w_feat\": 0.5}}'")) from err
    flags = explicit_flags(ctx)
    if loss_overrides is not None:
        flags["loss"] = loss_overrides
    cfg = call_pipeline(load_config, pipeline.StudyConfig, config, **flags)
    summary = call_pipeline(pipeline.run, cfg, progress=progress)
    for line in summary["headline"]:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"report: {summary['report']['md']} ({summary['wall_s']:.0f} s)", highlight=False)
    if fmt is Format.json:
        print_json(summary)
    else:
        title = f"study: Δ RSUM = {summary['target']} − arm, {len(summary['seeds'])} paired seeds"
        render_rows(summary_rows(summary), ROW_COLUMNS, fmt, title=title)
