"""Dual-stream teacher: any open_clip model, with that model's own preprocessing and tokenizer.

Model sources (``create_teacher("clip", model=..., pretrained=...)``):

- a built-in open_clip name (``"ViT-B-32"``) with ``pretrained`` = a pretrained tag (``"openai"``, downloaded by
  open_clip) or a checkpoint file, or no ``pretrained`` (random init);
- ``"hf-hub:org/repo"`` or ``"local-dir:/path"`` (open_clip's own schemas; ``pretrained`` is ignored by open_clip);
- a JSON model config (a dict, a ``.json`` path, or a shipped name such as ``"tiny"``) in open_clip's
  ``model_configs/*.json`` layout, or the ``open_clip_config.json`` layout ``{"model_cfg": ..., "preprocess_cfg":
  ...}``. Vision towers may be ``timm_model_name`` and text towers ``hf_model_name`` (open_clip's
  ``HFTextEncoder``); relative ``hf_model_name`` / ``hf_tokenizer_name`` paths are resolved against the JSON file's
  folder, so a config can point at a local Hugging Face folder and work offline.

Everything is built by ``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``; the image
preprocessing is read back from ``model.visual.preprocess_cfg`` (open_clip's final, merged preprocessing).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from mcad_cache.errors import CheckpointError, InputPathError, UnknownModelError
from mcad_cache.hashing import vocab_sha256
from mcad_cache.teachers import register_teacher
from mcad_cache.teachers.base import BaseTeacher, list_configs, resolve_config, resolve_device

_logger = logging.getLogger(__name__)

_JSON_CONFIG_DIR: Path | None = None  # where JSON configs are registered with open_clip (one file per config)


def open_clip_preprocess_to_cfg(pp: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's ``PreprocessCfg`` dict (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``,
    ``fill_color``) -> this project's preprocess cfg (``data.transforms``).

    open_clip's inference transform (``open_clip/transform.py`` ``image_transform``): ``"shortest"`` resizes the
    shorter side and centre-crops; ``"longest"`` resizes the longer side and centre-pads with ``fill_color``;
    ``"squash"`` resizes to exactly the size. ``interpolation="random"`` means bicubic at inference.

    Raises:
        ValueError: an unknown ``resize_mode`` or ``interpolation``.
    """
    size = pp.get("size", 224)
    if isinstance(size, (list, tuple)):
        h, w = int(size[0]), int(size[1])
        image_size: int | list[int] = h if h == w else [h, w]
    else:
        image_size = int(size)
    mode = pp.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash", "longest"):
        raise ValueError(f"open_clip resize_mode {mode!r} is not supported")
    interp = pp.get("interpolation", "bicubic")
    interp = "bicubic" if interp == "random" else interp
    if interp not in ("bicubic", "bilinear"):
        raise ValueError(f"open_clip interpolation {interp!r} is not supported")
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    cfg: dict[str, Any] = {
        "image_size": image_size,
        "resize_mode": mode,
        "crop": None if mode == "squash" else "center",
        "interpolation": interp,
        "mean": mean,
        "std": std,
    }
    fill = int(pp.get("fill_color", 0) or 0)
    if mode == "longest" and fill:
        cfg["fill"] = fill
    return cfg


