"""Learning-rate schedules: linear warmup then cosine decay, built on ``torch.optim.lr_scheduler``.

Formula (open_clip ``training/scheduler.py`` ``cosine_lr``): multiplier ``(step + 1) / warmup_steps`` for
``step < warmup_steps``, then ``0.5 * (1 + cos(pi * e / es))`` with ``e = step - warmup_steps`` and
``es = total_steps - warmup_steps``, reaching 0 at ``total_steps``. Steps are optimiser steps, 0-based.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier (dimensionless, in [0, 1]) at optimiser step ``step``; see the module docstring."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosine:
    """Picklable multiplier for ``LambdaLR`` (a lambda would not survive ``torch.save`` of the scheduler)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def create_warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``LambdaLR`` with :func:`warmup_cosine` (call ``scheduler.step()`` after every optimiser step).

    Raises:
        ValueError: ``total_steps < 1`` or ``warmup_steps < 0``.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps))
