"""Importers: Karpathy JSON round trip (7, 4 and 1 captions), folder JSONL/CSV, openclipart captions and splits,
deterministic shards and index, image re-encoding."""

from __future__ import annotations

import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcad_cache.config import ImportConfig
from mcad_cache.data import DecodePolicy, ShardIndex, iter_samples
from mcad_cache.data.importers import make_key, reencode_image, split_of
from mcad_cache.demo.openclipart import (
    ClipartMeta,
    build_captions,
    fetch_openclipart,
    is_junk,
    list_items,
    name_words,
    read_svg_meta,
)
from mcad_cache.errors import DataSourceError
from mcad_cache.hashing import file_sha256
from mcad_cache.pipelines import data_import
from tests.data_fixtures import image_bytes


def _save(path: Path, mode="RGB", size=(48, 32), color=(10, 200, 30), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt)
    return path


KARPATHY_CAPTIONS = {
    "img_a": [f"a photo number {j} of a dog" for j in range(7)],
    "img_b": ["two cats", "  two   cats on a sofa ", "a sofa", "cats sleeping"],
    "img_c": ["a single caption"],
}


@pytest.fixture()
def karpathy(tmp_path):
    root = tmp_path / "images"
    images = []
    for i, (name, caps) in enumerate(KARPATHY_CAPTIONS.items()):
        _save(root / "val2014" / f"{name}.jpg", fmt="JPEG", size=(640, 480))
        split = ["train", "restval", "test"][i]
        images.append(
            {
                "filepath": "val2014",
                "filename": f"{name}.jpg",
                "split": split,
                "imgid": i,
                "cocoid": 100 + i,
                "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
            }
        )
    images.append(
        {
            "filepath": "val2014",
            "filename": "gone.jpg",
            "split": "val",
            "imgid": 3,
            "sentences": [{"raw": "missing file"}],
        }
    )
    images.append(
        {
            "filepath": "val2014",
            "filename": "img_a.jpg",
            "split": "val",
            "imgid": 4,
            "sentences": [{"raw": "same file again"}],
        }
    )
    images.append(
        {"filepath": "val2014", "filename": "nocap.jpg", "split": "val", "imgid": 5, "sentences": [{"raw": " ... "}]}
    )
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return ann, root


def test_karpathy_round_trip_keeps_every_caption(karpathy, tmp_path):
    ann, root = karpathy
    out = tmp_path / "out"
    report = data_import.run(
        ImportConfig(
            source="karpathy", annotations=str(ann), root=str(root), out=str(out), samples_per_shard=2, image_size_px=64
        )
    )
    assert report["kept_per_split"] == {"test": 1, "train": 2}  # restval counts as train
    assert report["dropped"] == {"duplicate_key": 1, "empty_caption": 1, "missing_image": 1}
    assert report["captions_per_image"] == {"1": 1, "4": 1, "7": 1}
    samples = {s.key: s for s in iter_samples(str(out / "*" / "shard-*.tar"))}
    expected = {k: [" ".join(c.split()) for c in caps] for k, caps in KARPATHY_CAPTIONS.items()}
    assert {k: s.captions for k, s in samples.items()} == expected
    assert all(s.skip is None and max(s.image.size) == 64 for s in samples.values())
    index = json.loads((out / "index.json").read_text())
    train = index["splits"]["train"]
    assert train["num_samples"] == 2 and [s["num_samples"] for s in train["shards"]] == [2]
    assert all(s["sha256"] == file_sha256(out / s["path"]) for s in train["shards"])
    meta = json.loads(ShardIndex(str(out / "*" / "*.tar")).read_bytes("img_b", "json"))
    assert meta["cocoid"] == 101 and meta["split"] == "restval" and len(meta["captions"]) == 4


def test_import_is_deterministic(karpathy, tmp_path):
    ann, root = karpathy
    digests = []
    for name, workers in (("one", 1), ("two", 2)):  # a process pool gives the same bytes
        data_import.run(
            ImportConfig(
                source="karpathy",
                annotations=str(ann),
                root=str(root),
                out=str(tmp_path / name),
                samples_per_shard=1,
                image_size_px=32,
                workers=workers,
            )
        )
        index = json.loads((tmp_path / name / "index.json").read_text())
        digests.append([(s["path"], s["sha256"]) for sp in index["splits"].values() for s in sp["shards"]])
    assert digests[0] == digests[1] and len(digests[0]) == 3


def test_karpathy_needs_annotations(tmp_path):
    with pytest.raises(ValueError, match="annotations"):
        data_import.run(ImportConfig(source="karpathy", out=str(tmp_path)))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(DataSourceError):
        data_import.run(ImportConfig(source="karpathy", annotations=str(bad), root=str(tmp_path), out=str(tmp_path)))


