"""``mcad-cache eval`` (retrieval R@K / RSUM of a student, teacher or cache) and ``mcad-cache compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
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


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Option(
            help="run dir, student checkpoint, cache built on the test shards, or the teacher's model (with --teacher)"
        ),
    ] = None,
    teacher: Annotated[str, typer.Option(help="evaluate a teacher: clip | albef | blip")] = None,
    pretrained: Annotated[str, typer.Option(help="teacher weights (tag, file or folder)")] = None,
    data: Annotated[list[str], typer.Option("--data", help="test shards")] = None,
    out: Annotated[str, typer.Option(help="results JSON (default: RUN/eval.json or .work/eval/...)")] = None,
    batch_size: Annotated[int, typer.Option(help="encoding batch size")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    k_test: Annotated[int, typer.Option(help="single-stream: ITC top-k re-ranked by ITM")] = None,
    itm_score: Annotated[str, typer.Option(help="single-stream rank score: itm | itm+itc")] = None,
    chunk_size: Annotated[int, typer.Option(help="query rows per similarity chunk")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = default)")] = None,
    config: Annotated[str, typer.Option("--config", help="JSON with EvalConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Image-text retrieval: i2t and t2i R@1/5/10 and RSUM (percent), any number of captions per image."""
    setup_logging(verbose)
    from mcad_cache.pipelines import evaluate as pipeline

    cfg = call_pipeline(
        load_config, EvalConfig, config, model=model, teacher=teacher, pretrained=pretrained, data=data or None,
        out=out, batch_size=batch_size, workers=workers, device=device, k_test=k_test, itm_score=itm_score,
        chunk_size=chunk_size, precision=precision, threads=threads,
    )  # fmt: skip
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
    console.print(_metrics_table(f"eval -> {result['out']}", [result | {"name": Path(result["model"]).name}]))


@app.command("compare")
def compare(
    results: Annotated[list[str], typer.Argument(help="run dirs (with eval.json) or eval JSON files")],
) -> None:
    """One table of retrieval metrics for several runs / eval results."""
    from mcad_cache.pipelines import evaluate as pipeline

    rows = call_pipeline(pipeline.load_results, results)
    names = [Path(r).name.removesuffix(".json") or r for r in results]
    if len(set(names)) < len(names):  # same folder names: show the full paths
        names = list(results)
    rows = [row | {"name": name} for row, name in zip(rows, names, strict=True)]
    console.print(_metrics_table("compare", rows))
