"""Single-stream teacher: BLIP image-text retrieval through transformers (``BlipForImageTextRetrieval``).

BLIP (Li et al., "BLIP: Bootstrapping Language-Image Pre-training", ICML 2022; code: github.com/salesforce/BLIP
``models/blip_retrieval.py``, ``train_retrieval.py``), as ported to transformers:

- ``image_tokens = vision_model(pixel_values).last_hidden_state`` [B, 1 + N, C_v];
- ITC (``use_itm_head=False``): ``image_emb = normalize(vision_proj(image_tokens[:, 0]))``,
  ``text_emb = normalize(text_proj(text_encoder(input_ids, attention_mask)[:, 0]))``;
- ITM (``use_itm_head=True``): ``text_encoder(input_ids, attention_mask, encoder_hidden_states=image_tokens)``
  (bidirectional self-attention + cross-attention to every image position), ``fused_cls`` = its first state,
  ``itm_logits = itm_head(fused_cls)`` ([no-match, match]).

First token of the ITM input: the original BLIP replaces ``[CLS]`` by its ``[ENC]`` token for image-grounded text
encoding (``train_retrieval.py``: ``text_ids[:, 0] = tokenizer.enc_token_id``); transformers' forward keeps
``[CLS]`` (huggingface/transformers#25629). ``itm_first_token="auto"`` uses ``[ENC]`` when the tokenizer has it as a
token and ``[CLS]`` otherwise; ``"cls"`` or ``"enc"`` force one. The choice is part of the fingerprint.

transformers' port carries no learned ITC temperature, so ``logit_scale`` is ``exp(config.logit_scale_init_value)``
(1 / 0.07 by default) unless given.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mcad_cache.errors import CheckpointError, InputPathError
from mcad_cache.hashing import vocab_sha256
from mcad_cache.teachers import register_teacher
from mcad_cache.teachers.base import (
    BaseTeacher,
    default_bert_tokenizer_source,
    list_configs,
    resolve_config,
    resolve_device,
)

_logger = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "Salesforce/blip-itm-base-coco"
_RESAMPLE_NAMES = {3: "bicubic", 2: "bilinear", 0: "nearest"}  # PIL.Image.Resampling values


def blip_preprocess_cfg(image_processor: Any) -> dict[str, Any]:
    """A ``BlipImageProcessor``'s settings as this project's preprocess cfg: BLIP squash-resizes to (height, width)
    (the original ``transforms.Resize((image_size, image_size), interpolation=BICUBIC)``), scales to [0, 1] and
    normalises with its mean / std.

    Raises:
        ValueError: a processor that crops, resizes by shortest edge, or uses an unsupported resample filter.
    """
    size = image_processor.size
    height = getattr(size, "height", None) if not isinstance(size, Mapping) else size.get("height")
    width = getattr(size, "width", None) if not isinstance(size, Mapping) else size.get("width")
    if height is None or width is None:
        raise ValueError(f"BLIP image processor size must give height and width, got {size!r}")
    if getattr(image_processor, "do_center_crop", False):
        raise ValueError("BLIP image processors with do_center_crop=True are not supported")
    resample = int(getattr(image_processor, "resample", 3))
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"unsupported resample filter {resample}")
    h, w = int(height), int(width)
    return {
        "image_size": h if h == w else [h, w],
        "resize_mode": "squash",
        "crop": None,
        "interpolation": _RESAMPLE_NAMES[resample],
        "mean": [float(v) for v in image_processor.image_mean],
        "std": [float(v) for v in image_processor.image_std],
    }


class BlipTeacher(BaseTeacher):
    """A ``BlipForImageTextRetrieval`` as a frozen single-stream teacher (formulas in the module docstring)."""

    kind = "single"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        weights_file: str | None,
        source: str,
        max_length: int,
        itm_first_token: str,
        logit_scale: float | None,
        name: str = "blip",
    ) -> None:
        self.name = name
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.weights_file = weights_file
        self.max_length = int(max_length)
        vocab = tokenizer.get_vocab()
        if itm_first_token == "auto":
            itm_first_token = "enc" if "[ENC]" in vocab else "cls"
        if itm_first_token == "enc":
            if "[ENC]" not in vocab:
                raise ValueError("itm_first_token='enc' but the tokenizer has no [ENC] token")
            self.itm_first_token_id: int | None = int(vocab["[ENC]"])
        elif itm_first_token == "cls":
            self.itm_first_token_id = None
        else:
            raise ValueError(f"itm_first_token must be 'auto', 'enc' or 'cls', got {itm_first_token!r}")
        self.itm_first_token = itm_first_token
        cfg = model.config
        self.architecture = {
            "family": "blip",
            "source": source,
            "class": type(model).__name__,
            "config": _config_dict(cfg),
            "itm_first_token": itm_first_token,
        }
        self.preprocess_cfg = blip_preprocess_cfg(image_processor)
        self.tokenizer_cfg = {
            "name": f"blip({type(tokenizer).__name__})",
            "context_length": self.max_length,
            "vocab_sha256": vocab_sha256(vocab),
        }
        if logit_scale is None:
            logit_scale = float(torch.tensor(float(getattr(cfg, "logit_scale_init_value", 2.6592))).exp())
        self.logit_scale = float(logit_scale)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """The model's own tokenizer, ``[CLS] ... [SEP]`` padded / truncated to ``max_length`` (BLIP retrieval: 35).

        Returns:
            ``{"input_ids": [B, max_length] int64, "attention_mask": [B, max_length] int64}`` on CPU.
        Raises:
            TypeError: ``texts`` is a bare string.
        """
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, not a str")
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    @torch.no_grad()
    def image_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] float32 (``preprocess_cfg``) -> image_tokens [B, 1 + N, C_v] float32 (ViT output).

        Raises:
            ValueError: not [B, 3, H, W].
        """
        return self.model.vision_model(pixel_values=self._inputs(images)).last_hidden_state.float()

    @torch.no_grad()
    def encode_image_from_tokens(self, image_tokens: Tensor) -> Tensor:
        """image_tokens [B, L_i, C_v] -> image_emb [B, D] float32, ``normalize(vision_proj(image_tokens[:, 0]))``."""
        out = self.model.vision_proj(image_tokens[:, 0].to(self.device))
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> image_emb [B, D] float32, L2-normalised (BLIP ITC image feature)."""
        out = self.model.vision_model(pixel_values=self._inputs(images)).last_hidden_state
        return self.encode_image_from_tokens(out)

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens [B, L] -> text_emb [B, D] float32, L2-normalised (BLIP ITC text feature, unimodal text encoder).

        Raises:
            ValueError: malformed ``tokens``.
        """
        ids, mask = self._tokens(tokens)
        states = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(self.model.text_proj(states[:, 0]).float(), dim=-1)

    def itm_input_ids(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> the ITM input: the first token replaced by ``[ENC]`` when ``itm_first_token == "enc"``
        (a copy; the argument is not modified)."""
        if self.itm_first_token_id is None:
            return input_ids
        out = input_ids.clone()
        out[:, 0] = self.itm_first_token_id
        return out

    @torch.no_grad()
    def itm_from_tokens(self, image_tokens: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Row-wise pairs: image_tokens [B, L_i, C_v] (from ``image_tokens``), tokens [B, L] ->
        (itm_logits [B, 2] float32, fused_cls [B, C] float32); match logit ``itm_logits[:, 1]``.

        Raises:
            ValueError: batch sizes differ or malformed ``tokens``.
        """
        ids, mask = self._tokens(tokens)
        if image_tokens.shape[0] != ids.shape[0]:
            raise ValueError(
                f"row-wise pairs need equal batch sizes: image_tokens {tuple(image_tokens.shape)}, "
                f"tokens {tuple(ids.shape)}"
            )
        image_tokens = image_tokens.to(self.device)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device)
        states = self.model.text_encoder(
            input_ids=self.itm_input_ids(ids),
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        fused_cls = states[:, 0]
        return self.model.itm_head(fused_cls).float(), fused_cls.float()


def _config_dict(cfg: Any) -> dict[str, Any]:
    """The architecture-relevant part of a BlipConfig, in its JSON form (no transformers bookkeeping). JSON form:
    ``id2label`` has int keys in the config, string keys once a cache manifest stores it; the fingerprint must equal
    its stored copy (the conformance suite checks the round trip)."""
    d = cfg.to_dict()
    drop = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "_commit_hash"}
    out = {k: v for k, v in d.items() if k not in drop}
    for sub in ("text_config", "vision_config"):
        if isinstance(out.get(sub), dict):
            out[sub] = {k: v for k, v in out[sub].items() if k not in drop}
    return json.loads(json.dumps(out))


