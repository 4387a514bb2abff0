"""Distillation from cached teachers: the stream, the join with the caches, the step, the loop, the run directory.

Modules: ``factory`` (``create_distill``: the one wiring), ``stream`` (``EpochStream``), ``join`` (``TargetJoiner``,
``CandidateImages``, ``open_caches``), ``batch`` (``DistillBatch``), ``forward`` (``distill_forward``, candidate
sources), ``step`` (``train_step``), ``loop`` (``train_loop``), ``prefetch``, ``optim`` (AdamW groups),
``checkpoint`` (exact-resume checkpoints), ``rundir`` (run-directory files; eval reads runs through it).
"""

from __future__ import annotations

from mcad_cache.distill.batch import DistillBatch
from mcad_cache.distill.checkpoint import (
    TrainState,
    checkpoint_path,
    continue_schedule,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rank_state,
    save_checkpoint,
    set_rng_state,
)
from mcad_cache.distill.factory import DistillRun, create_distill, create_loss_module
from mcad_cache.distill.forward import (
    ONLINE_CANDIDATES,
    CandidateSource,
    DistillStep,
    OnlineCandidates,
    distill_forward,
)
from mcad_cache.distill.join import CandidateImages, TargetJoiner, check_cache_data, check_caches_match, open_caches
from mcad_cache.distill.loop import StepCounter, train_loop
from mcad_cache.distill.optim import create_optimizer, param_groups
from mcad_cache.distill.step import step_generator, total_loss, train_step
from mcad_cache.distill.stream import EpochStream

__all__ = [
    "ONLINE_CANDIDATES",
    "CandidateImages",
    "CandidateSource",
    "DistillBatch",
    "DistillRun",
    "DistillStep",
    "EpochStream",
    "OnlineCandidates",
    "StepCounter",
    "TargetJoiner",
    "TrainState",
    "check_cache_data",
    "check_caches_match",
    "checkpoint_path",
    "continue_schedule",
    "create_distill",
    "create_loss_module",
    "create_optimizer",
    "distill_forward",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "open_caches",
    "param_groups",
    "prune_checkpoints",
    "rank_state",
    "save_checkpoint",
    "set_rng_state",
    "step_generator",
    "total_loss",
    "train_loop",
    "train_step",
]
