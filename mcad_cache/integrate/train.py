"""Training the integration module once, offline, on the teacher caches: its own AdamW, learning rate and steps,
early stopping on a held-out slice of the image rows (with their captions), the best state kept.

The objective is ``losses.integration_objective`` (teacher side only: the ground truth and the single-stream ITM
ranking), so nothing here can move the targets toward a student. Measured defaults: docs/losses.md.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from mcad_cache.integrate.parents import Parents
from mcad_cache.losses import LossConfig, TargetIntegration, integration_objective, modified_targets
from mcad_cache.progress import ProgressFn, no_progress

_logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What training produced: the module with its best held-out state, and the loss curve."""

    module: TargetIntegration
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_loss", "holdout_loss"}
    best_step: int = 0  # step of the kept state (0 = the initial state)
    best_holdout: float = float("inf")  # held-out objective of the kept state
    steps_run: int = 0
    stopped_early: bool = False


def split_rows(parents: Parents, *, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) image rows: usable images (valid, with a valid caption), shuffled with ``seed``.

    Raises:
        ValueError: fewer than 4 usable images (2 to train on, 2 to hold out).
    """
    counts = (
        np.add.reduceat(parents.text_valid.astype(np.int64), parents.offsets[:-1]) if len(parents.offsets) > 1 else []
    )
    usable = np.nonzero(parents.image_valid & (np.asarray(counts) > 0))[0]
    if usable.size < 4:
        raise ValueError(f"the caches hold {usable.size} usable images; integration needs at least 4")
    order = np.random.default_rng(seed).permutation(usable)
    n_hold = min(max(2, round(holdout_fraction * usable.size)), usable.size - 2)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def anchor_texts(parents: Parents, image_rows: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """One valid caption row per image row: drawn with ``rng``, or the first valid one when ``rng`` is None."""
    out = np.empty(len(image_rows), dtype=np.int64)
    for b, r in enumerate(image_rows.tolist()):
        rows = np.arange(parents.offsets[r], parents.offsets[r + 1])
        rows = rows[parents.text_valid[rows]]
        out[b] = rows[0] if rng is None else rows[rng.integers(len(rows))]
    return out


def _objective(module, parents, config, image_rows, text_rows, *, k, device) -> torch.Tensor:
    teacher, positives = parents.batch(image_rows, text_rows, k=k, itm_score=config.itm_score)
    teacher = teacher.to(device)
    modified = modified_targets(module, config, teacher)
    return integration_objective(config, teacher, modified, positives.to(device))


def train_module(
    parents: Parents,
    config: LossConfig,
    *,
    k: int,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    holdout_fraction: float = 0.1,
    eval_every: int = 25,
    patience: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """Train a ``TargetIntegration`` on the parents' cached teacher quantities.

    Args:
        parents: both parent caches.
        config: the integration fields (``gate_init``, ``max_gate``, ``w_int_*``, ``tau_itm``, ``itm_score``, ...).
        k: candidates per query used.
        steps: max optimiser steps.
        lr, weight_decay: AdamW settings of the module's own optimiser.
        batch_size: anchor pairs per step (capped by the training rows).
        holdout_fraction, eval_every, patience: early stopping on the held-out image rows (fixed anchors: each
            image's first valid caption); the state with the lowest held-out objective is kept.
        seed: split, batch order, anchor draws and the module's initialisation.
        device: where the module trains.
        progress: ``progress(iterable, description, total)``.
    Returns:
        The :class:`TrainResult`.
    Raises:
        ValueError: fewer than 4 usable images.
    """
    torch.manual_seed(seed)
    module = TargetIntegration(
        clip_dim=parents.clip_dim, fused_dim=parents.fused_dim, gate_init=config.gate_init, max_gate=config.max_gate
    ).to(device)
    train_rows, hold_rows = split_rows(parents, holdout_fraction=holdout_fraction, seed=seed)
    hold_texts = anchor_texts(parents, hold_rows, None)
    rng = np.random.default_rng(seed + 1)
    batch_size = min(batch_size, train_rows.size)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    result = TrainResult(module=module)

    @torch.no_grad()
    def holdout() -> float:
        module.eval()
        total, n = 0.0, 0
        for start in range(0, hold_rows.size, batch_size):
            rows = hold_rows[start : start + batch_size]
            if rows.size < 2:
                continue
            total += float(_objective(module, parents, config, rows, hold_texts[start : start + batch_size], k=k,
                                      device=device)) * rows.size  # fmt: skip
            n += rows.size
        module.train()
        return total / max(1, n)

    result.best_holdout = holdout()
    result.curve.append({"step": 0, "train_loss": float("nan"), "holdout_loss": result.best_holdout})
    best_state = copy.deepcopy(module.state_dict())
    bad, order, pos = 0, rng.permutation(train_rows), 0
    running: list[float] = []
    for step in progress(range(1, steps + 1), "integrate: training the module", steps):
        if pos + batch_size > order.size:
            order, pos = rng.permutation(train_rows), 0
        rows = order[pos : pos + batch_size]
        pos += batch_size
        loss = _objective(module, parents, config, rows, anchor_texts(parents, rows, rng), k=k, device=device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(float(loss.detach()))
        result.steps_run = step
        if step % eval_every == 0 or step == steps:
            held = holdout()
            result.curve.append({"step": step, "train_loss": float(np.mean(running)), "holdout_loss": held})
            running = []
            if held < result.best_holdout - 1e-6:
                result.best_holdout, result.best_step, bad = held, step, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                bad += 1
                if bad >= patience:
                    result.stopped_early = True
                    _logger.info(
                        "integration: early stop at step %d (best held-out at step %d)", step, result.best_step
                    )
                    break
    module.load_state_dict(best_state)
    module.eval()
    return result


__all__ = ["TrainResult", "anchor_texts", "split_rows", "train_module"]
