"""Distillation under DDP (torchrun): the in-batch terms over the global batch, and the rank summaries.

With ``--in-batch global`` (the default) the in-batch ITC and the in-batch KD of ``MCADLoss`` run on the image and
text embeddings all-gathered from every rank, with gradients (``losses.distributed.gather_with_grad``, the scheme of
open_clip's ``ClipLoss(gather_with_grad=True, local_loss=False)``), and the ITC positives are computed over the
gathered batch (the same caption or image on two ranks is a positive, not a negative). So W ranks with batch B train
like one process with batch W x B on the same samples: every rank computes the same global in-batch loss, each rank's
local features receive the gradient of that loss summed over the ranks' copies (W x), and DDP's average over ranks
divides it back. Per-sample terms (top-k KD over cached candidates, feature alignment) stay per rank: their mean over
ranks, which DDP's gradient average takes, is the mean over the global batch (equal B per rank).

``--in-batch rank`` restores per-rank terms (each rank's B x B matrices; W ranks then train like W batches of B).

Not global in either mode: BatchNorm statistics of the student's image tower (per rank, as torch DDP without
SyncBatchNorm), and gradient clipping under DDP, which clips the student and loss module together (one process
clips them separately, ``distill.step``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mcad_cache.distill.batch import DistillBatch
from mcad_cache.distill.forward import ONLINE_CANDIDATES, CandidateSource, DistillStep, distill_forward
from mcad_cache.errors import ConfigError
from mcad_cache.losses import duplicate_positives

IN_BATCH_MODES = ("global", "rank")  # DistillConfig.in_batch


def in_batch_gather(in_batch: str, *, world_size: int) -> bool:
    """Whether ``MCADLoss`` gathers its in-batch terms over the ranks (``MCADLoss.gather``): ``global`` with more
    than one rank.

    Raises:
        ConfigError: ``in_batch`` is not one of :data:`IN_BATCH_MODES`.
    """
    if in_batch not in IN_BATCH_MODES:
        raise ConfigError(f"--in-batch {in_batch!r} is unknown; use {' | '.join(IN_BATCH_MODES)}")
    return in_batch == "global" and world_size > 1


def gather_positives(batch: DistillBatch) -> Tensor:
    """ITC positives over the batch gathered from every rank, in rank order (the order of ``gather_with_grad``):
    ``duplicate_positives`` of all ranks' keys and anchor captions, [W x B, W x B] bool on CPU.

    All ranks must call it at the same step (it is a collective: ``all_gather_object``).
    """
    local = (list(batch.keys), list(batch.texts[: batch.num_pairs]))
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    keys = [k for part_keys, _ in parts for k in part_keys]
    captions = [c for _, part_captions in parts for c in part_captions]
    return duplicate_positives(keys, captions)


class GlobalBatchStep(DistillStep):
    """:class:`~mcad_cache.distill.forward.DistillStep` whose ITC positives span the global batch (the loss module
    gathers the embeddings itself, ``MCADLoss(gather=True)``). Runs inside DDP's forward, in the training thread, so
    its collective is ordered with DDP's own on every rank."""

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        if batch.targets.positives is not None:
            batch.targets.positives = gather_positives(batch)
        return distill_forward(self.model, self.loss_module, batch, candidates=self.candidates)


def create_ddp_step(
    model: nn.Module,
    loss_module: nn.Module,
    *,
    candidates: CandidateSource = ONLINE_CANDIDATES,
    global_in_batch: bool,
) -> DistributedDataParallel:
    """The student and loss module as one DDP module (one gradient all-reduce for both), with global in-batch
    positives when ``global_in_batch`` (the loss module must then have ``gather=True``, :func:`in_batch_gather`)."""
    step_cls = GlobalBatchStep if global_in_batch else DistillStep
    step = step_cls(model, loss_module, candidates=candidates)
    return DistributedDataParallel(step, find_unused_parameters=True)


def mean_over_ranks(values: dict[str, Any], *, keys: Callable[[str], bool]) -> dict[str, Any]:
    """``values`` with the entries whose name passes ``keys`` replaced by their mean over the ranks (one float64
    all-reduce; a collective: every rank calls it at the same step). The logged losses are then the losses of the
    global batch: global in-batch terms are equal on every rank, per-sample terms average to the global mean."""
    names = sorted(k for k, v in values.items() if keys(k) and isinstance(v, (int, float)))
    if not names or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {**values, **{k: float(v) for k, v in zip(names, t.tolist(), strict=True)}}


def gather_counts(value: int) -> list[int]:
    """Every rank's ``value`` (e.g. samples seen), in rank order; ``[value]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [int(value)]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, int(value))
    return [int(v) for v in values]


__all__ = [
    "IN_BATCH_MODES",
    "GlobalBatchStep",
    "create_ddp_step",
    "gather_counts",
    "gather_positives",
    "in_batch_gather",
    "mean_over_ranks",
]
