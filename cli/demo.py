"""``mcad-cache demo``: the main job end to end on real data (Open Clip Art Library), offline."""

from __future__ import annotations

from typing import Annotated

import typer

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
from mcad_cache.config import DemoConfig, load_config


@app.command("demo")
def demo(
    work: Annotated[str, typer.Option(help="folder for everything the demo writes")] = None,
    max_samples: Annotated[int, typer.Option(help="0 = all usable openclipart images; N = the first N")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps per student")] = None,
    batch_size: Annotated[int, typer.Option(help="pairs per student step")] = None,
    k: Annotated[int, typer.Option("--k", help="top-k candidates cached and used")] = None,
    student: Annotated[str, typer.Option(help="student config name or JSON path")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = None,
    seed: Annotated[int, typer.Option(help="seed of split, teachers, student init, shuffling")] = None,
    seeds: Annotated[str, typer.Option(help="seed study: comma-separated student seeds, e.g. 0,1,2")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads for distill (0 = torch's default)")] = None,
    config: Annotated[str, typer.Option("--config", help="run.json with DemoConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Import real data, prepare offline teachers, build both caches, distill MCAD and contrastive students,
    evaluate all four on the test split and write report.md. A second run reuses every finished step."""
    setup_logging(verbose)
    from mcad_cache.pipelines import demo as pipeline

    cfg = call_pipeline(
        load_config, DemoConfig, config, work=work, max_samples=max_samples, steps=steps, batch_size=batch_size,
        k=k, student=student, workers=workers, seed=seed, threads=threads,
        seeds=[int(x) for x in seeds.split(",") if x.strip()] if seeds else None,
    )  # fmt: skip
    summary = call_pipeline(pipeline.run, cfg, progress=progress)
    console.print(f"report: {summary['report']}")
