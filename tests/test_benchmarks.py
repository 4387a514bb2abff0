"""Benchmark scripts: the shared statistics on known inputs, and each script's ``--quick`` mode as behaviour (it runs
the library's real code paths, writes its documented JSON keys, and its timings are finite and positive)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def run_quick(name: str, work: Path, scratch: str | None = None) -> tuple[object, dict]:
    module = load(name)
    out = work / "json"
    payload = module.main(["--quick", "--out", str(out), "--work", str(work / (scratch or name))])
    written = json.loads((out / f"{name}_quick.json").read_text())
    missing = [field for field in module.REQUIRED_FIELDS if field not in written]
    assert missing == [], f"{name}: JSON lacks {missing}"
    assert written["benchmark"] == name
    for key in ("nproc", "cpu_model", "torch_version", "torch_threads", "command"):
        assert written["machine"][key] not in (None, "")
    assert written["machine"]["torch_threads"] == 1  # the scripts' default on a shared machine
    return module, payload


def positive_finite(values) -> bool:
    values = list(values)
    return bool(values) and all(isinstance(v, float | int) and math.isfinite(v) and v > 0 for v in values)


# ------------------------------------------------------------------------------------------- shared statistics
def test_ratio_stats_on_known_timings():
    C = load("_common")
    stats = C.ratio_stats([2.0, 6.0, 3.0], [1.0, 2.0, 4.0])  # per-rep ratios 2, 3, 0.75
    assert stats == {"median": 2.0, "min": 0.75, "max": 3.0, "per_rep": [2.0, 3.0, 0.75]}


def test_growth_exponent_recovers_known_orders():
    C = load("_common")
    sizes = [10.0, 100.0, 1000.0]
    assert C.fit_growth_exponent(sizes, [s**2 for s in sizes]) == pytest.approx(2.0)
    assert C.fit_growth_exponent(sizes, [3 * s for s in sizes]) == pytest.approx(1.0)
    assert C.fit_growth_exponent([10.0], [5.0]) is None


def test_interleave_rotates_the_order_every_repetition():
    C = load("_common")
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = C.interleave(fns, reps=3)
    assert calls == list("abcbcacab")
    assert {n: len(v) for n, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


# ------------------------------------------------------------------------------------------- quick modes
def test_build_efficiency_quick(work):
    module, p = run_quick("build_efficiency", work)
    assert [t["teacher"] for t in p["teachers"]] == ["clip", "albef"]
    for t in p["teachers"]:
        assert [f for f in module.TEACHER_FIELDS if f not in t] == []
        assert positive_finite(t["bare_s_per_rep"]) and positive_finite(t["build_s_per_rep"])
        # the proxy saw the real build's model calls: images and captions of every sample went through the teacher
        # (a single-stream teacher's images go through image_tokens once: pass 3 reuses them, issue 11)
        items = t["build_model_items"]
        assert items.get("encode_image", 0) + items.get("image_tokens", 0) >= t["num_samples"]
        assert t["build_model_items"]["encode_text"] >= t["num_captions"]
    albef = p["teachers"][1]
    # k pairs per image query and per caption query
    assert albef["bare_pairs"] == albef["k"] * (albef["num_samples"] + albef["num_captions"])


def test_distill_and_online_quick_run_the_library_factory(work, monkeypatch):
    import mcad_cache.distill as distill

    made = []
    real = distill.create_distill

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(distill, "create_distill", spy)
    module, p = run_quick("distill_overhead", work, scratch="distill-data")
    assert len(made) == 2 and all(isinstance(m, distill.DistillRun) for m in made)  # the pipeline's own wiring
    by = {m.config.candidates: m for m in made}
    assert sorted(by) == ["bank", "online"] and by["online"].bank is None and by["online"].index is not None
    assert by["bank"].index is None and by["bank"].bank is not None and by["bank"].bank.bank.filled
    for name in ("mcad_bank", "mcad_online", "contrastive_with_candidates", "contrastive_anchors"):
        assert positive_finite(p["step_s"]["per_rep"][name]), name
    assert positive_finite(p["loss_s"].values())
    # the headline: documented keys, each the median of the per-repetition ratios it names
    assert set(p["headline"]) == set(module.HEADLINE_KEYS) == set(p["headline_keys"])
    for key in ("mcad_bank_over_contrastive", "mcad_online_over_contrastive"):
        assert p["headline"][key] == p["ratios"][key]["median"]
    per = p["step_s"]["per_rep"]
    assert p["ratios"]["mcad_bank_over_contrastive"]["per_rep"] == [
        b / c for b, c in zip(per["mcad_bank"], per["contrastive_anchors"], strict=True)
    ]
    assert p["bank"]["initial_fill_s"] > 0 and p["bank"]["rows"]["images"] == 48
    # the joined batch is what the factory's TargetJoiner gives: k candidates per query at most, extra images fetched
    assert p["batch"]["anchors"] == 4 and 0 < p["batch"]["pairs_i2t"] <= 4 * 3
    assert p["batch"]["student_images"] == p["batch"]["anchors"] + p["batch"]["candidate_images_fetched"]
    assert p["batch"]["images"] >= p["batch"]["student_images"] - p["batch"]["candidate_images_fetched"]
    assert p["loader"]["samples_per_s"] > 0

    module, q = run_quick("offline_vs_online", work, scratch="distill-data")
    assert positive_finite(q["step_s"]["online_composed"]) and positive_finite(q["step_s"]["cached"])
    assert (
        set(q["headline"]) == set(q["headline_keys"])
        and q["headline"]["online_over_cached"] == q["ratio_online_vs_cached"]["median"]
    )
    assert positive_finite(q["experiments"]["per_sample_s"].values())


def test_bank_fidelity_quick(work):
    module, p = run_quick("bank_fidelity", work, scratch="distill-data")
    assert set(p["headline"]) == set(module.HEADLINE_KEYS) == set(p["headline_keys"])
    (seed,) = p["per_seed"]
    cos = [r["topk_cos"] for r in seed["per_step"]]
    assert len(cos) == 3 and all(-1.0 <= c <= 1.0 for c in cos)
    assert p["headline"]["topk_grad_cosine_median"] == sorted(cos)[1]
    assert all(0.0 < r["loss_cos"] < 1.0 for r in seed["per_step"])  # related, but the bank is not exact
    # step 1: the bank was just filled from the current weights, so its values are exact: the bank's gradient equals
    # the exact-values, detached-candidates one, and the whole gap is the candidate side's missing gradient
    first = seed["per_step"][0]
    assert first["topk_cos_bank_vs_detached"] == pytest.approx(1.0, abs=1e-4)
    assert first["topk_cos_detached_vs_exact"] == pytest.approx(first["topk_cos"], abs=1e-4)
    assert p["headline"]["rsum_bank_minus_online"] is None  # synthetic teachers: no recall claimed


def test_storage_quick(work):
    module, p = run_quick("storage", work)
    by = {c["name"]: c for c in p["caches"]}
    single = by["single D256 no-fused 1cap"]
    # fp16 unit vectors hardly compress: image + text embeddings alone are close to 2 x 256 x 2 bytes per sample
    assert single["per_array_bytes_per_sample"]["image_emb"] > 0.8 * 512
    assert single["bytes_per_sample"] >= single["stored_array_bytes_per_sample"]
    assert (
        by["single D256 fused int8 1cap"]["fused_bytes_per_sample"]
        < by["single D256 fused fp16 1cap"]["fused_bytes_per_sample"]
    )
    acc = p["int8_accuracy"]
    # absmax int8: |x - q s| <= s / 2 with s = max|x| / 127 per vector, so <= max|x| / 254 overall
    assert 0 < acc["int8"]["max_abs_error"] <= acc["int8"]["max_abs_value"] / 254 * 1.001
    # fp16: relative rounding error <= 2^-11
    assert acc["fp16"]["max_abs_error"] <= acc["fp16"]["max_abs_value"] * 2.0**-11
    loss = acc["loss"]["gate_0.45"]
    assert set(loss["abs_diff_int8"]) == set(loss["loss_fp32"]) and "loss" in loss["loss_fp32"]
    assert all(math.isfinite(v) for v in loss["abs_diff_int8"].values())


def test_scaling_quick(work):
    module, p = run_quick("scaling", work)
    assert [t["n"] for t in p["topk"]] == [200, 1000, 3000]
    assert [t["extrapolated"] for t in p["topk"]] == [False, False, True]
    assert positive_finite(t["seconds"] for t in p["topk"])
    assert [b["projected"] for b in p["build"]] == [False, False, True]
    assert all(b["memory"]["peak_bytes"] > 0 for b in p["build"] if not b["projected"])
    coco = p["coco5k_eval"]
    assert coco["n_texts"] == 5 * coco["n_images"]
