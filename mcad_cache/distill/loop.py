"""The distillation training loop: steps until ``total_steps``, logging, checkpoint calls, resume at a data position.

Plain functions of (model, loss module, batches, ...). What a batch is and how losses are computed from it is the
caller's (``prepare`` and ``forward``); this module owns the order of steps and the data position. Checkpoint files
and RNG serialisation are in :mod:`mcad_cache.distill.checkpoint`, the step in :mod:`mcad_cache.distill.step`.
Anything that draws random numbers per step must take them from a generator seeded by ``(seed, step)``
(``step.step_generator``) or from the global RNG after the batch is read.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mcad_cache.distill.checkpoint import TrainState, set_rng_state
from mcad_cache.distill.prefetch import Prefetcher
from mcad_cache.distill.step import train_step
from mcad_cache.errors import RunInterruptedError

_logger = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 600.0  # default time-based checkpoint interval: a killed run loses at most 10 min (our choice)
PLAIN_PROGRESS_S = 30.0  # interval of plain progress lines when stderr is not a terminal (nohup, SLURM; our choice)


def _prepared(
    stream: Iterator[Any], prepare: Callable[[Any, int], tuple[Any, list[str], int]], next_step: int
) -> Iterator[tuple[Any, list[str], int]]:
    """``prepare`` each raw batch in order with the step number it will be trained at (skipped ones take none)."""
    step = next_step
    for raw in stream:
        prepared, keys, num_pairs = prepare(raw, step)
        if prepared is not None:
            step += 1
        yield prepared, keys, num_pairs


class _StopSignals:
    """SIGINT / SIGTERM set a flag instead of killing the run, so the loop can checkpoint after the current step.

    Installed only in the main thread (``signal.signal`` works nowhere else); the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepCounter:
    """Iterable over step numbers for the progress bar; ``postfix`` shows loss and throughput (read by the CLI)."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = start, total
        self.postfix = ""

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start + 1, self.total + 1))


def train_loop(
    model: nn.Module,
    loss_module: nn.Module | None,
    *,
    batches_for_epoch: Callable[[int], Iterable[Any]],
    prepare: Callable[[Any, int], tuple[Any, list[str], int]],
    forward: Callable[[nn.Module, nn.Module | None, Any], Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    total_steps: int,
    rng_state: Mapping[str, Any] | None = None,
    grad_clip: float = 1.0,
    precision: str = "auto",
    device: torch.device | None = None,
    log_every: int = 10,
    checkpoint_every: int = 0,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    progress: Callable[..., Iterable[Any]] | None = None,
    max_epochs: int = 1_000_000,
    prefetch: int = 0,
    callbacks: Sequence[Callable[[TrainState], bool]] = (),
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    plain_progress_s: float | None = None,
) -> TrainState:
    """Run optimiser steps until ``total_steps``, resuming at ``state``.

    Args:
        model, loss_module: see :func:`train_step`.
        batches_for_epoch: ``epoch -> iterable of raw batches``; must give the same batches in the same order every
            time it is called with the same epoch (seeded shuffling).
        prepare: ``(raw batch, step) -> (batch for forward, sample keys, num pairs)``: joins teacher targets and
            fetches candidates; draws per-step randomness from :func:`step_generator`. Returning ``None`` for the
            batch skips it (e.g. a final partial batch) without counting a step.
        forward: see :func:`train_step`.
        state: the position to start from (a fresh ``TrainState()`` or one from :func:`load_checkpoint`).
        total_steps: stop after this many optimiser steps.
        rng_state: RNG states to restore once the data position is reached (from :func:`load_checkpoint`).
        log_every: call ``on_log`` every this many steps (and at the last step).
        checkpoint_every: call ``on_checkpoint`` every this many steps (0 = never; the caller saves the final one).
        on_log: receives ``{"step", "epoch", "samples_seen", "lr", "loss", "*_loss", "grad_norm", "samples_per_s",
            "elapsed_s"}``.
        progress: ``progress(iterable, description, total)`` over step numbers.
        max_epochs: safety bound when an epoch yields no usable batch.
        callbacks: called with the state after every step (after ``on_checkpoint``); one returning True stops
            training after this step (early stopping, ``distill.validation.Validator``). All of them run each step.
        checkpoint_every_s: also call ``on_checkpoint`` when this many seconds passed since the last one (0 = off);
            on by default, so a killed run resumes near where it stopped even with ``checkpoint_every=0``.
        plain_progress_s: log a plain progress line (step, share, loss, pairs/s, elapsed) every this many seconds;
            ``None``: :data:`PLAIN_PROGRESS_S` when stderr is not a terminal (a log file shows progress while a
            progress bar would not), else 0 (off).
        prefetch: prepare up to this many batches ahead in a background thread (0 = inline). ``prepare`` still
            runs in batch order with the same step numbers, so results do not change; it must not draw from the
            global RNG.
    Returns:
        The final :class:`TrainState`.
    Raises:
        NonFiniteError: from :func:`train_step`.
        RuntimeError: the data yields no usable batch.
        RunInterruptedError: SIGINT or SIGTERM arrived; the current step finished and ``on_checkpoint`` saved it.
    """
    if plain_progress_s is None:
        plain_progress_s = 0.0 if sys.stderr.isatty() else PLAIN_PROGRESS_S
    with _StopSignals() as signals:
        return _run(
            model, loss_module, batches_for_epoch=batches_for_epoch, prepare=prepare, forward=forward,
            optimizer=optimizer, scheduler=scheduler, state=state, total_steps=total_steps, rng_state=rng_state,
            grad_clip=grad_clip, precision=precision, device=device, log_every=log_every,
            checkpoint_every=checkpoint_every, on_log=on_log, on_checkpoint=on_checkpoint, progress=progress,
            max_epochs=max_epochs, prefetch=prefetch, callbacks=callbacks, checkpoint_every_s=checkpoint_every_s,
            plain_progress_s=plain_progress_s, signals=signals,
        )  # fmt: skip


def _run(
    model: nn.Module,
    loss_module: nn.Module | None,
    *,
    batches_for_epoch: Callable[[int], Iterable[Any]],
    prepare: Callable[[Any, int], tuple[Any, list[str], int]],
    forward: Callable[[nn.Module, nn.Module | None, Any], Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    total_steps: int,
    rng_state: Mapping[str, Any] | None,
    grad_clip: float,
    precision: str,
    device: torch.device | None,
    log_every: int,
    checkpoint_every: int,
    on_log: Callable[[dict[str, Any]], None] | None,
    on_checkpoint: Callable[[TrainState], None] | None,
    progress: Callable[..., Iterable[Any]] | None,
    max_epochs: int,
    prefetch: int,
    callbacks: Sequence[Callable[[TrainState], bool]],
    checkpoint_every_s: float,
    plain_progress_s: float,
    signals: _StopSignals,
) -> TrainState:
    """The body of :func:`train_loop` (its arguments), with stop signals caught by ``signals``."""
    counter = StepCounter(state.step, total_steps)
    steps_iter = iter(progress(counter, "distill", len(counter)) if progress is not None else counter)
    t0 = time.perf_counter()
    window_t, window_n = t0, 0
    last_checkpoint_t = last_plain_t = t0
    start_step = state.step
    empty_epochs = 0
    stopped = False
    while state.step < total_steps:
        if state.epoch >= max_epochs:
            raise RuntimeError(f"stopped after {max_epochs} epochs without reaching {total_steps} steps")
        stream = iter(batches_for_epoch(state.epoch))
        for _ in range(state.batch_in_epoch):  # resume: skip the batches already trained on
            if next(stream, None) is None:
                break
        if rng_state is not None:
            set_rng_state(rng_state)
            rng_state = None
        trained_this_epoch = 0
        items = _prepared(stream, prepare, state.step + 1)
        if prefetch > 0:
            items = Prefetcher(items, depth=prefetch)
        try:
            for prepared, keys, num_pairs in items:
                state.batch_in_epoch += 1
                if prepared is None:
                    continue
                next(steps_iter, None)
                values = train_step(
                    model, loss_module, prepared, forward=forward, optimizer=optimizer, scheduler=scheduler,
                    step=state.step + 1, keys=keys, grad_clip=grad_clip, device=device, precision=precision,
                )  # fmt: skip
                state.step += 1
                state.samples_seen += num_pairs
                trained_this_epoch += 1
                window_n += num_pairs
                now = time.perf_counter()
                rate = window_n / max(now - window_t, 1e-9)
                counter.postfix = f"loss {values['loss']:.4f} | {rate:.1f} pairs/s"
                if on_log is not None and (state.step % max(1, log_every) == 0 or state.step == total_steps):
                    on_log(
                        {
                            "step": state.step,
                            "epoch": state.epoch,
                            "samples_seen": state.samples_seen,
                            **values,
                            "samples_per_s": rate,
                            "elapsed_s": now - t0,
                        }
                    )
                    window_t, window_n = now, 0
                if plain_progress_s > 0 and now - last_plain_t >= plain_progress_s:
                    last_plain_t = now
                    _logger.info(
                        "step %d/%d (%.0f%%), loss %.4f, %.1f pairs/s, %.0f s elapsed, %.0f s to go",
                        state.step, total_steps, 100 * state.step / total_steps, float(values["loss"]), rate, now - t0,
                        (now - t0) / max(state.step - start_step, 1) * (total_steps - state.step),
                    )  # fmt: skip
                by_steps = checkpoint_every > 0 and state.step % checkpoint_every == 0
                by_time = checkpoint_every_s > 0 and now - last_checkpoint_t >= checkpoint_every_s
                if on_checkpoint is not None and (by_steps or by_time or signals.received is not None):
                    on_checkpoint(state)
                    last_checkpoint_t = time.perf_counter()
                if signals.received is not None:
                    name = signal.Signals(signals.received).name
                    saved = "a checkpoint was saved" if on_checkpoint is not None else "nothing was saved"
                    raise RunInterruptedError(
                        f"{name} received: stopped after step {state.step} of {total_steps}; {saved}; rerun the same "
                        "command to resume from it"
                    )
                stopped = any([bool(callback(state)) for callback in callbacks])  # a list: every callback runs
                if state.step >= total_steps or stopped:
                    break
        finally:
            if isinstance(items, Prefetcher):
                items.close()
        if state.step >= total_steps or stopped:
            break
        empty_epochs = 0 if trained_this_epoch else empty_epochs + 1
        if empty_epochs >= 2:
            raise RuntimeError("the training data yields no usable batch (too few samples for one batch?)")
        state.epoch += 1
        state.batch_in_epoch = 0
    for _ in steps_iter:  # let a progress bar finish cleanly
        pass
    return state


__all__ = ["StepCounter", "train_loop"]
