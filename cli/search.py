"""``mcad-cache index``, ``mcad-cache search`` and ``mcad-cache serve`` (docs/export.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
from mcad_cache.cli.options import FORMAT_HELP, Format, print_json, render_rows, stdout
from mcad_cache.pipelines import search as pipeline


@app.command("index")
def index(
    model: Annotated[str, typer.Argument(help="export folder (its files are run) or distill run directory")],
    data: Annotated[list[str], typer.Option("--data", help="gallery shards (paths, globs, folders)")],
    out: Annotated[str, typer.Option(help="index folder to write")],
    kind: Annotated[str, typer.Option(help="auto | flat | ivf (auto: exact below 20k images)")] = "auto",
    nlist: Annotated[int, typer.Option(help="IVF lists (0 = 4 sqrt(N))")] = 0,
    nprobe: Annotated[int, typer.Option(help="IVF lists probed per query (0 = nlist / 8)")] = 0,
    batch_size: Annotated[int, typer.Option(help="images per PyTorch encoder call")] = 32,
    threads: Annotated[int, typer.Option(help="CPU threads of the encoder")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out folder")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Encode a gallery of images into a faiss index (exact, or IVF with its recall vs exact measured)."""
    setup_logging(verbose)
    cfg = pipeline.IndexConfig(
        model=model, data=tuple(data), out=out, kind=kind, nlist=nlist, nprobe=nprobe, batch_size=batch_size,
        threads=threads, overwrite=overwrite,
    )  # fmt: skip
    r = call_pipeline(pipeline.build_index, cfg, progress=progress)
    recall = {k: v for k, v in r.items() if k.startswith("recall@")}
    console.print(
        f"index -> {r['out']}: {r['num_items']} images ({r['num_skipped']} skipped), {r['kind']}, "
        f"{r['images_per_s']} images/s" + (f", {recall}" if recall else ""), highlight=False, soft_wrap=True,
    )  # fmt: skip


@app.command("search")
def search(
    index_dir: Annotated[str, typer.Argument(metavar="INDEX", help="index folder")],
    query: Annotated[str, typer.Argument(help="text query")] = "",
    image: Annotated[str, typer.Option(help="query by this image file instead of text")] = "",
    k: Annotated[int, typer.Option("-k", "--k", help="results")] = 10,
    model: Annotated[str, typer.Option(help="encoder (default: the one the index was built with)")] = "",
    threads: Annotated[int, typer.Option(help="CPU threads of the encoder")] = 1,
    fmt: Annotated[Format, typer.Option("--format", help=FORMAT_HELP)] = Format.table,
) -> None:
    """Print the top-k indexed images for a text (or --image) query, with keys, captions and cosine scores (stdout;
    --format json prints the whole result: query, results, timing)."""
    r = call_pipeline(pipeline.search, index_dir, text=query, image=image, k=k, model=model, threads=threads)
    t = r["timing_ms"]
    title = f"{r['query']}  (encode {t['encode']:.1f} ms, search {t['search']:.2f} ms)"
    rows = [
        {"rank": x["rank"], "score": f"{x['score']:.4f}", "key": x["key"], "captions": " | ".join(x["captions"])}
        for x in r["results"]
    ]
    if fmt is Format.json:
        print_json(r)
    elif fmt is Format.table:
        table = Table(title=title)
        for col, justify in (("rank", "right"), ("score", "right"), ("key", "left"), ("captions", "left")):
            table.add_column(col, justify=justify, overflow="fold")
        for row in rows:
            table.add_row(str(row["rank"]), row["score"], row["key"], row["captions"])
        stdout.print(table)
    else:
        console.print(title, highlight=False, soft_wrap=True)
        render_rows(rows, ["rank", "score", "key", "captions"], fmt)


@app.command("serve")
def serve(
    index_dir: Annotated[str, typer.Argument(metavar="INDEX", help="index folder")],
    host: Annotated[str, typer.Option(help="address to bind (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    model: Annotated[str, typer.Option(help="encoder (default: the one the index was built with)")] = "",
    threads: Annotated[int, typer.Option(help="CPU threads of the encoder")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The local search page: type a query or upload an image, see thumbnails, captions and scores."""
    setup_logging(verbose)
    console.print(f"serving {index_dir} on http://{host}:{port}/ (Ctrl+C to stop)", highlight=False)
    call_pipeline(pipeline.serve, index_dir, host=host, port=port, model=model, threads=threads)
