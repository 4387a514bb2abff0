"""``DistillBatch``: one training batch after the join (anchors, candidate indices, teacher targets)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mcad_cache.losses import TeacherTargets


@dataclass
class DistillBatch:
    """One training batch: anchors, candidate ids resolved to student inputs, and the teacher targets.

    Attributes:
        keys: B sample keys (stream order).
        images: [B, 3, H, W] float32, the student's preprocessing.
        texts: T >= B caption strings: the B anchors first, then each distinct candidate caption once.
        extra_images: [U, 3, H, W] candidate images that are not anchors of this batch (U may be 0), or None.
        topk_text_index: [B, K] int64 rows of ``texts`` for each image's candidate captions (0 where invalid), or None.
        topk_image_index: [B, K] int64 rows of ``cat(images, extra_images)`` for each caption's candidate images.
        targets: the teacher side, CPU float32.
        tokens: ``texts`` tokenized by the student (``input_ids`` / ``attention_mask`` [T, L]), or None.
        anchor_image_rows: [B] int64 rows of the anchors in the candidate cache (the rows a candidate bank uses).
        anchor_text_rows: [B] int64 rows of the anchor captions in the candidate cache.
        topk_text_rows: [B, K] int64 candidate-cache rows of each image's candidate captions (-1 = empty slot).
        topk_image_rows: [B, K] int64 candidate-cache rows of each caption's candidate images (-1 = empty slot).
    """

    keys: list[str]
    images: Tensor
    texts: list[str]
    extra_images: Tensor | None
    topk_text_index: Tensor | None
    topk_image_index: Tensor | None
    targets: TeacherTargets
    tokens: dict[str, Tensor] | None = None
    anchor_image_rows: Tensor | None = None
    anchor_text_rows: Tensor | None = None
    topk_text_rows: Tensor | None = None
    topk_image_rows: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.keys)


__all__ = ["DistillBatch"]
