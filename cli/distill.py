"""``mcad-cache distill``: train a student from cached teacher targets (docs/distill.md)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, console, progress, setup_logging, user_error
from mcad_cache.config import DistillConfig, load_config


def _init_distributed() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL on GPUs, else gloo) and pin this rank's
    GPU (``LOCAL_RANK``). The pipeline then runs data-parallel (DDP, each rank its own shards)."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@app.command("distill")
def distill(
    cache: Annotated[
        list[str], typer.Option("--cache", help="teacher cache (repeat: one CLIP, one ALBEF/BLIP)")
    ] = None,
    data: Annotated[list[str], typer.Option("--data", help="training shards (paths, globs, brace patterns)")] = None,
    out: Annotated[str, typer.Option(help="run directory (resumed when it holds a checkpoint)")] = None,
    student: Annotated[str, typer.Option(help="student config name or JSON path")] = None,
    preset: Annotated[str, typer.Option(help="mcad | contrastive | clip-kd | clip-kd-feat | single-topk")] = None,
    k: Annotated[int, typer.Option("--k", help="top-k candidates used (<= the caches' k)")] = None,
    batch_size: Annotated[int, typer.Option(help="image-caption pairs per step")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps (0 = epochs x steps per epoch)")] = None,
    epochs: Annotated[int, typer.Option(help="passes over the data when --steps is 0")] = None,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = None,
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = None,
    grad_clip: Annotated[float, typer.Option(help="max global gradient norm (0 = off)")] = None,
    workers: Annotated[
        int, typer.Option(help="DataLoader decode processes (-1 = auto from the cores; never changes the order)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast on CUDA only)")] = None,
    seed: Annotated[int, typer.Option(help="seed of init, shuffling and caption choice")] = None,
    shuffle_buffer: Annotated[int, typer.Option(help="sample shuffle buffer (0 = stream order)")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="steps between resumable checkpoints (0 = end only)")] = None,
    log_every: Annotated[int, typer.Option(help="steps between metrics.jsonl lines")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="resume from the run dir's checkpoint")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = auto: the cores the workers leave)")] = None,
    candidates: Annotated[
        str,
        typer.Option(
            help="top-k candidate embeddings: online (encoded in the step with gradient: exact, ~8x a contrastive "
            "step) | bank (read from a bank of detached student embeddings: about the cost of a contrastive step; "
            "docs/distill.md)"
        ),
    ] = None,
    bank_text: Annotated[
        str, typer.Option(help="with --candidates bank: caption candidates from the bank | online (encoded in a step)")
    ] = None,
    bank_ema: Annotated[
        float, typer.Option(help="with --candidates bank: momentum of an EMA student refreshing the bank (0 = none)")
    ] = None,
    bank_refresh_every: Annotated[
        int, typer.Option(help="with --candidates bank: steps between full re-encodes of the bank (0 = never)")
    ] = None,
    loss: Annotated[str, typer.Option(help="LossConfig overrides as JSON, e.g. '{\"w_feat\": 0.5}'")] = None,
    config: Annotated[str, typer.Option("--config", help="run.json with DistillConfig fields")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Distil a student from cached teacher targets joined to the shards by key."""
    setup_logging(verbose)
    from mcad_cache.pipelines import distill as pipeline

    _init_distributed()
    try:
        loss_overrides = json.loads(loss) if loss else None
    except json.JSONDecodeError as err:
        raise user_error(ValueError(f"--loss is not valid JSON ({err}); e.g. '{{\"w_feat\": 0.5}}'")) from err
    cfg = call_pipeline(
        load_config, DistillConfig, config, cache=cache or None, data=data or None, out=out, student=student,
        preset=preset, k=k, batch_size=batch_size, steps=steps, epochs=epochs, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, grad_clip=grad_clip, workers=workers, device=device, precision=precision,
        seed=seed, shuffle_buffer=shuffle_buffer, checkpoint_every=checkpoint_every, log_every=log_every,
        resume=resume, loss=loss_overrides, threads=threads, candidates=candidates, bank_text=bank_text,
        bank_ema=bank_ema, bank_refresh_every=bank_refresh_every,
    )  # fmt: skip
    summary = call_pipeline(pipeline.run, cfg, progress=progress)
    table = Table(title=f"distill {cfg.preset} -> {summary['run_dir']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("pairs seen", str(summary["samples_seen"]))
    table.add_row("time (s)", f"{summary['elapsed_s']:.1f}")
    for name, value in summary["final"].items():
        table.add_row(name, f"{value:.4g}")
    table.add_row("student", summary["checkpoint"])
    console.print(table)
