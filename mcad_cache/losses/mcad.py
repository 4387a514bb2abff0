"""MCAD losses: student ITC, in-batch and top-k distribution distillation, feature alignment, target integration.

What follows the paper (MCAD, arXiv 2310.19654, abstract / summary level) and what is ours is listed in
``docs/losses.md``; every weight and temperature lives in ``LossConfig`` with a comment naming its source.

Conventions (STYLE.md): ``sims`` are cosines in [-1, 1]; ``logits = logit_scale * sims`` with a *linear* logit scale;
KD uses ``log_softmax(logits / τ)`` on both sides and ``KL(p_T || q_S) * τ²`` (Hinton et al. 2015; timm's
``LogitDistillationTask``), in float32. Invalid candidates (``valid == False``) are removed from both softmaxes; a
query whose candidates are all invalid is left out of the mean. Shape letters: B anchor pairs, K candidates per query,
D student embedding, Dc CLIP embedding, C fused [CLS] width.

The training step sums the values whose keys end in ``_loss`` (each already multiplied by its weight); ``loss`` is
that sum. Terms whose weight is 0 are not computed and their key is absent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_logger = logging.getLogger(__name__)

INTEGRATIONS = ("none", "logit_fusion", "mixture", "modified_features")
ITM_SCORES = ("pos_logit", "log_odds")
FEATURE_KINDS = ("cosine", "mse")
FEATURE_SOURCES = ("emb", "feat")
AGGREGATIONS = ("itm_softmax", "mean")
PRESETS = ("contrastive", "clip-kd", "clip-kd-feat", "single-topk", "mcad")


@dataclass(frozen=True)
class LossConfig:
    """Weights and temperatures of every MCAD loss term. A weight of 0 switches its term off (key absent)."""

    # ---- term weights (each ``*_loss`` value is already multiplied by its weight) ----
    w_itc: float = 1.0  # student ITC on ground truth (CLIP; MCAD keeps it beside distillation). Our weight.
    w_kd_i2t: float = 0.5  # in-batch KD, image queries. Our choice: 0.5 per direction = symmetric mean, as ITC
    w_kd_t2i: float = 0.5  # in-batch KD, caption queries. Our choice (see w_kd_i2t)
    w_topk_i2t: float = 0.5  # top-k KD over each image's K cached candidate captions. Our choice
    w_topk_t2i: float = 0.5  # top-k KD over each caption's K cached candidate images. Our choice
    w_feat: float = 1.0  # feature alignment, mean of image and text sides (paper: features help; weight ours)
    w_integration: float = 1.0  # objective that trains the modified-features module (ours; see docs/losses.md)
    # ---- KD temperatures (applied to both teacher and student logits, loss scaled by τ²) ----
    kd_temperature: float = 1.0  # in-batch τ. Our choice: 1 = each model's own logit scale (CLIP-KD, Yang et al. 2024)
    topk_temperature: float = 1.0  # top-k τ. Our choice (as kd_temperature)
    # ---- teacher score temperatures (turn cached scores into teacher logits) ----
    tau_clip: float | None = None  # on CLIP cosines; None = 1 / clip_logit_scale, the teacher's own (CLIP)
    tau_itm: float = 1.0  # on ITM scores; raw logits as ALBEF's retrieval ranks them (our choice of 1)
    tau_ss: float | None = None  # on single-stream ITC cosines; None = 1 / ss_logit_scale (ALBEF temp 0.07)
    itm_score: str = "pos_logit"  # pos_logit = itm_logits[..., 1] (ALBEF/BLIP retrieval code) | log_odds = [1] - [0]
    # ---- how the two teachers are combined ----
    integration: str = "modified_features"  # none | logit_fusion | mixture | modified_features. Default: ours
    w_fusion_clip: float = 1.0  # w_C in logit fusion / mixture (our choice)
    w_fusion_itm: float = 1.0  # w_A (single-stream ITM) in logit fusion / mixture (our choice)
    w_fusion_ss: float = 0.0  # weight of the single-stream ITC cosines in fusion / mixture (our choice: off)
    # ---- feature alignment ----
    feat_kind: str = "cosine"  # cosine (1 - cos) | mse (F.mse_loss, element mean). Our choice; CLIP-KD uses MSE
    feat_source: str = "emb"  # student side: emb (projected embedding, as CLIP-KD's FD) | feat (pre-projection)
    # ---- modified-features integration module (ours: the paper's module is not public) ----
    gate_init: float = 0.01  # initial gate g = max_gate * tanh(a); near 0 so the start is plain CLIP (Flamingo-like)
    max_gate: float = 0.5  # |g| <= max_gate < 1: a CLIP feature turns by at most arcsin(max_gate) = 30 deg (ours)
    aggregate: str = "itm_softmax"  # pool a query's K fused feats: itm_softmax (teacher's ITM belief) | mean. Ours
    w_int_itc: float = 1.0  # integration objective: ITC of modified features on ground truth (ours)
    w_int_itm: float = 1.0  # integration objective: KL(p_ITM || p_modified) over top-k, both directions (ours)
    w_int_topk_gt: float = 0.0  # integration objective: -log P(positives) over top-k with is_positive (ours; off)

    def validate(self) -> None:
        """Raises:
        ValueError: an unknown option name or a non-positive temperature / negative weight.
        """
        for name, value, allowed in (
            ("integration", self.integration, INTEGRATIONS),
            ("itm_score", self.itm_score, ITM_SCORES),
            ("feat_kind", self.feat_kind, FEATURE_KINDS),
            ("feat_source", self.feat_source, FEATURE_SOURCES),
            ("aggregate", self.aggregate, AGGREGATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("w_") and value < 0:
                raise ValueError(f"LossConfig.{f.name} must be >= 0, got {value}")
            if (f.name.startswith("tau_") or f.name.endswith("_temperature")) and value is not None and value <= 0:
                raise ValueError(f"LossConfig.{f.name} must be > 0, got {value}")
        if not 0.0 < self.max_gate < 1.0:
            raise ValueError(
                f"max_gate must be in (0, 1) (keeps modified features anchored to CLIP), got {self.max_gate}"
            )
        if not 0.0 <= self.gate_init < self.max_gate:
            raise ValueError(f"gate_init must be in [0, max_gate={self.max_gate}), got {self.gate_init}")
        if (
            self.integration in ("logit_fusion", "mixture")
            and self.w_fusion_clip + self.w_fusion_itm + self.w_fusion_ss <= 0
        ):
            raise ValueError("logit_fusion / mixture need at least one positive w_fusion_* weight")

    @property
    def uses_single_stream(self) -> bool:
        """True when a top-k term reads single-stream teacher outputs."""
        if self.integration == "modified_features":
            return True
        if self.integration in ("logit_fusion", "mixture"):
            return self.w_fusion_itm > 0 or self.w_fusion_ss > 0
        return False

    def loss_keys(self) -> set[str]:
        """Exactly the ``*_loss`` keys ``MCADLoss.forward`` returns for this config (``loss`` not included)."""
        keys = set()
        for key, weight in (
            ("itc_loss", self.w_itc),
            ("kd_i2t_loss", self.w_kd_i2t),
            ("kd_t2i_loss", self.w_kd_t2i),
            ("topk_i2t_loss", self.w_topk_i2t),
            ("topk_t2i_loss", self.w_topk_t2i),
            ("feat_loss", self.w_feat),
        ):
            if weight > 0:
                keys.add(key)
        if self.has_integration_module and self.w_integration > 0:
            keys.add("integration_loss")
        return keys

    @property
    def has_integration_module(self) -> bool:
        """True when ``MCADLoss`` holds a trainable ``TargetIntegration`` (modified features feeding some KD term)."""
        return self.integration == "modified_features" and (
            self.w_kd_i2t + self.w_kd_t2i + self.w_topk_i2t + self.w_topk_t2i + self.w_feat > 0
        )

    def required_inputs(self) -> dict[str, set[str]]:
        """Fields of ``StudentOutputs`` and ``TeacherTargets`` that ``MCADLoss.forward`` needs under this config.

        Returns:
            ``{"student": {...}, "teacher": {...}}``; any other field may be None.
        """
        student = {"image_emb", "text_emb", "logit_scale"}
        teacher: set[str] = set()
        mod = self.integration == "modified_features"
        if self.w_kd_i2t + self.w_kd_t2i + self.w_feat > 0 or (mod and self.has_integration_module):
            teacher |= {"clip_image_emb", "clip_text_emb", "clip_logit_scale"}
        if self.w_feat > 0 and self.feat_source == "feat":
            student |= {"image_feat", "text_feat"}
        ss_needed = self.uses_single_stream
        for d, cand in (("i2t", "text"), ("t2i", "image")):
            w = self.w_topk_i2t if d == "i2t" else self.w_topk_t2i
            if w > 0:
                student.add(f"topk_{cand}_emb")
                teacher.add(f"valid_{d}")
                if self.integration == "modified_features":
                    teacher |= {"clip_image_emb", "clip_text_emb", f"clip_topk_{cand}_emb", "clip_logit_scale"}
                elif self.integration == "none" or self.w_fusion_clip > 0:
                    teacher |= {f"clip_topk_sims_{d}", "clip_logit_scale"}
                if ss_needed and (self.integration == "modified_features" or self.w_fusion_itm > 0):
                    teacher.add(f"itm_logits_{d}")
                if ss_needed and self.integration != "modified_features" and self.w_fusion_ss > 0:
                    teacher |= {f"ss_sims_{d}", "ss_logit_scale"}
            if mod and self.has_integration_module:
                teacher |= {f"fused_cls_{d}", f"itm_logits_{d}", f"valid_{d}", f"clip_topk_{cand}_emb"}
                if self.w_int_topk_gt > 0:
                    teacher.add(f"is_positive_{d}")
        return {"student": student, "teacher": teacher}


_PRESETS: dict[str, dict[str, Any]] = {
    # Ablations of the MCAD study (paper: contrastive only, CLIP distribution, + CLIP features, single-stream top-k,
    # full). Exact per-preset weights are ours.
    "contrastive": dict(
        w_kd_i2t=0.0, w_kd_t2i=0.0, w_topk_i2t=0.0, w_topk_t2i=0.0, w_feat=0.0, w_integration=0.0, integration="none"
    ),
    "clip-kd": dict(w_topk_i2t=0.0, w_topk_t2i=0.0, w_feat=0.0, w_integration=0.0, integration="none"),
    "clip-kd-feat": dict(w_topk_i2t=0.0, w_topk_t2i=0.0, w_integration=0.0, integration="none"),
    "single-topk": dict(
        w_kd_i2t=0.0,
        w_kd_t2i=0.0,
        w_feat=0.0,
        w_integration=0.0,
        integration="logit_fusion",
        w_fusion_clip=0.0,
        w_fusion_itm=1.0,
        w_fusion_ss=0.0,
    ),
    "mcad": dict(integration="modified_features"),
}


def preset(name: str, **overrides: Any) -> LossConfig:
    """The ``LossConfig`` of an ablation preset, with field overrides (``None`` values dropped).

    Presets and their loss keys: ``contrastive`` {itc}; ``clip-kd`` {itc, kd_i2t, kd_t2i}; ``clip-kd-feat``
    {itc, kd_i2t, kd_t2i, feat}; ``single-topk`` {itc, topk_i2t, topk_t2i} (teacher: ITM over the top-k);
    ``mcad`` {itc, kd_i2t, kd_t2i, topk_i2t, topk_t2i, feat, integration} (modified features by default).

    Raises:
        ValueError: unknown preset (lists ``PRESETS``), unknown field, or a bad value.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; known presets: {', '.join(PRESETS)}")
    values = {**_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown loss field(s) {unknown}; known: {sorted(names)}")
    for f in dataclasses.fields(LossConfig):
        if f.name in values and isinstance(values[f.name], int) and f.type in ("float", "float | None"):
            values[f.name] = float(values[f.name])
    cfg = LossConfig(**values)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass
class StudentOutputs:
    """What the student produced for one batch of B anchor pairs (image i with its chosen caption i).

    Attributes:
        image_emb: [B, D] float, L2-normalised.
        text_emb: [B, D] float, L2-normalised.
        logit_scale: 0-dim tensor, linear (student's ``exp(log_logit_scale)``), with gradient.
        image_feat: [B, F_img] pre-projection pooled image features (needed when ``feat_source="feat"``).
        text_feat: [B, F_txt] pre-projection pooled text features (needed when ``feat_source="feat"``).
        topk_text_emb: [B, K, D] L2-normalised student embeddings of each image query's K cached candidate captions,
            in the cache's candidate order.
        topk_image_emb: [B, K, D] L2-normalised student embeddings of each caption query's K candidate images.
    """

    image_emb: Tensor
    text_emb: Tensor
    logit_scale: Tensor
    image_feat: Tensor | None = None
    text_feat: Tensor | None = None
    topk_text_emb: Tensor | None = None
    topk_image_emb: Tensor | None = None


@dataclass
class TeacherTargets:
    """Cached teacher outputs for the same B anchor pairs, upcast to float32. Any field may be None when the loss
    config does not need it (``LossConfig.required_inputs()`` lists what it needs). Candidate order (K) is the cache's
    and must match ``StudentOutputs.topk_*_emb``.

    Attributes:
        clip_image_emb: [B, Dc] dual-stream (CLIP) image embeddings, L2-normalised.
        clip_text_emb: [B, Dc] CLIP text embeddings of the anchor captions, L2-normalised.
        clip_logit_scale: the CLIP teacher's linear logit scale (about 100), a float.
        clip_topk_sims_i2t: [B, K] CLIP cosines of image i with its K candidate captions.
        clip_topk_sims_t2i: [B, K] CLIP cosines of caption i with its K candidate images.
        clip_topk_text_emb: [B, K, Dc] CLIP embeddings of image i's candidate captions (modified features).
        clip_topk_image_emb: [B, K, Dc] CLIP embeddings of caption i's candidate images (modified features).
        itm_logits_i2t: [B, K, 2] raw single-stream ITM logits (class 1 = match) of (image i, candidate caption).
        itm_logits_t2i: [B, K, 2] raw ITM logits of (candidate image, caption i).
        ss_sims_i2t: [B, K] single-stream teacher's own ITC cosines of the same candidates.
        ss_sims_t2i: [B, K] as ss_sims_i2t, caption queries.
        ss_logit_scale: the single-stream teacher's linear ITC scale (ALBEF: 1 / temp), a float.
        fused_cls_i2t: [B, K, C] fused [CLS] states of (image i, candidate caption).
        fused_cls_t2i: [B, K, C] fused [CLS] states of (candidate image, caption i).
        valid_i2t: [B, K] bool, False = missing candidate (excluded from every softmax). None = all valid.
        valid_t2i: [B, K] bool, as valid_i2t.
        is_positive_i2t: [B, K] bool, candidate caption is a ground-truth caption of image i.
        is_positive_t2i: [B, K] bool, candidate image is caption i's ground-truth image.
    """

    clip_image_emb: Tensor | None = None
    clip_text_emb: Tensor | None = None
    clip_logit_scale: float | None = None
    clip_topk_sims_i2t: Tensor | None = None
    clip_topk_sims_t2i: Tensor | None = None
    clip_topk_text_emb: Tensor | None = None
    clip_topk_image_emb: Tensor | None = None
    itm_logits_i2t: Tensor | None = None
    itm_logits_t2i: Tensor | None = None
    ss_sims_i2t: Tensor | None = None
    ss_sims_t2i: Tensor | None = None
    ss_logit_scale: float | None = None
    fused_cls_i2t: Tensor | None = None
    fused_cls_t2i: Tensor | None = None
    valid_i2t: Tensor | None = None
    valid_t2i: Tensor | None = None
    is_positive_i2t: Tensor | None = None
    is_positive_t2i: Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherTargets:
        """A copy with every tensor on ``device`` (floats as float32, masks as bool)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=torch.bool if value.dtype == torch.bool else torch.float32)
            out[f.name] = value
        return TeacherTargets(**out)


_PER_CANDIDATE = {
    "i2t": ("clip_topk_sims_i2t", "clip_topk_text_emb", "itm_logits_i2t", "ss_sims_i2t", "fused_cls_i2t"),
    "t2i": ("clip_topk_sims_t2i", "clip_topk_image_emb", "itm_logits_t2i", "ss_sims_t2i", "fused_cls_t2i"),
}


def _zero_invalid(teacher: TeacherTargets) -> TeacherTargets:
    """Per-candidate fields with their invalid slots set to 0 (a cache marks them NaN): masked entries are dropped
    from every softmax anyway, but a NaN there would still poison gradients through 0 * NaN."""
    changes: dict[str, Tensor] = {}
    for d, names in _PER_CANDIDATE.items():
        valid = getattr(teacher, f"valid_{d}")
        if valid is None:
            continue
        valid = valid.bool()
        for name in names:
            value = getattr(teacher, name)
            if value is not None:
                v = valid.reshape(valid.shape + (1,) * (value.ndim - valid.ndim))
                changes[name] = torch.where(v, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return dataclasses.replace(teacher, **changes) if changes else teacher


def _require(obj: Any, name: str, why: str) -> Any:
    value = getattr(obj, name)
    if value is None:
        raise ValueError(f"{type(obj).__name__}.{name} is None but {why} needs it")
    return value


# ------------------------------------------------------------------------------------------------ plain functions
def itc_loss(logits_i2t: Tensor, *, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP on ground truth: pair i is image i with caption i.

    Source: CLIP (Radford et al. 2021, Fig. 3 pseudo-code); open_clip ``ClipLoss``. With ``positives`` (ours), each
    row's loss is ``-log Σ_{j positive} softmax(row)_j`` (multi-positive InfoNCE), so in-batch duplicates (the same
    caption text on two images, as in web alt-text) are not pushed apart; without it this is exactly ``ClipLoss``.

    Args:
        logits_i2t: [B, B] ``logit_scale * image_emb @ text_emb.T``; rows are image queries.
        positives: [B, B] bool or None, ``positives[i, j]`` = caption j also matches image i; the diagonal is
            always treated as positive.
    Returns:
        Scalar float32: ``(CE(logits_i2t, arange B) + CE(logits_i2t.T, arange B)) / 2`` (multi-positive form when
        ``positives`` is given).
    Raises:
        ValueError: ``logits_i2t`` is not square, or ``positives`` has another shape.
    """
    if logits_i2t.ndim != 2 or logits_i2t.shape[0] != logits_i2t.shape[1]:
        raise ValueError(f"itc_loss needs square [B, B] logits, got {tuple(logits_i2t.shape)}")
    logits = logits_i2t.float()
    n = logits.shape[0]
    if positives is None:
        labels = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    if positives.shape != logits.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must match logits {tuple(logits.shape)}")
    pos = positives.bool().to(logits.device) | torch.eye(n, dtype=torch.bool, device=logits.device)
    rows = -torch.logsumexp(F.log_softmax(logits, -1).masked_fill(~pos, float("-inf")), -1).mean()
    cols = -torch.logsumexp(F.log_softmax(logits.t(), -1).masked_fill(~pos.t(), float("-inf")), -1).mean()
    return (rows + cols) / 2


def duplicate_positives(image_keys: list[str], captions: list[str]) -> Tensor:
    """In-batch positives for ``itc_loss``: pairs (i, j) whose images are the same sample or whose captions are the
    same text (compared after ``strip().lower()``).

    Args:
        image_keys: B sample keys (``__key__``) of the anchor images.
        captions: B anchor captions.
    Returns:
        [B, B] bool on CPU, True on the diagonal.
    Raises:
        ValueError: the two lists differ in length.
    """
    if len(image_keys) != len(captions):
        raise ValueError(f"{len(image_keys)} image keys vs {len(captions)} captions")
    keys = list(image_keys)
    texts = [c.strip().lower() for c in captions]
    same_key = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
    same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
    return same_key | same_text


def masked_log_softmax(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log_softmax`` over the last dim restricted to ``mask``; masked entries are ``-inf``.

    Args:
        logits: [..., K] float (upcast to float32).
        mask: [..., K] bool or None (all valid). A row with no valid entry is computed as if all its entries were
            valid (so it stays NaN-free); callers drop such rows.
    Returns:
        [..., K] float32 log-probabilities.
    """
    logits = logits.float()
    if mask is None:
        return F.log_softmax(logits, dim=-1)
    row_ok = mask.any(dim=-1, keepdim=True)
    eff = mask | ~row_ok
    return F.log_softmax(logits.masked_fill(~eff, float("-inf")), dim=-1)


def kd_loss_from_log_probs(
    student_logits: Tensor, teacher_log_probs: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``τ² · mean_rows KL(p_T || softmax(student_logits / τ))`` for a teacher given as log-probabilities.

    Args:
        student_logits: [..., K] scaled student logits (before τ), any float dtype; computed in float32.
        teacher_log_probs: [..., K] teacher log-probabilities already at temperature τ (e.g. a mixture), float32.
        temperature: τ > 0.
        mask: [..., K] bool, False entries are removed from the student softmax and from the sum; the teacher must
            put zero mass there. Rows with no True entry are left out of the mean.
    Returns:
        Scalar float32 (0 with a gradient path when no row is valid).
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_log_probs.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = masked_log_softmax(student_logits.float() / temperature, mask)
    log_p = teacher_log_probs.float()
    if mask is None:
        term = log_p.exp() * (log_p - log_q)
        row_kl = term.sum(-1)
        return row_kl.mean() * temperature**2
    mask = mask.bool()
    log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
    log_q = torch.where(mask, log_q, torch.zeros_like(log_q))
    p = torch.where(mask, log_p.exp(), torch.zeros_like(log_p))
    row_kl = (p * (log_p - log_q)).sum(-1)
    row_ok = mask.any(-1)
    if not bool(row_ok.any()):
        return student_logits.float().sum() * 0.0
    return row_kl[row_ok].mean() * temperature**2


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Distribution distillation ``τ² · mean_rows KL(softmax(t / τ) || softmax(s / τ))`` over the last dim.

    Source: Hinton et al. 2015; timm ``LogitDistillationTask`` (``log_softmax`` on both sides, ``τ²`` scaling).
    The gradient with respect to ``student_logits`` is ``τ · (q - p) / R`` for R averaged rows.

    Args:
        student_logits: [..., K] scaled student logits (``logit_scale * sims``), any float dtype; float32 inside.
        teacher_logits: [..., K] teacher logits on the same candidates; float16 from a cache is fine.
        temperature: τ > 0, dimensionless.
        mask: [..., K] bool or None; False entries are excluded from both softmaxes. Rows without any True entry are
            dropped from the mean.
    Returns:
        Scalar float32, exactly 0 when ``student_logits == teacher_logits`` on the valid entries.
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_log_probs = masked_log_softmax(teacher_logits.float() / temperature, mask)
    return kd_loss_from_log_probs(student_logits, teacher_log_probs, temperature=temperature, mask=mask)


def topk_kd_loss(
    student_topk_logits: Tensor, teacher_topk_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(teacher || student) over each query's K cached candidates: ``kd_loss`` on [B, K] logits.

    Args:
        student_topk_logits: [B, K] scaled student logits of the same candidates, float32.
        teacher_topk_logits: [B, K] teacher logits, upcast to float32. Both renormalised over the valid candidates.
        temperature: τ > 0.
        mask: [B, K] bool validity, or None.
    Returns:
        Scalar float32, mean over queries with a valid candidate, times τ².
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    return kd_loss(student_topk_logits, teacher_topk_logits, temperature=temperature, mask=mask)


def feature_loss(student: Tensor, teacher: Tensor, *, kind: str = "cosine") -> Tensor:
    """Feature alignment between (already projected) student features and teacher features.

    Source: CLIP-KD (Yang et al. 2024) feature distillation uses MSE; MCAD aligns features (form not public).

    Args:
        student: [B, Dc] student features mapped into the teacher's space, float.
        teacher: [B, Dc] teacher features (L2-normalised CLIP or modified features), float32, no gradient needed.
        kind: ``"cosine"`` = mean over B of ``1 - cos(student, teacher)`` (scale-free); ``"mse"`` = ``F.mse_loss``
            (mean over B · Dc elements) on the raw vectors.
    Returns:
        Scalar float32; 0 when the two agree (cosine: same direction; mse: equal).
    Raises:
        ValueError: shapes differ or unknown ``kind``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"feature_loss: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    raise ValueError(f"feature_loss kind must be one of {FEATURE_KINDS}, got {kind!r}")


def itm_scores(itm_logits: Tensor, *, kind: str = "pos_logit") -> Tensor:
    """Single-stream match score from raw ITM logits.

    Args:
        itm_logits: [..., 2] raw logits, class 1 = match.
        kind: ``"pos_logit"`` = ``itm_logits[..., 1]`` (ALBEF ``evaluation`` and BLIP re-rank by it);
            ``"log_odds"`` = ``itm_logits[..., 1] - itm_logits[..., 0]`` = log p(match) / p(no match).
    Returns:
        [...] float32.
    Raises:
        ValueError: last dim is not 2 or unknown ``kind``.
    """
    if itm_logits.shape[-1] != 2:
        raise ValueError(f"itm_logits must end in 2 classes, got {tuple(itm_logits.shape)}")
    x = itm_logits.float()
    if kind == "pos_logit":
        return x[..., 1]
    if kind == "log_odds":
        return x[..., 1] - x[..., 0]
    raise ValueError(f"itm_score must be one of {ITM_SCORES}, got {kind!r}")


def logit_fusion_logits(
    scores: list[Tensor], *, weights: list[float], temperatures: list[float], mask: Tensor | None = None
) -> Tensor:
    """Fused teacher logits ``z = Σ_m w_m · s_m / τ_m`` (``p_T = softmax(z / τ_kd)`` over the candidates).

    Args:
        scores: M tensors [B, K] (e.g. CLIP cosines, ITM scores), float.
        weights: M weights w_m >= 0; terms with w_m = 0 are skipped.
        temperatures: M teacher temperatures τ_m > 0.
        mask: [B, K] bool; invalid entries become ``-inf``.
    Returns:
        [B, K] float32 logits.
    """
    z = None
    for s, w, t in zip(scores, weights, temperatures, strict=True):
        if w == 0:
            continue
        term = w * s.float() / t
        z = term if z is None else z + term
    if z is None:
        raise ValueError("logit fusion needs at least one positive weight")
    if mask is not None:
        z = z.masked_fill(~mask.bool(), float("-inf"))
    return z


def mixture_log_probs(
    logits: list[Tensor], *, weights: list[float], temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Log of a distribution mixture ``p_T = Σ_m w̄_m softmax(z_m / τ)`` with ``w̄ = w / Σ w``.

    Computed stably as ``logsumexp_m(log w̄_m + log_softmax(z_m / τ))``.

    Args:
        logits: M tensors [B, K], each teacher's logits ``s_m / τ_m``.
        weights: M weights >= 0 (renormalised to sum 1; zero weights skipped).
        temperature: KD τ > 0 applied to every teacher before its softmax.
        mask: [B, K] bool or None; every teacher's softmax is restricted to it.
    Returns:
        [B, K] float32 log-probabilities (``-inf`` at masked entries).
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("mixture needs at least one positive weight")
    parts = [
        math.log(w / total) + masked_log_softmax(z.float() / temperature, mask)
        for z, w in zip(logits, weights, strict=True)
        if w > 0
    ]
    return torch.logsumexp(torch.stack(parts, dim=0), dim=0)


def _pool_fused(fused: Tensor, weights_logits: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
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
        if self.config.tau_clip is not None:
            return self.config.tau_clip
        scale = _require(teacher, "clip_logit_scale", "tau_clip=None (the CLIP teacher's own scale)")
        return 1.0 / float(scale)

    def _tau_ss(self, teacher: TeacherTargets) -> float:
        if self.config.tau_ss is not None:
            return self.config.tau_ss
        return 1.0 / float(_require(teacher, "ss_logit_scale", "tau_ss=None"))

    def _clip_topk_sims(self, teacher: TeacherTargets, direction: str) -> Tensor:
        sims = getattr(teacher, f"clip_topk_sims_{direction}")
        if sims is not None:
            return sims.float()
        if direction == "i2t" and teacher.clip_topk_text_emb is not None and teacher.clip_image_emb is not None:
            return torch.einsum("bd,bkd->bk", teacher.clip_image_emb.float(), teacher.clip_topk_text_emb.float())
        if direction == "t2i" and teacher.clip_topk_image_emb is not None and teacher.clip_text_emb is not None:
            return torch.einsum("bd,bkd->bk", teacher.clip_text_emb.float(), teacher.clip_topk_image_emb.float())
        raise ValueError(f"TeacherTargets.clip_topk_sims_{direction} is None (and no CLIP candidate embeddings)")

    def _modified(self, teacher: TeacherTargets) -> dict[str, Tensor]:
        """Modified anchor features and top-k sims (with gradient into the integration module)."""
        assert self.integration is not None
        cfg = self.config
        out: dict[str, Tensor] = {}
        v = _require(teacher, "clip_image_emb", "modified_features").float()
        t = _require(teacher, "clip_text_emb", "modified_features").float()
        for d, cand in (("i2t", "text"), ("t2i", "image")):
            fused = getattr(teacher, f"fused_cls_{d}")
            if fused is None:
                continue
            valid = getattr(teacher, f"valid_{d}")
            itm = getattr(teacher, f"itm_logits_{d}")
            pool_logits = None
            if cfg.aggregate == "itm_softmax":
                pool_logits = (
                    itm_scores(_require(teacher, f"itm_logits_{d}", "aggregate='itm_softmax'"), kind=cfg.itm_score)
                    / cfg.tau_itm
                )
            pooled, row_ok = _pool_fused(fused, pool_logits, valid)
            if d == "i2t":
                out["image"] = self.integration.modify_image(v, pooled, row_ok)
            else:
                out["text"] = self.integration.modify_text(t, pooled, row_ok)
            cand_emb = getattr(teacher, f"clip_topk_{cand}_emb")
            if cand_emb is not None:
                query = v if d == "i2t" else t
                out[f"topk_sims_{d}"] = self.integration.topk_sims(query, cand_emb, fused, direction=d)
            if itm is not None:
                out[f"itm_{d}"] = itm_scores(itm, kind=cfg.itm_score)
        out.setdefault("image", F.normalize(v, dim=-1))
        out.setdefault("text", F.normalize(t, dim=-1))
        return out

    def _topk_teacher_log_probs(
        self, teacher: TeacherTargets, direction: str, modified: dict[str, Tensor] | None
    ) -> Tensor:
        """Teacher log-probabilities at τ_topk over the K candidates, [B, K] float32, detached."""
        cfg = self.config
        tau = cfg.topk_temperature
        mask = getattr(teacher, f"valid_{direction}")
        why = f"topk_{direction} ({cfg.integration})"
        if cfg.integration == "modified_features":
            assert modified is not None
            key = f"topk_sims_{direction}"
            if key not in modified:
                cand = "text" if direction == "i2t" else "image"
                raise ValueError(f"{why} needs TeacherTargets.fused_cls_{direction} and clip_topk_{cand}_emb")
            z = modified[key].detach() / self._tau_clip(teacher)
            return masked_log_softmax(z / tau, mask)
        if cfg.integration == "none":
            z = self._clip_topk_sims(teacher, direction) / self._tau_clip(teacher)
            return masked_log_softmax(z / tau, mask)
        scores, weights, temps = [], [], []
        if cfg.w_fusion_clip > 0:
            scores.append(self._clip_topk_sims(teacher, direction))
            weights.append(cfg.w_fusion_clip)
            temps.append(self._tau_clip(teacher))
        if cfg.w_fusion_itm > 0:
            itm = _require(teacher, f"itm_logits_{direction}", why)
            scores.append(itm_scores(itm, kind=cfg.itm_score))
            weights.append(cfg.w_fusion_itm)
            temps.append(cfg.tau_itm)
        if cfg.w_fusion_ss > 0:
            scores.append(_require(teacher, f"ss_sims_{direction}", why).float())
            weights.append(cfg.w_fusion_ss)
            temps.append(self._tau_ss(teacher))
        if cfg.integration == "logit_fusion":
            z = logit_fusion_logits(scores, weights=weights, temperatures=temps, mask=mask)
            return masked_log_softmax(z / tau, mask)
        logits = [s / t for s, t in zip(scores, temps, strict=True)]
        return mixture_log_probs(logits, weights=weights, temperature=tau, mask=mask)

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
                image or the same caption text on two anchors. None = only the diagonal (open_clip ``ClipLoss``).
        Returns:
            ``{"itc_loss", "kd_i2t_loss", "kd_t2i_loss", "topk_i2t_loss", "topk_t2i_loss", "feat_loss",
            "integration_loss"}`` restricted to ``config.loss_keys()``, each a weighted scalar float32, plus
            ``"loss"``, their sum.
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
        teacher = _zero_invalid(teacher)
        out: dict[str, Tensor] = {}
        img = student.image_emb.float()
        txt = student.text_emb.float()
        scale = student.logit_scale.float()
        gather = _gather_with_grad if self.gather and _world_size() > 1 else _identity
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
                v_t = gather(_require(teacher, "clip_image_emb", "in-batch KD").float())
                t_t = gather(_require(teacher, "clip_text_emb", "in-batch KD").float())
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
            cand_emb = _require(student, f"topk_{cand}_emb", f"topk_{d}_loss").float()
            student_logits = scale * torch.einsum("bd,bkd->bk", query, cand_emb)
            log_p = self._topk_teacher_log_probs(teacher, d, modified).detach()
            mask = getattr(teacher, f"valid_{d}")
            if mask is not None:
                mask = mask.bool()
            out[f"topk_{d}_loss"] = weight * kd_loss_from_log_probs(
                student_logits, log_p, temperature=cfg.topk_temperature, mask=mask
            )

        # feature alignment to (modified) teacher features
        if cfg.w_feat > 0:
            assert self.feat_head_image is not None and self.feat_head_text is not None
            if modified is not None:
                v_t, t_t = modified["image"].detach(), modified["text"].detach()
            else:
                v_t = _require(teacher, "clip_image_emb", "feat_loss").float()
                t_t = _require(teacher, "clip_text_emb", "feat_loss").float()
            if cfg.feat_source == "emb":
                s_img, s_txt = student.image_emb, student.text_emb
            else:
                s_img = _require(student, "image_feat", "feat_source='feat'")
                s_txt = _require(student, "text_feat", "feat_source='feat'")
            f_img = self.feat_head_image(s_img.float())
            f_txt = self.feat_head_text(s_txt.float())
            out["feat_loss"] = (
                cfg.w_feat
                * 0.5
                * (feature_loss(f_img, v_t, kind=cfg.feat_kind) + feature_loss(f_txt, t_t, kind=cfg.feat_kind))
            )

        if modified is not None and cfg.w_integration > 0:
            out["integration_loss"] = cfg.w_integration * self._integration_objective(teacher, modified, positives)

        out["loss"] = sum(out.values(), torch.zeros((), device=img.device))
        return out

    def _integration_objective(
        self, teacher: TeacherTargets, modified: dict[str, Tensor], positives: Tensor | None = None
    ) -> Tensor:
        """Trains only the integration module: ITC of modified anchors on ground truth + ITM consistency over top-k
        (+ optional ground-truth CE over top-k). Scalar float32."""
        cfg = self.config
        total = torch.zeros((), device=modified["image"].device)
        tau_c = self._tau_clip(teacher)
        if cfg.w_int_itc > 0:
            v_all, t_all = modified.get("image_all", modified["image"]), modified.get("text_all", modified["text"])
            logits = v_all @ t_all.t() / tau_c
            total = total + cfg.w_int_itc * itc_loss(logits, positives=positives)
        for d in ("i2t", "t2i"):
            key = f"topk_sims_{d}"
            if key not in modified:
                continue
            z_mod = modified[key] / tau_c
            mask = getattr(teacher, f"valid_{d}")
            mask = mask.bool() if mask is not None else None
            if cfg.w_int_itm > 0 and f"itm_{d}" in modified:
                teacher_lp = masked_log_softmax(modified[f"itm_{d}"] / cfg.tau_itm, mask)
                total = total + cfg.w_int_itm * 0.5 * kd_loss_from_log_probs(z_mod, teacher_lp, mask=mask)
            if cfg.w_int_topk_gt > 0:
                pos = _require(teacher, f"is_positive_{d}", "w_int_topk_gt > 0").bool()
                if mask is not None:
                    pos = pos & mask
                log_p = masked_log_softmax(z_mod, mask)
                has_pos = pos.any(-1)
                if bool(has_pos.any()):
                    lp_pos = torch.logsumexp(log_p.masked_fill(~pos, float("-inf")), dim=-1)
                    total = total - cfg.w_int_topk_gt * 0.5 * lp_pos[has_pos].mean()
        return total

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Scalars to log (not losses): the integration gates, when present."""
        if self.integration is None:
            return {}
        g_img, g_txt = self.integration.gates()
        return {"gate_image": float(g_img), "gate_text": float(g_txt)}


def _identity(x: Tensor) -> Tensor:
    return x


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 with a backward that sums every rank's gradient into the owner's slice (public
    ``torch.distributed`` calls only; works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def _gather_with_grad(x: Tensor) -> Tensor:
    """All-gather [B, ...] from every rank into [W * B, ...] in rank order, differentiable. Equal B on every rank
    is required (DDP's equal steps)."""
    return _AllGather.apply(x)


def student_outputs(
    model_out: Mapping[str, Tensor],
    *,
    topk_text_emb: Tensor | None = None,
    topk_image_emb: Tensor | None = None,
) -> StudentOutputs:
    """Wrap ``DualEncoder.forward``'s dict (``image_emb``, ``text_emb``, ``image_feat``, ``text_feat``,
    ``logit_scale``) plus optional top-k candidate embeddings [B, K, D] into ``StudentOutputs``."""
    return StudentOutputs(
        image_emb=model_out["image_emb"],
        text_emb=model_out["text_emb"],
        logit_scale=model_out["logit_scale"],
        image_feat=model_out.get("image_feat"),
        text_feat=model_out.get("text_feat"),
        topk_text_emb=topk_text_emb,
        topk_image_emb=topk_image_emb,
    )


__all__ = [
    "LossConfig",
    "MCADLoss",
    "PRESETS",
    "StudentOutputs",
    "TargetIntegration",
    "TeacherTargets",
    "duplicate_positives",
    "feature_loss",
    "itc_loss",
    "itm_scores",
    "kd_loss",
    "kd_loss_from_log_probs",
    "logit_fusion_logits",
    "masked_log_softmax",
    "mixture_log_probs",
    "preset",
    "student_outputs",
    "topk_kd_loss",
]
