"""Summary and report of a finished study: ``study.json``, ``study.md``, a forest plot and a per-seed paired plot.

The comparisons are the target preset (mcad) against every other preset of the study, paired by seed over the seeds
both have. They form one family for Holm's correction (our choice: the forest plot shows all of them, so all of them
are corrected together). Two of them are the headline: against the baseline (contrastive) and against the best
single-teacher preset, the one with the highest mean RSUM. Choosing "best" on the same runs favours that preset, so
the second line is conservative for the target.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcad_cache.metrics import METRIC_KEYS
from mcad_cache.study.runner import RunResult, StudyPlan
from mcad_cache.study.stats import ALPHA, POWER, holm, mean_std, paired_delta, pairs_needed

STUDY_JSON = "study.json"
STUDY_MD = "study.md"
FOREST_PNG = "forest.png"
PAIRED_PNG = "paired.png"
TARGET_MDE = 3.0  # RSUM points the study should be able to detect (issue 12)


def _by_seed(results: Sequence[RunResult], preset: str, key: str) -> dict[int, float]:
    return {r.seed: r.metrics[key] for r in results if r.preset == preset}


def summarise_study(
    plan: StudyPlan,
    results: Sequence[RunResult],
    *,
    metric: str = "rsum",
    target_mde: float = TARGET_MDE,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Per-preset mean ± std of every metric, paired Δs of the target against every other preset, the headline.

    Args:
        plan: the study's plan (presets, target, baseline, single-teacher presets).
        results: the runs (``run_study``'s return), any subset of ``plan.runs()``.
        metric: the compared metric, a METRIC_KEYS entry (RSUM, 0-600 points).
        target_mde: the Δ the study should detect at 80 % power; ``seeds_needed`` says how many pairs would.
        alpha: two-sided level of the t-interval and tests.
    Returns:
        A JSON-ready dict: ``presets`` {name: {"num_runs", "metrics": {key: {"mean", "std", "by_seed"}},
        "wall_s": {"mean", "total"}}}, ``comparisons`` (``PairedDelta.to_dict()``, Holm over the family),
        ``best_single``, ``headline`` (two lines), ``mde`` {"target", "observed", "seeds_needed", "met"}, ``runs``.
    Raises:
        ValueError: ``metric`` is not a METRIC_KEYS entry.
    """
    if metric not in METRIC_KEYS:
        raise ValueError(f"metric must be one of {METRIC_KEYS}, got {metric!r}")
    presets: dict[str, Any] = {}
    for p in plan.presets:
        runs = [r for r in results if r.preset == p]
        metrics = {}
        for key in METRIC_KEYS:
            by_seed = _by_seed(results, p, key)
            mean, std = mean_std(list(by_seed.values()))
            metrics[key] = {"mean": mean, "std": std, "by_seed": {str(s): v for s, v in by_seed.items()}}
        walls = [r.wall_s for r in runs]
        presets[p] = {
            "num_runs": len(runs),
            "metrics": metrics,
            "wall_s": {"mean": mean_std(walls)[0], "total": float(sum(walls))},
        }

    target = _by_seed(results, plan.target, metric)
    deltas = []
    for other in plan.presets:
        if other == plan.target:
            continue
        b = _by_seed(results, other, metric)
        seeds = sorted(set(target) & set(b))
        deltas.append(paired_delta([target[s] for s in seeds], [b[s] for s in seeds], a=plan.target, b=other))
    deltas = holm(deltas, alpha=alpha)
    by_other = {d.b: d for d in deltas}

    single = [p for p in plan.single_teacher_present() if presets[p]["num_runs"]]
    best_single = max(single, key=lambda p: presets[p]["metrics"][metric]["mean"]) if single else None
    headline = [_headline(by_other[plan.baseline], metric)]
    if best_single is not None:
        headline.append(_headline(by_other[best_single], metric, note="best single-teacher preset"))
    else:
        headline.append(f"{plan.target} vs a single-teacher preset: none in this study")

    vs_base = by_other[plan.baseline]
    mde = {
        "target": target_mde,
        "observed": vs_base.mde,
        "seeds_needed": pairs_needed(vs_base.std_delta, target_mde, alpha=alpha),
        "met": bool(math.isfinite(vs_base.mde) and vs_base.mde <= target_mde),
        "alpha": alpha,
        "power": POWER,
    }
    return {
        "metric": metric,
        "target": plan.target,
        "baseline": plan.baseline,
        "presets": presets,
        "seeds": sorted({r.seed for r in results}),
        "comparisons": [d.to_dict() for d in deltas],
        "best_single": best_single,
        "headline": headline,
        "mde": mde,
        "runs": [
            {"preset": r.preset, "seed": r.seed, "metrics": r.metrics, "wall_s": r.wall_s, "reused": r.reused}
            for r in results
        ],
    }


def _fmt(x: float, spec: str = "+.1f") -> str:
    return "n/a" if not math.isfinite(x) else format(x, spec)


def _headline(d: Any, metric: str, *, note: str = "") -> str:
    name = "RSUM" if metric == "rsum" else metric
    extra = f" ({note})" if note else ""
    return (
        f"{d.a} vs {d.b}{extra}: Δ {name} = {_fmt(d.mean_delta)} [{_fmt(d.ci_low)}, {_fmt(d.ci_high)}], "
        f"Wilcoxon p = {_fmt(d.wilcoxon_p, '.3g')} (Holm {_fmt(d.wilcoxon_p_holm, '.3g')}), "
        f"n = {d.num_pairs} paired seeds, MDE {_fmt(d.mde, '.1f')}"
    )


