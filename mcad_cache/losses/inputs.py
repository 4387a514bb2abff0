"""The loss inputs: what the student produced (``StudentOutputs``) and the cached teacher side (``TeacherTargets``).

Shape letters: B anchor pairs, K candidates per query, D student embedding, Dc CLIP embedding, C fused [CLS] width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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
        topk_logits_i2t: [B, K] fixed teacher log-probabilities (τ = 1) over image i's candidates, read from a derived
            cache (``mcad-cache integrate``); NaN / any value at invalid slots (masked).
        topk_logits_t2i: [B, K] as topk_logits_i2t, caption queries.
        positives: [B, B] bool in-batch positives (``duplicate_positives``: same sample or same caption text), used by
            the ITC terms when ``MCADLoss.forward`` gets no ``positives`` argument. None = the diagonal only.
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
    topk_logits_i2t: Tensor | None = None
    topk_logits_t2i: Tensor | None = None
    positives: Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherTargets:
        """A copy with every tensor on ``device`` (floats as float32, masks as bool)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=torch.bool if value.dtype == torch.bool else torch.float32)
            out[f.name] = value
        return TeacherTargets(**out)


PER_CANDIDATE = {
    "i2t": (
        "clip_topk_sims_i2t",
        "clip_topk_text_emb",
        "itm_logits_i2t",
        "ss_sims_i2t",
        "fused_cls_i2t",
        "topk_logits_i2t",
    ),
    "t2i": (
        "clip_topk_sims_t2i",
        "clip_topk_image_emb",
        "itm_logits_t2i",
        "ss_sims_t2i",
        "fused_cls_t2i",
        "topk_logits_t2i",
    ),
}


def zero_invalid(teacher: TeacherTargets) -> TeacherTargets:
    """Per-candidate fields with their invalid slots set to 0 (a cache marks them NaN): masked entries are dropped
    from every softmax anyway, but a NaN there would still poison gradients through 0 * NaN."""
    changes: dict[str, Tensor] = {}
    for d, names in PER_CANDIDATE.items():
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


def require(obj: Any, name: str, why: str) -> Any:
    """``obj.name``; raises ``ValueError`` naming the field and the term that needs it when it is None."""
    value = getattr(obj, name)
    if value is None:
        raise ValueError(f"{type(obj).__name__}.{name} is None but {why} needs it")
    return value


__all__ = ["PER_CANDIDATE", "StudentOutputs", "TeacherTargets", "require", "zero_invalid"]
