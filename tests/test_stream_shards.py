"""Shards as WebDataset users write them (issue 15, item 7): ``pipe:CMD`` and ``.tar.gz`` shards stream through
``data verify`` and ``build`` (the real CLI) and give the same report and the same cache arrays as the plain tars;
random access refuses a stream with one line."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import fake_teacher  # noqa: F401  (registers the "fake" teacher for the CLI runs)
import numpy as np
import pytest
import zarr
from distill_fixtures import make_shards
from test_build import write_shards
from typer.testing import CliRunner

from mcad_cache.cache import open_cache
from mcad_cache.cli.main import app
from mcad_cache.data.index import ShardIndex
from mcad_cache.data.tar import expand_shards, is_stream, scan_shard, shard_sha256
from mcad_cache.distill.chunks import ChunkDataset, iter_chunk_samples
from mcad_cache.errors import ConfigError, DataSourceError
from mcad_cache.hashing import file_sha256

runner = CliRunner()


@pytest.fixture(scope="module")
def three_forms(tmp_path_factory) -> dict[str, list[str]]:
    """The same two shards (with a decode error, a sample without captions and one that is no image) as plain tars,
    as ``pipe:cat`` commands (one brace pattern, expanded like WebDataset) and as ``.tar.gz`` files."""
    root = tmp_path_factory.mktemp("streams")
    write_shards(root / "plain")
    (root / "gz").mkdir()
    for tar in sorted((root / "plain").glob("*.tar")):
        with open(tar, "rb") as src, gzip.open(root / "gz" / f"{tar.name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return {
        "plain": [str(root / "plain" / "shard-*.tar")],
        "pipe": [f"pipe:cat {root / 'plain'}/shard-{{000..001}}.tar"],
        "gz": [str(root / "gz")],  # a folder stands for its .tar.gz files too
    }


def test_expand_and_identity(three_forms):
    plain, pipe, gz = (expand_shards(three_forms[k]) for k in ("plain", "pipe", "gz"))
    assert len(plain) == len(pipe) == len(gz) == 2
    assert pipe[0].startswith("pipe:cat ") and pipe[0].endswith("shard-000.tar") and gz[1].endswith(".tar.gz")
    assert not any(map(is_stream, plain)) and all(map(is_stream, pipe + gz))
    # identity: the sha256 of the uncompressed tar bytes, so all three forms are the same shard
    for a, b, c in zip(plain, pipe, gz, strict=True):
        assert file_sha256(a) == shard_sha256(b) == shard_sha256(c) == scan_shard(b).sha256
        assert file_sha256(c) != file_sha256(a)  # the .gz file itself differs: the identity is its content
    with pytest.raises(ValueError, match="no shard files match"):
        expand_shards(["/no/such/shards-*.tar.gz"])


def test_truncated_stream_is_reported_like_the_file(three_forms, tmp_path):
    data = Path(expand_shards(three_forms["plain"])[0]).read_bytes()
    for cut in (len(data) // 2, len(data) - 10240 + 100):  # inside a member; the end-of-archive block missing
        (tmp_path / "t.tar").write_bytes(data[:cut])
        file, stream = scan_shard(str(tmp_path / "t.tar")), scan_shard(f"pipe:cat {tmp_path / 't.tar'}")
        assert stream.truncated and file.truncated
        assert (stream.cut_key, [m.key for m in stream.members]) == (file.cut_key, [m.key for m in file.members])
    failed = scan_shard(f"pipe:cat {tmp_path / 'missing.tar'}")
    assert failed.unreadable and "exit 1" in failed.error
    with pytest.raises(DataSourceError, match="missing.tar.*cannot be read to its end"):
        shard_sha256(f"pipe:cat {tmp_path / 'missing.tar'}")


def _verify(shards: list[str], out: Path) -> dict:
    res = runner.invoke(app, ["data", "verify", *shards, "--json", str(out)])
    assert res.exit_code == 1, res.output  # the fixture's three bad samples
    report = json.loads(out.read_text())
    report.pop("time_s")
    for shard in report["shards"]:
        shard["path"] = Path(shard["path"].split()[-1]).name.removesuffix(".gz")
    for listed in report["problems"].values():
        for item in listed:
            item["shard"] = Path(item["shard"].split()[-1]).name.removesuffix(".gz")
            item["detail"] = re.sub(r"0x[0-9a-f]+", "0x", item["detail"])  # PIL's message holds an object address
    return report


def test_verify_report_is_the_same(three_forms, tmp_path):
    plain = _verify(three_forms["plain"], tmp_path / "plain.json")
    assert plain["num_samples"] == 12 and plain["counts"]["decode_error"] == 2
    assert _verify(three_forms["pipe"], tmp_path / "pipe.json") == plain
    assert _verify(three_forms["gz"], tmp_path / "gz.json") == plain


def _build(shards: list[str], out: Path) -> zarr.Group:
    args = ["build", "--teacher", "fake", "--out", str(out), "--k", "3", "--batch-size", "4", "--workers", "0"]
    res = runner.invoke(app, [*args, "--device", "cpu", *[a for s in shards for a in ("--data", s)]])
    assert res.exit_code == 0, res.output
    return zarr.open_group(str(out), mode="r")


def test_build_arrays_are_the_same(three_forms, tmp_path):
    plain = _build(three_forms["plain"], tmp_path / "plain.zarr")
    names = sorted(plain.array_keys())
    assert {"image_emb", "text_emb", "i2t_idx", "t2i_idx"} <= set(names)
    for form in ("pipe", "gz"):
        other = _build(three_forms[form], tmp_path / f"{form}.zarr")
        assert sorted(other.array_keys()) == names
        for name in names:
            np.testing.assert_array_equal(np.asarray(other[name][:]), np.asarray(plain[name][:]), err_msg=name)
        records = open_cache(tmp_path / f"{form}.zarr").fingerprint["data"]["shards"]
        assert [r["sha256"] for r in records] == [file_sha256(p) for p in expand_shards(three_forms["plain"])]


def test_sequential_readers_stream_random_access_refuses(three_forms):
    def read(shards):
        return [(s["key"], s["captions"], s["skip"]) for s in iter_chunk_samples(ChunkDataset(shards), workers=0)]

    plain, piped = read(three_forms["plain"]), read(three_forms["pipe"])
    assert piped == plain and len(plain) == 12  # what distill --candidates bank and eval read
    keys = ShardIndex(three_forms["gz"], keys_only=True)  # checking a cache's keys against the shards
    assert keys.keys() == ShardIndex(three_forms["plain"]).keys()
    with pytest.raises(ConfigError, match=r"is a stream .* --candidates bank"):
        ShardIndex(three_forms["pipe"])
    with pytest.raises(ConfigError, match="is a stream"):
        keys.read_image_bytes(keys.keys()[0])


def test_eval_of_a_cache_on_streamed_test_shards(tmp_path):
    plain = make_shards(tmp_path / "clean", num_samples=8, per_shard=4)  # eval refuses bad samples: clean shards
    for tar in plain:
        with open(tar, "rb") as src, gzip.open(f"{tar}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    forms = {"plain": plain, "pipe": [f"pipe:cat {p}" for p in plain], "gz": [f"{p}.gz" for p in plain]}
    _build(plain, tmp_path / "c.zarr")
    metrics = {}
    for form, shards in forms.items():
        out = tmp_path / f"{form}.json"
        data = [a for s in shards for a in ("--data", s)]
        res = runner.invoke(app, ["eval", "--model", str(tmp_path / "c.zarr"), *data, "--out", str(out), "--device",
                                  "cpu"])  # fmt: skip
        assert res.exit_code == 0, res.output
        metrics[form] = json.loads(out.read_text())["metrics"]
    assert metrics["plain"]["rsum"] > 0 and metrics["pipe"] == metrics["plain"] == metrics["gz"]


def test_distill_online_candidates_refuse_a_stream_in_one_line(tmp_path):
    plain = make_shards(tmp_path / "clean", num_samples=4, per_shard=4)
    _build(plain, tmp_path / "c.zarr")
    args = ["distill", "--data", f"pipe:cat {plain[0]}", "--cache", str(tmp_path / "c.zarr"), "--out",
            str(tmp_path / "run"), "--preset", "clip-kd", "--loss", '{"w_topk_t2i": 1.0}', "--k", "3",
            "--candidates", "online", "--student", "tiny", "--device", "cpu", "--workers", "0", "--steps", "1",
            "--batch-size", "2"]  # fmt: skip
    res = runner.invoke(app, args)
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "Traceback" not in text, res.output
    assert "is a stream" in text and "--candidates bank" in text, text


def test_distill_with_a_candidate_bank_streams_and_matches_the_plain_tars(tmp_path):
    plain = make_shards(tmp_path / "clean", num_samples=8, per_shard=4)
    _build(plain, tmp_path / "c.zarr")
    finals = {}
    for form, shards in {"plain": plain, "pipe": [f"pipe:cat {p}" for p in plain]}.items():
        args = ["distill", *[a for s in shards for a in ("--data", s)], "--cache", str(tmp_path / "c.zarr"), "--out",
                str(tmp_path / form), "--preset", "clip-kd", "--loss", '{"w_topk_t2i": 1.0}', "--k", "3",
                "--candidates", "bank", "--student", "tiny", "--device", "cpu", "--workers", "0", "--steps", "2",
                "--batch-size", "4", "--shuffle-buffer", "0"]  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        finals[form] = json.loads((tmp_path / form / "summary.json").read_text())["final"]
    assert finals["plain"]["topk_t2i_loss"] > 0 and finals["pipe"] == finals["plain"]