def mde_sentence(summary: dict[str, Any]) -> str:
    """One sentence: the observed MDE of target vs baseline against the target, and what would reach it."""
    m = summary["mde"]
    pair = f"{summary['target']} vs {summary['baseline']}"
    if not math.isfinite(m["observed"]):
        return f"Minimal detectable Δ ({pair}): not defined (fewer than 2 paired seeds)."
    head = (
        f"Minimal detectable Δ ({pair}, {int(m['power'] * 100)} % power, two-sided α = {m['alpha']}): "
        f"{m['observed']:.2f} RSUM"
    )
    if m["met"]:
        return f"{head}, within the target of {m['target']:.1f}."
    return (
        f"{head}, above the target of {m['target']:.1f}: at the observed spread about {m['seeds_needed']} paired "
        f"seeds would reach it, or a larger test split (less sampling noise per run) with the same seeds."
    )


def write_study(out: str | os.PathLike[str], summary: dict[str, Any], *, title: str = "Study") -> dict[str, str]:
    """Write ``study.json``, ``study.md``, ``forest.png`` and ``paired.png`` into ``out``.

    Returns:
        {"json", "md", "forest", "paired"}: the written paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / STUDY_JSON,
        "md": out / STUDY_MD,
        "forest": out / FOREST_PNG,
        "paired": out / PAIRED_PNG,
    }
    _plot_forest(summary, paths["forest"])
    _plot_paired(summary, paths["paired"])
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["md"].write_text(study_markdown(summary, title=title))
    return {k: str(v) for k, v in paths.items()}


def study_markdown(summary: dict[str, Any], *, title: str = "Study") -> str:
    """The study's Markdown report: the two headline lines, the MDE sentence, tables, plot links, wall times."""
    metric = summary["metric"]
    lines = [f"# {title}", "", *[f"- {h}" for h in summary["headline"]], "", mde_sentence(summary), ""]
    lines += [
        f"Seeds: {', '.join(map(str, summary['seeds']))}. Δ = {summary['target']} minus the other preset, paired by "
        f"seed (same initialisation, same batch order); 95 % t-interval (scipy ttest_rel), two-sided Wilcoxon "
        f"signed-rank p (scipy), Holm over the {len(summary['comparisons'])} comparisons (statsmodels).",
        "",
        "## Test recall per preset (mean ± std over seeds, percent)",
        "",
        "| preset | runs | " + " | ".join(METRIC_KEYS) + " | wall s / run |",
        "|---|---:|" + "---:|" * (len(METRIC_KEYS) + 1),
    ]
    for name, p in summary["presets"].items():
        cells = [f"{_fmt(p['metrics'][k]['mean'], '.1f')} ± {_fmt(p['metrics'][k]['std'], '.1f')}" for k in METRIC_KEYS]
        lines.append(f"| {name} | {p['num_runs']} | " + " | ".join(cells) + f" | {_fmt(p['wall_s']['mean'], '.0f')} |")
    lines += [
        "",
        f"## Paired Δ {metric}",
        "",
        "| comparison | n | mean Δ | std Δ | 95 % CI | t-test p | Wilcoxon p | Holm p | MDE (80 %) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for d in summary["comparisons"]:
        lines.append(
            f"| {d['a']} − {d['b']} | {d['num_pairs']} | {_fmt(d['mean_delta'])} | {_fmt(d['std_delta'], '.2f')} | "
            f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] | {_fmt(d['t_p'], '.3g')} | {_fmt(d['wilcoxon_p'], '.3g')} | "
            f"{_fmt(d['wilcoxon_p_holm'], '.3g')} | {_fmt(d['mde'], '.2f')} |"
        )
    lines += ["", f"![forest plot]({FOREST_PNG})", "", f"![paired runs]({PAIRED_PNG})", ""]
    lines += ["## Runs", "", f"| preset | seed | {metric} | wall s | reused |", "|---|---:|---:|---:|---|"]
    for r in summary["runs"]:
        lines.append(
            f"| {r['preset']} | {r['seed']} | {r['metrics'][metric]:.1f} | {r['wall_s']:.1f} | "
            f"{'yes' if r['reused'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _plot_forest(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = summary["comparisons"]
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(comps) + 1.4))
    for i, d in enumerate(comps):
        y = len(comps) - 1 - i
        if math.isfinite(d["ci_low"]):
            ax.plot([d["ci_low"], d["ci_high"]], [y, y], color="tab:blue", lw=2)
        if math.isfinite(d["mean_delta"]):
            ax.plot([d["mean_delta"]], [y], "o", color="tab:blue")
    ax.axvline(0.0, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(comps)), [f"{d['a']} − {d['b']}" for d in reversed(comps)])
    ax.set_xlabel(f"paired Δ {summary['metric']} (mean, 95 % t-interval)")
    ax.set_title(f"{len(summary['seeds'])} paired seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_paired(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    names = list(summary["presets"])
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 4))
    for seed in summary["seeds"]:
        ys = [summary["presets"][p]["metrics"][metric]["by_seed"].get(str(seed), float("nan")) for p in names]
        ax.plot(range(len(names)), ys, "-o", color="grey", alpha=0.5, lw=1, ms=3)
    means = [summary["presets"][p]["metrics"][metric]["mean"] for p in names]
    ax.plot(range(len(names)), means, "s", color="black", ms=7, label="mean")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(f"test {metric}")
    ax.set_title("one grey line per seed (same init and batch order in every preset)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
