"""The distillation training loop: AdamW + warmup/cosine, gradient clipping, autocast, exact resume.

Plain functions of (model, loss module, batches, ...). What a batch is and how losses are computed from it is the
caller's (``forward``); this module owns the optimiser step, the schedule, checkpoints and the data position.

**Exact resume.** A checkpoint holds the model and loss-module weights (safetensors), the optimiser and scheduler
state, the RNG states (torch CPU and CUDA, Python ``random``) and the data position (epoch, batches consumed in that
epoch, optimiser steps). On resume the epoch's deterministic batch stream is rebuilt and the consumed batches are
skipped (read, not trained on), then the RNG states are restored, so the next step sees the same batch, the same
dropout masks and the same caption choices as an uninterrupted run. Anything that draws random numbers per step
must take them from a generator seeded by ``(seed, step)`` (see :func:`step_generator`) or from the global RNG
after the batch is read.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mcad_cache.errors import CheckpointError, NonFiniteError

_logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"  # DualEncoder.save's weights file name
LOSS_FILE = "loss.safetensors"
STATE_FILE = "train_state.pt"  # written last: a checkpoint folder without it is incomplete


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


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one optimiser step: ``manual_seed(seed * 1_000_003 + step)``; independent of the global
    RNG, so per-step choices (e.g. the anchor caption of each image) survive resume and worker changes."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step))


def param_groups(modules: Iterable[nn.Module], *, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices / conv kernels only.

    Biases, norm gains, embeddings' scalars and the logit scale (tensors with ``ndim < 2``, or named ``*logit_scale*``)
    get no decay, as in open_clip ``training/main.py`` (``exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias"
    in n or "logit_scale" in n``).

    Args:
        modules: modules whose trainable parameters are optimised (student, loss module).
        weight_decay: decoupled weight decay for the decayed group.
    Returns:
        Two groups ``[{"params", "weight_decay"}, {"params", "weight_decay": 0}]`` (empty groups dropped).
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or "logit_scale" in name or "bias" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(
    modules: Iterable[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``betas=(0.9, 0.98)``, ``eps=1e-6``: CLIP's (Radford et al. 2021, and
    open_clip's defaults for ViT models).

    Raises:
        ValueError: no trainable parameter, or lr <= 0.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(modules, weight_decay=weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear warmup ``(step + 1) / warmup_steps``, then cosine
    decay ``0.5 * (1 + cos(pi * e / es))`` to 0 at ``total_steps`` (open_clip ``training/scheduler.py``
    ``cosine_lr``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``LambdaLR`` with :func:`warmup_cosine` (call ``scheduler.step()`` after every optimiser step).

    Raises:
        ValueError: ``total_steps < 1`` or ``warmup_steps < 0``.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=warmup_steps, total_steps=total_steps)
    )


def autocast_for(device: torch.device, precision: str = "auto") -> Any:
    """Autocast context for training: bf16 on CUDA for "auto" / "bf16", fp16 for "fp16"; none on CPU or "fp32".

    Raises:
        ValueError: unknown precision, or "bf16"/"fp16" asked on a non-CUDA device.
    """
    import contextlib

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto | fp32 | bf16 | fp16, got {precision!r}")
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device (autocast is CUDA-only here), got {device}")
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


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
) -> Path:
    """Write a resumable checkpoint atomically (to ``folder.tmp``, then renamed).

    Layout: ``model.safetensors`` (+ ``student_config.json`` and ``tokenizer/`` when the model has ``save``, so the
    folder loads with ``DualEncoder.load``), ``loss.safetensors`` (loss-module parameters and buffers),
    ``train_state.pt`` (optimizer, scheduler, RNG states, :class:`TrainState`, ``extra``), written last.
    Distributed runs (one writer, rank 0) pass ``rank_states``: every rank's ``{"train_state": dict, "rng": ...}``
    (from :func:`rank_state`), since each rank has its own data position and RNG.

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
) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """Load a :func:`save_checkpoint` folder into existing objects (strict key / shape match).

    Args:
        rank, world_size: this process's rank and the run's number of ranks (distributed checkpoints hold one data
            position and RNG state per rank).
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


# ---------------------------------------------------------------------------------------------------- the step
def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The trained scalar: ``losses["loss"]`` when the loss module gives its weighted sum, else the sum of the values
    whose keys end in ``_loss`` (open_clip ``DistillCLIPTask.training_forward``)."""
    if "loss" in losses:
        return losses["loss"]
    terms = [v for k, v in losses.items() if k.endswith("_loss")]
    if not terms:
        raise ValueError(f"no '*_loss' term among {sorted(losses)}")
    return torch.stack([t.float() for t in terms]).sum()


