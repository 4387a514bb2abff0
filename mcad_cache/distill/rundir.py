"""The run directory of a distillation run: its files, the resume check, metrics, the final student, the summary.

Layout (``DistillConfig.out``)::

    config.json         resolved DistillConfig (+ the resolved LossConfig under "loss_config")
    metrics.jsonl       one JSON line per logged step: losses, lr, grad norm, throughput; val_* lines
    metrics.csv         with --report-to csv; tensorboard/ with --report-to tensorboard (distill.tracking)
    loss_curves.png     panels per loss group, lr, grad norms, logit scale, throughput, val recall (distill.plots)
    best/               with --val-data: the student with the best val RSUM + val.json (distill.validation)
    checkpoints/step_N/ resumable checkpoints (distill.checkpoint)
    final/              the student (model.safetensors, student_config.json, tokenizer/) + loss.safetensors
    summary.json        steps, samples, time, final losses, caches used, skip counts, schedule_history

    eval/               eval results, one file per (student folder, test set): eval_result_path; eval.json = latest

``distill`` writes it; ``eval`` reads it through :func:`find_student` and :func:`read_summary`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mcad_cache.distill.checkpoint import LOSS_FILE
from mcad_cache.errors import CheckpointError
from mcad_cache.hashing import json_sha256

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
STUDENT_CONFIG = "student_config.json"  # DualEncoder.save's config file: marks a student checkpoint folder
RESUME_FREE_FIELDS = (
    "resume", "workers", "log_every", "checkpoint_every", "device", "threads",
    "report_to", "run_name", "val_data", "eval_every", "early_stopping",  # validation never changes training
)  # fields that may change on resume  # fmt: skip
SCHEDULE_FIELDS = ("steps", "epochs")  # may change on resume: the schedule is extended (checkpoint.continue_schedule)


def check_resume_config(run_dir: str | Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume a run dir whose ``config.json`` differs from ``resolved`` outside ``RESUME_FREE_FIELDS`` and
    ``SCHEDULE_FIELDS`` (a changed total length is checked and recorded by ``checkpoint.continue_schedule``).

    Raises:
        CheckpointError: the diff, one line per field.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    diff = [
        f"{k}: run dir has {saved.get(k)!r}, now {resolved.get(k)!r}"
        for k in sorted(set(saved) | set(resolved))
        if k not in RESUME_FREE_FIELDS + SCHEDULE_FIELDS and saved.get(k) != resolved.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"{run_dir} holds a run with another config; use a new --out or the same settings:\n  " + "\n  ".join(diff)
        )


def write_config(run_dir: str | Path, resolved: dict[str, Any]) -> None:
    """Write ``config.json``."""
    (Path(run_dir) / CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only the metrics.jsonl lines of steps ``<= step`` (a resumed run rewrites the later ones)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def reset_metrics(run_dir: str | Path) -> None:
    """Start an empty metrics.jsonl."""
    (Path(run_dir) / METRICS_FILE).write_text("")


def append_metrics(run_dir: str | Path, values: dict[str, Any]) -> None:
    """Append one JSON line to metrics.jsonl."""
    with (Path(run_dir) / METRICS_FILE).open("a") as f:
        f.write(json.dumps(values) + "\n")


def save_final(run_dir: str | Path, *, model: nn.Module, loss_module: nn.Module) -> Path:
    """Save the student (``model.save``) and the loss module's state (``loss.safetensors``) under ``final/``."""
    from safetensors.torch import save_file

    final = Path(run_dir) / FINAL_DIR
    model.save(final)
    save_file({k: v.detach().contiguous().cpu() for k, v in loss_module.state_dict().items()}, str(final / LOSS_FILE))
    return final


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json``."""
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of a run dir as a dict, or None when there is none."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def find_student(path: str | Path) -> Path | None:
    """The student checkpoint folder of ``path``: ``path/final`` for a run dir, ``path`` itself for a checkpoint
    folder (one with ``student_config.json``), else None."""
    path = Path(path)
    if (path / FINAL_DIR / STUDENT_CONFIG).is_file():
        return path / FINAL_DIR
    if (path / STUDENT_CONFIG).is_file():
        return path
    return None


def run_dir_of(student_folder: str | Path) -> Path:
    """The run dir that holds a student checkpoint folder (its parent for ``final/``, else the folder)."""
    folder = Path(student_folder)
    return folder.parent if folder.name == FINAL_DIR else folder


EVAL_DIR = "eval"  # RUN/eval/<student folder>-<data fingerprint>.json: one file per (weights, test set)
EVAL_ROOT = Path(".work/eval")  # teachers' and caches' results when no --out is given


def data_fingerprint(shards: Sequence[str]) -> str:
    """12 hex digits of sha256 over the sorted (resolved path, size in bytes) of each shard (size -1 for a stream
    URL): two test sets never share it, and re-evaluating the same set gives the same name."""
    items = []
    for s in shards:
        p = Path(s)
        items.append([str(p.resolve()) if p.exists() else s, p.stat().st_size if p.is_file() else -1])
    return json_sha256(sorted(items))[:12]


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "default"


def eval_result_path(
    *, kind: str, model: str, teacher: str, pretrained: str, shards: Sequence[str], student_folder: Path | None
) -> Path:
    """Where ``eval`` writes its results when no ``--out`` is given: named by model, weights and data fingerprint,
    so a result never overwrites another's (re-running the same evaluation rewrites its own file).

    - student: ``RUN/eval/<final|best|folder>-<data fp>.json`` (beside the run it belongs to);
    - teacher: ``.work/eval/<teacher>-<model>-<weights>-<sha8 of model and weights>-<data fp>.json``;
    - cache: ``.work/eval/cache-<name>-<sha8 of its resolved path>-<data fp>.json``.
    """
    data_fp = data_fingerprint(shards)
    if kind == "student" and student_folder is not None:
        folder = Path(student_folder)
        return run_dir_of(folder) / EVAL_DIR / f"{_slug(folder.name)}-{data_fp}.json"

    def ident(x: str) -> str:
        return str(Path(x).resolve()) if x and Path(x).exists() else x

    if kind == "teacher":
        weights_fp = json_sha256([teacher, ident(model), ident(pretrained)])[:8]
        return (
            EVAL_ROOT
            / f"{teacher}-{_slug(model or 'default')}-{_slug(pretrained or 'default')}-{weights_fp}-{data_fp}.json"
        )
    return EVAL_ROOT / f"cache-{_slug(model)}-{json_sha256([ident(model)])[:8]}-{data_fp}.json"


def plot_curves(metrics_path: str | Path, out_path: str | Path, *, run_name: str | None = None) -> Path | None:
    """Draw metrics.jsonl into a PNG (``distill.plots.plot_run``: panels per loss group, log scale where terms
    differ by orders of magnitude, grad norms, logit scale, throughput, val recall). ``run_name`` defaults to
    ``config.json``'s ``run_name`` beside the metrics, else the run dir's name."""
    from mcad_cache.distill.plots import plot_run

    if run_name is None:
        cfg_path = Path(metrics_path).parent / CONFIG_FILE
        saved = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        run_name = saved.get("run_name") or Path(metrics_path).resolve().parent.name
    return plot_run(metrics_path, out_path, run_name=run_name)


__all__ = [
    "CONFIG_FILE",
    "CURVES_FILE",
    "EVAL_DIR",
    "EVAL_ROOT",
    "FINAL_DIR",
    "METRICS_FILE",
    "RESUME_FREE_FIELDS",
    "SCHEDULE_FIELDS",
    "STUDENT_CONFIG",
    "SUMMARY_FILE",
    "append_metrics",
    "check_resume_config",
    "data_fingerprint",
    "eval_result_path",
    "find_student",
    "plot_curves",
    "read_summary",
    "reset_metrics",
    "run_dir_of",
    "save_final",
    "truncate_metrics",
    "write_config",
    "write_summary",
]
