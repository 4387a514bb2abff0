"""Powered, paired ablation studies: presets x seeds, resumable runs, paired statistics and the report (issue 12).

- ``runner``: ``StudyPlan``, ``RunSpec``, ``run_study`` (finished runs reused, new seeds add only new runs; ``jobs``
  worker processes).
- ``runs``: one run (``run_arm``): its ``DistillConfig``, training (image path or frozen-tower tables), test eval.
- ``stats``: ``paired_delta`` (t-interval, Wilcoxon), ``holm``, ``minimal_detectable_delta``, ``pairs_needed``.
- ``report``: ``summarise_study``, ``write_study`` (study.json, study.md, forest.png, paired.png).
"""

from __future__ import annotations

from mcad_cache.study.report import summarise_study, write_study
from mcad_cache.study.runner import (
    CORE_PRESETS,
    SINGLE_TEACHER_PRESETS,
    RunResult,
    RunSpec,
    StudyMismatchError,
    StudyPlan,
    run_study,
)
from mcad_cache.study.stats import PairedDelta, holm, minimal_detectable_delta, paired_delta, pairs_needed

__all__ = [
    "CORE_PRESETS",
    "SINGLE_TEACHER_PRESETS",
    "PairedDelta",
    "RunResult",
    "RunSpec",
    "StudyMismatchError",
    "StudyPlan",
    "holm",
    "minimal_detectable_delta",
    "paired_delta",
    "pairs_needed",
    "run_study",
    "summarise_study",
    "write_study",
]
