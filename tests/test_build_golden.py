"""Golden equality of the cache build: a cache built on the test fixtures equals, array by array, the one recorded
in ``tests/golden/build_arrays.json`` (sha256 of every array's bytes, with shape and dtype).

Recorded with the build engine before the issue-9 move (``pipelines/build_cache.py`` -> ``mcad_cache/build/``), so a
refactor that changes any stored value fails here. Deterministic: one torch thread (conftest), fixed seeds, workers=0.

Float values depend on the CPU kernels: the digests of float arrays are compared exactly only where the environment
(torch version, CPU capability, machine) is the recorded one; elsewhere float arrays are compared by NaN count and a
float64 sum (rtol 1e-3), and integer, boolean and string arrays (keys, maps, candidate ids, flags) always exactly.
Regenerate after an intended change of stored values: ``python tests/test_build_golden.py`` (then review the diff).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from fake_teacher import FakeTeacher  # noqa: F401  (registers "fake")
from test_build import write_shards

from mcad_cache.config import BuildConfig
from mcad_cache.pipelines.build_cache import run

GOLDEN = Path(__file__).resolve().parent / "golden" / "build_arrays.json"

# name -> BuildConfig overrides over BASE; "albef" uses the tiny ALBEF teacher (random init, seed 0)
CASES: dict[str, dict] = {
    "fake_dual": {},
    "fake_single_int8_forced": {"model": "single", "fused_dtype": "int8", "force_positives": True},
    "fake_single_fp16_emb_fp32": {"model": "single", "fused_dtype": "fp16", "emb_dtype": "fp32", "k": 2},
    "albef_tiny": {"teacher": "albef", "model": "tiny", "k": 2, "emb_dtype": "fp32", "random_init": True},
}
BASE = {"k": 3, "batch_size": 3, "workers": 0, "rows_per_chunk": 4, "chunk_size": 5, "device": "cpu", "threads": 1}


def environment() -> dict[str, str]:
    """What float results depend on (CPU kernels)."""
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def array_digest(values: np.ndarray) -> dict:
    """shape, dtype and sha256 of an array's C-order bytes (strings: of their UTF-8 JSON list); floats also carry
    their NaN count and float64 sum (the portable check)."""
    if values.dtype.kind in "OUST":
        raw = json.dumps([str(x) for x in values.reshape(-1).tolist()]).encode()
        dtype = "str"
    else:
        raw = np.ascontiguousarray(values).tobytes()
        dtype = str(values.dtype)
    out = {"shape": list(values.shape), "dtype": dtype, "sha256": hashlib.sha256(raw).hexdigest()}
    if values.dtype.kind == "f":
        v = values.astype(np.float64)
        out["nan_count"] = int(np.isnan(v).sum())
        out["sum"] = float(np.nansum(v))
    return out


def cache_digests(path: Path) -> dict[str, dict]:
    """Digest of every array of the cache (root arrays and the build group's done markers)."""
    g = zarr.open_group(str(path), mode="r")
    out = {name: array_digest(np.asarray(g[name][:])) for name in sorted(g.array_keys())}
    build = g["build"]
    out.update({f"build/{n}": array_digest(np.asarray(build[n][:])) for n in sorted(build.array_keys())})
    return out


def build_case(name: str, shard_dir: Path, out: Path, tokenizer_dir: Path | None) -> dict[str, dict]:
    kw = {**BASE, **CASES[name]}
    kw.setdefault("teacher", "fake")
    if name == "albef_tiny":
        from mcad_cache.pipelines import build_cache
        from mcad_cache.teachers import create_teacher

        teacher = create_teacher("albef", model="tiny", tokenizer=str(tokenizer_dir), device="cpu")
        original = build_cache.create_teacher
        build_cache.create_teacher = lambda *_, **__: teacher  # the CLI cannot pass a tokenizer folder
        try:
            run(BuildConfig(data=(str(shard_dir / "shard-*.tar"),), out=str(out), **kw))
        finally:
            build_cache.create_teacher = original
    else:
        run(BuildConfig(data=(str(shard_dir / "shard-*.tar"),), out=str(out), **kw))
    return cache_digests(out)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_equals_golden(case, golden, tmp_path, tiny_bert_tokenizer_dir):
    write_shards(tmp_path / "shards")
    got = build_case(case, tmp_path / "shards", tmp_path / "cache", tiny_bert_tokenizer_dir)
    want = golden["cases"][case]
    assert sorted(got) == sorted(want), "array names differ from the golden cache"
    exact_floats = golden["environment"] == environment()
    for name, w in want.items():
        g = got[name]
        assert (g["shape"], g["dtype"]) == (w["shape"], w["dtype"]), name
        if "nan_count" in w and not exact_floats:
            assert g["nan_count"] == w["nan_count"], name
            assert g["sum"] == pytest.approx(w["sum"], rel=1e-3, abs=1e-3), name
        else:
            assert g["sha256"] == w["sha256"], f"{case}: array {name!r} differs from the golden cache"


def _regenerate() -> None:
    """Rebuild every case and rewrite the golden file (run from the repository root)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_shards(tmp_path / "shards")
        tok = conftest._write_tiny_bert_tokenizer(tmp_path / "tok")
        cases = {c: build_case(c, tmp_path / "shards", tmp_path / c, tok) for c in sorted(CASES)}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    lines = [f' "environment": {json.dumps(environment(), sort_keys=True)},', ' "cases": {']
    for i, (case, arrays) in enumerate(sorted(cases.items())):
        lines.append(f"  {json.dumps(case)}: {{")
        rows = [f"   {json.dumps(n)}: {json.dumps(d, sort_keys=True)}" for n, d in sorted(arrays.items())]
        lines.append(",\n".join(rows))
        lines.append("  }" + ("," if i < len(cases) - 1 else ""))
    GOLDEN.write_text("{\n" + "\n".join(lines) + "\n }\n}\n")  # one line per array: readable diffs
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    _regenerate()
