"""MCAD losses: student ITC, in-batch and top-k distribution distillation, feature alignment, target integration.

Modules: ``config`` (``LossConfig``, presets), ``inputs`` (``StudentOutputs``, ``TeacherTargets``), ``functional``
(plain losses), ``integration`` (integration modes as objects in one table, the learned ``TargetIntegration``),
``mcad`` (``MCADLoss``), ``distributed`` (DDP gather with gradients). Formulas and sources: ``docs/losses.md``.
"""

from __future__ import annotations

from mcad_cache.losses.config import AGGREGATIONS, FEATURE_SOURCES, PRESETS, LossConfig, preset
from mcad_cache.losses.functional import (
    FEATURE_KINDS,
    ITM_SCORES,
    TOPK_LOSSES,
    duplicate_positives,
    feature_loss,
    itc_loss,
    itm_scores,
    kd_loss,
    kd_loss_from_log_probs,
    listmle_loss,
    logit_fusion_logits,
    masked_log_softmax,
    mixture_log_probs,
    pairwise_rank_loss,
)
from mcad_cache.losses.inputs import PER_CANDIDATE, StudentOutputs, TeacherTargets
from mcad_cache.losses.integration import (
    INTEGRATIONS,
    Integration,
    TargetIntegration,
    get_integration,
    integration_objective,
    modified_direction,
    modified_targets,
)
from mcad_cache.losses.mcad import MCADLoss

__all__ = [
    "AGGREGATIONS",
    "FEATURE_KINDS",
    "FEATURE_SOURCES",
    "INTEGRATIONS",
    "ITM_SCORES",
    "PER_CANDIDATE",
    "PRESETS",
    "TOPK_LOSSES",
    "Integration",
    "LossConfig",
    "MCADLoss",
    "StudentOutputs",
    "TargetIntegration",
    "TeacherTargets",
    "duplicate_positives",
    "feature_loss",
    "get_integration",
    "integration_objective",
    "itc_loss",
    "itm_scores",
    "kd_loss",
    "kd_loss_from_log_probs",
    "listmle_loss",
    "logit_fusion_logits",
    "masked_log_softmax",
    "mixture_log_probs",
    "modified_direction",
    "modified_targets",
    "pairwise_rank_loss",
    "preset",
]
