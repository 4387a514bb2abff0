"""The ALBEF network (salesforce/ALBEF ``models/model_retrieval.py`` + ``models/xbert.py``, inference parts):
``AlbefConfig``, the BERT text/fusion encoder ``AlbefTextEncoder`` and ``AlbefModel`` (ViT or timm CNN image
encoder, ITC projections, ITM head). Loading, tokenisation and the ``Teacher`` live in ``teachers/albef.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mcad_cache.errors import ConfigError

_ACTIVATIONS = {
    "gelu": partial(F.gelu, approximate="none"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class AlbefConfig:
    """ALBEF architecture. JSON layout (``configs/albef_*.json``): the top-level fields below plus a ``"bert"`` dict
    with the key names of ALBEF's ``configs/config_bert.json`` (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``, ``type_vocab_size``, ``vocab_size``,
    ``layer_norm_eps``, ``hidden_act``, ``pad_token_id``, ``fusion_layer``; ``encoder_width`` must equal
    ``vision_width`` when given). Defaults: ALBEF's retrieval config (``configs/Retrieval_coco.yaml``)."""

    image_res: int = 384  # pixels; squash-resize target (384 retrieval fine-tuned, 256 pre-training)
    patch_size: int = 16  # ViT patch size, pixels
    vision_width: int = 768  # ViT width C_v
    vision_depth: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    mlp_ratio: float = 4.0  # ViT MLP hidden = mlp_ratio * C_v
    vision_eps: float = 1e-6  # ViT LayerNorm eps (ALBEF: partial(nn.LayerNorm, eps=1e-6))
    embed_dim: int = 256  # ITC projection dim D
    temp: float = 0.07  # initial ITC temperature (the checkpoint's ``temp`` overrides it)
    max_length: int = 30  # tokenizer max length (ALBEF retrieval eval: max_length=30)
    max_words: int = 30  # pre_caption word limit (ALBEF re_eval_dataset max_words=30)
    hidden_size: int = 768  # BERT width C
    num_hidden_layers: int = 12  # BERT layers, text + fusion
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    vocab_size: int = 30522  # BERT-base uncased WordPiece
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    fusion_layer: int = 6  # first layer with cross-attention (layers [fusion_layer, num_hidden_layers) fuse)
    vision_encoder: str = "vit"  # "vit" (ALBEF's) | "timm_cnn" (a timm CNN trunk; the offline demo teacher)
    timm_model_name: str | None = None  # "timm_cnn": the timm model name (e.g. "tf_efficientnet_lite0")
    image_mean: tuple[float, float, float] | None = None  # per-channel mean for preprocess_cfg (None: ALBEF's)
    image_std: tuple[float, float, float] | None = None  # per-channel std for preprocess_cfg (None: ALBEF's)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlbefConfig:
        """From the JSON layout (top level + ``"bert"``), ignoring BERT keys that do not change the architecture
        (dropout probabilities, ``architectures``, ``model_type``, ``initializer_range``).

        Raises:
            ValueError: unknown keys, ``encoder_width != vision_width``, or inconsistent sizes.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        flat = {k: v for k, v in d.items() if k != "bert"}
        bert = dict(d.get("bert", {}))
        encoder_width = bert.pop("encoder_width", None)
        for k in (
            "attention_probs_dropout_prob",
            "hidden_dropout_prob",
            "architectures",
            "model_type",
            "initializer_range",
            "add_cross_attention",
        ):
            bert.pop(k, None)
        unknown = sorted((set(flat) | set(bert)) - names)
        if unknown:
            raise ConfigError(f"unknown ALBEF config keys {unknown}; known: {sorted(names)}")
        for k in ("image_mean", "image_std"):
            if flat.get(k) is not None:
                flat[k] = tuple(float(v) for v in flat[k])
        cfg = cls(**{**flat, **bert})
        if encoder_width is not None and int(encoder_width) != cfg.vision_width:
            raise ConfigError(f"bert.encoder_width {encoder_width} != vision_width {cfg.vision_width}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises ValueError on sizes that cannot form a model."""
        if self.vision_encoder not in ("vit", "timm_cnn"):
            raise ConfigError(f"vision_encoder must be 'vit' or 'timm_cnn', got {self.vision_encoder!r}")
        if self.vision_encoder == "timm_cnn" and not self.timm_model_name:
            raise ConfigError("vision_encoder 'timm_cnn' needs timm_model_name")
        for k in ("image_mean", "image_std"):
            v = getattr(self, k)
            if v is not None and len(v) != 3:
                raise ConfigError(f"{k} must be 3 numbers, got {v!r}")
        if self.vision_encoder == "vit" and self.image_res % self.patch_size:
            raise ConfigError(f"image_res {self.image_res} is not a multiple of patch_size {self.patch_size}")
        if (self.vision_encoder == "vit" and self.vision_width % self.vision_heads) or (
            self.hidden_size % self.num_attention_heads
        ):
            raise ConfigError("widths must be multiples of their head counts")
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ConfigError(f"fusion_layer {self.fusion_layer} outside [0, {self.num_hidden_layers}]")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
        if self.max_length > self.max_position_embeddings:
            raise ConfigError(f"max_length {self.max_length} > max_position_embeddings {self.max_position_embeddings}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("image_mean", "image_std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


# ----------------------------------------------------------------------------------------------------------------
# Modules. Attribute names follow ALBEF's xbert.py so that the original keys map 1:1 (after the layout prefix).
# ----------------------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """Multi-head attention with separate ``query``/``key``/``value`` projections (BERT ``BertSelfAttention``);
    keys/values come from ``kv_width``-wide memory for cross-attention. Scaled dot product 1/sqrt(head_dim)."""

    def __init__(self, width: int, heads: int, kv_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor, key_mask: Tensor | None) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(memory)), self._split(self.value(memory))
        # key_mask [B, Lk] bool (True = attend) -> [B, 1, 1, Lk]; masked keys get zero weight, as BERT's -10000 bias.
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


class _AttentionOutput(nn.Module):
    """``LayerNorm(dense(h) + residual)`` (BERT ``BertSelfOutput`` / ``BertOutput``)."""

    def __init__(self, in_width: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _AttentionBlock(nn.Module):
    """BERT ``BertAttention``: ``self`` (the attention) + ``output`` (projection, residual, LayerNorm)."""

    def __init__(self, width: int, heads: int, kv_width: int, eps: float) -> None:
        super().__init__()
        self.self = _Attention(width, heads, kv_width)
        self.output = _AttentionOutput(width, width, eps)

    def forward(self, x: Tensor, memory: Tensor, key_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, memory, key_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    """ALBEF ``BertLayer``: self-attention, then (fusion layers) cross-attention to the image tokens, then FFN."""

    def __init__(self, cfg: AlbefConfig, *, cross: bool) -> None:
        super().__init__()
        c, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = _AttentionBlock(c, cfg.num_attention_heads, c, eps)
        self.crossattention = _AttentionBlock(c, cfg.num_attention_heads, cfg.vision_width, eps) if cross else None
        self.intermediate = _Intermediate(c, cfg.intermediate_size, cfg.hidden_act)
        self.output = _AttentionOutput(cfg.intermediate_size, c, eps)

    def forward(self, x: Tensor, text_mask: Tensor, image_tokens: Tensor | None, image_mask: Tensor | None) -> Tensor:
        x = self.attention(x, x, text_mask)
        if self.crossattention is not None:
            if image_tokens is None:
                raise ValueError("fusion layers need image_tokens")
            x = self.crossattention(x, image_tokens, image_mask)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    """BERT embeddings: word + token type (0) + absolute position, then LayerNorm."""

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, c, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, c)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, c)
        self.LayerNorm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(cfg, cross=i >= cfg.fusion_layer) for i in range(cfg.num_hidden_layers)])


class AlbefTextEncoder(nn.Module):
    """ALBEF's ``BertModel`` (no pooler): ``text`` mode runs layers ``[0, fusion_layer)``, ``fusion`` mode runs
    ``[fusion_layer, L)`` over text states with cross-attention to image tokens."""

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        self.fusion_layer = cfg.fusion_layer
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask [B, L] -> text_tokens [B, L, C] (text-mode output)."""
        mask = attention_mask.bool()
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer[: self.fusion_layer]:
            x = layer(x, mask, None, None)
        return x

    def forward_fusion(self, text_tokens: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """text_tokens [B, L, C], attention_mask [B, L], image_tokens [B, L_i, C_v] -> fused states [B, L, C].
        Every image position is attended (ALBEF's ``image_atts`` are all ones)."""
        mask = attention_mask.bool()
        x = text_tokens
        for layer in self.encoder.layer[self.fusion_layer :]:
            x = layer(x, mask, image_tokens, None)
        return x


class AlbefModel(nn.Module):
    """ALBEF retrieval model (no momentum encoders or queues: they only matter for training)."""

    def __init__(self, cfg: AlbefConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.vision_encoder == "timm_cnn":
            self.visual_encoder = timm.create_model(
                cfg.timm_model_name, pretrained=False, num_classes=0, global_pool=""
            )
            if self.visual_encoder.num_features != cfg.vision_width:
                raise ValueError(
                    f"vision_width {cfg.vision_width} != {cfg.timm_model_name}'s num_features "
                    f"{self.visual_encoder.num_features}"
                )
        else:
            self.visual_encoder = VisionTransformer(
                img_size=cfg.image_res,
                patch_size=cfg.patch_size,
                embed_dim=cfg.vision_width,
                depth=cfg.vision_depth,
                num_heads=cfg.vision_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=cfg.vision_eps),
                num_classes=0,
                global_pool="token",
            )
        self.text_encoder = AlbefTextEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self._init_text_weights()

    def _init_text_weights(self) -> None:
        # BERT's _init_weights: Linear/Embedding N(0, 0.02), zero biases, LayerNorm (1, 0).
        for m in [self.text_encoder, self.vision_proj, self.text_proj, self.itm_head]:
            for mod in m.modules():
                if isinstance(mod, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(mod.weight, std=0.02)
                    if isinstance(mod, nn.Linear) and mod.bias is not None:
                        nn.init.zeros_(mod.bias)
                elif isinstance(mod, nn.LayerNorm):
                    nn.init.ones_(mod.weight)
                    nn.init.zeros_(mod.bias)

    def image_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, R, R] -> image_tokens [B, 1 + (R / P)^2, C_v] (ViT output after the final norm).

        With ``vision_encoder == "timm_cnn"``: the trunk's feature map [B, C_v, h, w] as ``[mean over positions,
        position 1, ..., position h*w]`` -> [B, 1 + h*w, C_v] (the pooled map plays [CLS]; our choice for the
        offline demo teacher, not ALBEF's)."""
        out = self.visual_encoder.forward_features(images)
        if self.cfg.vision_encoder == "timm_cnn":
            tokens = out.flatten(2).transpose(1, 2)
            out = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------------------------------------------
