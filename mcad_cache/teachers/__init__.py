"""Teacher registry: ``create_teacher(name, **kwargs)``, ``list_teachers()``, ``@register_teacher(name)``.

Built-in teachers register on first use (their modules import open_clip / transformers, which are slow to import).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mcad_cache.errors import UnknownModelError
from mcad_cache.teachers.base import Teacher

_REGISTRY: dict[str, Callable[..., Teacher]] = {}
# Built-in name -> module that registers it on import.
_BUILTIN = {
    "clip": "mcad_cache.teachers.clip",
    "albef": "mcad_cache.teachers.albef",
    "blip": "mcad_cache.teachers.blip",
}


def register_teacher(name: str) -> Callable[[Callable[..., Teacher]], Callable[..., Teacher]]:
    """Decorator: register a builder ``fn(**kwargs) -> Teacher`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered by another builder.
    """

    def deco(fn: Callable[..., Teacher]) -> Callable[..., Teacher]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"teacher {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_teachers() -> list[str]:
    """Names ``create_teacher`` accepts, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def create_teacher(name: str, **kwargs: Any) -> Teacher:
    """Build a registered teacher. ``None`` kwargs are dropped (meaning: the teacher's own default).

    Raises:
        UnknownModelError: ``name`` is not registered; the message lists ``list_teachers()``.
    """
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown teacher {name!r}; known teachers: {', '.join(list_teachers())}")
    return _REGISTRY[name](**{k: v for k, v in kwargs.items() if v is not None})


__all__ = ["Teacher", "create_teacher", "list_teachers", "register_teacher"]
