"""The student side of a distillation step: encode a ``DistillBatch``, assemble ``StudentOutputs``, call the loss.

**Candidate source (plug-in point).** The student's embeddings of each query's K cached candidates come from a
``CandidateSource``: ``(batch, image_emb, text_emb) -> (topk_text_emb [B, K, D] | None, topk_image_emb | None)``,
called with the embeddings of the one forward pass (anchors first, then the extra candidates). The default,
:class:`OnlineCandidates`, gathers them from that pass (exact, with gradient). An item-indexed bank of student
embeddings (``distill.bank.BankCandidates``, DESIGN.md "Candidates at the cost of a plain step") is another source
with the same call. A source says which candidates the pass must encode (``online_images``, ``online_texts``): the
bank encodes no candidate image, and candidate captions only when asked to.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mcad_cache.distill.batch import DistillBatch
from mcad_cache.losses import StudentOutputs


class CandidateSource(Protocol):
    """Where the student's candidate embeddings come from; see the module docstring."""

    online_images: bool  # the forward pass encodes the batch's extra candidate images
    online_texts: bool  # the forward pass encodes the batch's candidate captions

    def __call__(
        self, batch: DistillBatch, image_emb: Tensor, text_emb: Tensor
    ) -> tuple[Tensor | None, Tensor | None]: ...


class OnlineCandidates:
    """Candidates encoded in the step's own forward pass: rows ``topk_*_index`` of that pass's embeddings."""

    online_images = True
    online_texts = True

    def __call__(self, batch: DistillBatch, image_emb: Tensor, text_emb: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Returns ``([B, K, D] text, [B, K, D] image)`` L2-normalised student embeddings, None when not joined."""
        device = image_emb.device
        topk_text = text_emb[batch.topk_text_index.to(device)] if batch.topk_text_index is not None else None
        topk_image = image_emb[batch.topk_image_index.to(device)] if batch.topk_image_index is not None else None
        return topk_text, topk_image


ONLINE_CANDIDATES = OnlineCandidates()


def distill_forward(
    model: nn.Module, loss_module: nn.Module, batch: DistillBatch, *, candidates: CandidateSource = ONLINE_CANDIDATES
) -> dict[str, Tensor]:
    """Student forward for one :class:`DistillBatch`, then the loss module.

    One call of the model's ``forward(images=, input_ids=, attention_mask=)`` (what DDP wraps): images are the
    anchors then the extra candidates, captions the anchors then each distinct candidate caption (each side only as
    far as ``candidates`` asks: anchors alone otherwise); candidate embeddings are gathered into ``[B, K, D]``.

    Args:
        model: the student ``DualEncoder`` (or a wrapper of it with ``.module``).
        loss_module: ``losses.MCADLoss``.
        batch: from ``distill.join.TargetJoiner`` (``tokens`` set when the joiner was given the student's tokenizer).
        candidates: the candidate source (default: online, from this forward pass).
    Returns:
        The loss module's dict of weighted ``*_loss`` terms plus ``loss``.
    """
    device = next(model.parameters()).device
    b = batch.num_pairs
    images = batch.images
    if candidates.online_images and batch.extra_images is not None and batch.extra_images.shape[0] > 0:
        images = torch.cat([images, batch.extra_images])
    tokens = batch.tokens if batch.tokens is not None else getattr(model, "module", model).tokenize(batch.texts)
    if not candidates.online_texts:
        tokens = anchor_tokens(tokens, b)
    out = model(
        images=images.to(device, non_blocking=True),
        input_ids=tokens["input_ids"].to(device, non_blocking=True),
        attention_mask=tokens["attention_mask"].to(device, non_blocking=True),
    )
    image_emb, text_emb = out["image_emb"], out["text_emb"]
    topk_text_emb, topk_image_emb = candidates(batch, image_emb, text_emb)
    student = StudentOutputs(
        image_emb=image_emb[:b],
        text_emb=text_emb[:b],
        logit_scale=out["logit_scale"],
        image_feat=out["image_feat"][:b],
        text_feat=out["text_feat"][:b],
        topk_text_emb=topk_text_emb,
        topk_image_emb=topk_image_emb,
    )
    return loss_module(student, batch.targets.to(device))


def anchor_tokens(tokens: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    """The first ``b`` rows of ``tokens`` (``input_ids`` / ``attention_mask`` [T, L]), cut to their longest caption
    (dynamic padding: the text tower's output does not depend on trailing padding)."""
    mask = tokens["attention_mask"][:b]
    length = max(1, int(mask.sum(1).max())) if b > 0 else 1
    return {"input_ids": tokens["input_ids"][:b, :length], "attention_mask": mask[:, :length]}


class DistillStep(nn.Module):
    """Student + loss module as one module, so DDP all-reduces both modules' gradients together."""

    def __init__(
        self, model: nn.Module, loss_module: nn.Module, *, candidates: CandidateSource = ONLINE_CANDIDATES
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_module = loss_module
        self.candidates = candidates

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        return distill_forward(self.model, self.loss_module, batch, candidates=self.candidates)


def wrapped_forward(wrapper: nn.Module, loss_module: Any, batch: DistillBatch) -> dict[str, Tensor]:
    """``train_step``'s ``forward`` for a (DDP-wrapped) :class:`DistillStep`: the loss module is inside it."""
    return wrapper(batch)


__all__ = [
    "ONLINE_CANDIDATES",
    "CandidateSource",
    "DistillStep",
    "OnlineCandidates",
    "anchor_tokens",
    "distill_forward",
    "wrapped_forward",
]
