"""``MCADLoss``: every MCAD term for one batch (student ITC, in-batch and top-k KD, feature alignment, the
integration objective), as an ``nn.Module`` holding the feature heads and the learned integration module.

What follows the paper (MCAD, arXiv 2310.19654, abstract / summary level) and what is ours is listed in
``docs/losses.md``. The teacher's top-k distribution comes from the integration mode object
(``losses.integration``); this module never branches on the mode's name.

The training step sums the values whose keys end in ``_loss`` (each already multiplied by its weight); ``loss`` is
that sum. Terms whose weight is 0 are not computed and their key is absent.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from mcad_cache.losses.config import LossConfig
from mcad_cache.losses.distributed import gather_with_grad, identity, world_size
from mcad_cache.losses.functional import (
    feature_loss,
    itc_loss,
    kd_loss,
    kd_loss_from_log_probs,
    listmle_loss,
    pairwise_rank_loss,
)
from mcad_cache.losses.inputs import StudentOutputs, TeacherTargets, require, zero_invalid
from mcad_cache.losses.integration import TargetIntegration, integration_objective, modified_targets, tau_clip

# top-k term by LossConfig.topk_loss: (student_logits, teacher_log_probs, *, temperature, mask) -> scalar
TOPK_TERMS = {"kl": kd_loss_from_log_probs, "listmle": listmle_loss, "pairwise": pairwise_rank_loss}

_logger = logging.getLogger(__name__)


class MCADLoss(nn.Module):
    """All MCAD loss terms for one batch; holds the learnable feature-alignment heads and the integration module.

    The optimiser must include ``MCADLoss.parameters()`` (heads and integration module train with the student).
    What trains what:

    - student: ``itc_loss``, ``kd_*_loss``, ``topk_*_loss``, ``feat_loss`` (teacher targets are detached);
    - feature heads ``feat_head_image`` / ``feat_head_text`` (Linear student -> Dc): ``feat_loss``;
    - ``integration`` (modified features): only ``integration_loss`` = ``w_int_itc`` · ITC of the modified anchor
      features on ground truth + ``w_int_itm`` · KL(p_ITM || p_modified) over the top-k (+ optional ``w_int_topk_gt``).
      The student sees its outputs detached, so the module cannot move the targets toward the student (the trivial
      solution of KD-trained targets).
    """

    def __init__(
        self,
        config: LossConfig,
        *,
        student_dim: int,
        student_image_feat_dim: int | None = None,
        student_text_feat_dim: int | None = None,
        clip_dim: int | None = None,
        fused_dim: int | None = None,
        gather: bool = False,
    ) -> None:
        """Args:
            config: weights and temperatures.
            student_dim: D of the student embeddings.
            student_image_feat_dim, student_text_feat_dim: F_img / F_txt (needed when ``feat_source="feat"``).
            clip_dim: Dc (needed for feature alignment and modified features).
            fused_dim: C of the fused [CLS] (needed for modified features).
            gather: under ``torch.distributed`` with more than one rank, compute the in-batch terms (ITC, in-batch
                KD, the integration ITC) on the batch all-gathered from every rank, with gradients (open_clip
                ``ClipLoss(gather_with_grad=True, local_loss=False)``): every rank gets the same global in-batch loss
                and DDP's gradient averaging gives the gradient of that loss. Per-query terms (top-k, features) stay
                local; with equal local batches their DDP average is the global mean. No effect on one process.

        Raises:
            ValueError: a dimension the config needs is missing, or a bad config.
        """
        super().__init__()
        config.validate()
        self.config = config
        self.mode = config.mode  # the integration mode object (losses.integration.INTEGRATIONS)
        self.gather = bool(gather)
        self.feat_head_image: nn.Module | None = None
        self.feat_head_text: nn.Module | None = None
        self.integration: TargetIntegration | None = None
        if config.w_feat > 0:
            if clip_dim is None:
                raise ValueError("feature alignment (w_feat > 0) needs clip_dim")
            if config.feat_source == "emb":
                in_img, in_txt = student_dim, student_dim
            else:
                if student_image_feat_dim is None or student_text_feat_dim is None:
                    raise ValueError("feat_source='feat' needs student_image_feat_dim and student_text_feat_dim")
                in_img, in_txt = student_image_feat_dim, student_text_feat_dim
            self.feat_head_image = nn.Linear(in_img, clip_dim)
            self.feat_head_text = nn.Linear(in_txt, clip_dim)
        if config.has_integration_module:
            if clip_dim is None or fused_dim is None:
                raise ValueError("integration='modified_features' needs clip_dim and fused_dim")
            self.integration = TargetIntegration(
                clip_dim=clip_dim, fused_dim=fused_dim, gate_init=config.gate_init, max_gate=config.max_gate
            )
            if config.w_integration == 0:
                _logger.warning("modified_features with w_integration = 0: the integration module never trains")

    # ------------------------------------------------------------------ teacher sides
    def _tau_clip(self, teacher: TeacherTargets) -> float:
        return tau_clip(self.config, teacher)

    def _modified(self, teacher: TeacherTargets) -> dict[str, Tensor]:
        """Modified anchor features and top-k sims of both directions (with gradient into the integration module).

        Raises:
            ValueError: a field either direction needs is None (named): every direction is modified, also one whose
                top-k term is off (``w_topk_t2i = 0`` still trains ``proj_text`` / ``gate_text``).
        """
        assert self.integration is not None
        return modified_targets(self.integration, self.config, teacher)

    def topk_teacher_log_probs(
        self, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None = None
    ) -> Tensor:
        """The teacher's log-probabilities at the top-k τ over each query's K candidates, [B, K] float32, from this
        config's integration mode (``losses.integration``); ``modified`` = the learned module's outputs, if any.

        Raises:
            ValueError: a ``TeacherTargets`` field the mode needs is None.
        """
        return self.mode.teacher_log_probs(self.config, teacher, direction, modified)

    # ------------------------------------------------------------------ forward
    def forward(
        self, student: StudentOutputs, teacher: TeacherTargets, *, positives: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Compute every enabled term.

        Args:
            student: the student's outputs (see ``StudentOutputs``), with gradient.
            teacher: cached teacher targets (see ``TeacherTargets``); ``LossConfig.required_inputs()`` lists the
                fields needed.
            positives: optional [B, B] bool in-batch positives for the ITC terms (``duplicate_positives``): the same
                image or the same caption text on two anchors. None = ``teacher.positives`` (set by the join), else
                only the diagonal (open_clip ``ClipLoss``).
        Returns:
            ``{"itc_loss", "kd_i2t_loss", "kd_t2i_loss", "topk_i2t_loss", "topk_t2i_loss", "feat_loss",
            "integration_loss"}`` restricted to ``config.loss_keys()``, each a weighted scalar float32, plus
            ``"loss"``: the sum of the **student's** terms. ``integration_loss`` (teacher side) is logged apart: it
            enters ``loss`` as ``x - x.detach()``, which adds its gradient (to the module only) and nothing to the
            value, so ``loss`` curves compare across presets.
        Raises:
            ValueError: a needed input is None, or shapes disagree.
        """
        # Everything in float32, also inside a bf16/fp16 autocast region of the training step: autocast would
        # otherwise run the similarity matmuls and the heads in low precision.
        with torch.autocast(device_type=student.image_emb.device.type, enabled=False):
            return self._forward_fp32(student, teacher, positives)

    def _forward_fp32(
        self, student: StudentOutputs, teacher: TeacherTargets, positives: Tensor | None
    ) -> dict[str, Tensor]:
        cfg = self.config
        teacher = zero_invalid(teacher)
        if positives is None and teacher.positives is not None:
            positives = teacher.positives.to(student.image_emb.device)
        out: dict[str, Tensor] = {}
        img = student.image_emb.float()
        txt = student.text_emb.float()
        scale = student.logit_scale.float()
        gather = gather_with_grad if self.gather and world_size() > 1 else identity
        img_all, txt_all = gather(img), gather(txt)
        if positives is not None and positives.shape != (img_all.shape[0], img_all.shape[0]):
            raise ValueError(
                f"positives {tuple(positives.shape)} must be [N, N] over the (gathered) batch of {img_all.shape[0]}"
            )
        logits_i2t = scale * img_all @ txt_all.t()

        if cfg.w_itc > 0:
            out["itc_loss"] = cfg.w_itc * itc_loss(logits_i2t, positives=positives)

        modified = self._modified(teacher) if self.integration is not None else None
        if modified is not None:
            modified["image_all"], modified["text_all"] = gather(modified["image"]), gather(modified["text"])

        # in-batch KD from the dual-stream teacher (modified when modified_features)
        if cfg.w_kd_i2t > 0 or cfg.w_kd_t2i > 0:
            if modified is not None:
                v_t, t_t = modified["image_all"].detach(), modified["text_all"].detach()
            else:
                v_t = gather(require(teacher, "clip_image_emb", "in-batch KD").float())
                t_t = gather(require(teacher, "clip_text_emb", "in-batch KD").float())
            teacher_i2t = v_t @ t_t.t() / self._tau_clip(teacher)
            tau = cfg.kd_temperature
            if cfg.w_kd_i2t > 0:
                out["kd_i2t_loss"] = cfg.w_kd_i2t * kd_loss(logits_i2t, teacher_i2t, temperature=tau)
            if cfg.w_kd_t2i > 0:
                out["kd_t2i_loss"] = cfg.w_kd_t2i * kd_loss(logits_i2t.t(), teacher_i2t.t(), temperature=tau)

        # top-k KD over the cached candidates
        for d, cand, query, weight in (
            ("i2t", "text", img, cfg.w_topk_i2t),
            ("t2i", "image", txt, cfg.w_topk_t2i),
        ):
            if weight <= 0:
                continue
            cand_emb = require(student, f"topk_{cand}_emb", f"topk_{d}_loss").float()
            student_logits = scale * torch.einsum("bd,bkd->bk", query, cand_emb)
            log_p = self.topk_teacher_log_probs(teacher, d, modified).detach()
            mask = getattr(teacher, f"valid_{d}")
            if mask is not None:
                mask = mask.bool()
            out[f"topk_{d}_loss"] = weight * TOPK_TERMS[cfg.topk_loss](
                student_logits, log_p, temperature=cfg.topk_temperature, mask=mask
            )

        # feature alignment to (modified) teacher features
        if cfg.w_feat > 0:
            assert self.feat_head_image is not None and self.feat_head_text is not None
            if modified is not None:
                v_t, t_t = modified["image"].detach(), modified["text"].detach()
            else:
                v_t = require(teacher, "clip_image_emb", "feat_loss").float()
                t_t = require(teacher, "clip_text_emb", "feat_loss").float()
            if cfg.feat_source == "emb":
                s_img, s_txt = student.image_emb, student.text_emb
            else:
                s_img = require(student, "image_feat", "feat_source='feat'")
                s_txt = require(student, "text_feat", "feat_source='feat'")
            f_img = self.feat_head_image(s_img.float())
            f_txt = self.feat_head_text(s_txt.float())
            out["feat_loss"] = (
                cfg.w_feat
                * 0.5
                * (feature_loss(f_img, v_t, kind=cfg.feat_kind) + feature_loss(f_txt, t_t, kind=cfg.feat_kind))
            )

        out["loss"] = sum(out.values(), torch.zeros((), device=img.device))
        if modified is not None and cfg.w_integration > 0:
            teacher_side = cfg.w_integration * integration_objective(cfg, teacher, modified, positives)
            out["integration_loss"] = teacher_side
            out["loss"] = out["loss"] + (teacher_side - teacher_side.detach())  # its gradient, not its value
        return out

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Scalars to log (not losses): the integration gates, when present."""
        if self.integration is None:
            return {}
        g_img, g_txt = self.integration.gates()
        return {"gate_image": float(g_img), "gate_text": float(g_txt)}


__all__ = ["MCADLoss"]
