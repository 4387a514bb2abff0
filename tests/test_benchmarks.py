"""Smoke test of the benchmark scripts: each one's ``--quick`` mode runs on tiny sizes, writes its JSON with every
field, and the figures it reports agree with the measurements it stores (ratios are medians of per-repetition
ratios; int8 / fp16 errors stay within their quantisation bounds; bytes per sample cover the stored embeddings)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
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
    for field in module.REQUIRED_FIELDS:
        assert field in written, f"{name}: JSON lacks {field!r}"
    assert written["benchmark"] == name
    for key in ("nproc", "cpu_model", "torch_version", "torch_threads", "command"):
        assert written["machine"][key] not in (None, "")
    assert written["machine"]["torch_threads"] == 1  # the scripts' default on a shared machine
    return module, payload


def assert_median_of_ratios(stats: dict, num: list[float], den: list[float]) -> None:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    assert stats["per_rep"] == pytest.approx(ratios)
    assert stats["median"] == pytest.approx(statistics.median(ratios))
    assert stats["min"] <= stats["median"] <= stats["max"]


def test_build_efficiency_quick(work):
    module, p = run_quick("build_efficiency", work)
    assert [t["teacher"] for t in p["teachers"]] == ["clip", "albef"]
    for t in p["teachers"]:
        for field in module.TEACHER_FIELDS:
            assert field in t, field
        assert_median_of_ratios(t["efficiency"], t["bare_s_per_rep"], t["build_s_per_rep"])
        assert t["build_samples_per_s"] == pytest.approx(t["num_samples"] / t["build_s"])
        # the proxy saw the build's model calls: images and captions of every sample went through the teacher
        assert t["build_model_items"]["encode_image"] >= t["num_samples"]
        assert t["build_model_items"]["encode_text"] >= t["num_captions"]
        assert t["meets_target"] == (t["efficiency"]["median"] >= module.TARGET)
    albef = p["teachers"][1]
    # k pairs per image query and per caption query
    assert albef["bare_pairs"] == albef["k"] * (albef["num_samples"] + albef["num_captions"])


def test_distill_and_online_quick(work):
    module, p = run_quick("distill_overhead", work, scratch="distill-data")
    med = p["step_s"]["median"]
    assert_median_of_ratios(
        p["ratio_mcad_vs_contrastive_with_candidates"],
        p["step_s"]["per_rep"]["mcad"],
        p["step_s"]["per_rep"]["contrastive_with_candidates"],
    )
    b = p["breakdown_s"]
    assert b["mcad_step_total_s"] == med["mcad"]
    assert b["candidate_encoding_s"] == pytest.approx(med["contrastive_with_candidates"] - med["contrastive_anchors"])
    assert p["batch"]["anchors"] == 4 and p["batch"]["pairs_i2t"] <= 4 * 3
    assert p["batch"]["student_images"] == p["batch"]["anchors"] + p["batch"]["candidate_images_fetched"]
    assert p["loader"]["samples_per_s"] > 0 and p["verdict"] in ("meets", "misses")
    assert p["mcad_only_s"] == pytest.approx(
        b["cache_read_and_join_s"] + b["candidate_image_fetch_decode_s"] + b["losses_extra_s"]
    )

    module, q = run_quick("offline_vs_online", work, scratch="distill-data")
    assert_median_of_ratios(q["ratio_online_vs_cached"], q["step_s"]["online_composed"], q["step_s"]["cached"])
    per = q["experiments"]["per_sample_s"]
    for e in q["experiments"]["totals"]:
        n, d = e["experiments"], q["experiments"]["dataset_size"]
        assert e["online_s"] == pytest.approx(n * d * per["online"])
        assert e["offline_s"] == pytest.approx(d * per["build"] + n * d * per["cached_student"])


def test_storage_quick(work):
    module, p = run_quick("storage", work)
    by = {c["name"]: c for c in p["caches"]}
    single = by["single D256 no-fused 1cap"]
    # fp16 unit vectors hardly compress: image + text embeddings alone are close to 2 x 256 x 2 bytes per sample
    assert single["per_array_bytes_per_sample"]["image_emb"] > 0.8 * 512
    assert single["bytes_per_sample"] >= single["stored_array_bytes_per_sample"]
    assert p["headline"]["no_fused_bytes_per_sample"] == single["bytes_per_sample"]
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
    assert p["verdicts"]["no_fused_le_2KB"] == (single["bytes_per_sample"] <= 2048)


def test_scaling_quick(work):
    module, p = run_quick("scaling", work)
    assert [t["n"] for t in p["topk"]] == [200, 1000, 3000]
    assert [t["extrapolated"] for t in p["topk"]] == [False, False, True]
    big = p["topk"][-1]
    assert big["seconds"] == pytest.approx(big["measured_seconds"] * 3000 / big["timed_query_rows"])
    assert [b["projected"] for b in p["build"]] == [False, False, True]
    assert all(b["memory"]["peak_bytes"] > 0 for b in p["build"] if not b["projected"])
    coco = p["coco5k_eval"]
    assert coco["n_texts"] == 5 * coco["n_images"]
    assert coco["within_bound"] == (coco["memory"]["increase_bytes"] <= coco["stated_bound_bytes"])
    assert p["growth"]["topk_time"] is not None
