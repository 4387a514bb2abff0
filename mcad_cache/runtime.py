"""Device and precision: the one rule every phase (build, distill, eval, benchmarks) uses.

Rule: ``device="auto"`` picks CUDA when available, else CPU. ``precision="auto"`` means bf16 autocast on CUDA and
plain fp32 elsewhere; ``"bf16"``/``"fp16"`` are refused on a non-CUDA device (autocast is used on CUDA only here);
``"fp32"`` never autocasts. Model outputs that are stored or compared are cast back to float32 by the caller.
"""

from __future__ import annotations

import contextlib

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
        raise ValueError(f"precision {precision!r} needs a CUDA device (autocast on CUDA only here), device is {device}")
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
