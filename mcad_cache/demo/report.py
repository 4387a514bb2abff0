"""The demo's ``report.md``: three headline lines (teachers and the premise, the two study verdicts), then the tables,
the plots and the time table.

The premise of MCAD is a single-stream teacher stronger than the dual-stream one. It is checked on **val** (the
teachers' own check, before any student exists) under ALBEF's protocol: ITM-only re-rank of the ITC top-``k_test``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mcad_cache.metrics import METRIC_KEYS

RECALL_KEYS = METRIC_KEYS  # i2t/t2i R@1/5/10 and rsum, percent


def chance_recall(num_images: int, num_captions: int) -> dict[str, float]:
    """Expected R@K (percent) of a random ranking: i2t hits if any of an image's c captions is in the top K of N_t
    (approximated with the mean captions per image c = N_t / N_i, drawing without replacement); t2i: K / N_i."""
    c = num_captions / max(num_images, 1)
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        miss = 1.0
        for j in range(min(k, num_captions)):
            miss *= max(0.0, (num_captions - c - j) / (num_captions - j))
        out[f"i2t_R@{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_R@{k}"] = 100.0 * min(1.0, k / num_images)
    out["rsum"] = sum(out[key] for key in RECALL_KEYS[:-1])
    return out


def premise_check(teachers: dict[str, Any]) -> dict[str, Any]:
    """Does the single-stream teacher beat the dual-stream one on val RSUM with ITM-only re-rank (ALBEF's protocol)?

    Args:
        teachers: ``prepare_teachers.run``'s report (``clip.val``, ``albef.val_itm``, ``albef.val``, ``albef.val_itc``).
    Returns:
        ``{"holds", "clip_val_rsum", "albef_val_itm_rsum", "albef_val_itm_itc_rsum", "albef_val_itc_rsum"}``.
    """
    clip = float(teachers["clip"]["val"]["rsum"])
    itm = float(teachers["albef"]["val_itm"]["rsum"])
    return {
        "holds": itm > clip,
        "clip_val_rsum": clip,
        "albef_val_itm_rsum": itm,
        "albef_val_itm_itc_rsum": float(teachers["albef"]["val"]["rsum"]),
        "albef_val_itc_rsum": float(teachers["albef"]["val_itc"]["rsum"]),
    }


def teachers_line(test: dict[str, dict[str, Any]], premise: dict[str, Any], *, k_test: int) -> str:
    """Headline line 1: the teachers' test RSUM and the premise check (says so first when it fails)."""
    proto = test["clip"]["protocol"]
    numbers = (
        f"teachers on test ({proto['num_images']} images, {proto['num_captions']} captions): CLIP RSUM "
        f"{test['clip']['metrics']['rsum']:.1f}, ALBEF (ITM re-rank of ITC top-{k_test}) RSUM "
        f"{test['albef']['metrics']['rsum']:.1f}"
    )
    val = (
        f"val RSUM: ALBEF ITM-only {premise['albef_val_itm_rsum']:.1f} (ITM+ITC {premise['albef_val_itm_itc_rsum']:.1f}"
        f", ITC {premise['albef_val_itc_rsum']:.1f}) vs CLIP {premise['clip_val_rsum']:.1f}"
    )
    if premise["holds"]:
        return f"Premise holds: the single-stream teacher beats the dual-stream one ({val}); {numbers}."
    return (
        f"Premise FAILS: the single-stream demo teacher does not beat the dual-stream one ({val}), so this study "
        f"cannot test the paper's premise; {numbers}."
    )


def _rel(path: str | Path, work: Path) -> str:
    return os.path.relpath(Path(path).resolve(), work.resolve())


def write_report(work: Path, summary: dict[str, Any]) -> Path:
    """Write ``<work>/report.md`` from the demo summary (``demo.run``'s) and return its path."""
    study = summary["study"]
    lines = ["# mcad-cache demo report", "", f"1. {summary['headline'][0]}"]
    lines += [f"{i}. {h}" for i, h in enumerate(summary["headline"][1:], start=2)]
    lines += ["", study["mde_sentence"], ""]
    data = summary["data"]
    lines += [
        f"Data: Open Clip Art Library (public domain), shards in `{summary['shards']}`: train "
        f"{data['num_train_images']} images of which {data['num_cache_images']} cached and trained on, val "
        f"{data['num_val_images']}, test {data['num_test_images']}. Recall in percent; RSUM is the sum of the six; "
        "ties count against.",
        "",
        "## Test recall",
        "",
        "| model | " + " | ".join(RECALL_KEYS) + " |",
        "|---|" + "---:|" * len(RECALL_KEYS),
    ]
    for name, result in summary["teachers_test"].items():
        m = result["metrics"]
        lines.append(f"| teacher: {name} | " + " | ".join(f"{m[k]:.1f}" for k in RECALL_KEYS) + " |")
    for name, p in study["presets"].items():
        cells = [f"{p['metrics'][k]['mean']:.1f} ± {p['metrics'][k]['std']:.1f}" for k in RECALL_KEYS]
        lines.append(f"| student: {name} ({p['num_runs']} seeds) | " + " | ".join(cells) + " |")
    chance = summary["chance"]
    lines.append("| chance | " + " | ".join(f"{chance[k]:.1f}" for k in RECALL_KEYS) + " |")
    lines += [
        "",
        f"Students: mean ± std over paired seeds. Full study: [{_rel(study['report']['md'], work)}]"
        f"({_rel(study['report']['md'], work)}).",
        "",
        f"![forest plot]({_rel(study['report']['forest'], work)})",
        "",
        f"![paired runs]({_rel(study['report']['paired'], work)})",
        "",
    ]
    if summary.get("val_curve"):
        lines += [
            "Val curve of one run (val RSUM against step):",
            "",
            f"![val curve]({_rel(summary['val_curve'], work)})",
        ]
        lines.append("")
    machine = summary.get("machine", {})
    lines += [
        "## Timings",
        "",
        f"{machine.get('cpus', '?')} CPUs; load average (1, 5, 15 min) {machine.get('load_average_start')} at the "
        f"start, {machine.get('load_average_end')} at the end. Wall seconds grow with the machine's load; CPU seconds "
        "(this process and its finished workers, `getrusage`) much less.",
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    cpu = summary.get("cpu_s", {})
    lines += [f"| {k.removesuffix('_s')} | {v} | {cpu.get(k, '')} |" for k, v in summary["timings_s"].items()]
    path = work / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_val_curve(metrics_jsonl: Path, out: Path) -> Path | None:
    """Plot ``val_rsum`` against ``step`` from a run's ``metrics.jsonl`` (matplotlib Agg); None when absent."""
    import json

    rows = (
        [json.loads(x) for x in metrics_jsonl.read_text().splitlines() if x.strip()] if metrics_jsonl.is_file() else []
    )
    rows = [r for r in rows if "val_rsum" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["val_rsum"] for r in rows], "-o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("val RSUM")
    ax.set_title(metrics_jsonl.parent.parent.name + " / " + metrics_jsonl.parent.name)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
