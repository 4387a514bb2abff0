"""``mcad-cache build``: run one teacher over shards into a resumable Zarr v3 cache."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging
from mcad_cache.cli.options import (
    EMB_DTYPE,
    FUSED_DTYPE,
    PRECISION,
    TEACHER,
    TOPK_BACKEND,
    choice,
    device_option,
    explicit_flags,
    stdout,
)
from mcad_cache.config import BuildConfig, load_config
from mcad_cache.pipelines import build_cache

B = BuildConfig()  # defaults shown in --help; a --config file overrides them, typed flags override both


@app.command("build")
def build(
    ctx: typer.Context,
    teacher: Annotated[str, choice(TEACHER, "teacher registry name")] = B.teacher,
    data: Annotated[
        list[str],
        typer.Option(
            "--data", "--train-data", metavar="SHARDS", help="shards: paths, globs, brace patterns (repeatable)"
        ),
    ] = None,
    out: Annotated[
        str, typer.Option(metavar="DIR", help="cache directory (resumed if it has this fingerprint)")
    ] = B.out,
    model: Annotated[
        str, typer.Option(metavar="NAME|PATH", help="open_clip name / JSON config, ALBEF config, BLIP path")
    ] = B.model,
    pretrained: Annotated[
        str, typer.Option(metavar="TAG|PATH", help="weights: open_clip tag or file, ALBEF .pth, BLIP folder")
    ] = B.pretrained,
    random_init: Annotated[
        bool, typer.Option("--random-init/--no-random-init", help="allow a teacher without weights")
    ] = B.random_init,
    k: Annotated[int, typer.Option("--k", metavar="N", help="top-k candidates per query, both directions")] = B.k,
    force_positives: Annotated[
        bool, typer.Option("--force-positives/--no-force-positives", help="put every positive into its candidates")
    ] = B.force_positives,
    candidate_source: Annotated[
        str, typer.Option(metavar="DIR", help='another cache whose ITC ranking picks the candidates ("" = own ITC)')
    ] = B.candidate_source,
    batch_size: Annotated[
        int, typer.Option(metavar="N", help="teacher batch size (images, captions or pairs)")
    ] = B.batch_size,
    workers: Annotated[int, typer.Option(metavar="N", help="DataLoader worker processes decoding images")] = B.workers,
    device: Annotated[str, device_option("where the teacher runs")] = B.device,
    precision: Annotated[str, choice(PRECISION, "auto = bf16 autocast on CUDA, else fp32")] = B.precision,
    fused_dtype: Annotated[str, choice(FUSED_DTYPE, "fused [CLS] storage")] = B.fused_dtype,
    emb_dtype: Annotated[str, choice(EMB_DTYPE, "embedding storage")] = B.emb_dtype,
    topk_backend: Annotated[str, choice(TOPK_BACKEND, "chunked torch matmul or an exact faiss index")] = B.topk_backend,
    chunk_size: Annotated[
        int, typer.Option(metavar="N", help="query rows per similarity block in the top-k")
    ] = B.chunk_size,
    rows_per_chunk: Annotated[
        int, typer.Option(metavar="N", help="rows per Zarr chunk = commit unit")
    ] = B.rows_per_chunk,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="stop at the first bad sample")] = B.strict,
    threads: Annotated[int, typer.Option(metavar="N", help="torch CPU threads (0 = torch's default)")] = B.threads,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="replace a cache built differently")
    ] = B.overwrite,
    views: Annotated[
        int, typer.Option(metavar="N", help="image views stored per image (1 = canonical; > 1 needs --augment)")
    ] = B.views,
    augment: Annotated[
        str, typer.Option(metavar="SPEC", help="view spec, e.g. rrc:scale=0.35-1,ratio=0.75-1.3333,flip=0.5;v1")
    ] = B.augment,
    view_seed: Annotated[int, typer.Option(metavar="N", help="seed of the per-view crop / flip draws")] = B.view_seed,
    token_scratch_gib: Annotated[
        float,
        typer.Option(
            metavar="GIB",
            help="disk cap of the image tokens kept from pass 1 for the ITM pass (single-stream teachers); "
            "0 = off: the image tower runs again in pass 3. Not in the fingerprint (same arrays)",
        ),
    ] = B.token_scratch_gib,
    rank: Annotated[
        int, typer.Option(metavar="N", help="this process's index among --world-size build processes")
    ] = B.rank,
    world_size: Annotated[
        int, typer.Option(metavar="N", help="build processes sharing one cache (disjoint units)")
    ] = B.world_size,
    config: Annotated[
        str, typer.Option("--config", metavar="FILE", help="run.json with BuildConfig fields (flags win)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs on stderr")] = False,
) -> None:
    """Build a teacher cache (embeddings, global top-k both directions, ITM logits and fused features for
    single-stream teachers). Rerun the same command to resume an interrupted build."""
    setup_logging(verbose)
    cfg = call_pipeline(load_config, BuildConfig, config, **explicit_flags(ctx))
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
    stdout.print(table)
