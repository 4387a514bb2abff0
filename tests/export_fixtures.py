"""A tiny student saved as a distill run directory (the files ``distill`` writes: ``final/`` + ``config.json``), and
tiny shards, for the export / search / serve tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from distill_fixtures import make_shards

from mcad_cache.student import create_student


def make_run(folder: Path, **overrides) -> Path:
    """``folder/final`` holds a seeded random ``tiny`` student; ``folder/config.json`` names its caches and data."""
    torch.manual_seed(0)
    student = create_student("tiny", **overrides)
    student.save(folder / "final")
    config = {"cache": ["caches/clip", "caches/albef"], "data": ["shards/train-0000.tar"], "student": "tiny",
              "preset": "mcad", "seed": 0}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def gallery_shards(folder: Path) -> list[str]:
    """12 samples (32 x 24 px PNG, 1..3 captions each) in 2 shards."""
    return make_shards(folder, num_samples=12, per_shard=6)