def train_step(
    model: nn.Module,
    loss_module: nn.Module | None,
    batch: Any,
    *,
    forward: Callable[[nn.Module, nn.Module | None, Any], Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    keys: list[str],
    grad_clip: float = 1.0,
    device: torch.device | None = None,
    precision: str = "auto",
) -> dict[str, float]:
    """One optimiser step.

    Args:
        model, loss_module: trained together (the loss module may hold the learned integration module).
        batch: whatever ``forward`` takes.
        forward: ``forward(model, loss_module, batch) -> dict`` of scalar loss tensors (keys ending in ``_loss``,
            optionally their weighted sum ``loss``).
        step: the 1-based number of this optimiser step (for error messages).
        keys: the sample keys of the batch (for error messages).
        grad_clip: max L2 norm of the student's gradients, and separately of the loss module's; 0 = off.
        device: where the model runs (decides autocast); default: the model's first parameter's device.
        precision: see :func:`autocast_for`.
    Returns:
        Float values of every loss term plus ``loss``, ``grad_norm`` (student, before clipping),
        ``loss_grad_norm`` (loss module, when it has gradients) and ``lr``.
    Raises:
        NonFiniteError: the loss (or the gradient norm) is NaN or inf; names the step and the batch's keys.
    """
    device = device or next(model.parameters()).device
    model.train()
    if loss_module is not None:
        loss_module.train()
    with autocast_for(device, precision):
        losses = dict(forward(model, loss_module, batch))
    loss = total_loss(losses)
    if not bool(torch.isfinite(loss.detach())):
        terms = {k: float(v.detach()) for k, v in losses.items() if k.endswith("_loss")}
        raise NonFiniteError(
            f"step {step}: non-finite loss {float(loss.detach())} (terms {terms}); batch keys {_keys_str(keys)}"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Clip the student and the loss module (feature heads, integration module) separately: the integration
    # objective can be large, and one global norm would let its gradients shrink the student's updates.
    norms = {}
    for name, module in (("grad_norm", model), ("loss_grad_norm", loss_module)):
        params = [p for p in module.parameters() if p.grad is not None] if module is not None else []
        if not params:
            continue
        if grad_clip > 0:
            norms[name] = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norms[name] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    for name, norm in norms.items():
        if not bool(torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"step {step}: non-finite {name} {float(norm)}; batch keys {_keys_str(keys)}")
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    out = {k: float(v.detach()) for k, v in losses.items() if k.endswith("_loss") or k == "loss"}
    out.update({"loss": float(loss.detach()), "lr": float(lr)})
    out.update({name: float(norm) for name, norm in norms.items()})
    return out


def _keys_str(keys: list[str], limit: int = 64) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} samples)"


# ---------------------------------------------------------------------------------------------------- the loop
def _prepared(
    stream: Iterator[Any], prepare: Callable[[Any, int], tuple[Any, list[str], int]], next_step: int
) -> Iterator[tuple[Any, list[str], int]]:
    """``prepare`` each raw batch in order with the step number it will be trained at (skipped ones take none)."""
    step = next_step
    for raw in stream:
        prepared, keys, num_pairs = prepare(raw, step)
        if prepared is not None:
            step += 1
        yield prepared, keys, num_pairs


class _Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead; re-raises its exception in the consumer."""

    _END = object()

    def __init__(self, items: Iterator[Any], *, depth: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="mcad-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001 (handed to the consumer thread, which re-raises it)
            self._put(("error", err))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        """Stop the producer (it may have prepared a few batches that are never used)."""
        self._stop.set()
        self._thread.join(timeout=10)


class StepCounter:
    """Iterable over step numbers for the progress bar; ``postfix`` shows loss and throughput (read by the CLI)."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = start, total
        self.postfix = ""

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start + 1, self.total + 1))


