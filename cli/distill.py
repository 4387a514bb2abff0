"""``mcad-cache distill``: train a student from cached teacher targets (docs/distill.md)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from mcad_cache.cli.app import app, call_pipeline, progress, setup_logging, user_error
from mcad_cache.cli.options import (
    CANDIDATES,
    IN_BATCH,
    PRECISION,
    PRESET,
    REPORT_TO,
    STUDENT,
    choice,
    device_option,
    explicit_flags,
    stdout,
)
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


D = DistillConfig()  # defaults shown in --help; a --config file overrides them, typed flags override both


@app.command("distill")
def distill(
    ctx: typer.Context,
    cache: Annotated[
        list[str], typer.Option("--cache", metavar="DIR", help="teacher cache (repeat: one CLIP, one ALBEF/BLIP)")
    ] = None,
    data: Annotated[
        list[str],
        typer.Option("--train-data", "--data", metavar="SHARDS", help="training shards (paths, globs, brace patterns)"),
    ] = None,
    val_data: Annotated[
        list[str], typer.Option("--val-data", metavar="SHARDS", help="validation shards: recall every --eval-every")
    ] = None,
    eval_every: Annotated[
        int, typer.Option(metavar="N", help="steps between validations (0 = after the last step only)")
    ] = D.eval_every,
    early_stopping: Annotated[
        int, typer.Option(metavar="N", help="stop after N validations without a better val RSUM (0 = never)")
    ] = D.early_stopping,
    out: Annotated[str, typer.Option(metavar="DIR", help="run directory (resumed when it holds a checkpoint)")] = D.out,
    student: Annotated[str, choice(STUDENT, "student config name or a JSON path")] = D.student,
    student_image: Annotated[
        str,
        typer.Option(
            metavar="NAME|PATH",
            help="image tower: a timm name (its pretrained weights: Hugging Face cache, or the hub when reachable), "
            "a timm weights file (.safetensors/.pth; architecture from --student) or a timm save_for_hf folder",
        ),
    ] = D.student_image,
    student_text: Annotated[
        str,
        typer.Option(
            metavar="NAME|PATH", help="text tower: a transformers hub name or a save_pretrained folder (with tokenizer)"
        ),
    ] = D.student_text,
    preset: Annotated[str, choice(PRESET, "loss preset (mcad-cache list presets)")] = D.preset,
    k: Annotated[
        int, typer.Option("--k", metavar="N", help="top-k candidates used (0 = the caches' k; at most the caches' k)")
    ] = D.k,
    batch_size: Annotated[int, typer.Option(metavar="N", help="image-caption pairs per step")] = D.batch_size,
    steps: Annotated[int, typer.Option(metavar="N", help="optimiser steps (0 = epochs x steps per epoch)")] = D.steps,
    epochs: Annotated[int, typer.Option(metavar="N", help="passes over the data when --steps is 0")] = D.epochs,
    lr: Annotated[float, typer.Option(metavar="LR", help="peak AdamW learning rate")] = D.lr,
    weight_decay: Annotated[float, typer.Option("--weight-decay", "--wd", metavar="WD", help="AdamW weight decay")] = (
        D.weight_decay
    ),
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", "--warmup", metavar="N", help="linear warmup steps")
    ] = D.warmup_steps,
    grad_clip: Annotated[float, typer.Option(metavar="NORM", help="max global gradient norm (0 = off)")] = D.grad_clip,
    workers: Annotated[
        int,
        typer.Option(
            metavar="N", help="DataLoader decode processes (-1 = auto from the cores; never changes the order)"
        ),
    ] = D.workers,
    device: Annotated[str, device_option("where the student trains")] = D.device,
    precision: Annotated[str, choice(PRECISION, "autocast precision (CUDA only; auto = bf16 there)")] = D.precision,
    seed: Annotated[int, typer.Option(metavar="N", help="seed of init, shuffling and caption choice")] = D.seed,
    shuffle_buffer: Annotated[
        int, typer.Option(metavar="N", help="sample shuffle buffer (0 = stream order)")
    ] = D.shuffle_buffer,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", "--save-every", metavar="N", help="steps between checkpoints (0 = end)")
    ] = D.checkpoint_every,
    log_every: Annotated[int, typer.Option(metavar="N", help="steps between metrics.jsonl lines")] = D.log_every,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="resume from the run dir's checkpoint")] = (
        D.resume
    ),
    threads: Annotated[
        int, typer.Option(metavar="N", help="torch CPU threads (0 = auto: the cores the workers leave)")
    ] = D.threads,
    candidates: Annotated[
        str,
        choice(
            CANDIDATES,
            "top-k candidate embeddings: online (encoded in the step with gradient: exact, ~8x a contrastive step) | "
            "bank (read from a bank of detached student embeddings: about the cost of a contrastive step)",
        ),
    ] = D.candidates,
    bank_text: Annotated[
        str, choice(CANDIDATES, "with --candidates bank: caption candidates from the bank | online")
    ] = D.bank_text,
    bank_ema: Annotated[
        float, typer.Option(metavar="M", help="with --candidates bank: EMA momentum refreshing the bank (0 = none)")
    ] = D.bank_ema,
    bank_refresh_every: Annotated[
        int, typer.Option(metavar="N", help="with --candidates bank: steps between full re-encodes (0 = never)")
    ] = D.bank_refresh_every,
    report_to: Annotated[
        str, choice(REPORT_TO, "tracking beside metrics.jsonl (wandb: when installed, offline unless WANDB_MODE)")
    ] = D.report_to,
    run_name: Annotated[
        str, typer.Option(metavar="NAME", help="name in plots and trackers (default: --out's name)")
    ] = (D.run_name),
    augment: Annotated[
        str,
        typer.Option(metavar="SPEC", help='views: "" = replay the cache\'s stored views, none, or a spec it must hold'),
    ] = D.augment,
    allow_aug_mismatch: Annotated[
        bool,
        typer.Option("--allow-aug-mismatch/--no-allow-aug-mismatch", help="train on views the cache lacks (warned)"),
    ] = D.allow_aug_mismatch,
    allow_view_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-view-mismatch/--no-allow-view-mismatch",
            help="train a student whose resize / crop differs from the teachers' (warned, recorded in the run)",
        ),
    ] = D.allow_view_mismatch,
    in_batch: Annotated[
        str, choice(IN_BATCH, "under torchrun: in-batch ITC/KD over all ranks' samples (global) or each rank's (rank)")
    ] = D.in_batch,
    loss: Annotated[
        str, typer.Option(metavar="JSON", help="LossConfig overrides as JSON, e.g. '{\"w_feat\": 0.5}'")
    ] = None,
    config: Annotated[
        str, typer.Option("--config", metavar="FILE", help="JSON with DistillConfig fields (flags win)")
    ] = (None),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs on stderr")] = False,
) -> None:
    """Distil a student from cached teacher targets joined to the shards by key; with --val-data, validate every
    --eval-every steps and keep the best checkpoint by val RSUM beside the last."""
    setup_logging(verbose)
    from mcad_cache.pipelines import distill as pipeline

    _init_distributed()
    flags = explicit_flags(ctx)
    if loss is not None:
        try:
            flags["loss"] = json.loads(loss)
        except json.JSONDecodeError as err:
            raise user_error(ValueError(f"--loss is not valid JSON ({err}); e.g. '{{\"w_feat\": 0.5}}'")) from err
    cfg = call_pipeline(load_config, DistillConfig, config, **flags)
    summary = call_pipeline(pipeline.run, cfg, progress=progress)
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 writes the run directory and prints the summary
        seen = summary["samples_seen_per_rank"]
        typer.echo(
            f"rank {summary['rank']} of {summary['world_size']}: {summary['steps']} steps, {seen[summary['rank']]} "
            f"pairs seen (per rank: {seen}); rank 0 writes {summary['run_dir']}"
        )
        return
    table = Table(title=f"distill {cfg.preset} -> {summary['run_dir']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("pairs seen", str(summary["samples_seen"]))
    table.add_row("time (s)", f"{summary['elapsed_s']:.1f}")
    for name, value in summary["final"].items():
        table.add_row(name, f"{value:.4g}")
    table.add_row("student", summary["checkpoint"])
    best = summary.get("best")
    if best:
        table.add_row("best val RSUM", f"{best['val_rsum']:.2f} at step {best['step']}")
        table.add_row("best student", best["checkpoint"])
    stdout.print(table)
