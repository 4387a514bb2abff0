"""``mcad-cache distill``: train a student from cached teacher targets (docs/distill.md).

The components are wired by ``mcad_cache.distill.create_distill``; this pipeline owns the run: the run directory
(``mcad_cache.distill.rundir``: config.json, metrics.jsonl, checkpoints, final/, summary.json), resume, DDP
coordination and progress. Running the same command again resumes from the last checkpoint (``resume=True``) and
reaches the same weights and metrics as an uninterrupted run; a changed config is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcad_cache.config import DistillConfig
from mcad_cache.distill import (
    TrainState,
    checkpoint_path,
    continue_schedule,
    create_distill,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rank_state,
    save_checkpoint,
    train_loop,
)
from mcad_cache.distill import rundir as rd
from mcad_cache.distill.ddp import gather_counts, mean_over_ranks
from mcad_cache.distill.tracking import create_run_hooks
from mcad_cache.errors import RunDirError
from mcad_cache.progress import no_progress
from mcad_cache.torchrun import process_group, torchrun_env

_logger = logging.getLogger(__name__)

PREFETCH_BATCHES = 2  # batches joined (cache reads, candidate images) ahead of the step, in a background thread
KEEP_CHECKPOINTS = 2  # checkpoint folders kept in the run dir (older ones are pruned)
DIST_TIMEOUT_S = 1800.0  # torchrun's process group: a collective waits this long for a missing rank (torch's default)


def _make_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"--out {str(path)!r} cannot be written ({err.strerror}); pass a writable folder") from err


def run(config: DistillConfig, *, progress: Callable[..., Iterable[Any]] = no_progress) -> dict[str, Any]:
    """Distil a student from the caches in ``config.cache`` on ``config.data``; see the module docstring.

    Under torchrun (``WORLD_SIZE`` > 1) the run joins the process group (NCCL on GPUs, else gloo) unless the caller
    already has one, and trains data-parallel: each rank its own chunks of the shards, in-batch terms over the global
    batch unless ``in_batch="rank"`` (``mcad_cache.distill.ddp``); logged losses are the mean over the ranks.

    Returns:
        The summary dict (also written to ``summary.json``) on rank 0; on other ranks a short dict (``rank``,
        ``world_size``, ``steps``, ``samples_seen``, ``samples_seen_per_rank``, ``replicas_in_sync``, ``run_dir``).
    Raises:
        ConfigError: bad config values (unknown preset, batch size < 2, no training step).
        RunDirError: ``out`` cannot be written.
        CacheSchemaError: k above a cache's k, a preset that needs a single-stream cache without one, caches of
            the wrong kinds.
        CacheIncompleteError / CacheMismatchError / CacheKeyError: stale, partial or foreign caches (readable
            diff, named keys).
        CheckpointError: resuming a run directory written with another config.
        NonFiniteError: a NaN/inf loss (names the step and the batch's keys).
    """
    with process_group(torchrun_env(os.environ), device=config.device, timeout_s=DIST_TIMEOUT_S):
        return _run(config, progress=progress)


def _run(config: DistillConfig, *, progress: Callable[..., Iterable[Any]]) -> dict[str, Any]:
    """:func:`run` inside the process group, when there is one."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    rank, world = _dist_info()
    is_main = rank == 0
    d = create_distill(config, rank=rank, world_size=world)
    config = d.config  # k resolved (0 = the caches' k)
    run_dir = Path(config.out)
    model, loss_module = d.model, d.loss_module

    if is_main:
        _make_run_dir(run_dir)
    state, rng_state, history = TrainState(), None, None
    latest = latest_checkpoint(run_dir) if config.resume else None
    if latest is not None:
        rd.check_resume_config(run_dir, d.resolved)
        state, rng_state, extra = load_checkpoint(
            latest, model=model, loss_module=loss_module, optimizer=d.optimizer, scheduler=d.scheduler,
            map_location=d.device, rank=rank, world_size=world, stateful=d.stateful,
        )  # fmt: skip
        if is_main:
            _logger.info(
                "resumed %s at step %d of %d (epoch %d, sample %d of the epoch)", run_dir, state.step, d.total_steps,
                state.epoch, state.batch_in_epoch * config.batch_size * world,
            )  # fmt: skip
        what = f"--steps {config.steps}" if config.steps > 0 else f"--epochs {config.epochs}"
        history = continue_schedule(
            d.scheduler, extra.get("schedule_history"), step=state.step, total_steps=d.total_steps, what=what
        )
        if is_main:
            rd.truncate_metrics(run_dir, state.step)
    elif is_main:
        rd.reset_metrics(run_dir)
    if world > 1:  # every rank has read the run dir before rank 0 rewrites config.json
        torch.distributed.barrier()
    if history is None:  # a fresh run: one schedule entry
        history = continue_schedule(d.scheduler, None, step=0, total_steps=d.total_steps, what="")
    if is_main:
        rd.write_config(run_dir, d.resolved)
    _logger.info(
        "distill: preset %s, %d steps (%d per epoch), batch %d x %d rank(s), k %d, device %s, student %s (%d params)",
        config.preset, d.total_steps, d.steps_per_epoch, config.batch_size, world, config.k, d.device,
        config.student, model.num_params()["total"],
    )  # fmt: skip

    hooks = create_run_hooks(
        config, model=model, resolved=d.resolved, total_steps=d.total_steps, start_step=state.step, is_main=is_main
    )  # --report-to trackers, --val-data validator (issue 15)
    last: dict[str, Any] = {}

    def on_log(values: dict[str, Any]) -> None:
        values = {**values, **loss_module.diagnostics(), "logit_scale": float(model.logit_scale.detach())}
        if world > 1:  # the global batch's losses (a collective: every rank logs at the same steps)
            values = mean_over_ranks(values, keys=lambda k: k == "loss" or k.endswith("_loss"))
        last.update(values)
        if is_main:  # the losses of the global batch (mean over the ranks)
            rd.append_metrics(run_dir, values)
            hooks.log(values)

    def on_checkpoint(st: TrainState) -> None:
        states = [rank_state(st)]
        if world > 1:  # every rank's data position and RNG go into rank 0's checkpoint
            states = [None] * world
            torch.distributed.all_gather_object(states, rank_state(st))
        if is_main:
            save_checkpoint(
                checkpoint_path(run_dir, st.step), model=model, loss_module=loss_module, optimizer=d.optimizer,
                scheduler=d.scheduler, state=st, rank_states=states if world > 1 else None, stateful=d.stateful,
                extra={"schedule_history": history},
            )  # fmt: skip
            prune_checkpoints(run_dir, keep=KEEP_CHECKPOINTS)
        if world > 1:
            torch.distributed.barrier()

    trained, trained_loss, forward = d.trained_module()
    t0 = time.perf_counter()
    start_step = state.step
    state = train_loop(
        trained, trained_loss, batches_for_epoch=d.stream, prepare=d.prepare, forward=forward,
        optimizer=d.optimizer, scheduler=d.scheduler, state=state, total_steps=d.total_steps, rng_state=rng_state,
        grad_clip=config.grad_clip, precision=config.precision, device=d.device, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, on_log=on_log, on_checkpoint=on_checkpoint,
        progress=progress if is_main else None, prefetch=PREFETCH_BATCHES, callbacks=hooks.callbacks,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    just_saved = config.checkpoint_every > 0 and state.step % config.checkpoint_every == 0 and state.step > start_step
    if not just_saved and (state.step > start_step or latest is None):
        on_checkpoint(state)
    best = hooks.close()
    in_sync = _replicas_in_sync(model, loss_module) if world > 1 else True
    seen = gather_counts(state.samples_seen) if world > 1 else [state.samples_seen]
    if not is_main:
        return {
            "run_dir": str(run_dir), "rank": rank, "world_size": world, "steps": state.step,
            "samples_seen": seen[rank], "samples_seen_per_rank": seen, "replicas_in_sync": in_sync,
        }  # fmt: skip
    final = rd.save_final(run_dir, model=model, loss_module=loss_module)
    curves = rd.plot_curves(run_dir / rd.METRICS_FILE, run_dir / rd.CURVES_FILE)
    summary = {
        "run_dir": str(run_dir),
        "preset": config.preset,
        "student": config.student,
        "num_params": model.num_params(),
        "steps": state.step,
        "steps_this_session": state.step - start_step,
        "epochs_started": state.epoch + 1,
        "samples_seen": sum(seen),
        "samples_seen_per_rank": seen,
        "world_size": world,
        "in_batch": config.in_batch if world > 1 else "global",
        "replicas_in_sync": in_sync,
        "elapsed_s": elapsed,
        "final": {k: v for k, v in last.items() if k.endswith("_loss") or k in ("loss", "lr", "logit_scale")},
        "caches": [
            {"path": str(r.path), "teacher": r.teacher, "kind": r.kind, "k": r.k}
            for r in (d.clip, d.single)
            if r is not None
        ],
        "k": config.k,
        "schedule_history": history,
        "view_mismatch": d.resolved.get("view_mismatch", []),
        "device": str(d.device),
        "skips": d.report.to_dict() | {"note": "samples read by this session (skipped-over batches included)"},
        "checkpoint": str(final),
        "loss_curves": str(curves) if curves else None,
        "best": best,
    }
    rd.write_summary(run_dir, summary)
    return summary


def _dist_info() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def _replicas_in_sync(model: nn.Module, loss_module: nn.Module) -> bool:
    """Every rank holds the same weights (a float64 checksum of all parameters, gathered)."""
    total = sum(float(p.detach().double().sum()) for m in (model, loss_module) for p in m.parameters())
    sums = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(sums, total)
    if len(set(sums)) != 1:
        _logger.error("replicas diverged: parameter checksums %s", sums)
        return False
    return True


__all__ = ["run"]