def test_folder_jsonl_and_csv(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "a.png", mode="RGBA", color=(255, 0, 0, 0))
    _save(root / "sub" / "b.jpg", fmt="JPEG")
    _save(root / "c.png")
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"image": "a.png", "captions": ["red square", "a transparent thing"], "split": "val"},
                {"file": "sub/b.jpg", "captions": "a string is one caption"},
                {"image": "c.png", "caption": "   "},
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"
    report = data_import.run(
        ImportConfig(source="folder", annotations=str(jsonl), root=str(root), out=str(out), image_size_px=0)
    )
    assert report["kept_per_split"] == {"train": 1, "val": 1} and report["dropped"] == {"empty_caption": 1}
    got = {s.key: (s.captions, s.image.getpixel((0, 0))) for s in iter_samples(str(out / "*" / "*.tar"))}
    assert got["a"] == (["red square", "a transparent thing"], (255, 255, 255))  # alpha kept, composited on read
    assert got["sub__b"][0] == ["a string is one caption"]
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text('image,caption\na.png,first\nc.png,"third, with comma"\na.png,second\n')
    data_import.run(ImportConfig(source="folder", annotations=str(csv_path), root=str(root), out=str(out)))
    got = {s.key: s.captions for s in iter_samples(str(out / "train" / "*.tar"))}
    assert got == {"a": ["first", "second"], "c": ["third, with comma"]}
    assert not list(out.glob("val/*.tar"))  # the earlier import's val shards are gone


def test_reencode_keeps_alpha_and_shrinks():
    arr = np.zeros((100, 300, 4), np.uint8)
    arr[:, :150] = (0, 0, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    data, ext = reencode_image(buf.getvalue(), max_side_px=60, policy=DecodePolicy())
    im = Image.open(io.BytesIO(data))
    assert ext == "png" and im.mode == "RGBA" and im.size == (60, 20)
    assert im.getpixel((5, 10)) == (0, 0, 255, 255) and im.getpixel((55, 10))[3] == 0
    jpg, ext = reencode_image(image_bytes("RGB", (400, 200), fmt="JPEG"), max_side_px=100, policy=DecodePolicy())
    assert ext == "jpg" and Image.open(io.BytesIO(jpg)).size == (100, 50)
    small = image_bytes("RGB", (20, 10))
    assert reencode_image(small, max_side_px=0, policy=DecodePolicy()) == (small, "png")


def test_keys_and_splits_are_deterministic():
    assert make_key("a.b/c d+") == "a_b_c_d"
    splits = Counter(split_of(f"g{i}", seed=0, test_fraction=0.125, val_fraction=0.0625) for i in range(4000))
    assert abs(splits["test"] / 4000 - 0.125) < 0.02 and abs(splits["val"] / 4000 - 0.0625) < 0.015
    assert split_of("x", seed=1, test_fraction=0.5, val_fraction=0.1) == split_of(
        "x", seed=1, test_fraction=0.5, val_fraction=0.1
    )


SVG = """<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <metadata><rdf:RDF><cc:Work rdf:about="">
  <dc:title>{title}</dc:title><dc:description>{desc}</dc:description>
  <dc:subject><rdf:Bag>{kws}</rdf:Bag></dc:subject>
  <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
 </cc:Work></rdf:RDF></metadata></svg>"""


def _clipart(data_dir: Path, rel: str, *, title="", desc="", kws=(), creator="Jane Doe", png=True):
    svg = data_dir / "svg" / f"{rel}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(
        SVG.format(title=title, desc=desc, creator=creator, kws="".join(f"<rdf:li>{k}</rdf:li>" for k in kws))
    )
    if png:
        _save(data_dir / "png" / f"{rel}.png", mode="RGBA", size=(300, 150), color=(0, 0, 0, 0))


def test_svg_meta_ignores_creator_titles(tmp_path):
    _clipart(tmp_path, "animals/frog", title="2 dead frogs", desc="nothing more", kws=("frog", "swamp"))
    meta = read_svg_meta(tmp_path / "svg" / "animals" / "frog.svg")
    assert (meta.title, meta.description, meta.keywords, meta.creator) == (
        "2 dead frogs",
        "nothing more",
        ["frog", "swamp"],
        "Jane Doe",
    )


def test_caption_rules():
    stats = Counter()
    meta = ClipartMeta(
        title="gramastar",
        description="mail me: joe@example.com",
        keywords=["hash", "star", ""],
        creator="Joe Bloggs (joe@example.com)",
    )
    caps = build_captions(
        meta, "star_75pt28step_joe_blo_01", frequent_titles={"gramastar"}, frequent_descriptions=set(), stats=stats
    )
    assert caps == ["star pt step", "star"]
    assert stats["title_collection"] == 1 and stats["description_junk"] == 1
    assert is_junk("HASH(0x862bbb8)") and is_junk("see http://x.org") and is_junk("www.example.com")
    assert is_junk("a@b.de") and not is_junk("a red car")
    assert name_words("MatieresToxiques") == "matieres toxiques"
    assert name_words("eau_non_potable_yves_gui_01", creator="yves GUILLOU") == "eau non potable"
    caps = build_captions(
        ClipartMeta(title="Australia - Tasmania", keywords=["flag"]),
        "australia_tasmania",
        frequent_titles=set(),
        frequent_descriptions=set(),
        stats=stats,
    )
    assert caps == ["Australia - Tasmania", "flag"]  # the file-name words repeat the title


