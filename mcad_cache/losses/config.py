"""Loss configuration: ``LossConfig`` (every weight and temperature, each with its source) and the ablation presets.

What follows the paper (MCAD, arXiv 2310.19654, abstract / summary level) and what is ours is listed in
``docs/losses.md``. How the two teachers are combined is an integration mode from the table in
:mod:`mcad_cache.losses.integration`; this module never compares ``integration`` to a mode name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mcad_cache.losses.functional import FEATURE_KINDS, ITM_SCORES, TOPK_LOSSES
from mcad_cache.losses.integration import DIRECTIONS, INTEGRATIONS, Integration

FEATURE_SOURCES = ("emb", "feat")
AGGREGATIONS = ("itm_softmax", "mean")
PRESETS = ("contrastive", "clip-kd", "clip-kd-feat", "single-topk", "mcad", "mcad-rank", "mcad-online")


@dataclass(frozen=True)
class LossConfig:
    """Weights and temperatures of every MCAD loss term. A weight of 0 switches its term off (key absent)."""

    # ---- term weights (each ``*_loss`` value is already multiplied by its weight) ----
    w_itc: float = 1.0  # student ITC on ground truth (CLIP; MCAD keeps it beside distillation). Our weight.
    w_kd_i2t: float = 0.5  # in-batch KD, image queries. Our choice: 0.5 per direction = symmetric mean, as ITC
    w_kd_t2i: float = 0.5  # in-batch KD, caption queries. Our choice (see w_kd_i2t)
    w_topk_i2t: float = 0.5  # top-k KD over each image's K cached candidate captions. Our choice
    w_topk_t2i: float = 0.5  # top-k KD over each caption's K cached candidate images. Our choice
    w_feat: float = 16.0  # feature alignment (paper: features help). Measured: its student gradient ~ one KD term's
    w_integration: float = 1.0  # objective that trains the modified-features module (ours; see docs/losses.md)
    # ---- KD temperatures (applied to both teacher and student logits, loss scaled by τ²) ----
    kd_temperature: float = 1.0  # in-batch τ. Our choice: 1 = each model's own logit scale (CLIP-KD, Yang et al. 2024)
    topk_temperature: float = 1.0  # top-k τ. Our choice (as kd_temperature)
    topk_loss: str = "kl"  # top-k term: kl (distribution) | listmle | pairwise (teacher's order; CPRD, CVPR 2024)
    # ---- teacher score temperatures (turn cached scores into teacher logits) ----
    tau_clip: float | None = None  # on CLIP cosines; None = 1 / clip_logit_scale, the teacher's own (CLIP)
    tau_itm: float = 1.0  # on ITM scores; raw logits as ALBEF's retrieval ranks them (our choice of 1)
    tau_ss: float | None = None  # on single-stream ITC cosines; None = 1 / ss_logit_scale (ALBEF temp 0.07)
    itm_score: str = "pos_logit"  # pos_logit = itm_logits[..., 1] (ALBEF/BLIP retrieval code) | log_odds = [1] - [0]
    # ---- how the two teachers are combined ----
    integration: str = "modified_features"  # none | logit_fusion | mixture | modified_features. Default: ours
    w_fusion_clip: float = 1.0  # w_C in logit fusion / mixture (our choice)
    w_fusion_itm: float = 1.0  # w_A (single-stream ITM) in logit fusion / mixture (our choice)
    w_fusion_ss: float = 0.0  # weight of the single-stream ITC cosines in fusion / mixture (our choice: off)
    # ---- feature alignment ----
    feat_kind: str = "mse"  # mse: ‖ŝ − t̂‖² of L2-normalised features = 2(1 − cos) (CLIP-KD's form) | cosine: 1 − cos
    feat_source: str = "emb"  # student side: emb (projected embedding, as CLIP-KD's FD) | feat (pre-projection)
    # ---- modified-features integration module (ours: the paper's module is not public) ----
    gate_init: float = 0.01  # initial gate g = max_gate * tanh(a); near 0 so the start is plain CLIP (Flamingo-like)
    max_gate: float = 0.5  # |g| <= max_gate < 1: a CLIP feature turns by at most arcsin(max_gate) = 30 deg (ours)
    aggregate: str = "itm_softmax"  # pool a query's K fused feats: itm_softmax (teacher's ITM belief) | mean. Ours
    w_int_itc: float = 1.0  # integration objective: ITC of modified features on ground truth (ours)
    w_int_itm: float = 1.0  # integration objective: KL(p_ITM || p_modified) over top-k, both directions (ours)
    w_int_topk_gt: float = 0.0  # integration objective: -log P(positives) over top-k with is_positive (ours; off)

    def validate(self) -> None:
        """Raises:
        ValueError: an unknown option name or a non-positive temperature / negative weight.
        """
        for name, value, allowed in (
            ("integration", self.integration, tuple(INTEGRATIONS)),
            ("itm_score", self.itm_score, ITM_SCORES),
            ("feat_kind", self.feat_kind, FEATURE_KINDS),
            ("feat_source", self.feat_source, FEATURE_SOURCES),
            ("aggregate", self.aggregate, AGGREGATIONS),
            ("topk_loss", self.topk_loss, TOPK_LOSSES),
        ):
            if value not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("w_") and value < 0:
                raise ValueError(f"LossConfig.{f.name} must be >= 0, got {value}")
            if (f.name.startswith("tau_") or f.name.endswith("_temperature")) and value is not None and value <= 0:
                raise ValueError(f"LossConfig.{f.name} must be > 0, got {value}")
        if not 0.0 < self.max_gate < 1.0:
            raise ValueError(
                f"max_gate must be in (0, 1) (keeps modified features anchored to CLIP), got {self.max_gate}"
            )
        if not 0.0 <= self.gate_init < self.max_gate:
            raise ValueError(f"gate_init must be in [0, max_gate={self.max_gate}), got {self.gate_init}")
        self.mode.validate(self)

    @property
    def mode(self) -> Integration:
        """The integration mode object of ``integration`` (from ``losses.integration.INTEGRATIONS``).

        Raises:
            ValueError: unknown mode name.
        """
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"LossConfig.integration must be one of {tuple(INTEGRATIONS)}, got {self.integration!r}")
        return INTEGRATIONS[self.integration]

    @property
    def uses_single_stream(self) -> bool:
        """True when a top-k term reads single-stream teacher outputs."""
        return self.mode.uses_single_stream(self)

    def loss_keys(self) -> set[str]:
        """Exactly the ``*_loss`` keys ``MCADLoss.forward`` returns for this config (``loss`` not included)."""
        keys = set()
        for key, weight in (
            ("itc_loss", self.w_itc),
            ("kd_i2t_loss", self.w_kd_i2t),
            ("kd_t2i_loss", self.w_kd_t2i),
            ("topk_i2t_loss", self.w_topk_i2t),
            ("topk_t2i_loss", self.w_topk_t2i),
            ("feat_loss", self.w_feat),
        ):
            if weight > 0:
                keys.add(key)
        if self.has_integration_module and self.w_integration > 0:
            keys.add("integration_loss")
        return keys

    @property
    def has_integration_module(self) -> bool:
        """True when ``MCADLoss`` holds a trainable ``TargetIntegration`` (modified features feeding some KD term)."""
        return self.mode.has_module(self)

    def required_inputs(self) -> dict[str, set[str]]:
        """Fields of ``StudentOutputs`` and ``TeacherTargets`` that ``MCADLoss.forward`` needs under this config.

        Returns:
            ``{"student": {...}, "teacher": {...}}``; any other field may be None.
        """
        student = {"image_emb", "text_emb", "logit_scale"}
        teacher: set[str] = set()
        mode = self.mode
        if self.w_kd_i2t + self.w_kd_t2i + self.w_feat > 0:
            teacher |= {"clip_image_emb", "clip_text_emb", "clip_logit_scale"}
        if self.w_feat > 0 and self.feat_source == "feat":
            student |= {"image_feat", "text_feat"}
        for d, cand in DIRECTIONS:
            if (self.w_topk_i2t if d == "i2t" else self.w_topk_t2i) > 0:
                student.add(f"topk_{cand}_emb")
                teacher |= {f"valid_{d}"} | mode.topk_inputs(self, d)
            teacher |= mode.module_inputs(self, d)
        return {"student": student, "teacher": teacher}


_PRESETS: dict[str, dict[str, Any]] = {
    # Ablations of the MCAD study (paper: contrastive only, CLIP distribution, + CLIP features, single-stream top-k,
    # full). Exact per-preset weights are ours.
    "contrastive": dict(
        w_kd_i2t=0.0, w_kd_t2i=0.0, w_topk_i2t=0.0, w_topk_t2i=0.0, w_feat=0.0, w_integration=0.0, integration="none"
    ),
    "clip-kd": dict(w_topk_i2t=0.0, w_topk_t2i=0.0, w_feat=0.0, w_integration=0.0, integration="none"),
    "clip-kd-feat": dict(w_topk_i2t=0.0, w_topk_t2i=0.0, w_integration=0.0, integration="none"),
    "single-topk": dict(
        w_kd_i2t=0.0,
        w_kd_t2i=0.0,
        w_feat=0.0,
        w_integration=0.0,
        integration="logit_fusion",
        w_fusion_clip=0.0,
        w_fusion_itm=1.0,
        w_fusion_ss=0.0,
    ),
    # Full MCAD: fixed targets from a derived cache (`mcad-cache integrate`: the integration module trained once,
    # offline, on the teacher caches). mcad-rank: the same targets, top-k terms as ListMLE over the teacher's order.
    # mcad-online: the integration module trained inside the student's optimiser (the old `mcad`; measured to stay
    # near CLIP-KD, docs/losses.md).
    "mcad": dict(integration="derived", w_integration=0.0),
    "mcad-rank": dict(integration="derived", w_integration=0.0, topk_loss="listmle"),
    "mcad-online": dict(integration="modified_features"),
}


def preset(name: str, **overrides: Any) -> LossConfig:
    """The ``LossConfig`` of an ablation preset, with field overrides (``None`` values dropped).

    Presets and their loss keys: ``contrastive`` {itc}; ``clip-kd`` {itc, kd_i2t, kd_t2i}; ``clip-kd-feat``
    {itc, kd_i2t, kd_t2i, feat}; ``single-topk`` {itc, topk_i2t, topk_t2i} (teacher: ITM over the top-k);
    ``mcad`` {itc, kd_i2t, kd_t2i, topk_i2t, topk_t2i, feat} with fixed targets from a derived cache;
    ``mcad-rank`` the same with ListMLE top-k terms; ``mcad-online`` {..., integration} (module trained online).

    Raises:
        ValueError: unknown preset (lists ``PRESETS``), unknown field, or a bad value.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; known presets: {', '.join(PRESETS)}")
    values = {**_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown loss field(s) {unknown}; known: {sorted(names)}")
    for f in dataclasses.fields(LossConfig):
        if f.name not in values or f.type not in ("float", "float | None", "int"):
            continue
        value = values[f.name]
        if value is None and f.type == "float | None":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"loss field {f.name!r} must be a number, got {value!r}")
        if f.type != "int":
            values[f.name] = float(value)
    cfg = LossConfig(**values)
    cfg.validate()
    return cfg


__all__ = ["AGGREGATIONS", "FEATURE_SOURCES", "PRESETS", "LossConfig", "preset"]
