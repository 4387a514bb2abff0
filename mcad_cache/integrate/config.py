"""``IntegrateConfig``: the settings of one offline integration run (``mcad-cache integrate``).

Precedence as every run config (STYLE.md): dataclass defaults, then ``--config run.json``, then explicit flags;
flags map 1:1 to field names. The fields that change the derived targets form the derived cache's fingerprint
(:func:`IntegrateConfig.fingerprint`); the others (device, threads, paths) do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mcad_cache.errors import ConfigError

# CLI spelling -> LossConfig.integration (losses.integration.INTEGRATIONS). "none" writes CLIP-only targets in the
# same format (the control arm of a study).
FORMULATIONS = {
    "modified-features": "modified_features",
    "logit-fusion": "logit_fusion",
    "mixture": "mixture",
    "none": "none",
}
# LossConfig fields an integration run may override with --loss (the rest belong to the student's loss).
INTEGRATION_FIELDS = (
    "tau_clip", "tau_itm", "tau_ss", "itm_score", "w_fusion_clip", "w_fusion_itm", "w_fusion_ss", "gate_init",
    "max_gate", "aggregate", "w_int_itc", "w_int_itm", "w_int_topk_gt",
)  # fmt: skip


@dataclass(frozen=True)
class IntegrateConfig:
    cache: tuple[str, ...] = ()  # the two parent caches: one dual-stream (CLIP), one single-stream (ALBEF/BLIP)
    out: str = ".work/targets"  # derived cache (Zarr v3) to write; a complete one with this fingerprint is reused
    integration: str = "modified-features"  # modified-features | logit-fusion | mixture | none (CLIP-only control)
    k: int = 0  # candidates per query written, <= the parents' k (0 = the parents' k)
    force_positive: bool = False  # a query with no positive in its k slots gets its best-ITM cached positive last
    steps: int = 600  # max optimiser steps of the integration module (modified-features; others train nothing)
    lr: float = 1e-2  # AdamW learning rate of the module (own optimiser; measured in docs/losses.md)
    weight_decay: float = 0.0  # AdamW weight decay of the module
    batch_size: int = 64  # anchor pairs per step (in-batch ITC of the modified features needs several)
    holdout_fraction: float = 0.1  # fraction of image rows (with their captions) held out for early stopping
    eval_every: int = 25  # steps between held-out evaluations
    patience: int = 4  # held-out evaluations without improvement before stopping (best state is kept)
    seed: int = 0  # holdout split, batch order, anchor captions, module init
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op CPU threads (0 = torch's default)
    overwrite: bool = False  # replace a derived cache at `out` made from other parents or settings
    loss: dict[str, Any] = field(default_factory=dict)  # integration fields of LossConfig (INTEGRATION_FIELDS)

    def validate(self) -> None:
        """Raises:
        ConfigError: a bad value, named with its option.
        """
        if len(self.cache) != 2:
            raise ConfigError(
                f"--cache: give exactly two parent caches (one CLIP, one ALBEF/BLIP), got {len(self.cache)}"
            )
        if self.integration not in FORMULATIONS:
            raise ConfigError(f"--integration {self.integration!r} is unknown; known: {', '.join(FORMULATIONS)}")
        unknown = sorted(set(self.loss) - set(INTEGRATION_FIELDS))
        if unknown:
            raise ConfigError(f"--loss: {unknown} are not integration fields; known: {', '.join(INTEGRATION_FIELDS)}")
        for name in ("steps", "k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be >= 2 (in-batch ITC), got {self.batch_size}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"--holdout-fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")

    @property
    def mode(self) -> str:
        """The ``LossConfig.integration`` name of ``integration``."""
        return FORMULATIONS[self.integration]

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide the derived targets (part of the derived cache's fingerprint)."""
        skip = {"cache", "out", "device", "threads", "overwrite"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


__all__ = ["FORMULATIONS", "INTEGRATION_FIELDS", "IntegrateConfig"]
