"""The optimiser: AdamW with decoupled weight decay on matrices only (open_clip's parameter groups).

The learning-rate schedule is ``mcad_cache.schedules.create_warmup_cosine`` (the one home of warmup-cosine).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(modules: Iterable[nn.Module], *, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices / conv kernels only.

    Biases, norm gains, embeddings' scalars and the logit scale (tensors with ``ndim < 2``, or named ``*logit_scale*``)
    get no decay, as in open_clip ``training/main.py`` (``exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias"
    in n or "logit_scale" in n``).

    Args:
        modules: modules whose trainable parameters are optimised (student, loss module).
        weight_decay: decoupled weight decay for the decayed group.
    Returns:
        Two groups ``[{"params", "weight_decay"}, {"params", "weight_decay": 0}]`` (empty groups dropped).
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or "logit_scale" in name or "bias" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(
    modules: Iterable[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``betas=(0.9, 0.98)``, ``eps=1e-6``: CLIP's (Radford et al. 2021, and
    open_clip's defaults for ViT models).

    Raises:
        ValueError: no trainable parameter, or lr <= 0.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(modules, weight_decay=weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


__all__ = ["create_optimizer", "param_groups"]
