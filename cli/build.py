"""``mcad-cache build``: run one teacher over shards into a resumable Zarr v3 cache."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
from mcad_cache.config import BuildConfig, load_config
from mcad_cache.pipelines import build_cache


@app.command("build")
def build(
    teacher: Annotated[str, typer.Option(help="teacher registry name: clip | albef | blip")] = None,
    data: Annotated[list[str], typer.Option(help="shards: paths, globs, brace patterns (repeatable)")] = None,
    out: Annotated[str, typer.Option(help="cache directory (resumed if it has this fingerprint)")] = None,
    model: Annotated[str, typer.Option(help="open_clip name / JSON config, ALBEF config, BLIP path")] = None,
    pretrained: Annotated[str, typer.Option(help="weights: open_clip tag or file, ALBEF .pth, BLIP folder")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="allow a teacher without weights")] = None,
    k: Annotated[int, typer.Option("--k", help="top-k candidates per query, both directions")] = None,
    force_positives: Annotated[bool, typer.Option("--force-positives/--no-force-positives")] = None,
    candidate_source: Annotated[str, typer.Option(help="another cache whose ITC ranking picks the candidates")] = None,
    batch_size: Annotated[int, typer.Option(help="teacher batch size (images, captions or pairs)")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes decoding images")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, else fp32) | fp32 | bf16")] = None,
    fused_dtype: Annotated[str, typer.Option(help="fused [CLS] storage: fp16 | int8 | none")] = None,
    emb_dtype: Annotated[str, typer.Option(help="embedding storage: fp16 | fp32")] = None,
    topk_backend: Annotated[str, typer.Option(help="torch (chunked matmul) | faiss")] = None,
    chunk_size: Annotated[int, typer.Option(help="query rows per similarity block in the top-k")] = None,
    rows_per_chunk: Annotated[int, typer.Option(help="rows per Zarr chunk = commit unit")] = None,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="stop at the first bad sample")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a cache built differently")] = None,
    rank: Annotated[int, typer.Option(help="this process's index among --world-size build processes")] = None,
    world_size: Annotated[int, typer.Option(help="build processes sharing one cache (disjoint units)")] = None,
    config: Annotated[str, typer.Option("--config", help="run.json with BuildConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Build a teacher cache (embeddings, global top-k both directions, ITM logits and fused features for
    single-stream teachers). Rerun the same command to resume an interrupted build."""
    setup_logging(verbose)
    cfg = call_pipeline(
        load_config,
        BuildConfig,
        config,
        teacher=teacher,
        data=tuple(data) if data else None,
        out=out,
        model=model,
        pretrained=pretrained,
        random_init=random_init,
        k=k,
        force_positives=force_positives,
        candidate_source=candidate_source,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        fused_dtype=fused_dtype,
        emb_dtype=emb_dtype,
        topk_backend=topk_backend,
        chunk_size=chunk_size,
        rows_per_chunk=rows_per_chunk,
        strict=strict,
        threads=threads,
        overwrite=overwrite,
        rank=rank,
        world_size=world_size,
    )
    result = call_pipeline(build_cache.run, cfg, progress=progress)
    if result.status == "rank-done":
        console.print(f"rank {cfg.rank} of {cfg.world_size}: its units are committed; rank 0 finalizes the cache")
        return
    if result.status == "complete":
        console.print(f"cache {result.path} is already complete for this build: nothing to do")
    table = Table(title=f"build {cfg.teacher} -> {result.path}: {result.status} in {result.seconds:.1f} s")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("images (valid)", f"{result.num_images} ({result.num_valid_images})")
    table.add_row("texts (valid)", f"{result.num_texts} ({result.num_valid_texts})")
    for reason, n in sorted(result.skip_counts.items()):
        table.add_row(f"skipped: {reason}", str(n))
    for stage, s in result.stage_seconds.items():
        table.add_row(f"time: {stage}", f"{s:.1f} s")
    console.print(table)