def _is_config_spec(spec: Any) -> bool:
    return isinstance(spec, Mapping) or str(spec).endswith(".json") or str(spec) in list_configs("blip")


@register_teacher("blip")
def create_blip_teacher(
    *,
    model: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    max_length: int = 35,
    itm_first_token: str = "auto",
    logit_scale: float | None = None,
    device: torch.device | str = "auto",
    seed: int = 0,
    local_files_only: bool = False,
) -> BlipTeacher:
    """Build a BLIP retrieval teacher through transformers.

    Two ways:

    - weights: ``pretrained`` (or ``model``) is a local folder written by ``save_pretrained`` (model + processor)
      or a hub name (``"Salesforce/blip-itm-base-coco"``, ``"Salesforce/blip-itm-large-coco"``,
      ``"...-flickr"``; needs network): ``BlipForImageTextRetrieval.from_pretrained`` and
      ``BlipProcessor.from_pretrained`` (falling back to ``AutoTokenizer`` + ``BlipImageProcessorPil`` when the
      folder has no processor files);
    - random init (tests): ``model`` / ``config`` is a ``BlipConfig`` dict, a ``.json`` path or a shipped name
      (``"tiny"``, ``"base"``); ``tokenizer`` names a BERT-uncased tokenizer folder (default: the ALBEF default).

    Args:
        model: a model folder / hub name, or an architecture config (see above). Default: ``DEFAULT_HUB_MODEL``.
        pretrained: a model folder or hub name (takes precedence over ``model`` for the weights).
        config: alias of ``model`` for configs.
        tokenizer: tokenizer folder / hub name overriding the model's own.
        max_length: tokenizer max length (BLIP retrieval: 35).
        itm_first_token: ``"auto"``, ``"enc"`` or ``"cls"`` (see the module docstring).
        logit_scale: linear ITC scale to record (default ``exp(config.logit_scale_init_value)``).
        device: ``"auto"`` / ``"cpu"`` / ``"cuda:N"``.
        seed: seed of a random initialisation (global RNG untouched).
        local_files_only: never contact the hub (transformers' ``local_files_only``).
    Returns:
        A ``BlipTeacher`` in eval mode on ``device``.
    Raises:
        CheckpointError: transformers cannot load the weights into ``BlipForImageTextRetrieval``.
        FileNotFoundError: a missing config file.
        ValueError: an invalid config or ``itm_first_token``.
    """
    from transformers import (  # noqa: PLC0415 - slow import
        AutoTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    if model is not None and config is not None and model != config:
        raise ValueError(f"give model= or config=, not both (got model={model!r}, config={config!r})")
    spec = model if model is not None else config
    dev = resolve_device(device)
    weights_file: str | None = None
    if pretrained is None and spec is not None and _is_config_spec(spec):
        cfg_dict, _ = resolve_config("blip", spec)
        cfg = BlipConfig(**copy.deepcopy(cfg_dict))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = BlipForImageTextRetrieval(cfg)
        tok = AutoTokenizer.from_pretrained(
            str(tokenizer) if tokenizer is not None else default_bert_tokenizer_source()
        )
        size = cfg.vision_config.image_size
        image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
        source = f"config:{spec}" if not isinstance(spec, Mapping) else "config:dict"
    else:
        src = str(pretrained if pretrained is not None else spec if spec is not None else DEFAULT_HUB_MODEL)
        looks_local = isinstance(pretrained, os.PathLike) or src.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(src).expanduser().exists():
            raise InputPathError(f"--pretrained {src}: no such BLIP model folder; check the path")
        try:
            net = BlipForImageTextRetrieval.from_pretrained(src, local_files_only=local_files_only)
        except (OSError, ValueError, RuntimeError) as err:
            if Path(src).exists():
                raise CheckpointError(f"{src}: not loadable as BlipForImageTextRetrieval: {err}") from err
            raise
        try:
            processor = BlipProcessor.from_pretrained(src, local_files_only=local_files_only)
            tok, image_processor = processor.tokenizer, processor.image_processor
        except (OSError, ValueError) as err:
            _logger.info("%s: no BlipProcessor (%s); using AutoTokenizer + BlipImageProcessorPil", src, err)
            tok = AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)
            size = net.config.vision_config.image_size
            image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
        if tokenizer is not None:
            tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=local_files_only)
        weights_file = str(Path(src).resolve()) if Path(src).is_dir() else None
        source = Path(src).name if Path(src).is_dir() else src
    vocab_size = net.config.text_config.vocab_size
    if len(tok) > vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens > the model's text vocab_size {vocab_size}")
    teacher = BlipTeacher(
        net,
        tok,
        image_processor,
        weights_file=weights_file,
        source=source,
        max_length=max_length,
        itm_first_token=itm_first_token,
        logit_scale=logit_scale,
    )
    teacher.random_init = source.startswith("config:")
    teacher.to(dev)
    _logger.info("blip teacher %s on %s (itm first token: %s)", source, dev, teacher.itm_first_token)
    return teacher


__all__ = ["DEFAULT_HUB_MODEL", "BlipTeacher", "blip_preprocess_cfg", "create_blip_teacher"]
