"""mcad-cache: run MCAD teachers once into a Zarr v3 cache, distill small dual-encoder students from it.

Public API (imported lazily so ``import mcad_cache`` stays cheap): ``create_teacher``, ``list_teachers``,
``create_student``, ``open_cache``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_teacher": "mcad_cache.teachers",
    "list_teachers": "mcad_cache.teachers",
    "create_student": "mcad_cache.student",
    "open_cache": "mcad_cache.cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcad_cache' has no attribute {name!r}")
