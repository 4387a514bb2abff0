"""mcad-cache: run MCAD teachers once into a Zarr v3 cache, distill small dual-encoder students from it.

Public API (README "Python API"; each name is imported on first use so ``import mcad_cache`` stays cheap, and
``dir(mcad_cache)`` lists them all):

- runs, one per CLI command, keyword arguments = the config fields: ``build_cache``, ``integrate_targets``,
  ``distill_student``, ``evaluate``, ``export_student`` (``mcad_cache.api``; not ``build`` / ``distill``: those
  names are subpackages);
- objects: ``load_student(run_dir)``, ``open_cache(path)``, ``create_teacher(name, ...)``, ``list_teachers()``,
  ``create_student(name)``;
- configs: ``BuildConfig``, ``DistillConfig``, ``EvalConfig``; the error root ``McadError``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_cache": "mcad_cache.api",
    "integrate_targets": "mcad_cache.api",
    "distill_student": "mcad_cache.api",
    "evaluate": "mcad_cache.api",
    "export_student": "mcad_cache.api",
    "load_student": "mcad_cache.api",
    "open_cache": "mcad_cache.cache",
    "create_teacher": "mcad_cache.teachers",
    "list_teachers": "mcad_cache.teachers",
    "create_student": "mcad_cache.student",
    "BuildConfig": "mcad_cache.config",
    "DistillConfig": "mcad_cache.config",
    "EvalConfig": "mcad_cache.config",
    "McadError": "mcad_cache.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcad_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
