"""``verify_shards`` and the ``mcad-cache data import|verify`` commands on tiny shards."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from mcad_cache.cli.main import app
from mcad_cache.data.tar import scan_shard
from mcad_cache.data.verify import verify_shards
from tests.data_fixtures import caption_json, good_sample, image_bytes, write_members, write_samples

runner = CliRunner()
PNG = image_bytes("RGB", (32, 24))


def _modes_shard(path: Path) -> Path:
    return write_samples(
        path, [good_sample(f"m{i}", 1 + i % 3, mode=m) for i, m in enumerate(("RGB", "RGBA", "L", "P", "LA"))]
    )


def test_clean_shards_are_ok(tmp_path):
    _modes_shard(tmp_path / "a.tar")
    write_samples(tmp_path / "b.tar", [good_sample("j0", 2, fmt="JPEG")])
    report = verify_shards(str(tmp_path / "*.tar"))
    d = report.to_dict()
    assert report.ok and d["num_samples"] == 6 and d["num_ok"] == 6
    assert d["image_modes"] == {"L": 1, "LA": 1, "P": 1, "RGB": 2, "RGBA": 1}
    assert d["captions_per_sample"] == {"1": 2, "2": 3, "3": 1} and d["num_captions"] == 11
    assert [s["last_good_key"] for s in d["shards"]] == ["m4", "j0"]


def test_every_problem_is_reported(tmp_path):
    a = write_members(
        tmp_path / "a.tar",
        [
            ("ok.png", PNG),
            ("ok.txt", b"fine"),
            ("split.png", PNG),
            ("mid.png", PNG),
            ("mid.txt", b"m"),
            ("split.txt", b"s"),
            ("dup.png", PNG),
            ("dup.txt", b"d"),
            ("dup.txt", b"again"),
            ("UPPER.PNG", PNG),
            ("UPPER.txt", b"u"),
            ("dotted.v2.png", PNG),
            ("dotted.txt", b"x"),
            ("noext", b"?"),
            ("cross.png", PNG),
            ("cross.json", caption_json("c")),
        ],
    )
    b = write_samples(tmp_path / "b.tar", [good_sample("cross"), good_sample("b1"), good_sample("b2")])
    cut = next(m for m in scan_shard(str(b)).members if m.name == "b2.png")
    with open(b, "r+b") as f:
        f.truncate(cut.offset + 5)
    report = verify_shards([str(a), str(b)])
    d = report.to_dict()
    assert not report.ok
    nonzero = {r: n for r, n in d["counts"].items() if n}
    assert nonzero == {"split_sample": 1, "duplicate_key": 2, "missing_image": 2, "truncated_shard": 1}
    assert d["unrecognised_members"] == 3
    why = {p["key"]: p["detail"] for p in d["problems"]["unrecognised_member"]}
    assert why == {"UPPER.PNG": "upper-case extension", "dotted.v2.png": "dot inside the name", "noext": "no extension"}
    dup = {(p["shard"], p["key"]) for p in d["problems"]["duplicate_key"]}
    assert dup == {(str(a), "dup"), (str(b), "cross")}
    shard_b = d["shards"][1]
    assert shard_b["truncated"] and shard_b["last_good_key"] == "b1"
    assert d["num_ok"] == 4  # ok, mid, cross (first occurrence, in a) and b1 (b)


def test_cli_verify_exit_codes_and_json(tmp_path):
    _modes_shard(tmp_path / "good.tar")
    out = tmp_path / "v.json"
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "good.tar"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["ok"] is True
    write_members(tmp_path / "bad.tar", [("x.png", PNG)])
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "{good,bad}.tar")])
    assert result.exit_code == 1
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "none-*.tar")])
    assert result.exit_code == 1


def test_cli_import_then_verify(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (i * 40, 0, 0)).save(root / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "captions": [f"image {i}"] * (1 + i % 2), "split": "train"})
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"samples_per_shard": 2, "image_size_px": 16}))
    out = tmp_path / "shards"
    result = runner.invoke(
        app,
        [
            "data",
            "import",
            "--source",
            "folder",
            "--root",
            str(root),
            "--annotations",
            str(tmp_path / "caps.jsonl"),
            "--out",
            str(out),
            "--config",
            str(cfg),
        ],
    )
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [2, 2, 1]
    assert index["config"]["image_size_px"] == 16 and index["config"]["samples_per_shard"] == 2
    result = runner.invoke(app, ["data", "verify", str(out / "train" / "shard-{000000..000002}.tar")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "import", "--source", "nope", "--out", str(out)])
    assert result.exit_code == 2 and "'nope' is not one of" in result.output  # refused at parse time
