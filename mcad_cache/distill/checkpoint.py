"""Resumable checkpoints: ``TrainState`` (the data position), RNG-state serialisation, save / load / find.

**Exact resume.** A checkpoint holds the model and loss-module weights (safetensors), the optimiser and scheduler
state, the RNG states (torch CPU and CUDA, Python ``random``) and the data position (epoch, batches consumed in that
epoch, optimiser steps). On resume the epoch's deterministic batch stream is rebuilt and the consumed batches are
skipped (read, not trained on), then the RNG states are restored (``distill.loop.train_loop``), so the next step sees
the same batch, the same dropout masks and the same caption choices as an uninterrupted run. Other run state with
tensors (the candidate bank and its EMA student, ``distill.bank``) is saved beside them as ``NAME.safetensors``
(``stateful``), and a resume that expects it refuses a checkpoint without it.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mcad_cache.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"  # DualEncoder.save's weights file name
LOSS_FILE = "loss.safetensors"
STATE_FILE = "train_state.pt"  # written last: a checkpoint folder without it is incomplete

_logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """Run state saved with a checkpoint as ``NAME.safetensors`` (e.g. ``distill.bank.BankCandidates``)."""

    def state_dict(self) -> Mapping[str, Tensor]: ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None: ...


@dataclass
class TrainState:
    """Where a run is: the data position and the optimiser step count.

    Attributes:
        step: optimiser steps done (the next step is ``step + 1``).
        epoch: the epoch being read (0-based).
        batch_in_epoch: batches of that epoch already consumed (trained on).
        samples_seen: image-caption pairs trained on so far.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0


