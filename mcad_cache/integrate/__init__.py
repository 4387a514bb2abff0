"""Offline integration: train the integration module once on the teacher caches, write a derived target cache.

Modules: ``config`` (``IntegrateConfig``), ``parents`` (both parent caches joined by key into ``TeacherTargets``),
``derived`` (the derived cache: schema, writer, ``DerivedReader``), ``train`` (the module's own optimiser, held-out
early stopping), ``diagnostics`` (gates, KL, ranking agreement, plot), ``engine`` (``integrate``: the whole stage).
Formulas: docs/losses.md; format: docs/cache-format.md.
"""

from __future__ import annotations

from mcad_cache.integrate.config import FORMULATIONS, INTEGRATION_FIELDS, IntegrateConfig
from mcad_cache.integrate.derived import DerivedReader, describe_derived, is_derived, open_derived

__all__ = [
    "FORMULATIONS",
    "INTEGRATION_FIELDS",
    "DerivedReader",
    "IntegrateConfig",
    "describe_derived",
    "is_derived",
    "open_derived",
]
