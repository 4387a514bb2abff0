"""Plots of a distill run that a person reads at a glance (matplotlib, Agg backend; our layout).

:func:`plot_run` draws ``metrics.jsonl`` into one PNG: the run name in the title; one panel per loss group
(total, contrastive, in-batch KD, top-k KD, features, integration; only groups the run has) after one panel of
all terms together, each on a log y axis
when its positive curves span more than :data:`LOG_SCALE_RATIO` (small terms are no longer squashed onto 0); panels
for learning rate, gradient norms, logit scale, throughput and, with ``--val-data``, val recall (R@1/5/10 both
directions and RSUM, best step marked). Legends sit outside the axes so they never cover the curve ends.
:func:`plot_recall_bars` draws ``compare``'s grouped bars of R@K per model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOG_SCALE_RATIO = 100.0  # log y when max/min of a panel's positive values exceeds this (our choice)
LOSS_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("total loss", ("loss",)),
    ("contrastive (ITC)", ("itc_",)),
    ("in-batch KD", ("kd_",)),
    ("top-k KD", ("topk_",)),
    ("features", ("feat_",)),
    ("integration", ("integration_", "fusion_")),
)  # panel title, key prefixes (keys ending in _loss; "loss" itself is the total)
RECALL_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def _read(metrics_path: str | Path) -> list[dict[str, Any]]:
    path = Path(metrics_path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_losses(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(panel title, loss keys)]``: each ``*_loss`` key in the first group whose prefix it has; the rest go to
    an "other losses" panel. Groups without keys are left out."""
    panels: list[tuple[str, list[str]]] = []
    placed: set[str] = set()
    for title, prefixes in LOSS_GROUPS:
        keys = [
            n for n in names if n not in placed and (n == "loss" if prefixes == ("loss",) else n.startswith(prefixes))
        ]
        placed.update(keys)
        if keys:
            panels.append((title, keys))
    rest = [n for n in names if n not in placed]
    if rest:
        panels.append(("other losses", rest))
    return panels


def wants_log_scale(series: Sequence[Sequence[float]]) -> bool:
    """True when the finite positive values of ``series`` span more than :data:`LOG_SCALE_RATIO` (and none is <= 0,
    which a log axis cannot show)."""
    values = [v for s in series for v in s if v is not None and math.isfinite(v)]
    if not values or min(values) <= 0:
        return False
    return max(values) / min(values) > LOG_SCALE_RATIO


def plot_run(metrics_path: str | Path, out_path: str | Path, *, run_name: str = "") -> Path | None:
    """Draw a run's ``metrics.jsonl`` into ``out_path`` (PNG); None when there is nothing to plot.

    Train lines are those without ``val_rsum``; validation lines (``distill.validation``) give the val panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(metrics_path)
    train = [r for r in rows if "val_rsum" not in r]
    val = [r for r in rows if "val_rsum" in r]
    if not train and not val:
        return None
    loss_names = sorted({k for r in train for k in r if k == "loss" or k.endswith("_loss")})
    panels: list[tuple[str, list[str], list[dict[str, Any]], str]] = [
        (title, keys, train, "loss (weighted)") for title, keys in group_losses(loss_names)
    ]
    if len(panels) > 1:  # every term on one axis first: log y when they differ by orders of magnitude
        panels.insert(0, ("all loss terms", loss_names, train, "loss (weighted)"))
    for title, keys, unit in (
        ("learning rate", ["lr"], "lr"),
        ("gradient norm (before clipping)", ["grad_norm", "loss_grad_norm"], "L2 norm"),
        ("logit scale", ["logit_scale"], "linear"),
        ("throughput", ["samples_per_s"], "pairs / s"),
    ):
        present = [k for k in keys if any(k in r for r in train)]
        if present:
            panels.append((title, present, train, unit))
    if val:
        panels.append(("val recall", [*RECALL_KEYS, "rsum"], val, "percent"))
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 3.2 * nrows), squeeze=False)
    for ax, (title, keys, data, unit) in zip(axes.flat, panels, strict=False):
        steps = [r["step"] for r in data]
        series = []
        for key in keys:
            name = f"val_{key}" if data is val else key
            ys = [r.get(name, float("nan")) for r in data]
            series.append(ys)
            style = {"lw": 2.0 if key in ("loss", "rsum") else 1.2, "marker": "o" if data is val else None}
            if data is val and key == "rsum":
                ax2 = ax.twinx()
                ax2.plot(steps, ys, color="k", label="RSUM (right)", **style)
                ax2.set_ylabel("RSUM")
                best = max(range(len(ys)), key=lambda i: ys[i])
                ax2.axvline(steps[best], color="k", ls=":", lw=1)
                ax2.annotate(f"best {ys[best]:.1f} @ {steps[best]}", (steps[best], ys[best]), fontsize=8)
                continue
            ax.plot(steps, ys, label=key, **style)
        if data is not val and wants_log_scale(series):
            ax.set_yscale("log")
            title += " (log y)"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0 if data is not val else 1.12, 1.0))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    last = train[-1] if train else val[-1]
    fig.suptitle(f"{run_name or Path(metrics_path).parent.name}: step {last['step']}", fontsize=12)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return Path(out_path)


def plot_recall_bars(rows: Sequence[Mapping[str, Any]], out_path: str | Path, *, title: str = "") -> Path:
    """Grouped bars: one group per R@K (i2t R@1/5/10, t2i R@1/5/10), one bar per model (``row["name"]``,
    ``row["metrics"]`` in percent), RSUM in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(RECALL_KEYS))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(RECALL_KEYS) + 0.3 * len(rows)), 4))
    for i, row in enumerate(rows):
        m = row["metrics"]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, [m[k] for k in RECALL_KEYS], width,
                      label=f"{row['name']} (RSUM {m['rsum']:.1f})")  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(x, [k.replace("_", " ") for k in RECALL_KEYS])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "retrieval recall")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


__all__ = ["LOG_SCALE_RATIO", "LOSS_GROUPS", "group_losses", "plot_recall_bars", "plot_run", "wants_log_scale"]
