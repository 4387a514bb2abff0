"""``mcad-cache demo run`` (the main job end to end on real data, offline) and ``mcad-cache demo teachers`` (train
the offline demo teachers once). The demo app lives in ``mcad_cache.demo``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
from mcad_cache.cli.options import explicit_flags
from mcad_cache.config import load_config
from mcad_cache.demo.config import DemoConfig, TeachersConfig

demo_app = typer.Typer(
    help="The demo app: real data (Open Clip Art Library), offline teachers, both caches, students, report.",
    no_args_is_help=True,
)
app.add_typer(demo_app, name="demo")
DEMO, TEACH = DemoConfig(), TeachersConfig()  # defaults shown in --help; flag > file > default


@demo_app.command("run")
def run(
    ctx: typer.Context,
    work: Annotated[str, typer.Option(metavar="DIR", help="folder for everything the demo writes")] = DEMO.work,
    quick: Annotated[bool, typer.Option("--quick", help="the whole flow at test size (seconds, not minutes)")] = False,
    max_samples: Annotated[
        int, typer.Option(metavar="N", help="0 = all usable openclipart images; N = the first N")
    ] = DEMO.max_samples,
    train_images: Annotated[
        int, typer.Option(metavar="N", help="first N train images for caches and students (0 = all)")
    ] = DEMO.train_images,
    steps: Annotated[int, typer.Option(metavar="N", help="optimiser steps per student")] = DEMO.steps,
    batch_size: Annotated[int, typer.Option(metavar="N", help="pairs per student step")] = DEMO.batch_size,
    k: Annotated[int, typer.Option("--k", metavar="N", help="top-k candidates cached")] = DEMO.k,
    k_test: Annotated[int, typer.Option(metavar="N", help="teachers' test eval: ITM re-rank depth")] = DEMO.k_test,
    student: Annotated[str, typer.Option(metavar="NAME|PATH", help="student config name or JSON path")] = DEMO.student,
    workers: Annotated[int, typer.Option(metavar="N", help="DataLoader worker processes")] = DEMO.workers,
    seed: Annotated[int, typer.Option(metavar="N", help="seed of split and teachers")] = DEMO.seed,
    seeds: Annotated[
        int, typer.Option(metavar="N", help="paired student seeds per preset (>= 10 for the study's power)")
    ] = DEMO.seeds,
    threads: Annotated[int, typer.Option(metavar="N", help="torch CPU threads (0 = torch's default)")] = DEMO.threads,
    jobs: Annotated[
        int, typer.Option(metavar="N", help="processes at a time: study runs; > 1 also evaluates the teachers beside")
    ] = DEMO.jobs,
    config: Annotated[str, typer.Option("--config", metavar="FILE", help="run.json with DemoConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Import real data, prepare offline teachers, build both caches, evaluate the teachers, run the paired study
    (presets x seeds, frozen-tower students) and write report.md. A second run reuses every finished step."""
    setup_logging(verbose)
    from mcad_cache.demo import run as pipeline
    from mcad_cache.demo.config import QUICK

    flags = explicit_flags(ctx)
    flags.pop("quick", None)
    base = {**QUICK, "work": ".work/demo-quick"} if quick else {}
    cfg = call_pipeline(load_config, DemoConfig, config, **{**base, **flags})  # flag > --quick > file > default
    summary = call_pipeline(pipeline.run, cfg, progress=progress)
    for line in summary["headline"]:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"report: {summary['report']} ({summary['timings_s']['total_s']:.0f} s)", highlight=False)


@demo_app.command("teachers")
def teachers(
    ctx: typer.Context,
    train: Annotated[
        list[str], typer.Option(metavar="SHARDS", help="training shards or a folder of shard-*.tar (repeatable)")
    ] = None,
    val: Annotated[list[str], typer.Option(metavar="SHARDS", help="validation shards or a folder (repeatable)")] = None,
    out: Annotated[str, typer.Option(metavar="DIR", help="output folder: clip/, albef/, teachers.json")] = TEACH.out,
    max_train_images: Annotated[
        int, typer.Option(metavar="N", help="first N usable training images (0 = all)")
    ] = TEACH.max_train_images,
    max_val_images: Annotated[
        int, typer.Option(metavar="N", help="first N usable validation images (0 = all)")
    ] = TEACH.max_val_images,
    image_size_px: Annotated[
        int, typer.Option(metavar="N", help="square input size of both teachers, pixels")
    ] = TEACH.image_size_px,
    embed_dim: Annotated[int, typer.Option(metavar="N", help="ITC embedding width")] = TEACH.embed_dim,
    dual_mode: Annotated[
        str, typer.Option(metavar="MODE", help="auto | bridge | tuned | bridge+tuned")
    ] = TEACH.dual_mode,
    dual_steps: Annotated[int, typer.Option(metavar="N", help="dual-stream tuning steps")] = TEACH.dual_steps,
    albef_steps: Annotated[
        int, typer.Option(metavar="N", help="single-stream ITC + ITM tuning steps")
    ] = TEACH.albef_steps,
    fusion_layers: Annotated[
        int, typer.Option(metavar="N", help="ALBEF fusion layers after MiniLM's 6")
    ] = TEACH.fusion_layers,
    workers: Annotated[
        int, typer.Option(metavar="N", help="DataLoader worker processes decoding images")
    ] = TEACH.workers,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto | cpu | cuda | cuda:N")] = TEACH.device,
    seed: Annotated[int, typer.Option(metavar="N", help="seed of heads init, batches and negative draws")] = TEACH.seed,
    force: Annotated[bool, typer.Option("--force", help="prepare again even when up to date")] = TEACH.force,
    config: Annotated[str, typer.Option("--config", metavar="FILE", help="run.json with TeachersConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Tune the offline demo teachers (open_clip EfficientNet-Lite0 + MiniLM; ALBEF-architecture with the same
    towers) on the train shards once and save them in the real clip / albef formats, with their val recall."""
    setup_logging(verbose)
    from mcad_cache.demo import prepare_teachers

    cfg = call_pipeline(load_config, TeachersConfig, config, **explicit_flags(ctx))
    report = call_pipeline(prepare_teachers.run, cfg, progress=progress)
    summary = {
        name: {"model": report[name]["model"], "pretrained": report[name]["pretrained"], "val": report[name]["val"]}
        for name in ("clip", "albef")
    }
    console.print_json(json.dumps({"reused": report["reused"], **summary}))
