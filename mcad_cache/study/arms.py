"""Study arms: a loss preset plus overrides, so one study compares paired runs that differ in one setting.

Syntax of one ``--preset`` entry (``StudyConfig.presets``; docs/results.md "Study arms")::

    [LABEL=]PRESET[@KEY=VALUE[,KEY=VALUE ...]]

    clip-kd                                   the plain preset
    clip-kd@views=4                           replay the first 4 stored views of the cache (issue 16)
    clip-kd@views=1                           the canonical view only (same as augment=none)
    topk-bank=clip-kd@w_topk_i2t=0.5,w_topk_t2i=0.5,candidates=bank    labelled; CLIP top-k terms from a bank

- ``LABEL`` (optional; it is recognised by an ``=`` before any ``@``) names the arm in folders, tables and plots;
  without it the whole entry is the name. The name is the run folder ``runs/<name>/seed-<s>``, so it may not hold
  ``/`` or start with ``.``.
- ``KEY`` is a ``LossConfig`` field (docs/losses.md: ``w_*``, temperatures, ``integration`` ...), one of
  :data:`ARM_RUN_FIELDS` (``DistillConfig`` settings that leave the pairing intact), or ``views``. ``-`` in a key is
  read as ``_``. A value is ``true`` / ``false``, an integer, a number, or else text (it cannot hold ``,``).
- ``views=N`` replays the first N stored views of the dual-stream cache (N <= V; view 0 is the canonical image, so
  ``views=1`` is the canonical view only). The frozen-tower path serves any N; the image path N = 1 or N = V.

Arms are paired exactly like presets: the seed alone fixes the student's initialisation and the batch keys, and the
overrides allowed here change neither (settings that would, such as ``batch_size`` or ``seed``, are refused).
Each finished run records its arm's definition (:meth:`Arm.definition`); a rerun refuses a folder whose arm of the
same name was defined otherwise (``study.runner.load_result``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from mcad_cache.config import DistillConfig
from mcad_cache.errors import ConfigError
from mcad_cache.losses import PRESETS, LossConfig, preset

# DistillConfig fields an arm may set: none changes the student's init or the batch order (the pairing).
ARM_RUN_FIELDS: tuple[str, ...] = (
    "k", "lr", "weight_decay", "warmup_steps", "grad_clip", "candidates", "bank_text", "bank_ema",
    "bank_refresh_every", "augment", "allow_aug_mismatch",
)  # fmt: skip
VIEWS_KEY = "views"  # replay the first N stored views (issue 16)
SYNTAX = "[LABEL=]PRESET[@KEY=VALUE,...], e.g. clip-kd@views=4 or bank=clip-kd@w_topk_i2t=0.5,candidates=bank"

_LOSS_FIELDS = {f.name for f in dataclasses.fields(LossConfig)}
_RUN_TYPES = typing.get_type_hints(DistillConfig)


@dataclass(frozen=True)
class Arm:
    """One arm of a study: a preset plus overrides (module docstring)."""

    name: str  # label, or the entry as written: the run folder and the name in tables
    preset: str  # a losses.PRESETS name
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides (on top of the study's --loss)
    run: dict[str, Any] = field(default_factory=dict)  # DistillConfig overrides (ARM_RUN_FIELDS)
    views: int | None = None  # replay the first N stored views; None = as the run config says (all, or none)

    def definition(self) -> dict[str, Any]:
        """What the arm's runs depend on besides the study's shared settings (recorded with each run)."""
        return {"preset": self.preset, "loss": dict(self.loss), "run": dict(self.run), "views": self.views}


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _check_run_value(entry: str, key: str, value: Any) -> Any:
    tp = _RUN_TYPES[key]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"study arm {entry!r}: {key} must be {tp.__name__}, got {value!r}")
    return value


def parse_arm(entry: str) -> Arm:
    """Parse one study entry (module docstring).

    Raises:
        ConfigError: an empty or malformed entry, an unknown preset or key, a key given twice, a value of the wrong
            type (loss values are checked by ``losses.preset``), ``views`` < 1, or ``views`` beside ``augment``;
            the message names the entry and shows the syntax.
    """
    text = str(entry).strip()
    head, _, tail = text.partition("@")
    label = ""
    if "=" in head:
        label, _, head = head.partition("=")
        label = label.strip() or "/"  # an empty label is malformed
    name = label or text
    head = head.strip()
    if not head or not name or "/" in name or name.startswith(".") or (not tail and "@" in text):
        raise ConfigError(f"study arm {text!r} is malformed; use {SYNTAX}")
    if head not in PRESETS:
        raise ConfigError(f"study arm {text!r}: unknown preset {head!r}; known: {', '.join(PRESETS)}")
    loss: dict[str, Any] = {}
    run: dict[str, Any] = {}
    views = None
    seen: set[str] = set()
    for part in filter(None, (p.strip() for p in tail.split(","))) if tail else ():
        key, eq, raw = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ConfigError(f"study arm {text!r}: {part!r} is not KEY=VALUE; use {SYNTAX}")
        if key in seen:
            raise ConfigError(f"study arm {text!r}: {key} is given twice")
        seen.add(key)
        value = _value(raw)
        if key == VIEWS_KEY:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"study arm {text!r}: views must be an integer >= 1, got {raw!r}")
            views = value
        elif key in _LOSS_FIELDS:
            loss[key] = value
        elif key in ARM_RUN_FIELDS:
            run[key] = _check_run_value(text, key, value)
        else:
            raise ConfigError(
                f"study arm {text!r}: unknown key {key!r}; use views, a LossConfig field (docs/losses.md) or one of "
                f"{', '.join(ARM_RUN_FIELDS)} (settings that change the init or batch order cannot differ per arm)"
            )
    if views is not None and "augment" in run:
        raise ConfigError(f"study arm {text!r}: give views or augment, not both")
    try:
        preset(head, **loss)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"study arm {text!r}: {err}") from err
    return Arm(name=name, preset=head, loss=loss, run=run, views=views)


def parse_arms(entries: typing.Iterable[str]) -> list[Arm]:
    """Every entry parsed; names must be unique and no two arms may be defined alike.

    Raises:
        ConfigError: a bad entry (:func:`parse_arm`), a repeated name, or two names for one definition.
    """
    arms = [parse_arm(e) for e in entries]
    names: dict[str, Arm] = {}
    for arm in arms:
        if arm.name in names:
            raise ConfigError(f"study arm name {arm.name!r} is given twice")
        twin = next((a for a in names.values() if a.definition() == arm.definition()), None)
        if twin is not None:
            raise ConfigError(f"study arms {twin.name!r} and {arm.name!r} are the same run; keep one")
        names[arm.name] = arm
    return arms


def arm_name(entry: str, names: typing.Sequence[str]) -> str:
    """The arm ``entry`` refers to among ``names``: itself when it is a name, else the name of the arm it spells (a
    labelled entry ``LABEL=PRESET@...`` given in full names ``LABEL``); unparseable entries are returned as given."""
    if entry in names:
        return entry
    try:
        return parse_arm(entry).name
    except ConfigError:
        return entry


def arm_config(base: DistillConfig, arm: Arm) -> DistillConfig:
    """``base`` (the study's shared settings, seed and folder) with the arm's preset and overrides: the arm's loss
    fields on top of ``base.loss``; ``views=1`` sets ``augment="none"``, ``views>1`` replays (``augment=""``)."""
    run = dict(arm.run)
    if arm.views is not None:
        run["augment"] = "none" if arm.views == 1 else ""
    return dataclasses.replace(base, preset=arm.preset, loss={**base.loss, **arm.loss}, **run)


__all__ = ["ARM_RUN_FIELDS", "SYNTAX", "VIEWS_KEY", "Arm", "arm_config", "arm_name", "parse_arm", "parse_arms"]
