"""Reuse of a single-stream teacher's text-only encoder states across the many pairs a caption is scored in."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mcad_cache.teachers.base import TextStateTeacher


def supports_text_states(teacher: object) -> bool:
    """True for a :class:`~mcad_cache.teachers.base.TextStateTeacher` (ALBEF: ``text_tokens`` and
    ``itm_from_text_tokens``); BLIP cross-attends in every text layer, so it has no such split."""
    return isinstance(teacher, TextStateTeacher)


class TextStateCache:
    """Text-only encoder states of captions, computed once per caption and reused for every pair it is in.

    ALBEF's fusion encoder runs its text-only layers (6 of 12 in ALBEF-base; source: salesforce/ALBEF
    ``models/xbert.py``, ``mode="text"`` then ``mode="fusion"``) on the caption alone, so their output does not depend
    on the image: scoring a caption against K images needs them once, not K times.

    Captions are encoded in fixed blocks of ``block`` rows, so a state never depends on which pairs asked first (a
    resumed build computes the same numbers as an uninterrupted one). Blocks are kept first-in first-out up to
    ``max_bytes``. Call ``get`` inside the caller's autocast context.

    Args:
        teacher: a teacher for which ``supports_text_states`` is true.
        captions: caption strings, indexed by text row.
        block: captions per encoder call.
        max_bytes: memory bound of the kept states (device memory where the teacher runs).
    """

    def __init__(
        self, teacher: TextStateTeacher, captions: Sequence[str], *, block: int = 64, max_bytes: int = 2 * 1024**3
    ) -> None:
        if not supports_text_states(teacher):
            raise TypeError(f"{type(teacher).__name__} has no text-only encoder states (text_tokens)")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.teacher, self.captions, self.block, self.max_bytes = teacher, captions, block, max_bytes
        self.bytes = 0
        self.blocks: dict[int, tuple[Tensor, Tensor]] = {}

    def _block(self, b: int) -> tuple[Tensor, Tensor]:
        if b not in self.blocks:
            rows = list(self.captions[b * self.block : (b + 1) * self.block])
            tokens = {k: v.to(self.teacher.device) for k, v in self.teacher.tokenize(rows).items()}
            states = self.teacher.text_tokens(tokens)
            size = states.numel() * states.element_size()
            while self.blocks and self.bytes + size > self.max_bytes:
                old = self.blocks.pop(next(iter(self.blocks)))
                self.bytes -= old[0].numel() * old[0].element_size()
            self.blocks[b] = (states, tokens["attention_mask"])
            self.bytes += size
        return self.blocks[b]

    def get(self, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """text_tokens [n, L, C] float32 and attention_mask [n, L] int64 of caption rows ``rows``, on the teacher's
        device, ready for ``teacher.itm_from_text_tokens(image_tokens, text_tokens, attention_mask)``.

        Raises:
            IndexError: a row outside the captions.
        """
        parts = [self._block(r // self.block) for r in rows]
        states = torch.stack([p[0][r % self.block] for p, r in zip(parts, rows, strict=True)])
        mask = torch.stack([p[1][r % self.block] for p, r in zip(parts, rows, strict=True)])
        return states, mask
