"""ALBEF build (issue 11): pass 3a reuses the image tokens of pass 1, so the image tower runs once per image; the
token scratch is bounded, resume-safe (a missing slot file means "recompute that unit") and deleted at completion;
every variant gives the golden cache bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_build_golden as golden  # noqa: E402

import mcad_cache.build.itm as itm  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(tmp_path: Path, tokenizer_dir: Path, monkeypatch, **config) -> tuple[dict, dict]:
    """Build the golden ``albef_tiny`` case; returns (array digests, images through each teacher call + the cache's
    ``image_valid`` and the manifest). The build also runs ``image_tokens`` on one image to probe the fused width.
    ``config``: extra BuildConfig fields."""
    from mcad_cache.pipelines import build_cache
    from mcad_cache.teachers import create_teacher

    golden.write_shards(tmp_path / "shards")
    teacher = create_teacher("albef", model="tiny", tokenizer=str(tokenizer_dir), device="cpu")
    calls = {"image_tokens": 0, "encode_image": 0}
    for name in calls:
        real = getattr(teacher, name)

        def counted(images, _real=real, _name=name):
            calls[_name] += int(images.shape[0])
            return _real(images)

        monkeypatch.setattr(teacher, name, counted)
    monkeypatch.setattr(build_cache, "create_teacher", lambda *_, **__: teacher)
    kw = {**golden.BASE, **golden.CASES["albef_tiny"], **config}
    fields = build_cache.BuildConfig.__dataclass_fields__
    if "random_init" in fields:
        kw["random_init"] = True
    build_cache.run(
        build_cache.BuildConfig(data=(str(tmp_path / "shards" / "shard-*.tar"),), out=str(tmp_path / "c"), **kw)
    )
    assert not (tmp_path / "c" / "build" / "scratch").exists()  # deleted at completion
    import zarr

    valid = zarr.open_group(str(tmp_path / "c"), mode="r")["image_valid"][:]
    calls["valid"] = [bool(v) for v in valid]
    from mcad_cache.cache import CacheReader

    calls["manifest"] = CacheReader(str(tmp_path / "c")).manifest
    return golden.cache_digests(tmp_path / "c"), calls


def _same_as_golden(got: dict) -> None:
    want = json.loads(golden.GOLDEN.read_text())
    exact = want["environment"] == golden.environment()
    for name, w in want["cases"]["albef_tiny"].items():
        if exact:
            assert got[name]["sha256"] == w["sha256"], name
        elif "sum" in w:
            assert got[name]["sum"] == pytest.approx(w["sum"], rel=1e-3, abs=1e-3), name


def test_tokens_of_pass_1_are_reused(tmp_path, tiny_bert_tokenizer_dir, monkeypatch):
    loads = []
    real_load = itm.TokenScratch.load
    monkeypatch.setattr(itm.TokenScratch, "load", lambda self, u: loads.append(real_load(self, u) is not None) or
                        real_load(self, u))  # fmt: skip
    got, calls = _build(tmp_path, tiny_bert_tokenizer_dir, monkeypatch)
    _same_as_golden(got)
    n_valid = sum(calls["valid"])
    assert 0 < n_valid < len(calls["valid"])  # the golden shards hold an image that does not decode
    assert calls["image_tokens"] == 1 + n_valid and calls["encode_image"] == 0  # once per image, in pass 1
    assert loads and all(loads)


def test_bounded_scratch_recomputes(tmp_path, tiny_bert_tokenizer_dir, monkeypatch):
    # a cap of 1e-9 GiB (1 byte): nothing fits, every unit is recomputed in pass 3a
    got, calls = _build(tmp_path, tiny_bert_tokenizer_dir, monkeypatch, token_scratch_gib=1e-9)
    _same_as_golden(got)
    assert calls["image_tokens"] == 1 + 2 * sum(calls["valid"])


def test_default_cap_is_the_documented_bound():
    from mcad_cache.config import BuildConfig

    assert BuildConfig().token_scratch_gib * 2**30 == itm.TOKEN_SCRATCH_MAX_BYTES


def test_scratch_off_gives_identical_arrays_and_is_not_fingerprinted(tmp_path, tiny_bert_tokenizer_dir, monkeypatch):
    """--token-scratch-gib 0: pass 1 runs encode_image, pass 3a the tower again (the pre-issue-11 path); every array
    equals the default build's bit for bit, the cap is in the manifest's build config and not in the fingerprint."""
    on, calls_on = _build(tmp_path / "on", tiny_bert_tokenizer_dir, monkeypatch)
    off, calls_off = _build(tmp_path / "off", tiny_bert_tokenizer_dir, monkeypatch, token_scratch_gib=0)
    assert {n: d["sha256"] for n, d in off.items()} == {n: d["sha256"] for n, d in on.items()}
    n_valid = sum(calls_off["valid"])
    assert calls_off["encode_image"] == n_valid  # pass 1: the tower through encode_image, no tokens kept
    assert calls_off["image_tokens"] == 1 + n_valid  # the probe, then pass 3a once per image
    assert calls_on["encode_image"] == 0 and calls_on["image_tokens"] == 1 + n_valid
    assert calls_off["manifest"]["build"]["config"]["token_scratch_gib"] == 0
    assert calls_on["manifest"]["build"]["config"]["token_scratch_gib"] == 8.0

    def fingerprint(calls: dict) -> dict:  # the shards are written twice (tar mtimes differ): compare the rest
        return {k: v for k, v in calls["manifest"]["fingerprint"].items() if k != "data"}

    assert fingerprint(calls_off) == fingerprint(calls_on)
    assert "token_scratch" not in json.dumps(calls_on["manifest"]["fingerprint"])


def test_negative_cap_is_one_config_error(tmp_path):
    from typer.testing import CliRunner

    from mcad_cache.cli.main import app

    result = CliRunner().invoke(app, ["build", "--data", str(tmp_path / "x.tar"), "--out", str(tmp_path / "c"),
                                      "--token-scratch-gib", "-1"])  # fmt: skip
    assert result.exit_code == 1
    assert "--token-scratch-gib must be >= 0" in result.output
    assert "Traceback" not in result.output


def test_missing_slot_file_recomputes_that_unit(tmp_path, tiny_bert_tokenizer_dir, monkeypatch):
    """A crash can leave a unit's tokens incomplete: that unit is recomputed, the others reuse theirs."""
    real_load = itm.TokenScratch.load
    used = {}

    def load(self, unit):
        if unit == 1:
            files = sorted(self.dir.glob("tokens_000001_*.safetensors"))
            assert len(files) == 2  # 4 rows per unit in slots of 3 and 1
            files[0].unlink()
        out = real_load(self, unit)
        used[unit] = out is not None
        return out

    monkeypatch.setattr(itm.TokenScratch, "load", load)
    got, calls = _build(tmp_path, tiny_bert_tokenizer_dir, monkeypatch)
    _same_as_golden(got)
    assert used[1] is False and all(v for u, v in used.items() if u != 1)
    assert calls["image_tokens"] == 1 + sum(calls["valid"]) + sum(calls["valid"][4:8])  # unit 1's images again