def train_loop(
    model: nn.Module,
    loss_module: nn.Module | None,
    *,
    batches_for_epoch: Callable[[int], Iterable[Any]],
    prepare: Callable[[Any, int], tuple[Any, list[str], int]],
    forward: Callable[[nn.Module, nn.Module | None, Any], Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    total_steps: int,
    rng_state: Mapping[str, Any] | None = None,
    grad_clip: float = 1.0,
    precision: str = "auto",
    device: torch.device | None = None,
    log_every: int = 10,
    checkpoint_every: int = 0,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    progress: Callable[..., Iterable[Any]] | None = None,
    max_epochs: int = 1_000_000,
    prefetch: int = 0,
) -> TrainState:
    """Run optimiser steps until ``total_steps``, resuming at ``state``.

    Args:
        model, loss_module: see :func:`train_step`.
        batches_for_epoch: ``epoch -> iterable of raw batches``; must give the same batches in the same order every
            time it is called with the same epoch (seeded shuffling).
        prepare: ``(raw batch, step) -> (batch for forward, sample keys, num pairs)``: joins teacher targets and
            fetches candidates; draws per-step randomness from :func:`step_generator`. Returning ``None`` for the
            batch skips it (e.g. a final partial batch) without counting a step.
        forward: see :func:`train_step`.
        state: the position to start from (a fresh ``TrainState()`` or one from :func:`load_checkpoint`).
        total_steps: stop after this many optimiser steps.
        rng_state: RNG states to restore once the data position is reached (from :func:`load_checkpoint`).
        log_every: call ``on_log`` every this many steps (and at the last step).
        checkpoint_every: call ``on_checkpoint`` every this many steps (0 = never; the caller saves the final one).
        on_log: receives ``{"step", "epoch", "samples_seen", "lr", "loss", "*_loss", "grad_norm", "samples_per_s",
            "elapsed_s"}``.
        progress: ``progress(iterable, description, total)`` over step numbers.
        max_epochs: safety bound when an epoch yields no usable batch.
        prefetch: prepare up to this many batches ahead in a background thread (0 = inline). ``prepare`` still
            runs in batch order with the same step numbers, so results do not change; it must not draw from the
            global RNG.
    Returns:
        The final :class:`TrainState`.
    Raises:
        NonFiniteError: from :func:`train_step`.
        RuntimeError: the data yields no usable batch.
    """
    counter = StepCounter(state.step, total_steps)
    steps_iter = iter(progress(counter, "distill", len(counter)) if progress is not None else counter)
    t0 = time.perf_counter()
    window_t, window_n = t0, 0
    empty_epochs = 0
    while state.step < total_steps:
        if state.epoch >= max_epochs:
            raise RuntimeError(f"stopped after {max_epochs} epochs without reaching {total_steps} steps")
        stream = iter(batches_for_epoch(state.epoch))
        for _ in range(state.batch_in_epoch):  # resume: skip the batches already trained on
            if next(stream, None) is None:
                break
        if rng_state is not None:
            set_rng_state(rng_state)
            rng_state = None
        trained_this_epoch = 0
        items = _prepared(stream, prepare, state.step + 1)
        if prefetch > 0:
            items = _Prefetcher(items, depth=prefetch)
        try:
            for prepared, keys, num_pairs in items:
                state.batch_in_epoch += 1
                if prepared is None:
                    continue
                next(steps_iter, None)
                values = train_step(
                    model, loss_module, prepared, forward=forward, optimizer=optimizer, scheduler=scheduler,
                    step=state.step + 1, keys=keys, grad_clip=grad_clip, device=device, precision=precision,
                )  # fmt: skip
                state.step += 1
                state.samples_seen += num_pairs
                trained_this_epoch += 1
                window_n += num_pairs
                now = time.perf_counter()
                rate = window_n / max(now - window_t, 1e-9)
                counter.postfix = f"loss {values['loss']:.4f} | {rate:.1f} pairs/s"
                if on_log is not None and (state.step % max(1, log_every) == 0 or state.step == total_steps):
                    on_log(
                        {
                            "step": state.step,
                            "epoch": state.epoch,
                            "samples_seen": state.samples_seen,
                            **values,
                            "samples_per_s": rate,
                            "elapsed_s": now - t0,
                        }
                    )
                    window_t, window_n = now, 0
                if on_checkpoint is not None and checkpoint_every > 0 and state.step % checkpoint_every == 0:
                    on_checkpoint(state)
                if state.step >= total_steps:
                    break
        finally:
            if isinstance(items, _Prefetcher):
                items.close()
        if state.step >= total_steps:
            break
        empty_epochs = 0 if trained_this_epoch else empty_epochs + 1
        if empty_epochs >= 2:
            raise RuntimeError("the training data yields no usable batch (too few samples for one batch?)")
        state.epoch += 1
        state.batch_in_epoch = 0
    for _ in steps_iter:  # let a progress bar finish cleanly
        pass
    return state


__all__ = [
    "TrainState",
    "autocast_for",
    "checkpoint_path",
    "create_optimizer",
    "create_scheduler",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "param_groups",
    "rank_state",
    "save_checkpoint",
    "set_rng_state",
    "step_generator",
    "total_loss",
    "train_loop",
    "train_step",
    "warmup_cosine",
]
