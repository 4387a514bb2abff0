"""``mcad-cache inspect CACHE [--check] [--json]``: manifest, arrays, bytes per sample, statistics, skip counts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console
from mcad_cache.cli.options import FORMAT_HELP, Format, print_json, render_rows, stdout
from mcad_cache.pipelines import build_cache


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command("inspect")
def inspect(
    cache: Annotated[str, typer.Argument(help="cache directory (Zarr v3 store)")],
    check: Annotated[bool, typer.Option("--check", help="verify the cache; exit 1 on any problem")] = False,
    fmt: Annotated[Format, typer.Option("--format", help=FORMAT_HELP + "; csv/md: one row per array")] = Format.table,
    json_out: Annotated[bool, typer.Option("--json", help="same as --format json (kept for old scripts)")] = False,
) -> None:
    """Show a cache's manifest, array shapes and dtypes, bytes per sample, value statistics and skip counts.

    With --check, verify finiteness, id ranges, validity masks, key uniqueness and maps; exit 1 on any problem.
    """
    desc, problems = call_pipeline(build_cache.inspect, cache, check=check)
    if json_out or fmt is Format.json:
        print_json({**desc, "problems": problems})
    elif fmt is Format.table:
        _print(desc)
    else:
        rows = [
            {"name": name, "dims": ",".join(a["dims"]), "shape": "x".join(map(str, a["shape"])), "dtype": a["dtype"],
             "chunks": "x".join(map(str, a["chunks"])), "stored_bytes": a["stored_bytes"]}
            for name, a in desc["arrays"].items()
        ]  # fmt: skip
        render_rows(rows, ("name", "dims", "shape", "dtype", "chunks", "stored_bytes"), fmt)
    if problems is not None and not (json_out or fmt is Format.json):
        if problems:
            console.print(f"[red]check: {len(problems)} problem(s)[/red]")
            for line in problems:
                console.print(f"  - {line}", highlight=False, soft_wrap=True)
        else:
            console.print("[green]check: OK[/green]")
    if problems:
        raise typer.Exit(code=1)


def _print(desc: dict[str, Any]) -> None:
    m = desc["manifest"]
    fp = m.get("fingerprint", {})
    teacher = fp.get("teacher", {})
    lay = m.get("layout", {})
    head = Table(title=f"cache {desc['path']}", show_header=False)
    head.add_column("field")
    head.add_column("value")
    rows = [
        ("complete", str(m.get("complete"))),
        ("schema version", str(m.get("schema_version"))),
        (
            "teacher",
            f"{teacher.get('name')} ({lay.get('kind')}), weights sha256 {str(teacher.get('weights_sha256'))[:16]}…",
        ),
        ("logit_scale", f"{m.get('logit_scale')}"),
        ("k", str(lay.get("k"))),
        ("candidates", json.dumps({k: v for k, v in fp.get("candidates", {}).items() if k != "rule"})),
        ("storage", json.dumps(fp.get("storage", {}))),
        ("precision", str(fp.get("precision"))),
        ("preprocess", json.dumps(fp.get("preprocess", {}))),
        ("tokenizer", json.dumps(fp.get("tokenizer", {}))),
        ("shards", f"{len(m.get('shards', []))}"),
        ("images / valid", f"{lay.get('num_images')} / {desc['stats'].get('valid_images')}"),
        ("texts / valid", f"{lay.get('num_texts')} / {desc['stats'].get('valid_texts')}"),
        ("code version", str(m.get("build", {}).get("code_version"))),
        ("started / finished", f"{m.get('started_at')} / {m.get('finished_at')}"),
        ("stored bytes", _fmt_bytes(desc["stored_bytes"])),
        ("bytes per sample", _fmt_bytes(desc["bytes_per_sample"])),
    ]
    if "views" in desc:  # issue 16
        v = desc["views"]
        per = f"{_fmt_bytes(v['bytes_per_view'])} per view ({_fmt_bytes(v['bytes_per_view_per_image'])} per image)"
        rows.append(("views", f"V={v['num_views']} {v['augment']} seed {v['seed']}; {per}"))
    for k, v in rows:
        head.add_row(k, v)
    stdout.print(head, soft_wrap=True)
    arrays = Table(title="arrays")
    for col in ("name", "dims", "shape", "dtype", "chunks", "stored"):
        arrays.add_column(col)
    for name, a in desc["arrays"].items():
        arrays.add_row(
            name,
            ",".join(a["dims"]),
            str(tuple(a["shape"])),
            a["dtype"],
            str(tuple(a["chunks"])),
            _fmt_bytes(a["stored_bytes"]),
        )
    stdout.print(arrays)
    stats = Table(title="statistics (valid rows)")
    stats.add_column("name")
    stats.add_column("value")
    for k, v in desc["stats"].items():
        text = (
            ", ".join(f"{kk} {vv:.4f}" for kk, vv in v.items())
            if isinstance(v, dict)
            else (f"{v:.4f}" if isinstance(v, float) else str(v))
        )
        stats.add_row(k, text)
    stdout.print(stats)
    skips = m.get("skips", {})
    table = Table(title=f"skipped samples: {skips.get('num_skipped', 0)}")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("examples (shard, key)")
    examples: dict[str, list[str]] = {}
    for shard, key, reason in skips.get("examples", []):
        examples.setdefault(reason, []).append(f"{shard}:{key}")
    for reason, n in sorted(skips.get("counts", {}).items()):
        table.add_row(reason, str(n), ", ".join(examples.get(reason, [])[:3]))
    stdout.print(table)
