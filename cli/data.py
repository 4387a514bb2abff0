"""``mcad-cache data import`` and ``mcad-cache data verify``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import call_pipeline, console, data_app, progress, setup_logging
from mcad_cache.cli.options import IMPORTER, choice, explicit_flags, stdout
from mcad_cache.config import ImportConfig, load_config
from mcad_cache.demo import openclipart  # noqa: F401  (the demo app's importer: registers --source openclipart)
from mcad_cache.pipelines import data_import
from mcad_cache.pipelines import verify as verify_pipeline

IMP = ImportConfig()  # defaults shown in --help; a --config file overrides them, typed flags override both


@data_app.command("import")
def import_(
    ctx: typer.Context,
    source: Annotated[str, choice(IMPORTER, "importer (mcad-cache list importers)")] = IMP.source,
    out: Annotated[str, typer.Option(metavar="DIR", help="output folder (OUT/<split>/shard-*.tar, index.json)")] = (
        IMP.out
    ),
    root: Annotated[str, typer.Option(metavar="DIR", help="openclipart data folder or image root")] = IMP.root,
    annotations: Annotated[
        str, typer.Option(metavar="FILE", help="karpathy dataset_*.json or folder captions .jsonl/.csv")
    ] = IMP.annotations,
    samples_per_shard: Annotated[int, typer.Option(metavar="N", help="samples per tar")] = IMP.samples_per_shard,
    max_samples: Annotated[
        int, typer.Option(metavar="N", help="0 = all; else the first N in the importer's order")
    ] = IMP.max_samples,
    image_size_px: Annotated[
        int, typer.Option(metavar="PX", help="longest side after re-encoding (0 = keep original bytes)")
    ] = IMP.image_size_px,
    seed: Annotated[int, typer.Option(metavar="N", help="split seed (openclipart)")] = IMP.seed,
    workers: Annotated[int, typer.Option(metavar="N", help="image re-encoding processes (1 = none)")] = IMP.workers,
    config: Annotated[
        str, typer.Option("--config", metavar="FILE", help="JSON with ImportConfig fields (flags win)")
    ] = (None),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs on stderr")] = False,
) -> None:
    """Import captioned images into WebDataset shards with an index and a report of what was dropped and why."""
    setup_logging(verbose)
    cfg = call_pipeline(load_config, ImportConfig, config, **explicit_flags(ctx))
    report = call_pipeline(data_import.run, cfg, progress=progress)
    table = Table(title=f"import {cfg.source} -> {cfg.out} ({report['time_s']} s)")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("candidates", str(report["num_candidates"]))
    for split, n in report["kept_per_split"].items():
        table.add_row(f"kept: {split}", str(n))
    for reason, n in report["dropped"].items():
        table.add_row(f"dropped: {reason}", str(n))
    stdout.print(table)


@data_app.command("verify")
def verify(
    shards: Annotated[list[str], typer.Argument(help="shard paths, globs, brace patterns or folders")],
    json_out: Annotated[str, typer.Option("--json", help="write the full report as JSON here")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Read every shard once; report truncation, split samples, duplicate keys, bad names and every skip reason.

    Exits 1 when anything is wrong.
    """
    setup_logging(verbose)
    report = call_pipeline(verify_pipeline.run, shards, json_out=json_out, progress=progress)
    d = report.to_dict()
    table = Table(title=f"verify: {d['num_shards']} shard(s), {d['num_samples']} samples, {d['time_s']} s")
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_row("usable samples", str(d["num_ok"]))
    table.add_row("captions", str(d["num_captions"]))
    for reason in verify_pipeline.SKIP_REASONS:
        n = d["counts"][reason]
        table.add_row(f"[red]{reason}[/red]" if n else reason, str(n))
    n = d["unrecognised_members"]
    table.add_row("[red]unrecognised member names[/red]" if n else "unrecognised member names", str(n))
    for mode, n in d["image_modes"].items():
        table.add_row(f"images in source mode {mode}", str(n))
    truncated = [s for s in d["shards"] if s["truncated"]]
    for s in truncated:
        table.add_row(f"[red]truncated {s['path']}[/red] (last good key {s['last_good_key']!r})", "")
    stdout.print(table)
    for kind, listed in d["problems"].items():
        for p in listed[:5]:
            console.print(f"  {kind}: {p['shard']} key {p['key']!r}: {p['detail']}", highlight=False, soft_wrap=True)
    if not report.ok:
        console.print("[red]verify: problems found[/red]")
        raise typer.Exit(code=1)
    console.print("[green]verify: ok[/green]")