def test_openclipart_items_drop_collections_and_junk(tmp_path):
    data = tmp_path / "oc"
    for i in range(4):
        _clipart(data, f"shapes/star_{i}", title="gramastar", kws=("stars",))
    _clipart(data, "animals/frog_jane_do_01", title="Green frog", desc="HASH(0x862bbb8)", kws=("frog",))
    _clipart(data, "icons/70a001", title="gramastar")  # nothing informative left
    _clipart(data, "icons/contact", title="contact joe@example.com", desc="http://example.com")
    _clipart(data, "food/ghost", title="Ghost pear", png=False)
    stats, drops = Counter(), []
    items = list_items(data, seed=0, stats=stats, drops=drops, collection_min_count=3)
    by_key = {it.key: it for it in items}
    assert by_key["animals__frog_jane_do_01"].captions == ["Green frog", "frog"]
    assert by_key["shapes__star_0"].captions == ["star", "stars"]
    assert sorted((r, k) for r, k, _ in drops) == [
        ("missing_image", "food__ghost"),
        ("no_informative_caption", "icons__70a001"),
    ]
    assert "icons__contact" in by_key and by_key["icons__contact"].captions == ["contact"]
    assert all("@" not in c and "http" not in c for it in items for c in it.captions)
    stars = {by_key[f"shapes__star_{i}"].split for i in range(4)}
    assert len(stars) == 1  # same first caption, same split


def test_openclipart_pipeline_reuses_present_data(tmp_path):
    data = tmp_path / "oc"
    _clipart(data, "animals/frog", title="Green frog")
    _clipart(data, "animals/toad", title="Brown toad")
    assert fetch_openclipart(data) == data  # present: no apt-get
    out = tmp_path / "out"
    report = data_import.run(ImportConfig(source="openclipart", root=str(data), out=str(out), image_size_px=100))
    assert report["num_kept"] == 2 and report["num_candidates"] == 2
    samples = list(iter_samples(str(out / "*" / "*.tar")))
    assert sorted(s.key for s in samples) == ["animals__frog", "animals__toad"]
    assert all(s.source_mode == "RGBA" and s.image.size == (100, 50) for s in samples)


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport os, sys, pathlib, shutil\n{body}\n")
    path.chmod(0o755)


def test_fetch_runs_apt_get_and_dpkg_when_absent(tmp_path, monkeypatch):
    """Fake apt-get (fails until 'update' ran) and dpkg on PATH: the fetch retries after update, unpacks with
    paths that work from any working directory, and reuses what it fetched."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    sample_png = _save(tmp_path / "sample.png", mode="RGBA", color=(1, 2, 3, 255))
    _fake_tool(
        bin_dir,
        "apt-get",
        f"""
log = open({str(log)!r}, "a"); log.write(" ".join(sys.argv[1:]) + "\\n")
flag = pathlib.Path({str(tmp_path / "updated")!r})
if sys.argv[1] == "update":
    flag.touch(); sys.exit(0)
if not flag.exists():
    sys.exit(100)
for pkg in sys.argv[2:]:
    pathlib.Path(pkg + "_1.0_all.deb").write_text(pkg)
""",
    )
    _fake_tool(
        bin_dir,
        "dpkg",
        f"""
open({str(log)!r}, "a").write("dpkg " + " ".join(sys.argv[1:]) + "\\n")
deb, dest = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
kind = "png" if "png" in deb.read_text() else "svg"
out = dest / "usr/share/openclipart" / kind / "animals"
out.mkdir(parents=True, exist_ok=True)
if kind == "png":
    shutil.copy({str(sample_png)!r}, out / "frog.png")
else:
    (out / "frog.svg").write_text({SVG.format(title="Green frog", desc="", kws="", creator="x")!r})
""",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    data_dir = fetch_openclipart("rel_root")
    assert data_dir == Path("rel_root/extracted/usr/share/openclipart")
    calls = log.read_text().splitlines()
    assert calls[:3] == [
        "download openclipart-png openclipart-svg",
        "update",
        "download openclipart-png openclipart-svg",
    ]
    assert sum(c.startswith("dpkg -x") for c in calls) == 2
    assert fetch_openclipart("rel_root") == data_dir and len(log.read_text().splitlines()) == len(calls)
    report = data_import.run(ImportConfig(source="openclipart", root="rel_root", out="out", image_size_px=64))
    assert report["num_kept"] == 1


def test_fetch_failure_is_a_data_source_error(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "apt-get", "sys.stderr.write('E: no network'); sys.exit(100)")
    _fake_tool(bin_dir, "dpkg", "sys.exit(0)")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataSourceError, match="no network"):
        fetch_openclipart(tmp_path / "root")
