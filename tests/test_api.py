"""The Python API: what ``dir(mcad_cache)`` lists, and the README's example run on tiny shards."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from distill_fixtures import make_shards

import mcad_cache

ROOT = Path(__file__).resolve().parents[1]
API = (
    "build_cache",
    "integrate_targets",
    "distill_student",
    "evaluate",
    "export_student",
    "load_student",
    "open_cache",
)

# The README's example uses real model names and a real step count; on tiny shards each is swapped for a tiny one.
# Every swap must match exactly once, so an edit of the README that breaks the example fails here.
SWAPS = (
    ('model="ViT-B-16", pretrained="openai"', 'model="tiny", random_init=True, workers=0, device="cpu", batch_size=6'),
    (  # the tiny student and the tiny CLIP teacher both squash (the README's pair both crop): views match
        'student="mobilevitv2_tinybert", steps=2000',
        'student="tiny", steps=3, batch_size=4, warmup_steps=1, workers=0',
    ),
    ("eval_every=500", 'eval_every=2, device="cpu"'),
    ("data=test)", 'data=test, workers=0, device="cpu")'),
)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md: no python block under '## Python API'"
    return blocks[0]


def test_dir_lists_the_api_and_names_resolve():
    names = dir(mcad_cache)
    for name in API:
        assert name in names and callable(getattr(mcad_cache, name)), name
    importlib.import_module("mcad_cache.build.engine")  # importing the subpackages never shadows an API function
    importlib.import_module("mcad_cache.distill.loop")

    assert callable(mcad_cache.build_cache) and callable(mcad_cache.distill_student)
    from mcad_cache import load_student  # the import the issue says failed

    assert load_student is mcad_cache.api.load_student


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    for old, new in SWAPS:
        assert code.count(old) == 1, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    make_shards(tmp_path / "shards/f30k/train", num_samples=12, per_shard=6)
    make_shards(tmp_path / "shards/f30k/test", num_samples=6, per_shard=6, prefix="t")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    run, result, text_emb = scope["run"], scope["result"], scope["text_emb"]
    assert (tmp_path / "caches/clip.zarr/zarr.json").is_file()
    assert run["steps"] == 3 and run["best"]["step"] in (2, 3)
    assert 0 <= result["metrics"]["rsum"] <= 600
    assert text_emb.shape == (1, scope["student"].embed_dim)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert scope["cache"].num_images == 12
    assert "best val RSUM" in capsys.readouterr().out


def test_config_object_and_keywords(tmp_path):
    """A config object is overridden by keywords; an unknown field is a ConfigError naming it."""
    from mcad_cache.api import _config
    from mcad_cache.errors import ConfigError

    cfg = _config(mcad_cache.DistillConfig, mcad_cache.DistillConfig(steps=5, lr=1e-3), {"steps": 7, "seed": None})
    assert (cfg.steps, cfg.lr) == (7, 1e-3)
    with pytest.raises(ConfigError, match="stepz"):
        _config(mcad_cache.DistillConfig, None, {"stepz": 1})
