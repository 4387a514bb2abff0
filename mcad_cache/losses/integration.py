"""Integration modes: how the two teachers' cached outputs become one teacher distribution over the top-k.

One table, :data:`INTEGRATIONS` (name -> object), is the only place a mode is named. Each mode object declares the
``TeacherTargets`` fields it needs (:meth:`Integration.topk_inputs`, :meth:`Integration.module_inputs`), whether it
reads the single-stream teacher, whether it holds a learned module, and computes its teacher log-probabilities over a
query's K candidates (:meth:`Integration.teacher_log_probs`). A new mode is one class plus one row in the table.

Modes (formulas: docs/losses.md; DESIGN.md "The MCAD losses"):

- ``none``: CLIP alone, ``p_T = softmax(s_clip / tau_clip / τ)``.
- ``logit_fusion``: ``p_T = softmax((w_C s_clip / tau_C + w_A s_itm / tau_A + w_S s_ss / tau_S) / τ)``.
- ``mixture``: ``p_T = Σ_m w̄_m softmax(s_m / tau_m / τ)``.
- ``modified_features`` (ours): CLIP features plus a learned, gated projection of the fused [CLS]
  (:class:`TargetIntegration`), giving modified top-k similarities ``s'`` and ``p_T = softmax(s' / tau_clip / τ)``.
  Trained online by ``integration_loss`` (the ``mcad-online`` preset), or once, offline, by ``mcad-cache integrate``.
- ``derived``: fixed targets read from a derived cache written by ``mcad-cache integrate`` (any of the above,
  computed once): ``p_T = softmax(l / τ)`` with ``l`` the stored log-probabilities (``TeacherTargets.topk_logits_*``).

:func:`modified_targets` and :func:`integration_objective` are the module's forward and its training objective,
shared by ``MCADLoss`` (online) and ``mcad_cache.integrate`` (offline).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad_cache.losses.functional import (
    itc_loss,
    itm_scores,
    kd_loss_from_log_probs,
    logit_fusion_logits,
    masked_log_softmax,
    mixture_log_probs,
)
from mcad_cache.losses.inputs import TeacherTargets, require

if TYPE_CHECKING:
    from mcad_cache.losses.config import LossConfig

DIRECTIONS = (("i2t", "text"), ("t2i", "image"))  # (direction, candidate modality)


def tau_clip(config: LossConfig, teacher: TeacherTargets) -> float:
    """CLIP teacher temperature: ``config.tau_clip``, or ``1 / clip_logit_scale`` (the teacher's own) when None.

    Raises:
        ValueError: ``tau_clip`` is None and ``teacher.clip_logit_scale`` is None.
    """
    if config.tau_clip is not None:
        return config.tau_clip
    scale = require(teacher, "clip_logit_scale", "tau_clip=None (the CLIP teacher's own scale)")
    return 1.0 / float(scale)


def tau_ss(config: LossConfig, teacher: TeacherTargets) -> float:
    """Single-stream ITC temperature: ``config.tau_ss``, or ``1 / ss_logit_scale`` when None.

    Raises:
        ValueError: ``tau_ss`` is None and ``teacher.ss_logit_scale`` is None.
    """
    if config.tau_ss is not None:
        return config.tau_ss
    return 1.0 / float(require(teacher, "ss_logit_scale", "tau_ss=None"))


def clip_topk_sims(teacher: TeacherTargets, direction: str) -> Tensor:
    """CLIP cosines of each query with its K candidates, [B, K] float32: the cached ``clip_topk_sims_*``, or
    recomputed from the anchor and candidate CLIP embeddings.

    Raises:
        ValueError: neither is present.
    """
    sims = getattr(teacher, f"clip_topk_sims_{direction}")
    if sims is not None:
        return sims.float()
    if direction == "i2t" and teacher.clip_topk_text_emb is not None and teacher.clip_image_emb is not None:
        return torch.einsum("bd,bkd->bk", teacher.clip_image_emb.float(), teacher.clip_topk_text_emb.float())
    if direction == "t2i" and teacher.clip_topk_image_emb is not None and teacher.clip_text_emb is not None:
        return torch.einsum("bd,bkd->bk", teacher.clip_text_emb.float(), teacher.clip_topk_image_emb.float())
    raise ValueError(f"TeacherTargets.clip_topk_sims_{direction} is None (and no CLIP candidate embeddings)")


def pool_fused(fused: Tensor, weights_logits: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pool [B, K, C] fused features into [B, C] with softmax(weights_logits) (or uniform) over valid entries.

    Returns (pooled [B, C], row_ok [B] bool)."""
    b, k, _ = fused.shape
    if mask is None:
        mask = torch.ones(b, k, dtype=torch.bool, device=fused.device)
    logits = weights_logits.float() if weights_logits is not None else torch.zeros(b, k, device=fused.device)
    w = masked_log_softmax(logits, mask).exp() * mask.float()
    return torch.einsum("bk,bkc->bc", w, fused.float()), mask.any(-1)


class TargetIntegration(nn.Module):
    """Modified teacher features: CLIP features plus a learned, gated projection of the single-stream fused [CLS].

    Ours (MCAD's module is not public), following its summary: the single-stream fused features are incorporated
    into the dual-stream image and text features, giving modified features and similarities:

    - per candidate pair (query, candidate j) with fused state h_j:
      ``v' = normalize(v + g_v · normalize(P_v h_j))``, ``t' = normalize(t + g_t · normalize(P_t h_j))``,
      ``s'_j = <v', t'>`` (the modified top-k similarity);
    - per anchor (in-batch and feature targets): the query's K fused states pooled with the teacher's own ITM
      distribution (no labels), ``h̄ = Σ_j softmax(itm_j / τ_itm) h_j``, then the same formula.

    ``P_v, P_t: Linear(C, Dc)``; ``g = max_gate · tanh(a)`` with ``a`` initialised so ``g = gate_init`` (near 0:
    training starts from plain CLIP; |g| <= max_gate < 1 keeps the result within arcsin(max_gate) of CLIP).
    """

    def __init__(self, *, clip_dim: int, fused_dim: int, gate_init: float = 0.01, max_gate: float = 0.5) -> None:
        super().__init__()
        self.max_gate = float(max_gate)
        self.proj_image = nn.Linear(fused_dim, clip_dim)
        self.proj_text = nn.Linear(fused_dim, clip_dim)
        a0 = math.atanh(gate_init / max_gate)
        self.gate_image = nn.Parameter(torch.tensor(a0))
        self.gate_text = nn.Parameter(torch.tensor(a0))

    def gates(self) -> tuple[Tensor, Tensor]:
        """``(g_image, g_text)`` 0-dim float32, each in (-max_gate, max_gate)."""
        return self.max_gate * torch.tanh(self.gate_image), self.max_gate * torch.tanh(self.gate_text)

    def modify_image(self, clip_image: Tensor, fused: Tensor, row_ok: Tensor | None = None) -> Tensor:
        """``normalize(v + g_v · normalize(P_v fused))``; rows with ``row_ok == False`` stay ``v``.

        Args:
            clip_image: [..., Dc] L2-normalised CLIP image features, float32.
            fused: [..., C] fused [CLS] states (or their pool), float32.
            row_ok: [...] bool or None.
        Returns:
            [..., Dc] float32, L2-normalised.
        """
        g, _ = self.gates()
        delta = g * F.normalize(self.proj_image(fused.float()), dim=-1)
        if row_ok is not None:
            delta = delta * row_ok.unsqueeze(-1).float()
        return F.normalize(clip_image.float() + delta, dim=-1)

    def modify_text(self, clip_text: Tensor, fused: Tensor, row_ok: Tensor | None = None) -> Tensor:
        """As ``modify_image`` with ``P_t`` and ``g_t``."""
        _, g = self.gates()
        delta = g * F.normalize(self.proj_text(fused.float()), dim=-1)
        if row_ok is not None:
            delta = delta * row_ok.unsqueeze(-1).float()
        return F.normalize(clip_text.float() + delta, dim=-1)

    def topk_sims(self, query_emb: Tensor, cand_emb: Tensor, fused: Tensor, *, direction: str) -> Tensor:
        """Modified cosines ``s'_j`` of each query with its K candidates.

        Args:
            query_emb: [B, Dc] CLIP embeddings of the queries (images for i2t, captions for t2i).
            cand_emb: [B, K, Dc] CLIP embeddings of the candidates (captions for i2t, images for t2i).
            fused: [B, K, C] fused [CLS] of each (query, candidate) pair.
            direction: ``"i2t"`` or ``"t2i"``.
        Returns:
            [B, K] float32 cosines.
        """
        q = query_emb.float().unsqueeze(1).expand_as(cand_emb)
        if direction == "i2t":
            v, t = self.modify_image(q, fused), self.modify_text(cand_emb, fused)
        elif direction == "t2i":
            v, t = self.modify_image(cand_emb, fused), self.modify_text(q, fused)
        else:
            raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
        return (v * t).sum(-1)


def modified_direction(
    module: TargetIntegration, config: LossConfig, teacher: TeacherTargets, direction: str
) -> dict[str, Tensor]:
    """The modified features of one direction's queries, with gradient into ``module``.

    Args:
        module: the integration module.
        config: ``itm_score``, ``tau_itm``, ``aggregate``.
        teacher: needs ``fused_cls_<d>``, ``clip_topk_<cand>_emb``, ``itm_logits_<d>``, the query CLIP embeddings
            (``clip_image_emb`` for i2t, ``clip_text_emb`` for t2i) and optionally ``valid_<d>``.
        direction: ``"i2t"`` or ``"t2i"``.
    Returns:
        ``anchor`` [B, Dc] modified query features (``v'`` for i2t, ``t'`` for t2i), L2-normalised; ``topk_sims``
        [B, K] modified cosines ``c'``; ``itm`` [B, K] ITM scores.
    Raises:
        ValueError: a needed field is None; the message names it (a loader that skipped a direction is an error,
            never a silently unmodified side).
    """
    cand = dict(DIRECTIONS)[direction]
    why = f"modified features ({direction})"
    query_name = "clip_image_emb" if direction == "i2t" else "clip_text_emb"
    query = require(teacher, query_name, why).float()
    fused = require(teacher, f"fused_cls_{direction}", why).float()
    cand_emb = require(teacher, f"clip_topk_{cand}_emb", why).float()
    itm = itm_scores(require(teacher, f"itm_logits_{direction}", why), kind=config.itm_score)
    valid = getattr(teacher, f"valid_{direction}")
    pooled, row_ok = pool_fused(fused, itm / config.tau_itm if config.aggregate == "itm_softmax" else None, valid)
    modify = module.modify_image if direction == "i2t" else module.modify_text
    return {
        "anchor": modify(query, pooled, row_ok),
        "topk_sims": module.topk_sims(query, cand_emb, fused, direction=direction),
        "itm": itm,
    }


def modified_targets(module: TargetIntegration, config: LossConfig, teacher: TeacherTargets) -> dict[str, Tensor]:
    """Both directions of :func:`modified_direction`: ``image`` [B, Dc] (``v'``), ``text`` [B, Dc] (``t'``),
    ``topk_sims_i2t`` / ``topk_sims_t2i`` [B, K], ``itm_i2t`` / ``itm_t2i`` [B, K].

    Raises:
        ValueError: a field either direction needs is None (named).
    """
    out: dict[str, Tensor] = {}
    for d, anchor in (("i2t", "image"), ("t2i", "text")):
        one = modified_direction(module, config, teacher, d)
        out[anchor], out[f"topk_sims_{d}"], out[f"itm_{d}"] = one["anchor"], one["topk_sims"], one["itm"]
    return out


def integration_objective(
    config: LossConfig, teacher: TeacherTargets, modified: dict[str, Tensor], positives: Tensor | None = None
) -> Tensor:
    """The objective that trains the integration module (teacher side only; docs/losses.md), scalar float32:
    ``w_int_itc`` · ITC of the modified anchors on ground truth (``positives``: in-batch duplicates)
    + ``w_int_itm`` · ½ Σ_dir KL(softmax(a / τ_A) ‖ softmax(c' / τ_C)) over the valid top-k
    + ``w_int_topk_gt`` · ½ Σ_dir −log Σ_{positive j} softmax(c' / τ_C)_j. All three: ours.

    Args:
        config: the weights and temperatures.
        teacher: ``valid_*``, ``clip_logit_scale`` (when ``tau_clip`` is None), ``is_positive_*`` (gt term).
        modified: :func:`modified_targets` (``image_all`` / ``text_all``, when present, are the gathered anchors).
        positives: [B, B] bool or None.
    """
    total = torch.zeros((), device=modified["image"].device)
    tau_c = tau_clip(config, teacher)
    if config.w_int_itc > 0:
        v_all, t_all = modified.get("image_all", modified["image"]), modified.get("text_all", modified["text"])
        total = total + config.w_int_itc * itc_loss(v_all @ t_all.t() / tau_c, positives=positives)
    for d in ("i2t", "t2i"):
        z_mod = modified[f"topk_sims_{d}"] / tau_c
        mask = getattr(teacher, f"valid_{d}")
        mask = mask.bool() if mask is not None else None
        if config.w_int_itm > 0:
            teacher_lp = masked_log_softmax(modified[f"itm_{d}"] / config.tau_itm, mask)
            total = total + config.w_int_itm * 0.5 * kd_loss_from_log_probs(z_mod, teacher_lp, mask=mask)
        if config.w_int_topk_gt > 0:
            pos = require(teacher, f"is_positive_{d}", "w_int_topk_gt > 0").bool()
            if mask is not None:
                pos = pos & mask
            log_p = masked_log_softmax(z_mod, mask)
            has_pos = pos.any(-1)
            if bool(has_pos.any()):
                lp_pos = torch.logsumexp(log_p.masked_fill(~pos, float("-inf")), dim=-1)
                total = total - config.w_int_topk_gt * 0.5 * lp_pos[has_pos].mean()
    return total


# ------------------------------------------------------------------------------------------------------ the modes
class Integration:
    """One integration mode. Subclasses override what differs; instances are stateless (the learned module, when a
    mode has one, lives in ``MCADLoss``)."""

    name = ""

    def validate(self, config: LossConfig) -> None:
        """Raises:
        ValueError: the config's weights cannot form this mode's distribution.
        """

    def uses_single_stream(self, config: LossConfig) -> bool:
        """True when this mode's top-k distribution reads single-stream teacher outputs."""
        return False

    def has_module(self, config: LossConfig) -> bool:
        """True when ``MCADLoss`` must hold a trainable :class:`TargetIntegration` for this mode."""
        return False

    def topk_inputs(self, config: LossConfig, direction: str) -> set[str]:
        """``TeacherTargets`` fields :meth:`teacher_log_probs` reads for ``direction`` (besides ``valid_*``)."""
        return {f"clip_topk_sims_{direction}", "clip_logit_scale"}

    def module_inputs(self, config: LossConfig, direction: str) -> set[str]:
        """``TeacherTargets`` fields the learned module reads for ``direction`` (empty without a module)."""
        return set()

    def teacher_log_probs(
        self, config: LossConfig, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None
    ) -> Tensor:
        """Teacher log-probabilities at the top-k temperature τ over the K candidates.

        Args:
            config: temperatures and fusion weights.
            teacher: cached targets (invalid slots already zeroed).
            direction: ``"i2t"`` or ``"t2i"``.
            modified: the learned module's outputs (``MCADLoss._modified``), or None without a module.
        Returns:
            [B, K] float32 log-probabilities (``-inf`` at invalid candidates); may carry gradient into the module
            (the caller detaches).
        Raises:
            ValueError: a needed ``TeacherTargets`` field is None.
        """
        z = clip_topk_sims(teacher, direction) / tau_clip(config, teacher)
        return masked_log_softmax(z / config.topk_temperature, getattr(teacher, f"valid_{direction}"))


class ClipOnly(Integration):
    """``none``: the CLIP teacher's own top-k distribution."""

    name = "none"


class _Fused(Integration):
    """Shared by ``logit_fusion`` and ``mixture``: weighted CLIP, ITM and single-stream ITC scores."""

    def validate(self, config: LossConfig) -> None:
        if config.w_fusion_clip + config.w_fusion_itm + config.w_fusion_ss <= 0:
            raise ValueError("logit_fusion / mixture need at least one positive w_fusion_* weight")

    def uses_single_stream(self, config: LossConfig) -> bool:
        return config.w_fusion_itm > 0 or config.w_fusion_ss > 0

    def topk_inputs(self, config: LossConfig, direction: str) -> set[str]:
        need: set[str] = set()
        if config.w_fusion_clip > 0:
            need |= {f"clip_topk_sims_{direction}", "clip_logit_scale"}
        if config.w_fusion_itm > 0:
            need.add(f"itm_logits_{direction}")
        if config.w_fusion_ss > 0:
            need |= {f"ss_sims_{direction}", "ss_logit_scale"}
        return need

    def _scores(
        self, config: LossConfig, teacher: TeacherTargets, direction: str
    ) -> tuple[list[Tensor], list[float], list[float]]:
        why = f"topk_{direction} ({self.name})"
        scores, weights, temps = [], [], []
        if config.w_fusion_clip > 0:
            scores.append(clip_topk_sims(teacher, direction))
            weights.append(config.w_fusion_clip)
            temps.append(tau_clip(config, teacher))
        if config.w_fusion_itm > 0:
            itm = require(teacher, f"itm_logits_{direction}", why)
            scores.append(itm_scores(itm, kind=config.itm_score))
            weights.append(config.w_fusion_itm)
            temps.append(config.tau_itm)
        if config.w_fusion_ss > 0:
            scores.append(require(teacher, f"ss_sims_{direction}", why).float())
            weights.append(config.w_fusion_ss)
            temps.append(tau_ss(config, teacher))
        return scores, weights, temps


class LogitFusion(_Fused):
    """``logit_fusion``: one softmax over the weighted sum of the teachers' logits (:func:`logit_fusion_logits`)."""

    name = "logit_fusion"

    def teacher_log_probs(
        self, config: LossConfig, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None
    ) -> Tensor:
        mask = getattr(teacher, f"valid_{direction}")
        scores, weights, temps = self._scores(config, teacher, direction)
        z = logit_fusion_logits(scores, weights=weights, temperatures=temps, mask=mask)
        return masked_log_softmax(z / config.topk_temperature, mask)


class Mixture(_Fused):
    """``mixture``: a weighted mixture of the teachers' distributions (:func:`mixture_log_probs`)."""

    name = "mixture"

    def teacher_log_probs(
        self, config: LossConfig, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None
    ) -> Tensor:
        mask = getattr(teacher, f"valid_{direction}")
        scores, weights, temps = self._scores(config, teacher, direction)
        logits = [s / t for s, t in zip(scores, temps, strict=True)]
        return mixture_log_probs(logits, weights=weights, temperature=config.topk_temperature, mask=mask)


class ModifiedFeatures(Integration):
    """``modified_features`` (ours): the learned :class:`TargetIntegration` gives modified top-k similarities."""

    name = "modified_features"

    def uses_single_stream(self, config: LossConfig) -> bool:
        return True

    def has_module(self, config: LossConfig) -> bool:
        return config.w_kd_i2t + config.w_kd_t2i + config.w_topk_i2t + config.w_topk_t2i + config.w_feat > 0

    def topk_inputs(self, config: LossConfig, direction: str) -> set[str]:
        cand = dict(DIRECTIONS)[direction]
        return {
            "clip_image_emb",
            "clip_text_emb",
            f"clip_topk_{cand}_emb",
            "clip_logit_scale",
            f"itm_logits_{direction}",
        }

    def module_inputs(self, config: LossConfig, direction: str) -> set[str]:
        if not self.has_module(config):
            return set()
        cand = dict(DIRECTIONS)[direction]
        need = {
            "clip_image_emb", "clip_text_emb", "clip_logit_scale",
            f"fused_cls_{direction}", f"itm_logits_{direction}", f"valid_{direction}", f"clip_topk_{cand}_emb",
        }  # fmt: skip
        if config.w_int_topk_gt > 0:
            need.add(f"is_positive_{direction}")
        return need

    def teacher_log_probs(
        self, config: LossConfig, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None
    ) -> Tensor:
        key = f"topk_sims_{direction}"
        if modified is None or key not in modified:
            cand = dict(DIRECTIONS)[direction]
            why = f"topk_{direction} ({self.name})"
            raise ValueError(f"{why} needs TeacherTargets.fused_cls_{direction} and clip_topk_{cand}_emb")
        z = modified[key].detach() / tau_clip(config, teacher)
        return masked_log_softmax(z / config.topk_temperature, getattr(teacher, f"valid_{direction}"))


class Derived(Integration):
    """``derived``: fixed targets of a derived cache (``mcad-cache integrate``); nothing is learned here."""

    name = "derived"

    def topk_inputs(self, config: LossConfig, direction: str) -> set[str]:
        return {f"topk_logits_{direction}"}

    def teacher_log_probs(
        self, config: LossConfig, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None
    ) -> Tensor:
        why = f"topk_{direction} (fixed targets: pass a derived cache written by `mcad-cache integrate`)"
        logits = require(teacher, f"topk_logits_{direction}", why).float()
        return masked_log_softmax(logits / config.topk_temperature, getattr(teacher, f"valid_{direction}"))


INTEGRATIONS: dict[str, Integration] = {
    mode.name: mode for mode in (ClipOnly(), LogitFusion(), Mixture(), ModifiedFeatures(), Derived())
}  # the one table of integration modes; LossConfig.integration is a key of it


def get_integration(name: str) -> Integration:
    """The mode object registered under ``name``.

    Raises:
        ValueError: unknown name (lists the known ones).
    """
    if name not in INTEGRATIONS:
        raise ValueError(f"LossConfig.integration must be one of {tuple(INTEGRATIONS)}, got {name!r}")
    return INTEGRATIONS[name]


__all__ = [
    "INTEGRATIONS",
    "ClipOnly",
    "Derived",
    "Integration",
    "LogitFusion",
    "Mixture",
    "ModifiedFeatures",
    "TargetIntegration",
    "clip_topk_sims",
    "get_integration",
    "integration_objective",
    "modified_direction",
    "modified_targets",
    "pool_fused",
    "tau_clip",
    "tau_ss",
]
