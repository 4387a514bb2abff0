"""A registered ``fake`` teacher for tests: tiny, deterministic, dual- or single-stream (``model="single"``).

Importing this module registers it (``@register_teacher("fake")``). Weights come from ``torch.Generator`` seeded
with ``seed`` (default 0), so two instances are identical and the fingerprint's weights sha256 is stable.

- image: channel means of a 4 x 4 grid of patches -> linear -> image_tokens [B, 16, C]; image_emb = normalize(
  linear(mean of tokens)) [B, D]. Colours drive the embedding, so coloured test images are told apart.
- text: characters (code point mod 128) -> embedding -> masked mean -> linear -> normalize [B, D].
- ITM (single): fused_cls = tanh(W [mean image token ; pooled text]) [B, C]; itm_logits = linear(fused_cls) [B, 2].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad_cache.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mcad_cache.teachers import register_teacher
from mcad_cache.teachers.base import BaseTeacher, resolve_device

EMB_DIM = 8
TOKEN_DIM = 12
CONTEXT = 16
IMAGE_SIZE = 32


class _FakeModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.patch = nn.Parameter(torch.randn(3, TOKEN_DIM, generator=gen))
        self.pos = nn.Parameter(0.1 * torch.randn(16, TOKEN_DIM, generator=gen))
        self.img_proj = nn.Parameter(torch.randn(TOKEN_DIM, EMB_DIM, generator=gen))
        self.tok_emb = nn.Parameter(torch.randn(128, TOKEN_DIM, generator=gen))
        self.txt_proj = nn.Parameter(torch.randn(TOKEN_DIM, EMB_DIM, generator=gen))
        self.fuse = nn.Parameter(torch.randn(2 * TOKEN_DIM, TOKEN_DIM, generator=gen) / 3)
        self.itm_head = nn.Parameter(torch.randn(TOKEN_DIM, 2, generator=gen))


class FakeTeacher(BaseTeacher):
    """Tiny deterministic teacher (see the module docstring). ``FakeTeacher(kind="single")`` returns a
    :class:`FakeSingleTeacher`, so only the single-stream variant has the single-stream abilities (protocols are
    checked by method presence)."""

    def __new__(cls, *, kind: str = "dual", seed: int = 0, device: Any = "cpu") -> FakeTeacher:
        if cls is FakeTeacher and kind == "single":
            return super().__new__(FakeSingleTeacher)
        return super().__new__(cls)

    def __init__(self, *, kind: str = "dual", seed: int = 0, device: Any = "cpu") -> None:
        self.name = "fake"
        self.kind = kind  # type: ignore[assignment]
        self.model = _FakeModel(seed).eval()
        self.architecture = {"fake": 1, "kind": kind, "emb_dim": EMB_DIM, "token_dim": TOKEN_DIM}
        self.preprocess_cfg = {
            "image_size": IMAGE_SIZE,
            "resize_mode": "squash",
            "crop": None,
            "interpolation": "bilinear",
            "mean": list(OPENAI_CLIP_MEAN),
            "std": list(OPENAI_CLIP_STD),
        }
        self.tokenizer_cfg = {"name": "fake-chars", "context_length": CONTEXT, "vocab_sha256": "0" * 64}
        self.logit_scale = 50.0
        self.to(resolve_device(device))

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Characters -> ids (code point mod 127, + 1; 0 = pad): ``input_ids`` / ``attention_mask`` [B, 16] int64."""
        ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for i, t in enumerate(texts):
            codes = [ord(c) % 127 + 1 for c in t[:CONTEXT]]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    @torch.no_grad()
    def _image_tokens(self, images: Tensor) -> Tensor:
        x = self._inputs(images).float()
        grid = F.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # [B, 16, 3]
        return torch.tanh(grid @ self.model.patch + self.model.pos)

    @torch.no_grad()
    def _image_emb(self, image_tokens: Tensor) -> Tensor:
        return F.normalize((image_tokens.float().mean(1) @ self.model.img_proj).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> image_emb [B, D] float32, L2-normalised."""
        return self._image_emb(self._image_tokens(images))

    def _pooled_text(self, tokens: dict[str, Tensor]) -> Tensor:
        ids, mask = self._tokens(tokens)
        emb = self.model.tok_emb[ids] * mask[..., None]
        return emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens -> text_emb [B, D] float32, L2-normalised."""
        return F.normalize((self._pooled_text(tokens) @ self.model.txt_proj).float(), dim=-1)


class FakeSingleTeacher(FakeTeacher):
    """The single-stream fake: adds ``image_tokens``, ``encode_image_from_tokens`` and an ITM head."""

    def image_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> image_tokens [B, 16, C] float32."""
        return self._image_tokens(images)

    def encode_image_from_tokens(self, image_tokens: Tensor) -> Tensor:
        """image_tokens [B, 16, C] -> image_emb [B, D] float32, L2-normalised."""
        return self._image_emb(image_tokens)

    @torch.no_grad()
    def itm_from_tokens(self, image_tokens: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Row-wise pairs -> (itm_logits [B, 2], fused_cls [B, C]) float32."""
        both = torch.cat([image_tokens.float().mean(1), self._pooled_text(tokens)], dim=1)
        fused = torch.tanh(both @ self.model.fuse) * 4
        return (fused @ self.model.itm_head).float(), fused.float()


@register_teacher("fake")
def create_fake_teacher(
    *, model: str | None = None, kind: str | None = None, seed: int = 0, device: Any = "cpu", **_: Any
) -> FakeTeacher:
    """``model="single"`` (or ``kind="single"``) gives the single-stream variant; default dual-stream."""
    return FakeTeacher(kind=kind or model or "dual", seed=seed, device=device)
