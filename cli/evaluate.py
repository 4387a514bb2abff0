"""``mcad-cache eval`` (retrieval R@K / RSUM of a student, teacher or cache) and ``mcad-cache compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
from mcad_cache.cli.options import (
    FORMAT_HELP,
    ITM_SCORE,
    PRECISION,
    TEACHER,
    Format,
    choice,
    device_option,
    explicit_flags,
    print_json,
    render_rows,
    stdout,
)
from mcad_cache.config import EvalConfig, load_config

_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def _metrics_table(title: str, rows: list[dict]) -> Table:
    """Model | i2t R@1 R@5 R@10 | t2i R@1 R@5 R@10 | RSUM | score (percent, 1 decimal); counts in the caption."""
    table = Table(title=title, padding=(0, 1))
    table.add_column("model", overflow="fold")
    for c in _COLUMNS:
        direction, _, k = c.partition("_")
        table.add_column(c.upper() if c == "rsum" else (f"{direction} {k}" if k == "R@1" else k), justify="right")
    table.add_column("score", overflow="fold")
    counts = set()
    for r in rows:
        m, p = r["metrics"], r["protocol"]
        counts.add((p["num_images"], p["num_captions"]))
        score = str(p.get("score_short", p.get("score", "")))
        table.add_row(str(r.get("name", r.get("model"))), *(f"{m[c]:.1f}" for c in _COLUMNS), score)
    table.caption = "; ".join(f"{i} images, {t} captions" for i, t in sorted(counts)) + "; ties count against"
    return table


E = EvalConfig()  # defaults shown in --help; a --config file overrides them, typed flags override both


def _rows(results: list[dict]) -> list[dict]:
    """One flat row per result for csv / md: name, the seven metrics, counts and the score."""
    rows = []
    for r in results:
        p = r["protocol"]
        rows.append({"model": r.get("name", r.get("model")), **{c: round(r["metrics"][c], 4) for c in _COLUMNS},
                     "images": p["num_images"], "captions": p["num_captions"],
                     "score": str(p.get("score_short", p.get("score", "")))})  # fmt: skip
    return rows


ROW_COLUMNS = ("model", *_COLUMNS, "images", "captions", "score")


@app.command("eval")
def eval_(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Option(
            metavar="PATH",
            help="run dir, student checkpoint, cache built on the test shards, or the teacher's model (with --teacher)",
        ),
    ] = E.model,
    teacher: Annotated[str, choice(TEACHER, "evaluate a teacher (registry name)")] = None,
    pretrained: Annotated[str, typer.Option(metavar="WEIGHTS", help="teacher weights (tag, file or folder)")] = (
        E.pretrained
    ),
    data: Annotated[list[str], typer.Option("--data", "--test-data", metavar="SHARDS", help="test shards")] = None,
    out: Annotated[
        str, typer.Option(metavar="FILE", help="results JSON (default: named by model, weights and data fingerprint)")
    ] = E.out,
    batch_size: Annotated[int, typer.Option(metavar="N", help="encoding batch size")] = E.batch_size,
    workers: Annotated[int, typer.Option(metavar="N", help="DataLoader worker processes")] = E.workers,
    device: Annotated[str, device_option("where the model runs")] = E.device,
    k_test: Annotated[int, typer.Option(metavar="K", help="single-stream: ITC top-k re-ranked by ITM")] = E.k_test,
    itm_score: Annotated[str, choice(ITM_SCORE, "single-stream rank score")] = E.itm_score,
    chunk_size: Annotated[int, typer.Option(metavar="N", help="query rows per similarity chunk")] = E.chunk_size,
    precision: Annotated[str, choice(PRECISION, "autocast precision (CUDA only)")] = E.precision,
    threads: Annotated[int, typer.Option(metavar="N", help="torch CPU threads (0 = default)")] = E.threads,
    fmt: Annotated[Format, typer.Option("--format", help=FORMAT_HELP)] = Format.table,
    config: Annotated[str, typer.Option("--config", metavar="FILE", help="JSON with EvalConfig fields (flags win)")] = (
        None
    ),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs on stderr")] = False,
) -> None:
    """Image-text retrieval: i2t and t2i R@1/5/10 and RSUM (percent), any number of captions per image. Results
    on stdout (--format), logs and the protocol on stderr."""
    setup_logging(verbose)
    from mcad_cache.pipelines import evaluate as pipeline

    cfg = call_pipeline(load_config, EvalConfig, config, **explicit_flags(ctx))
    result = call_pipeline(pipeline.run, cfg, progress=progress)
    p = result["protocol"]
    cpi = p["captions_per_image"]
    console.print(
        f"protocol: {p['num_images']} images, {p['num_captions']} captions ({cpi['min']}-{cpi['max']} per image, "
        f"mean {cpi['mean']:.2f}); i2t = {p['i2t']}; t2i = {p['t2i']}; ties: {p['ties']}; score: {p['score']}",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    for notice in result["notices"]:
        console.print(f"[yellow]notice:[/yellow] {notice}", highlight=False)
    console.print(f"results: {result['out']}", highlight=False, soft_wrap=True)
    named = result | {"name": Path(result["model"]).name or result["model"]}
    if fmt is Format.json:
        print_json(result)
    elif fmt is Format.table:
        stdout.print(_metrics_table(f"eval -> {result['out']}", [named]))
    else:
        render_rows(_rows([named]), ROW_COLUMNS, fmt)


@app.command("compare")
def compare(
    results: Annotated[list[str], typer.Argument(help="run dirs (with eval results) or eval JSON files")],
    fmt: Annotated[Format, typer.Option("--format", help=FORMAT_HELP)] = Format.table,
    plot: Annotated[str, typer.Option(metavar="FILE.png", help="also write grouped bars of R@K per model here")] = None,
) -> None:
    """One table of retrieval metrics for several runs / eval results (stdout), optionally a bar plot."""
    from mcad_cache.pipelines import evaluate as pipeline

    rows = call_pipeline(pipeline.load_results, results)
    names = [Path(r).name.removesuffix(".json") or r for r in results]
    if len(set(names)) < len(names):  # same folder names: show the full paths
        names = list(results)
    rows = [row | {"name": name} for row, name in zip(rows, names, strict=True)]
    if plot:
        from mcad_cache.pipelines import catalog

        console.print(f"plot: {catalog.plot_recall_bars(rows, plot)}", highlight=False)
    if fmt is Format.json:
        print_json([{"name": r["name"], "metrics": r["metrics"], "protocol": r["protocol"]} for r in rows])
    elif fmt is Format.table:
        stdout.print(_metrics_table("compare", rows))
    else:
        render_rows(_rows(rows), ROW_COLUMNS, fmt)