def _tokenizer_info(tokenizer: Any) -> tuple[str, int, str, int]:
    """(name, context_length, vocab sha256, pad id) of an open_clip tokenizer."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and hasattr(hf, "get_vocab"):
        name = f"open_clip.{type(tokenizer).__name__}({type(hf).__name__})"
        vocab = hf.get_vocab()
        pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
    elif hasattr(tokenizer, "encoder"):
        name = f"open_clip.{type(tokenizer).__name__}"
        vocab = tokenizer.encoder
        pad_id = 0  # SimpleTokenizer pads with 0 (open_clip/tokenizer.py SimpleTokenizer.__call__)
    else:
        raise TypeError(f"unsupported open_clip tokenizer {type(tokenizer).__name__}")
    return name, int(tokenizer.context_length), vocab_sha256(vocab), int(pad_id)


def _register_json_config(model_cfg: dict[str, Any]) -> str:
    """Register a model config with open_clip (``open_clip.add_model_config``) under a content-derived name
    ``mcad-json-<sha12>`` and return that name. The file lives in a private temp folder so that no built-in name
    can be shadowed."""
    global _JSON_CONFIG_DIR
    blob = json.dumps(model_cfg, sort_keys=True)
    name = "mcad-json-" + hashlib.sha256(blob.encode()).hexdigest()[:12]
    if name in open_clip.list_models():
        return name
    if _JSON_CONFIG_DIR is None or not _JSON_CONFIG_DIR.is_dir():
        _JSON_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="mcad-open-clip-configs-"))
    path = _JSON_CONFIG_DIR / f"{name}.json"
    path.write_text(blob)
    open_clip.add_model_config(path)
    return name


def _absolutise_hf_paths(model_cfg: dict[str, Any], base_dir: Path | None) -> None:
    """Make relative local ``hf_model_name`` / ``hf_tokenizer_name`` paths absolute (relative to ``base_dir``)."""
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if not value or base_dir is None or os.path.isabs(value):
            continue
        candidate = base_dir / value
        if candidate.exists():
            text_cfg[key] = str(candidate.resolve())


class ClipTeacher(BaseTeacher):
    """An open_clip model as a frozen dual-stream teacher.

    ``encode_image`` / ``encode_text`` are open_clip's ``model.encode_image`` / ``model.encode_text`` (CLIP, Radford
    et al. 2021), cast to float32 and L2-normalised in float32. ``logit_scale`` is ``exp(model.logit_scale)``.
    """

    kind = "dual"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        architecture: dict[str, Any],
        weights_file: str | None,
        name: str = "clip",
    ) -> None:
        self.name = name
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.architecture = architecture
        self.weights_file = weights_file
        self.preprocess_cfg = open_clip_preprocess_to_cfg(open_clip.get_model_preprocess_cfg(model))
        tok_name, context_length, vocab_hash, pad_id = _tokenizer_info(tokenizer)
        self.pad_id = pad_id
        self.tokenizer_cfg = {"name": tok_name, "context_length": context_length, "vocab_sha256": vocab_hash}
        self.logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().float().reshape(-1)[0])

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize with the model's own open_clip tokenizer.

        Returns:
            ``{"input_ids": [B, context_length] int64, "attention_mask": [B, context_length] int64}`` on CPU; the
            mask is ``input_ids != pad id`` (open_clip's ``HFTextEncoder`` uses the same rule; the CLIP text
            transformer pools at the EOT token and ignores the mask).
        Raises:
            TypeError: ``texts`` is a bare string.
        """
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, not a str")
        ids = self.tokenizer(list(texts)).long()
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] float32, preprocessed with ``preprocess_cfg`` -> image_emb [B, D] float32,
        L2-normalised (in float32, also under autocast).

        Raises:
            ValueError: ``images`` is not [B, 3, H, W].
        """
        out = self.model.encode_image(self._inputs(images), normalize=False)
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens from ``tokenize`` -> text_emb [B, D] float32, L2-normalised.

        Raises:
            ValueError: ``tokens`` lacks ``input_ids`` / ``attention_mask`` or they are not both [B, L].
        """
        ids, _ = self._tokens(tokens)
        out = self.model.encode_text(ids, normalize=False)
        return F.normalize(out.float(), dim=-1)


def _offline_tag_message(model_name: str, tag: str) -> str:
    return (
        f"--pretrained {tag}: the {model_name} weights of tag {tag!r} are not in the local cache and cannot be "
        "downloaded here (no network); fetch them where there is network, or pass --pretrained /path/to/weights "
        "(.safetensors, .bin or .pt)"
    )


