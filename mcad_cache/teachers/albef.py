"""Single-stream teacher: the ALBEF architecture, loading the original released ALBEF checkpoints.

ALBEF (Li et al., "Align before Fuse", NeurIPS 2021; code: github.com/salesforce/ALBEF ``models/model_retrieval.py``,
``models/vit.py``, ``models/xbert.py``):

- image encoder: ViT (patch 16, width 768, depth 12, LayerNorm eps 1e-6, exact GELU, [CLS] token); its output
  ``image_tokens [B, 1 + N, C_v]`` (after the final norm) is both the ITC source (``[CLS]``) and the cross-attention
  memory of the fusion layers. Built here with timm's ``VisionTransformer``, whose parameter names are those of
  ALBEF's own ``VisionTransformer``.
- text encoder: BERT-base. Layers ``[0, fusion_layer)`` are text-only (bidirectional self-attention);
  layers ``[fusion_layer, num_hidden_layers)`` add cross-attention to the image tokens after self-attention
  (ALBEF's ``BertLayer`` with ``crossattention``). Written here in plain torch (transformers 5's ``BertModel`` with
  cross-attention forces a causal decoder).
- ITC: ``image_emb = normalize(vision_proj(image_tokens[:, 0]))``, ``text_emb = normalize(text_proj(
  text_tokens[:, 0]))`` where ``text_tokens`` is the text-mode encoder output; ``logit_scale = 1 / temp``.
- ITM: the fusion layers run over ``text_tokens`` with cross-attention to ``image_tokens`` (all image positions
  attended); ``fused_cls`` is the fused [CLS] state and ``itm_logits = itm_head(fused_cls)`` ([no-match, match];
  the positive class is index 1, as ALBEF's ``itm_labels``).

Variant (our addition, for the offline demo teacher): ``"vision_encoder": "timm_cnn"`` replaces the ViT by a timm
CNN trunk (``timm.create_model(timm_model_name, num_classes=0, global_pool="")``, parameters under
``visual_encoder.*``); its feature map becomes ``[mean over positions, positions...]`` so the pooled map plays [CLS].
No position embedding, so no interpolation; ``image_mean`` / ``image_std`` in the config set the preprocessing.

Checkpoints: ``.pth`` files holding ``{"model": state_dict, ...}`` with ALBEF's original key names, both the
pre-training layout (``text_encoder.bert.*``, plus an MLM head ``text_encoder.cls.*``) and the retrieval fine-tuned
layout (``text_encoder.*``). Momentum copies (``*_m.*``), queues, the MLM head and BERT's ``position_ids`` buffer are
ignored and listed in the load report; a missing required key is a ``CheckpointError``. Position embeddings are
interpolated (bicubic over the patch grid, [CLS] kept) when the checkpoint's image size differs from the run's, as
ALBEF's ``interpolate_pos_embed`` does. Accepted release files: ``ALBEF_4M.pth``, ``ALBEF.pth`` (14M),
``mscoco.pth`` / ``flickr30k.pth`` (retrieval fine-tuned); see docs/teachers.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mcad_cache.constants import ALBEF_MEAN, ALBEF_STD
from mcad_cache.errors import CheckpointError, ConfigError, InputPathError
from mcad_cache.hashing import vocab_sha256
from mcad_cache.teachers import register_teacher
from mcad_cache.teachers.albef_model import AlbefConfig, AlbefModel
from mcad_cache.teachers.base import (
    BaseTeacher,
    default_bert_tokenizer_source,
    resolve_config,
    resolve_device,
)

_logger = logging.getLogger(__name__)

_QUEUE_KEYS = {"image_queue", "text_queue", "idx_queue", "queue_ptr"}
_MOMENTUM_RE = re.compile(r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.")


@dataclass
class LoadReport:
    """What ``load_albef_state_dict`` did. ``ignored`` maps each skipped checkpoint key to its reason
    (``momentum``, ``queue``, ``mlm_head``, ``buffer``, ``pooler``, or ``unexpected`` with ``strict=False``)."""

    source: str
    layout: str  # "pretrain" (text_encoder.bert.*) or "retrieval" (text_encoder.*)
    num_loaded: int = 0
    ignored: dict[str, str] = field(default_factory=dict)
    pos_embed_resized: tuple[int, int] | None = None  # (checkpoint patches, model patches) when interpolated

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for reason in self.ignored.values():
            counts[reason] = counts.get(reason, 0) + 1
        return {
            "source": self.source,
            "layout": self.layout,
            "num_loaded": self.num_loaded,
            "ignored_counts": counts,
            "ignored": dict(sorted(self.ignored.items())),
            "pos_embed_resized": list(self.pos_embed_resized) if self.pos_embed_resized else None,
        }


def interpolate_pos_embed(pos_embed: Tensor, *, num_patches: int, num_extra_tokens: int = 1) -> Tensor:
    """Resize a ViT position embedding to another square patch grid (ALBEF ``models/vit.py``
    ``interpolate_pos_embed``): the extra ([CLS]) tokens are kept, the grid part is reshaped to
    ``[1, C, g, g]`` and resized bicubically (``align_corners=False``) to the new grid.

    Args:
        pos_embed: [1, num_extra_tokens + g_old^2, C] float.
        num_patches: g_new^2, the model's patch count.
        num_extra_tokens: leading tokens that are not on the grid (1: [CLS]).
    Returns:
        [1, num_extra_tokens + num_patches, C], same dtype; the input itself when the grids already agree.
    Raises:
        CheckpointError: either grid is not square.
    """
    c = pos_embed.shape[-1]
    old = pos_embed.shape[-2] - num_extra_tokens
    g_old, g_new = math.isqrt(old), math.isqrt(num_patches)
    if g_old * g_old != old or g_new * g_new != num_patches:
        raise CheckpointError(f"position embedding grids must be square: checkpoint {old}, model {num_patches}")
    if g_old == g_new:
        return pos_embed
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:].reshape(1, g_old, g_old, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(g_new, g_new), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([extra, grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, c)], dim=1)


def read_albef_checkpoint(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """Read an ALBEF ``.pth`` and return its model state dict (``checkpoint["model"]``, or the file itself when it is
    a bare state dict). Tensors only; CPU.

    Args:
        path: the checkpoint file.
        trust_checkpoint: allow full unpickling (``weights_only=False``) when the safe loader refuses the file
            (old checkpoints pickling non-tensor objects in ``config`` / optimizer state). Only for trusted files.
    Raises:
        InputPathError: no such file (a ``FileNotFoundError``).
        CheckpointError: the file cannot be read safely (and ``trust_checkpoint`` is False) or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise InputPathError(f"--pretrained {path}: ALBEF checkpoint not found; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError variants
        if not trust_checkpoint:
            raise CheckpointError(
                f"{path}: the safe loader (weights_only=True) refused it ({type(err).__name__}: {err}); "
                "pass trust_checkpoint=True if you trust this file"
            ) from err
        _logger.warning("%s: loading with weights_only=False (trust_checkpoint=True)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not any(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no state dict found (expected a dict with a 'model' state dict)")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def load_albef_state_dict(
    model: AlbefModel, state_dict: Mapping[str, Tensor], *, source: str = "<state_dict>", strict: bool = True
) -> LoadReport:
    """Load an original-layout ALBEF state dict into ``model``.

    Key handling (ALBEF ``Retrieval.py`` does the same when it fine-tunes from a pre-training checkpoint): a leading
    ``module.`` is dropped; ``text_encoder.bert.`` becomes ``text_encoder.``; momentum encoders, queues, the MLM
    head, BERT's ``position_ids`` buffer and a BERT pooler are ignored and reported; ``visual_encoder.pos_embed``
    is interpolated to the model's patch grid.

    Args:
        model: the target model (its ``image_res`` decides the patch grid).
        state_dict: checkpoint tensors with ALBEF's key names.
        source: a name for messages (the file path).
        strict: unexpected keys (none of the above) are an error; with False they are ignored and reported.
    Returns:
        A ``LoadReport``.
    Raises:
        CheckpointError: a required key is missing (named in the message), shapes differ, both layouts are mixed,
            or (``strict``) there are unexpected keys.
    """
    keys = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    has_pre = any(k.startswith("text_encoder.bert.") for k in keys)
    has_ret = any(k.startswith(("text_encoder.embeddings.", "text_encoder.encoder.")) for k in keys)
    if has_pre and has_ret:
        raise CheckpointError(f"{source}: mixes text_encoder.bert.* and text_encoder.* layouts")
    report = LoadReport(source=source, layout="pretrain" if has_pre else "retrieval")
    expected = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in keys.items():
        name = key.replace("text_encoder.bert.", "text_encoder.", 1) if has_pre else key
        if _MOMENTUM_RE.match(name):
            report.ignored[key] = "momentum"
        elif name in _QUEUE_KEYS:
            report.ignored[key] = "queue"
        elif key.startswith("text_encoder.cls."):
            report.ignored[key] = "mlm_head"
        elif name == "text_encoder.embeddings.position_ids":
            report.ignored[key] = "buffer"
        elif name.startswith("text_encoder.pooler."):
            report.ignored[key] = "pooler"
        elif name in expected:
            mapped[name] = value
        else:
            report.ignored[key] = "unexpected"
    unexpected = sorted(k for k, r in report.ignored.items() if r == "unexpected")
    if unexpected and strict:
        raise CheckpointError(
            f"{source}: {len(unexpected)} key(s) that ALBEF's retrieval model does not have: {unexpected[:20]}"
            " (pass strict=False to ignore them)"
        )
    missing = sorted(k for k in expected if k not in mapped)
    if missing:
        raise CheckpointError(
            f"{source}: missing required key(s) {missing[:20]}" + (" ..." if len(missing) > 20 else "")
        )
    pe = mapped.get("visual_encoder.pos_embed")
    target = expected.get("visual_encoder.pos_embed")
    if pe is not None and target is not None and pe.shape != target.shape:
        num_patches = target.shape[1] - 1
        mapped["visual_encoder.pos_embed"] = interpolate_pos_embed(pe, num_patches=num_patches)
        report.pos_embed_resized = (pe.shape[1] - 1, num_patches)
        _logger.info("%s: position embedding interpolated from %d to %d patches", source, pe.shape[1] - 1, num_patches)
    if mapped["temp"].ndim != 0:
        mapped["temp"] = mapped["temp"].reshape(())
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch(es): " + "; ".join(bad[:20]))
    model.load_state_dict(mapped, strict=True)
    report.num_loaded = len(mapped)
    return report


def infer_checkpoint_image_res(state_dict: Mapping[str, Tensor], *, patch_size: int) -> int:
    """The image size a checkpoint was trained at: ``sqrt(pos_embed patches) * patch_size`` pixels.

    Raises:
        CheckpointError: no ``visual_encoder.pos_embed`` or a non-square grid.
    """
    pe = state_dict.get("visual_encoder.pos_embed", state_dict.get("module.visual_encoder.pos_embed"))
    if pe is None:
        raise CheckpointError("missing required key(s) ['visual_encoder.pos_embed']")
    n = pe.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"visual_encoder.pos_embed has {n} patch positions: not a square grid")
    return g * patch_size


