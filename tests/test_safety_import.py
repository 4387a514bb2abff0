"""Issue 13, importer safety: a rerun deletes only its own earlier shards; a string ``sentences`` is one caption; an
import that keeps nothing (wrong root, wrong columns, wrong schema) or drops too much exits 1 with the likely cause.
CLI cases run through the real typer app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mcad_cache.cli.main import app
from mcad_cache.config import ImportConfig
from mcad_cache.data import iter_samples
from mcad_cache.errors import DataSourceError, OutputPathError
from mcad_cache.pipelines import data_import

runner = CliRunner()


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (10 * i, 100, 30)).save(root / name, "PNG")


def _karpathy(tmp_path: Path, sentences: list) -> tuple[Path, Path]:
    root = tmp_path / "images"
    names = [f"img{i}.png" for i in range(len(sentences))]
    _images(root, names)
    doc = {"images": [{"filename": n, "split": "train", "sentences": s} for n, s in zip(names, sentences, strict=True)]}
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps(doc))
    return ann, root


def _import(args: list[str]):
    return runner.invoke(app, ["data", "import", "--workers", "1", "--image-size-px", "32", *args])


def test_rerun_removes_only_its_own_shards_and_keeps_a_sibling_dataset(tmp_path):
    """Old code: ``glob('*/shard-*.tar')`` under --out deleted a sibling dataset's shards, exit 0."""
    ann, root = _karpathy(tmp_path, [[{"raw": "a red square"}], [{"raw": "a blue square"}]])
    out = tmp_path / "datasets"
    sibling = out / "other_dataset" / "shard-000000.tar"
    sibling.parent.mkdir(parents=True)
    sibling.write_bytes(b"someone else's shard")
    notes = out / "notes.txt"
    notes.write_text("mine")
    args = ["--source", "karpathy", "--annotations", str(ann), "--root", str(root), "--out", str(out)]
    for _ in range(2):  # the second run replaces the first run's shards
        result = _import(args)
        assert result.exit_code == 0, result.output
    assert sibling.read_bytes() == b"someone else's shard" and notes.read_text() == "mine"
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.tar")) == [
        "other_dataset/shard-000000.tar",
        "train/shard-000000.tar",
    ]


def test_import_refuses_to_overwrite_shards_it_did_not_write(tmp_path):
    ann, root = _karpathy(tmp_path, [[{"raw": "a red square"}]])
    out = tmp_path / "datasets"
    foreign = out / "train" / "shard-000000.tar"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not from an import")
    cfg = ImportConfig(source="karpathy", annotations=str(ann), root=str(root), out=str(out), workers=1)
    with pytest.raises(OutputPathError, match="no earlier import"):
        data_import.run(cfg)
    assert foreign.read_bytes() == b"not from an import"


def test_karpathy_string_sentences_is_one_caption(tmp_path):
    """Old code: a string ``sentences`` became one caption per character."""
    ann, root = _karpathy(tmp_path, ["a dog on a sofa", [{"raw": "two cats"}, "a plain string caption"]])
    out = tmp_path / "out"
    data_import.run(ImportConfig(source="karpathy", annotations=str(ann), root=str(root), out=str(out), workers=1))
    captions = {s.key: s.captions for s in iter_samples(str(out / "train" / "*.tar"))}
    assert captions == {"img0": ["a dog on a sofa"], "img1": ["two cats", "a plain string caption"]}


@pytest.mark.parametrize(
    ("case", "cause"),
    [("wrong_root", "is --root the folder"), ("wrong_schema", "no caption found"), ("empty", "no entries")],
)
def test_karpathy_import_that_keeps_nothing_exits_1(tmp_path, case, cause):
    ann, root = _karpathy(tmp_path, [[{"raw": "a red square"}], [{"raw": "a blue square"}]])
    if case == "wrong_root":
        root = tmp_path
    elif case == "wrong_schema":  # captions under another field name
        doc = json.loads(ann.read_text())
        for img in doc["images"]:
            img["captions"] = img.pop("sentences")
        ann.write_text(json.dumps(doc))
    else:
        ann.write_text(json.dumps({"images": []}))
    out = tmp_path / "out"
    result = _import(["--source", "karpathy", "--annotations", str(ann), "--root", str(root), "--out", str(out)])
    assert result.exit_code == 1
    assert cause in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3  # one message (rich may wrap)


def test_folder_import_with_wrong_caption_column_exits_1(tmp_path):
    root = tmp_path / "images"
    _images(root, ["a.png", "b.png"])
    ann = tmp_path / "captions.csv"
    ann.write_text("image,text\na.png,a red square\nb.png,a blue square\n")  # "text" is not a caption column
    out = tmp_path / "out"
    result = _import(["--source", "folder", "--annotations", str(ann), "--root", str(root), "--out", str(out)])
    assert result.exit_code == 1 and "missing_caption x2" in result.output and "caption field" in result.output
    assert json.loads((out / "import_report.json").read_text())["num_kept"] == 0  # the report is still written


def test_drop_share_is_configurable(tmp_path):
    ann, root = _karpathy(tmp_path, [[{"raw": "kept"}], [{"raw": "gone"}], [{"raw": "gone too"}]])
    (root / "img1.png").unlink()
    (root / "img2.png").unlink()
    out = tmp_path / "out"
    base = {"source": "karpathy", "annotations": str(ann), "root": str(root), "out": str(out), "workers": 1}
    with pytest.raises(DataSourceError, match=r"kept 1 of 3 candidates \(dropped 67%"):
        data_import.run(ImportConfig(**base))
    report = data_import.run(ImportConfig(**base, max_drop_share=0.7))
    assert report["num_kept"] == 1
