"""One optimiser step: the step's generator, the loss total, the step itself (autocast, clipping, finiteness).

The student-side forward of a distillation batch (``distill_forward``) lives in :mod:`mcad_cache.distill.forward`;
``train_step`` takes any ``forward(model, loss_module, batch) -> dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mcad_cache.errors import NonFiniteError
from mcad_cache.runtime import autocast


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one optimiser step: ``manual_seed(seed * 1_000_003 + step)``; independent of the global
    RNG, so per-step choices (e.g. the anchor caption of each image) survive resume and worker changes."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step))


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
        precision: ``auto | fp32 | bf16 | fp16``, see ``mcad_cache.runtime.autocast``.
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
    with autocast(device, precision):
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


__all__ = ["step_generator", "total_loss", "train_step"]
