"""Diagnostics of a derived cache: how far its targets moved from CLIP-only and toward the single-stream ITM ranking.

Per direction, over queries with at least two valid candidates (distributions at τ = 1, renormalised over the K
valid candidates):

- ``kl_target_clip``: KL(p_target ‖ p_CLIP); ``kl_target_itm`` / ``kl_clip_itm``: KL(p_target ‖ p_ITM) and
  KL(p_CLIP ‖ p_ITM) (after / before); ``kl_itm_target`` / ``kl_itm_clip``: the reverse KL(p_ITM ‖ ·), which the
  integration objective minimises;
- ``top1_agree_before`` / ``_after``: fraction of queries whose CLIP-only / target top-1 candidate is the ITM top-1;
- ``spearman_before`` / ``_after``: mean Spearman rank correlation with the ITM scores (queries with all K valid);
- ``positive_top1_before`` / ``_after``: fraction of queries with a positive whose top-1 is a positive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata


def _kl(lp: np.ndarray, lq: np.ndarray, valid: np.ndarray) -> np.ndarray:
    p = np.where(valid, np.exp(lp), 0.0)
    return np.where(valid, p * (np.where(valid, lp, 0.0) - np.where(valid, lq, 0.0)), 0.0).sum(-1)


def _renorm(lp: np.ndarray, valid: np.ndarray) -> np.ndarray:
    x = np.where(valid, lp, -np.inf)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] == 0 or a.shape[1] < 2:
        return float("nan")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    ok = den > 0
    return float(((ra * rb).sum(1)[ok] / den[ok]).mean()) if ok.any() else float("nan")


def direction_stats(
    target: np.ndarray, clip: np.ndarray, itm: np.ndarray, valid: np.ndarray, is_positive: np.ndarray
) -> dict[str, float]:
    """Diagnostics of one direction (see the module docstring).

    Args:
        target, clip, itm: [N, K] log-probabilities (or logits) over each query's candidates; any value where invalid.
        valid: [N, K] bool.
        is_positive: [N, K] bool.
    Returns:
        Dict of floats (NaN when no query qualifies).
    """
    keep = valid.sum(-1) >= 2
    target, clip, itm, valid, pos = (a[keep] for a in (target, clip, itm, valid, is_positive))
    lt, lc, li = (_renorm(x, valid) for x in (target, clip, itm))
    out: dict[str, float] = {"num_queries": int(keep.sum())}
    if not keep.any():
        return out
    out["kl_target_clip"] = float(_kl(lt, lc, valid).mean())
    out["kl_target_itm"] = float(_kl(lt, li, valid).mean())
    out["kl_clip_itm"] = float(_kl(lc, li, valid).mean())
    out["kl_itm_target"] = float(_kl(li, lt, valid).mean())
    out["kl_itm_clip"] = float(_kl(li, lc, valid).mean())
    top_itm = np.argmax(np.where(valid, li, -np.inf), -1)
    for tag, x in (("before", lc), ("after", lt)):
        top = np.argmax(np.where(valid, x, -np.inf), -1)
        out[f"top1_agree_{tag}"] = float((top == top_itm).mean())
        full = valid.all(-1)
        out[f"spearman_{tag}"] = _spearman(x[full], li[full])
        has_pos = pos.any(-1)
        if has_pos.any():
            out[f"positive_top1_{tag}"] = float(np.take_along_axis(pos, top[:, None], 1)[has_pos, 0].mean())
    return out


def plot_diagnostics(diagnostics: dict[str, Any], path: str | Path) -> Path | None:
    """Two panels: the integration loss curve (train and held-out) and, per direction, KL to ITM and top-1 ITM
    agreement before (CLIP-only) and after (target). Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    curve = diagnostics.get("curve") or []
    if curve:
        steps = [c["step"] for c in curve]
        ax1.plot(steps, [c["train_loss"] for c in curve], label="train")
        ax1.plot(steps, [c["holdout_loss"] for c in curve], label="held-out")
        ax1.legend()
    ax1.set_title(
        f"integration loss (gates {diagnostics.get('gate_image', 0):.3f} / {diagnostics.get('gate_text', 0):.3f})"
    )
    ax1.set_xlabel("step")
    labels, before, after = [], [], []
    for d in ("i2t", "t2i"):
        stats = diagnostics.get(d, {})
        for name, b, a in (
            ("KL to ITM", "kl_clip_itm", "kl_target_itm"),
            ("top-1 = ITM", "top1_agree_before", "top1_agree_after"),
        ):
            labels.append(f"{d}\n{name}")
            before.append(stats.get(b, np.nan))
            after.append(stats.get(a, np.nan))
    x = np.arange(len(labels))
    ax2.bar(x - 0.2, before, 0.4, label="CLIP-only")
    ax2.bar(x + 0.2, after, 0.4, label="target")
    ax2.set_xticks(x, labels, fontsize=8)
    ax2.legend()
    ax2.set_title(f"{diagnostics.get('integration', '')}: before / after")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["direction_stats", "plot_diagnostics"]