def _tag_weights_reachable(cfg: Mapping[str, Any], *, cache_dir: str | None) -> bool:
    """True when a pretrained tag's weights are in the local cache, or their host's name resolves (a download can
    start). False fails fast, instead of the ~1 min of hub retries an offline machine spends before failing.

    Mirrors ``open_clip.pretrained.download_pretrained``: the Hugging Face hub file (a ``.safetensors`` twin first),
    else the URL's file under ``cache_dir`` (default ``~/.cache/clip``).
    """
    if not cfg or "file" in cfg:
        return True
    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(str(cfg["hf_hub"]))
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            if isinstance(huggingface_hub.try_to_load_from_cache(model_id, name, cache_dir=cache_dir), str):
                return True
        host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
    elif cfg.get("url"):
        url = str(cfg["url"])
        if os.path.isfile(os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
            return True
        host = urllib.parse.urlparse(url).hostname
    else:
        return True
    try:
        socket.getaddrinfo(host or "", 443)
    except OSError:
        return False
    return True


@register_teacher("clip")
def create_clip_teacher(
    *,
    model: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    device: torch.device | str = "auto",
    precision: str = "fp32",
    pretrained_text: bool = True,
    context_length: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> ClipTeacher:
    """Build an open_clip teacher.

    Args:
        model: open_clip built-in name, ``"hf-hub:..."`` / ``"local-dir:..."``, or a JSON model config (dict,
            ``.json`` path, or a shipped name: ``list_configs("clip")``, e.g. ``"tiny"``). Default ``"ViT-B-32"``.
        pretrained: pretrained tag of a built-in name (downloaded by open_clip; needs network) or a checkpoint file
            (open_clip ``load_checkpoint``: ``.pt``/``.bin``/``.safetensors``, strict). ``None``: no CLIP weights.
        config: alias of ``model`` for JSON configs (``config="tiny"``); give one of the two.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``.
        precision: open_clip precision (``"fp32"`` default; use autocast for mixed precision instead).
        pretrained_text: load the Hugging Face text tower's own weights (``hf_model_name``, a local folder works
            offline) when no full CLIP checkpoint is given (open_clip's ``pretrained_text``).
        context_length: override the tokenizer's context length (default: the model's).
        seed: seed of the random initialisation of whatever no checkpoint covers (the global RNG is untouched).
        cache_dir: open_clip download cache for pretrained tags.
    Returns:
        A ``ClipTeacher`` in eval mode on ``device``.
    Raises:
        UnknownModelError: an unknown built-in name or pretrained tag (the message lists what exists).
        CheckpointError: a checkpoint file open_clip cannot load into the model.
        FileNotFoundError: a ``.json`` config or checkpoint file that does not exist.
        InputPathError: a checkpoint path that does not exist, or a tag whose weights are neither cached locally nor
            downloadable (no network): fails at once, not after the hub's retries.
    """
    if model is not None and config is not None and model != config:
        raise ValueError(f"give model= or config=, not both (got model={model!r}, config={config!r})")
    spec = model if model is not None else config if config is not None else "ViT-B-32"
    dev = resolve_device(device)

    json_cfg: dict[str, Any] | None = None
    json_path: Path | None = None
    if isinstance(spec, Mapping) or str(spec).endswith(".json") or str(spec) in list_configs("clip"):
        json_cfg, json_path = resolve_config("clip", spec)
    force_pp: dict[str, Any] = {}
    if json_cfg is not None:
        model_cfg = copy.deepcopy(json_cfg.get("model_cfg", json_cfg))
        pp = json_cfg.get("preprocess_cfg", {}) if "model_cfg" in json_cfg else model_cfg.pop("preprocess_cfg", {})
        if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"open_clip model config needs embed_dim, vision_cfg, text_cfg; got {sorted(model_cfg)}")
        _absolutise_hf_paths(model_cfg, json_path.parent if json_path is not None else None)
        model_name = _register_json_config(model_cfg)
        force_pp = {f"image_{k}": v for k, v in pp.items() if k in ("mean", "std", "interpolation", "resize_mode")}
        arch_source = f"json:{json_path.name}" if json_path is not None else "json:dict"
    else:
        model_name = str(spec)
        schema, _ = open_clip.factory.parse_model_name(model_name)
        if schema is None and model_name.replace("/", "-") not in open_clip.list_models():
            raise UnknownModelError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        model_cfg = open_clip.get_model_config(model_name.replace("/", "-") if schema is None else model_name)
        arch_source = model_name

    weights_file: str | None = None
    tag: str | None = None
    if pretrained:
        if os.path.isfile(pretrained):
            weights_file = str(Path(pretrained).resolve())
        elif json_cfg is None and open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained):
            tag = pretrained
        elif str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise InputPathError(f"--pretrained {pretrained}: open_clip checkpoint file not found; check the path")
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
            raise UnknownModelError(
                f"pretrained {pretrained!r} is neither a file nor a tag of {model_name!r}; known tags: {tags}"
            )

    if tag is not None and not _tag_weights_reachable(
        open_clip.get_pretrained_cfg(model_name.replace("/", "-"), tag), cache_dir=cache_dir
    ):
        raise InputPathError(_offline_tag_message(model_name, tag))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            oc_model, _, _ = open_clip.create_model_and_transforms(
                model_name,
                pretrained=weights_file or tag,
                precision=precision,
                device="cpu",
                pretrained_text=pretrained_text,
                cache_dir=cache_dir,
                **force_pp,
            )
        except RuntimeError as err:
            if weights_file is not None and ("state_dict" in str(err) or "size mismatch" in str(err)):
                raise CheckpointError(f"{weights_file}: does not fit open_clip model {arch_source}: {err}") from err
            raise
        except OSError as err:  # a download that failed after all (hub offline mode, a dropped connection)
            if tag is None:
                raise
            raise InputPathError(f"{_offline_tag_message(model_name, tag)} ({type(err).__name__})") from err
    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length, cache_dir=cache_dir)
    if tag is not None:
        # The cached download (no second download): hash the file the weights came from.
        weights_file = open_clip.download_pretrained(
            open_clip.get_pretrained_cfg(model_name.replace("/", "-"), tag), cache_dir=cache_dir
        )
    architecture = {
        "family": "open_clip",
        "source": arch_source,
        "open_clip_name": model_name,  # built-in name, schema name, or mcad-json-<sha12> of a registered JSON config
        "model_cfg": model_cfg,
        "pretrained_tag": tag,
        "precision": precision,
    }
    teacher = ClipTeacher(oc_model, tokenizer, architecture=architecture, weights_file=weights_file)
    hf_text = bool(pretrained_text and (model_cfg or {}).get("text_cfg", {}).get("hf_model_name"))
    teacher.random_init = weights_file is None and tag is None and not hf_text
    teacher.to(dev)
    _logger.info(
        "clip teacher %s (pretrained=%s) on %s, preprocess %s",
        arch_source,
        tag or weights_file,
        dev,
        teacher.preprocess_cfg,
    )
    return teacher


__all__ = ["ClipTeacher", "create_clip_teacher", "open_clip_preprocess_to_cfg"]
