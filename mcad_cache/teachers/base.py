"""The Teacher protocol every cache-building teacher implements (see docs/architecture.md)."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Teacher(Protocol):
    """A frozen image-text teacher.

    Dual-stream teachers (``kind == "dual"``) give ITC embeddings only; single-stream teachers (``"single"``) also
    score (image, text) pairs with a fusion encoder and ITM head.
    """

    name: str  # registry key
    kind: Literal["dual", "single"]
    preprocess_cfg: dict[str, Any]  # data.transforms.make_image_transform's input: the teacher's own preprocessing
    tokenizer_cfg: dict[str, Any]  # {"name", "context_length", "vocab_sha256"}
    logit_scale: float  # linear ITC multiplier (CLIP: exp(learned log scale), ~100; ALBEF: 1 / temp)

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> Teacher: ...

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the teacher: name, architecture config, weights sha256, preprocess_cfg, tokenizer_cfg."""
        ...

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """``{"input_ids": [B, L] int64, "attention_mask": [B, L] int64}`` on CPU."""
        ...

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] float32 (already preprocessed) -> image_emb [B, D] float32, L2-normalised."""
        ...

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens from ``tokenize`` -> text_emb [B, D] float32, L2-normalised."""
        ...
