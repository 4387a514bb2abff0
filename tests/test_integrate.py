"""``mcad-cache integrate`` (issue 10): a world where the single-stream teacher knows better, the derived cache, its
fingerprint / reuse / refusal, every formulation, forced positives, and students distilled from derived targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from distill_fixtures import make_shards
from integrate_world import write_world

from mcad_cache.cache.schema import MANIFEST_ATTR
from mcad_cache.distill.join import open_caches
from mcad_cache.errors import CacheIncompleteError, CacheMismatchError, CacheSchemaError
from mcad_cache.integrate import open_derived
from mcad_cache.integrate.config import IntegrateConfig
from mcad_cache.pipelines import build_cache
from mcad_cache.pipelines import integrate as pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    shards = make_shards(root / "shards", num_samples=24, per_shard=12)
    return {"root": root, "shards": shards, **write_world(root, shards, k=4)}


def _cfg(world, out, **kw):
    base = dict(cache=(world["clip"], world["albef"]), out=str(out), batch_size=16, steps=300, device="cpu")
    return IntegrateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def modified(world):
    return pipeline.run(_cfg(world, world["root"] / "targets-mf"))


def test_modified_features_halve_the_kl_to_itm_in_both_directions(modified):
    d = modified.diagnostics
    assert modified.status == "written"
    for direction in ("i2t", "t2i"):
        s = d[direction]
        # the CLIP teacher of this world is noise; the modified top-k distribution moves to the ITM one
        assert s["kl_target_itm"] <= 0.5 * s["kl_clip_itm"], (direction, s)
        assert s["kl_itm_target"] <= 0.5 * s["kl_itm_clip"], (direction, s)
        assert s["top1_agree_after"] > s["top1_agree_before"] and s["spearman_after"] > s["spearman_before"] + 0.2
        assert s["kl_target_clip"] > 1.0  # far from CLIP-only
    assert min(abs(d["gate_image"]), abs(d["gate_text"])) > 0.1  # the gates opened (online: 0.01 -> 0.018)
    assert d["best_step"] > 0 and d["curve"][0]["holdout_loss"] > d["best_holdout_loss"]


def test_derived_cache_format_report_files_and_inspect(world, modified):
    out = modified.path
    reader = open_derived(out).require(complete=True)
    assert reader.kind == "derived" and reader.k == 4 and reader.logit_scale == 50.0
    clip = zarr.open_group(world["clip"], mode="r")
    assert list(reader.image_keys) == list(clip["image_keys"][:])  # keyed like its parents
    norms = np.linalg.norm(reader.image_emb(), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    top = reader.topk("i2t", np.arange(reader.num_images), k=3)
    p = np.exp(top["logits"]).sum(1)
    assert np.all(p <= 1.0 + 1e-5) and top["idx"].shape == (24, 3)
    fp = reader.fingerprint
    assert set(fp["parents"]) == {"clip", "single"} and fp["integration"]["integration"] == "modified-features"
    assert fp["loss"]["max_gate"] == 0.5
    report = json.loads(out.with_name(out.name + ".diagnostics.json").read_text())
    assert report["gate_image"] == modified.diagnostics["gate_image"]
    assert out.with_name(out.name + ".diagnostics.png").stat().st_size > 1000
    desc, problems = build_cache.inspect(str(out), check=True)
    assert problems == [] and desc["stats"]["gate_image"] == modified.diagnostics["gate_image"]
    assert desc["stats"]["i2t"]["kl_target_itm"] == modified.diagnostics["i2t"]["kl_target_itm"]


def test_every_formulation_is_a_derived_cache_and_reruns_are_reused_or_refused(world, tmp_path):
    results = {
        name: pipeline.run(_cfg(world, tmp_path / name, integration=name))
        for name in ("logit-fusion", "mixture", "none")
    }
    none = results["none"].diagnostics
    assert none["i2t"]["kl_target_clip"] == pytest.approx(0.0, abs=1e-6)  # the CLIP-only control
    for name in ("logit-fusion", "mixture"):
        s = results[name].diagnostics["i2t"]
        assert s["kl_target_itm"] < none["i2t"]["kl_target_itm"] and "gate_image" not in results[name].diagnostics
    again = pipeline.run(_cfg(world, tmp_path / "mixture", integration="mixture"))
    assert again.status == "complete" and again.diagnostics == results["mixture"].diagnostics
    with pytest.raises(CacheMismatchError, match=r"integration\.integration: cache has"):
        pipeline.run(_cfg(world, tmp_path / "mixture", integration="logit-fusion"))
    over = pipeline.run(_cfg(world, tmp_path / "mixture", integration="logit-fusion", overwrite=True))
    assert over.status == "written" and open_derived(tmp_path / "mixture").fingerprint["integration"][
        "integration"
    ] == ("logit-fusion")


def test_force_positive_puts_the_best_itm_positive_into_short_lists(world, tmp_path):
    plain = open_derived(pipeline.run(_cfg(world, tmp_path / "plain", integration="none", k=1)).path)
    forced_result = pipeline.run(_cfg(world, tmp_path / "forced", integration="none", k=1, force_positive=True))
    forced = open_derived(forced_result.path)
    rows = np.arange(plain.num_images)
    a, b = plain.topk("i2t", rows), forced.topk("i2t", rows)
    assert a["is_positive"].mean() < 1.0  # k' = 1: many image queries lose their positive
    assert b["is_positive"].all() and b["forced"].sum() == forced_result.diagnostics["i2t"]["forced_positives"] > 0
    assert forced.fingerprint["integration"]["force_positive"] is True


def test_stale_or_incomplete_parents_are_refused(world, modified, tmp_path):
    # a parent rebuilt after the integration: distill given both refuses the derived cache with a diff
    import shutil

    stale = tmp_path / "albef-stale.zarr"
    shutil.copytree(world["albef"], stale)
    group = zarr.open_group(str(stale), mode="r+")
    manifest = dict(group.attrs[MANIFEST_ATTR])
    manifest["fingerprint"] = {**manifest["fingerprint"], "teacher": {"name": "world-single-v2"}}
    group.attrs[MANIFEST_ATTR] = manifest
    with pytest.raises(CacheMismatchError, match=r"teacher\.name: cache has \"world-single\", expected"):
        open_caches([str(modified.path), str(stale)], shards=world["shards"])
    derived, single = open_caches([str(modified.path), world["albef"]], shards=world["shards"])
    assert derived.kind == "derived" and single is None
    manifest["complete"] = False
    group.attrs[MANIFEST_ATTR] = manifest
    with pytest.raises(CacheIncompleteError):
        pipeline.run(_cfg(world, tmp_path / "x", cache=(world["clip"], str(stale))))
    with pytest.raises(CacheSchemaError, match="one dual-stream"):
        pipeline.run(_cfg(world, tmp_path / "y", cache=(world["clip"], world["clip"])))


def test_derived_targets_rank_a_positive_first_more_often_than_clip_only(world, modified, tmp_path):
    """The integration's point, on the targets themselves: among the cached i2t candidates, the modified-features
    targets put a positive first for more image queries than the CLIP-only targets (``integration="none"``).

    An earlier version asserted that a student trained 40 steps on 24 images from these targets ranks positives
    first more often, on one seed (0.83 vs 0.54 on one machine, 0.67 vs 0.54 on another). Over seeds 0-2 it measured
    0.67 / 0.42 / 0.46 against 0.54 / 0.58 / 0.46 (no gain), and the student's top-1 agreement with the derived
    targets 0.50 / 0.29 / 0.38 against 0.33 / 0.33 / 0.29: at this size the student-level effect is within seed
    noise, so it is measured by the demo's 10-seed study (docs/results.md), not asserted here."""
    control = pipeline.run(_cfg(world, tmp_path / "clip-only", integration="none"))
    derived = open_derived(modified.path)
    rows = np.arange(derived.num_images)
    top, ctrl = derived.topk("i2t", rows), open_derived(control.path).topk("i2t", rows)

    def positive_first(t: dict[str, np.ndarray]) -> float:
        best = np.argmax(np.where(t["valid"], t["logits"], -np.inf), 1)
        has = t["is_positive"].any(1)
        return float(t["is_positive"][rows, best][has].mean())

    assert positive_first(top) > positive_first(ctrl) + 0.05, (positive_first(top), positive_first(ctrl))


def test_cli_integrate_prints_diagnostics_and_maps_user_errors(world, tmp_path):
    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    runner = CliRunner()
    args = ["integrate", "--cache", world["clip"], "--cache", world["albef"], "--device", "cpu"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "t"), "--integration", "logit-fusion"])
    assert res.exit_code == 0, res.output
    assert "KL(target ‖ CLIP-only)" in res.output and '"status": "written"' in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "u"), "--integration", "fusion"])
    assert res.exit_code == 1 and "--integration 'fusion' is unknown" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "kl_target_itm" in res.output
