"""Experiment tracking beside ``metrics.jsonl``: ``--report-to none | csv | tensorboard | wandb``.

``metrics.jsonl`` (``distill.rundir``) is always written and stays the source of truth for resume and plots; a
tracker mirrors the same scalars to a tool people already read:

- ``csv``: ``metrics.csv`` in the run dir (``csv.DictWriter``; rewritten with a wider header when a new column
  appears, e.g. the first validation).
- ``tensorboard``: event files under ``RUN/tensorboard/`` through ``torch.utils.tensorboard.SummaryWriter`` (needs
  the ``tensorboard`` package from PyPI), tags grouped as ``loss/*``, ``val/*``, ``train/*``.
- ``wandb``: only when ``wandb`` is installed (a ``ConfigError`` says how to install it otherwise). The run is
  always ``offline`` (never blocks on a network; the library reads no environment); ``wandb sync RUN/wandb/...``
  uploads it later.

The same interface as the Hugging Face Trainer's ``report_to`` and open_clip's ``--report-to``.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mcad_cache.config import DistillConfig
from mcad_cache.errors import ConfigError

REPORT_TO = ("none", "csv", "tensorboard", "wandb")
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    """Receives one dict of scalars per logged step (``values["step"]`` is the x axis)."""

    def log(self, values: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numeric entries of ``values`` except ``step`` (bools and strings dropped)."""
    return {
        k: float(v)
        for k, v in values.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def tag(name: str) -> str:
    """TensorBoard / W&B tag of a metric: ``loss/*`` for losses, ``val/*`` for validation, ``train/*`` else."""
    if name.startswith("val_"):
        return "val/" + name.removeprefix("val_")
    if name == "loss" or name.endswith("_loss"):
        return "loss/" + name
    return "train/" + name


class CsvTracker:
    """``metrics.csv``: one row per logged step, one column per scalar (union of all keys seen, ``step`` first)."""

    def __init__(self, run_dir: str | Path, *, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / CSV_FILE
        self.rows: list[dict[str, Any]] = []
        if resume_step > 0 and self.path.is_file():  # keep the rows of steps already trained
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        self.columns: list[str] = ["step", *sorted({k for r in self.rows for k in r} - {"step"})]
        self._write_all()

    def _write_all(self) -> None:
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)

    def log(self, values: Mapping[str, Any]) -> None:
        row = {"step": int(values["step"]), **_scalars(values)}
        self.rows.append(row)
        new = sorted(set(row) - set(self.columns))
        if new:  # a new column: rewrite with the wider header
            self.columns += new
            self._write_all()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n").writerow(row)

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files under ``RUN/tensorboard`` (``torch.utils.tensorboard.SummaryWriter``; purge_step on resume)."""

    def __init__(self, run_dir: str | Path, *, run_name: str, config: Mapping[str, Any], resume_step: int = 0) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step > 0 else None
        )
        if resume_step == 0:
            self.writer.add_text("run/name", run_name, 0)
            self.writer.add_text("run/config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())), 0)

    def log(self, values: Mapping[str, Any]) -> None:
        step = int(values["step"])
        for name, value in _scalars(values).items():
            if math.isfinite(value):
                self.writer.add_scalar(tag(name), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """An offline W&B run in the run dir (``wandb sync`` uploads it)."""

    def __init__(self, run_dir: str | Path, *, run_name: str, config: Mapping[str, Any], resume_step: int = 0) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--report-to wandb needs wandb: pip install wandb (or use --report-to tensorboard)")
        import wandb

        self.run = wandb.init(
            project="mcad-cache", name=run_name, dir=str(run_dir), config=dict(config), resume="allow", mode="offline",
        )  # fmt: skip

    def log(self, values: Mapping[str, Any]) -> None:
        self.run.log({tag(k): v for k, v in _scalars(values).items()}, step=int(values["step"]))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fans one ``log`` out to every tracker; ``close`` closes them all."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, values: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log(values)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def create_trackers(
    report_to: str, run_dir: str | Path, *, run_name: str, config: Mapping[str, Any], resume_step: int = 0
) -> Trackers:
    """The tracker ``report_to`` names (``none``: no tracker; metrics.jsonl is written either way).

    Raises:
        ConfigError: an unknown name (lists :data:`REPORT_TO`), or tensorboard / wandb not installed.
    """
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to {report_to!r} is unknown; use {' | '.join(REPORT_TO)}")
    names = [] if report_to == "none" else [report_to]
    trackers: list[Tracker] = []
    for n in names:
        if n == "csv":
            trackers.append(CsvTracker(run_dir, resume_step=resume_step))
        elif n == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, run_name=run_name, config=config, resume_step=resume_step))
        else:
            trackers.append(WandbTracker(run_dir, run_name=run_name, config=config, resume_step=resume_step))
    return Trackers(trackers)


class RunHooks:
    """What ``distill`` adds to a run beside the loop: trackers (``--report-to``) and the validator (``--val-data``).

    ``log(values)`` mirrors a metrics.jsonl line to the trackers; ``callbacks`` go to ``train_loop(callbacks=)``;
    ``close()`` closes the trackers and returns the best validation (or None) for ``summary.json``.
    """

    def __init__(self, trackers: Trackers, validator: Any | None, run_name: str) -> None:
        self.trackers, self.validator, self.run_name = trackers, validator, run_name
        self.callbacks = [validator] if validator is not None else []

    def log(self, values: Mapping[str, Any]) -> None:
        self.trackers.log(values)

    def close(self) -> dict[str, Any] | None:
        self.trackers.close()
        return self.validator.summary() if self.validator is not None else None


def create_run_hooks(
    config: DistillConfig,
    *,
    model: Any,
    resolved: Mapping[str, Any],
    total_steps: int,
    start_step: int,
    is_main: bool = True,
) -> RunHooks:
    """Trackers and validator of one distill run, from its config (``report_to``, ``run_name``, ``val_data``,
    ``eval_every``, ``early_stopping``). Validation lines go to metrics.jsonl and to the trackers (rank 0).

    Raises:
        ConfigError: unknown ``report_to``, a tracker that is not installed, ``eval_every`` / ``early_stopping``
            below 0 or given without ``val_data``.
    """
    from mcad_cache.distill import rundir as rd
    from mcad_cache.distill.validation import Validator

    for name in ("eval_every", "early_stopping"):
        value = getattr(config, name)
        if value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if value > 0 and not config.val_data:
            raise ConfigError(f"--{name.replace('_', '-')} {value} needs --val-data SHARDS (validation shards)")
    run_dir = Path(config.out)
    run_name = config.run_name or run_dir.resolve().name
    trackers = (
        create_trackers(config.report_to, run_dir, run_name=run_name, config=resolved, resume_step=start_step)
        if is_main
        else Trackers([])
    )

    def log_val(row: dict[str, Any]) -> None:
        rd.append_metrics(run_dir, row)
        trackers.log(row)

    validator = None
    if config.val_data:
        validator = Validator(
            model, shards=config.val_data, run_dir=run_dir, every=config.eval_every, total_steps=total_steps,
            patience=config.early_stopping, batch_size=config.batch_size, workers=0, precision=config.precision,
            log=log_val, is_main=is_main, start_step=start_step,
        )  # fmt: skip
    return RunHooks(trackers, validator, run_name)


__all__ = [
    "CSV_FILE",
    "REPORT_TO",
    "TENSORBOARD_DIR",
    "CsvTracker",
    "RunHooks",
    "TensorBoardTracker",
    "Tracker",
    "Trackers",
    "WandbTracker",
    "create_run_hooks",
    "create_trackers",
    "tag",
]