# ----------------------------------------------------------------------------------------------------------------
# Text preprocessing and the teacher
# ----------------------------------------------------------------------------------------------------------------

_PUNCT_RE = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES_RE = re.compile(r"\s{2,}")


def albef_pre_caption(caption: str, *, max_words: int = 30) -> str:
    """ALBEF's caption cleaning (``dataset/utils.py`` ``pre_caption``): lower-case; delete ``,.'!?"()*#:;~``;
    ``-`` and ``/`` become spaces; ``<person>`` becomes ``person``; runs of whitespace become one space; strip;
    keep the first ``max_words`` space-separated words."""
    text = _PUNCT_RE.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES_RE.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


class AlbefTeacher(BaseTeacher):
    """ALBEF as a frozen single-stream teacher (see the module docstring for the formulas)."""

    kind = "single"

    def __init__(
        self,
        model: AlbefModel,
        tokenizer: Any,
        *,
        weights_file: str | None,
        load_report: LoadReport | None,
        tokenizer_name: str,
        name: str = "albef",
    ) -> None:
        self.name = name
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.weights_file = weights_file
        self.load_report = load_report
        self.architecture = {"family": "albef", **self.cfg.to_dict()}
        self.preprocess_cfg = {
            "image_size": self.cfg.image_res,
            "resize_mode": "squash",
            "crop": None,
            "interpolation": "bicubic",
            "mean": list(self.cfg.image_mean or ALBEF_MEAN),
            "std": list(self.cfg.image_std or ALBEF_STD),
        }
        self.tokenizer_cfg = {
            "name": tokenizer_name,
            "context_length": self.cfg.max_length,
            "vocab_sha256": vocab_sha256(tokenizer.get_vocab()),
            "text_clean": "albef_pre_caption",
            "max_words": self.cfg.max_words,
        }
        self.logit_scale = float(1.0 / model.temp.detach().float())

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """ALBEF text input: ``albef_pre_caption`` then BERT WordPiece, ``[CLS] ... [SEP]``, padded / truncated to
        ``max_length`` (ALBEF: ``padding="max_length", truncation=True, max_length=30``).

        Returns:
            ``{"input_ids": [B, max_length] int64, "attention_mask": [B, max_length] int64}`` on CPU.
        Raises:
            TypeError: ``texts`` is a bare string.
        """
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, not a str")
        cleaned = [albef_pre_caption(t, max_words=self.cfg.max_words) for t in texts]
        enc = self.tokenizer(
            cleaned, padding="max_length", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    @torch.no_grad()
    def image_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, R, R] float32 (``preprocess_cfg``) -> image_tokens [B, 1 + (R/P)^2, C_v] float32.

        Raises:
            ValueError: not [B, 3, H, W].
        """
        return self.model.image_tokens(self._inputs(images)).float()

    @torch.no_grad()
    def encode_image_from_tokens(self, image_tokens: Tensor) -> Tensor:
        """image_tokens [B, L_i, C_v] -> image_emb [B, D] float32, ``normalize(vision_proj(image_tokens[:, 0]))``."""
        out = self.model.vision_proj(image_tokens[:, 0].to(self.device))
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, R, R] -> image_emb [B, D] float32, L2-normalised (ALBEF ITC image feature)."""
        return self.encode_image_from_tokens(self.model.image_tokens(self._inputs(images)))

    @torch.no_grad()
    def text_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens [B, L] -> text_tokens [B, L, C] float32: the text-mode encoder output (layers before fusion).

        Raises:
            ValueError: malformed ``tokens``.
        """
        ids, mask = self._tokens(tokens)
        return self.model.text_encoder.forward_text(ids, mask).float()

    @torch.no_grad()
    def encode_text_from_tokens(self, text_tokens: Tensor) -> Tensor:
        """text_tokens [B, L, C] -> text_emb [B, D] float32, ``normalize(text_proj(text_tokens[:, 0]))``."""
        out = self.model.text_proj(text_tokens[:, 0].to(self.device))
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens [B, L] -> text_emb [B, D] float32, L2-normalised (ALBEF ITC text feature)."""
        ids, mask = self._tokens(tokens)
        return self.encode_text_from_tokens(self.model.text_encoder.forward_text(ids, mask))

    @torch.no_grad()
    def itm_from_text_tokens(
        self, image_tokens: Tensor, text_tokens: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Row-wise pairs: image_tokens [B, L_i, C_v], text_tokens [B, L, C], attention_mask [B, L] ->
        (itm_logits [B, 2] float32, fused_cls [B, C] float32). Positive (match) logit: ``itm_logits[:, 1]``.

        Raises:
            ValueError: batch sizes differ.
        """
        if image_tokens.shape[0] != text_tokens.shape[0] or text_tokens.shape[:2] != attention_mask.shape:
            raise ValueError(
                f"row-wise pairs need equal batch sizes: image_tokens {tuple(image_tokens.shape)}, text_tokens "
                f"{tuple(text_tokens.shape)}, attention_mask {tuple(attention_mask.shape)}"
            )
        dev = self.device
        fused = self.model.text_encoder.forward_fusion(
            text_tokens.to(dev), attention_mask.to(dev), image_tokens.to(dev)
        )
        fused_cls = fused[:, 0]
        return self.model.itm_head(fused_cls).float(), fused_cls.float()

    @torch.no_grad()
    def itm_from_tokens(self, image_tokens: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Row-wise pairs: image_tokens [B, L_i, C_v] (from ``image_tokens``), tokens [B, L] ->
        (itm_logits [B, 2] float32, fused_cls [B, C] float32). To score one image against K captions, repeat its
        tokens with ``repeat_interleave``.

        Raises:
            ValueError: batch sizes differ or malformed ``tokens``.
        """
        ids, mask = self._tokens(tokens)
        text_tokens = self.model.text_encoder.forward_text(ids, mask)
        return self.itm_from_text_tokens(image_tokens, text_tokens, mask)


def _load_tokenizer(source: str) -> Any:
    from transformers import BertTokenizerFast  # noqa: PLC0415 - slow import

    return BertTokenizerFast.from_pretrained(source)


@register_teacher("albef")
def create_albef_teacher(
    *,
    model: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    image_res: int | None = None,
    max_length: int | None = None,
    device: torch.device | str = "auto",
    strict: bool = True,
    trust_checkpoint: bool = False,
    seed: int = 0,
) -> AlbefTeacher:
    """Build an ALBEF teacher, optionally loading an original ALBEF checkpoint.

    Args:
        model: architecture config: a shipped name (``"base"``: ViT-B/16 + BERT-base, 6 + 6 layers; ``"tiny"``), a
            ``.json`` path or a dict (``AlbefConfig.from_dict`` layout). Default ``"base"``.
        pretrained: an ALBEF ``.pth`` checkpoint (``ALBEF_4M.pth``, ``ALBEF.pth``, ``mscoco.pth``,
            ``flickr30k.pth``); ``None`` = random init (tests).
        config: alias of ``model``.
        tokenizer: BERT-uncased tokenizer folder or hub name (``BertTokenizerFast.from_pretrained``). Default:
            ``default_bert_tokenizer_source()``.
        image_res: the run's image size in pixels. Default: the checkpoint's own (from its position embedding: 384
            for the retrieval checkpoints, 256 for pre-training ones), else the config's. When it differs from the
            checkpoint's the position embedding is interpolated.
        max_length: tokenizer max length (default: the config's, 30).
        device: ``"auto"`` / ``"cpu"`` / ``"cuda:N"``.
        strict: refuse checkpoint keys that are neither model weights nor known training-only state.
        trust_checkpoint: allow full unpickling of a checkpoint the safe loader refuses.
        seed: seed of the random initialisation (global RNG untouched).
    Returns:
        An ``AlbefTeacher`` (eval mode, on ``device``) with ``load_report`` set when a checkpoint was loaded.
    Raises:
        CheckpointError: the checkpoint does not fit (missing keys named, shape mismatches, unexpected keys).
        FileNotFoundError: a missing checkpoint or config file.
        ValueError: an invalid config, or a tokenizer vocabulary larger than the config's ``vocab_size``.
    """
    if model is not None and config is not None and model != config:
        raise ConfigError(f"give model= or config=, not both (got model={model!r}, config={config!r})")
    spec = model if model is not None else config if config is not None else "base"
    cfg_dict, _ = resolve_config("albef", spec)
    cfg = AlbefConfig.from_dict(cfg_dict)
    state_dict = None
    weights_file = None
    if pretrained:
        weights_file = str(Path(pretrained).resolve())
        state_dict = read_albef_checkpoint(pretrained, trust_checkpoint=trust_checkpoint)
    overrides: dict[str, Any] = {}
    if image_res is not None:
        overrides["image_res"] = int(image_res)
    elif state_dict is not None and cfg.vision_encoder == "vit":
        overrides["image_res"] = infer_checkpoint_image_res(state_dict, patch_size=cfg.patch_size)
    if max_length is not None:
        overrides["max_length"] = int(max_length)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()

    tok_source = str(tokenizer) if tokenizer is not None else default_bert_tokenizer_source()
    tok = _load_tokenizer(tok_source)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_source} has {len(tok)} tokens > the model's vocab_size {cfg.vocab_size}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AlbefModel(cfg)
    report = None
    if state_dict is not None:
        report = load_albef_state_dict(net, state_dict, source=str(pretrained), strict=strict)
        _logger.info(
            "albef checkpoint %s: %s", pretrained, {k: v for k, v in report.to_dict().items() if k != "ignored"}
        )
    teacher = AlbefTeacher(
        net,
        tok,
        weights_file=weights_file,
        load_report=report,
        tokenizer_name=f"bert-wordpiece-uncased({type(tok).__name__})",
    )
    teacher.random_init = state_dict is None
    teacher.to(resolve_device(device))
    return teacher


__all__ = [
    "AlbefConfig",
    "AlbefModel",
    "AlbefTeacher",
    "LoadReport",
    "albef_pre_caption",
    "create_albef_teacher",
    "default_bert_tokenizer_source",
    "interpolate_pos_embed",
    "load_albef_state_dict",
    "read_albef_checkpoint",
]
