"""Device and precision: the one rule every phase (build, distill, eval, benchmarks) uses.

Rule: ``device="auto"`` picks CUDA when available, else CPU. ``precision="auto"`` means bf16 autocast on CUDA and
plain fp32 elsewhere; ``"bf16"``/``"fp16"`` are refused on a non-CUDA device (autocast is used on CUDA only here);
``"fp32"`` never autocasts. Model outputs that are stored or compared are cast back to float32 by the caller.
CPU budget: ``resolve_cpu_budget`` turns "auto" threads and workers into numbers that never oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from mcad_cache.errors import McadError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class DeviceError(McadError, RuntimeError):
    """A device that is not available here (for example ``--device cuda`` on a machine without a GPU)."""


def resolve_device(device: torch.device | str | None = "auto") -> torch.device:
    """``"auto"`` / ``None`` -> ``cuda`` when available, else ``cpu``; anything else -> ``torch.device(device)``.

    Raises:
        DeviceError: a CUDA device is asked for and CUDA is not available, or the device string is malformed.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"--device {device!r} is not a device name (use auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision (``fp32`` | ``bf16`` | ``fp16``) for ``precision`` on ``device``.

    Raises:
        ValueError: unknown precision, or ``bf16``/``fp16`` asked on a non-CUDA device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {' | '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(
            f"precision {precision!r} needs a CUDA device (autocast on CUDA only here), device is {device}"
        )
    return precision


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` (resolved by :func:`resolve_precision`) on ``device``; a no-op for fp32.

    Raises:
        ValueError: as :func:`resolve_precision`.
    """
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


def available_cores() -> int:
    """CPU cores this process may run on (its scheduler affinity; ``os.cpu_count()`` where that is unavailable)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_cpu_budget(
    *, threads: int, workers: int, device: torch.device, cores: int | None = None
) -> tuple[int, int]:
    """``(torch intra-op threads, DataLoader workers)`` that together never exceed the cores (our rule; measured in
    docs/distill.md, "CPU threads and workers": on 2 cores a tiny run took 28.3 s with torch's default threads beside
    2 workers and 6.0 s with 1 thread and 1 worker).

    ``threads <= 0`` and ``workers < 0`` mean "auto"; an explicit value is kept and the other takes what is left:

    - CPU device: the student runs in the main process, so it gets most cores: ``workers = cores // 4`` (at least 1
      when there are 2 or more cores), ``threads = cores - workers``.
    - CUDA: the GPU does the model work, the cores decode: ``workers = min(8, cores - 1)``,
      ``threads = min(4, cores - workers)``.

    Both are at least 1 thread and 0 workers.

    Args:
        threads: requested intra-op threads (<= 0 = auto).
        workers: requested decode workers (< 0 = auto).
        device: where the model runs.
        cores: the cores to plan for (default :func:`available_cores`).
    Returns:
        ``(threads, workers)``.
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    if workers < 0:
        if device.type == "cuda":
            workers = min(8, cores - 1)
        else:
            workers = max(1, cores // 4) if cores >= 2 else 0
        if threads > 0:
            workers = min(workers, max(0, cores - threads))
    if threads <= 0:
        left = max(1, cores - workers)
        threads = min(4, left) if device.type == "cuda" else left
    return int(threads), int(workers)


LOGGERS_TO_SPAWN = ("mcad_cache", "transformers")  # loggers whose levels a spawned worker copies from its parent


def logging_levels() -> dict[str, int]:
    """This process's levels of the root logger and ``LOGGERS_TO_SPAWN``: what ``init_spawned_logging`` needs."""
    levels = {name: logging.getLogger(name).level for name in LOGGERS_TO_SPAWN}
    return {**levels, "": logging.getLogger().level}


def init_spawned_logging(levels: dict[str, int], label: str = "worker") -> None:
    """In a spawned worker process (which starts with no logging set up): the parent's ``logging_levels()``, one
    stderr handler whose lines start with ``[label]``. The parent (the CLI) chose the levels, so a quiet parent gives
    a quiet worker (transformers' load reports and weight-loading bars included)."""
    logging.basicConfig(level=levels.get("", logging.WARNING), format=f"[{label}] %(levelname)s %(message)s")
    for name in LOGGERS_TO_SPAWN:
        if name in levels:
            logging.getLogger(name).setLevel(levels[name])
    hf_level = levels.get("transformers", logging.NOTSET)
    if hf_level != logging.NOTSET:  # transformers sets its own level when first imported: set it after that
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(hf_level)
            if hf_level > logging.INFO:
                hf_logging.disable_progress_bar()
