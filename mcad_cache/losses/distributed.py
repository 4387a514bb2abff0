"""DDP helpers for the in-batch loss terms: world size and an all-gather with gradients (gloo and NCCL)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def identity(x: Tensor) -> Tensor:
    """``x`` unchanged (the one-process stand-in for :func:`gather_with_grad`)."""
    return x


def world_size() -> int:
    """Ranks of the initialised ``torch.distributed`` process group, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 with a backward that sums every rank's gradient into the owner's slice (public
    ``torch.distributed`` calls only; works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather [B, ...] from every rank into [W * B, ...] in rank order, differentiable. Equal B on every rank
    is required (DDP's equal steps)."""
    return _AllGather.apply(x)


__all__ = ["gather_with_grad", "identity", "world_size"]