# ---------------------------------------------------------------------------------------------------- RNG state
def get_rng_state() -> dict[str, Any]:
    """Global RNG states: torch CPU, every CUDA device (if any), Python ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_tensor(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states from :func:`get_rng_state` (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_tensor(st: tuple) -> Tensor:
    version, internal, gauss = st
    return torch.tensor([version, -1 if gauss is None else 1, *internal], dtype=torch.int64), torch.tensor(
        [0.0 if gauss is None else gauss], dtype=torch.float64
    )


def _py_state_from_tensor(packed: Any) -> tuple:
    ints, gauss = packed
    values = ints.tolist()
    return values[0], tuple(values[2:]), None if values[1] == -1 else float(gauss.item())


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    loss_module: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    extra: Mapping[str, Any] | None = None,
    rank_states: list[dict[str, Any]] | None = None,
    stateful: Mapping[str, Stateful] | None = None,
) -> Path:
    """Write a resumable checkpoint atomically (to ``folder.tmp``, then renamed).

    Layout: ``model.safetensors`` (+ ``student_config.json`` and ``tokenizer/`` when the model has ``save``, so the
    folder loads with ``DualEncoder.load``), ``loss.safetensors`` (loss-module parameters and buffers),
    ``train_state.pt`` (optimizer, scheduler, RNG states, :class:`TrainState`, ``extra``), written last.
    Distributed runs (one writer, rank 0) pass ``rank_states``: every rank's ``{"train_state": dict, "rng": ...}``
    (from :func:`rank_state`), since each rank has its own data position and RNG. ``stateful``: more run state,
    each written as ``NAME.safetensors`` (contiguous CPU tensors).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if callable(getattr(model, "save", None)):
        model.save(tmp)
    else:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
    loss_state = {
        k: v.detach().contiguous().cpu() for k, v in (loss_module.state_dict() if loss_module else {}).items()
    }
    save_file(loss_state, str(tmp / LOSS_FILE))
    for name, obj in (stateful or {}).items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in obj.state_dict().items()}
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": get_rng_state(),
            "train_state": asdict(state),
            "extra": json.dumps(dict(extra or {})),
            "ranks": list(rank_states or []),
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    loss_module: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    map_location: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    stateful: Mapping[str, Stateful] | None = None,
) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """Load a :func:`save_checkpoint` folder into existing objects (strict key / shape match).

    Args:
        rank, world_size: this process's rank and the run's number of ranks (distributed checkpoints hold one data
            position and RNG state per rank).
        stateful: more run state to restore from ``NAME.safetensors`` (required when given).
    Returns:
        (train state, RNG states to restore with :func:`set_rng_state` once the data position is reached, extra).
    Raises:
        CheckpointError: missing files, weights that do not fit the model / loss module, or another world size.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (MODEL_FILE, LOSS_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder}: missing {name}")
    device = str(map_location)
    try:
        model.load_state_dict(load_file(str(folder / MODEL_FILE), device=device), strict=True)
        if loss_module is not None:
            loss_module.load_state_dict(load_file(str(folder / LOSS_FILE), device=device), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {folder} does not fit the model or loss module: {err}") from err
    for name, obj in (stateful or {}).items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {folder}: missing {path.name} (the run was written with other settings, e.g. "
                "--candidates online); resume with the run's own settings or use a new --out"
            )
        try:
            obj.load_state_dict(load_file(str(path)))
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {err}") from err
    blob = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(blob["scheduler"])
    ranks = blob.get("ranks") or []
    saved_world = max(1, len(ranks))
    if saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {folder} was written by {saved_world} rank(s), this run has {world_size}: resume with the "
            "same number of ranks (each rank's data position is its own)"
        )
    if ranks:
        return TrainState(**ranks[rank]["train_state"]), ranks[rank]["rng"], json.loads(blob["extra"])
    return TrainState(**blob["train_state"]), blob["rng"], json.loads(blob["extra"])


def continue_schedule(
    scheduler: Any, history: list[dict[str, int]] | None, *, step: int, total_steps: int, what: str
) -> list[dict[str, int]]:
    """The LR schedule of a resumed run whose total length changed (``--steps`` / ``--epochs``): extend it, as
    open_clip, timm and transformers do when a run is resumed with more epochs or steps: the warmup-cosine multiplier
    (``schedules.warmup_cosine``) is recomputed over the new total from the current step on (the LR jumps from the
    old curve to the new one; the steps already run keep theirs), and the change is recorded.

    Call after :func:`load_checkpoint`, which restored the old total into the scheduler's multiplier (``LambdaLR``
    saves a callable's attributes).

    Args:
        scheduler: the run's ``LambdaLR`` over ``schedules._WarmupCosine`` multipliers (``total_steps``,
            ``warmup_steps`` attributes).
        history: the checkpoint's ``extra["schedule_history"]`` (None for a checkpoint written before it existed:
            one entry is made from the restored multiplier).
        step: optimiser steps already done.
        total_steps: the resumed run's total.
        what: the option that set ``total_steps``, for the message (e.g. ``"--steps 200"``).
    Returns:
        ``[{"from_step", "total_steps", "warmup_steps"}, ...]``: steps ``from_step`` + 1 .. the next entry's
        ``from_step`` ran under a schedule of ``total_steps`` (one entry when the total never changed).
    Raises:
        CheckpointError: ``total_steps`` differs and is not above ``step`` (the run would end before the steps it
            already ran); one line with the fix.
    """
    fns = scheduler.lr_lambdas
    history = [dict(h) for h in history or []] or [
        {"from_step": 0, "total_steps": int(fns[0].total_steps), "warmup_steps": int(fns[0].warmup_steps)}
    ]
    if history[-1]["total_steps"] == total_steps:
        return history
    if total_steps <= step:
        raise CheckpointError(
            f"the run already ran {step} steps (of {history[-1]['total_steps']}); {what} makes {total_steps}: pass a "
            f"total above {step} to extend it, or a new --out to start another run"
        )
    for fn in fns:
        fn.total_steps = total_steps
        fn.warmup_steps = min(fn.warmup_steps, total_steps)
    groups = scheduler.optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, fns, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)  # the LR of step `step + 1` on the new curve
    scheduler._last_lr = [g["lr"] for g in groups]
    history.append({"from_step": step, "total_steps": total_steps, "warmup_steps": int(fns[0].warmup_steps)})
    _logger.warning(
        "schedule extended: steps 1-%d ran under a total of %d, steps %d-%d follow the cosine over %d (LR now %.3g; "
        "recorded as schedule_history in summary.json)",
        step, history[-2]["total_steps"], step + 1, total_steps, total_steps, groups[0]["lr"],
    )  # fmt: skip
    return history


def rank_state(state: TrainState) -> dict[str, Any]:
    """This process's data position and RNG states, for :func:`save_checkpoint`'s ``rank_states``."""
    return {"train_state": asdict(state), "rng": get_rng_state()}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint (one with ``train_state.pt``) of highest step under ``run_dir/checkpoints``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step_{step:08d}``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def prune_checkpoints(run_dir: str | Path, *, keep: int) -> None:
    """Delete all but the ``keep`` highest-step checkpoint folders under ``run_dir/checkpoints``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    done = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "CHECKPOINT_DIR",
    "LOSS_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "Stateful",
    "TrainState",
    "checkpoint_path",
    "continue_schedule",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "rank_state",
    "save_checkpoint",
    "set_rng_state",
]
