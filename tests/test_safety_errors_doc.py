"""docs/errors.md is checked here: every row of its first table runs through the real CLI and must exit with the
documented code and print one line containing the documented text (no traceback), touching nothing but its outputs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from data_fixtures import good_sample, write_samples
from PIL import Image
from typer.testing import CliRunner

from mcad_cache.cli.main import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| ([^|]+) \| `mcad-cache ([^`]+)` \| `([^`]+)` \| (\d+) \|$")


def doc_rows() -> list[tuple[str, str, str, int]]:
    rows = [m.groups() for m in map(ROW.match, DOC.read_text().splitlines()) if m]
    return [(what.strip(), cmd, text, int(code)) for what, cmd, text, code in rows]


def _scratch(tmp: Path) -> None:
    (tmp / "shards").mkdir()
    write_samples(tmp / "shards" / "shard-000000.tar", [good_sample("a"), good_sample("b")])
    (tmp / "images").mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.new("RGB", (32, 24), (40 * i, 90, 10)).save(tmp / "images" / name)
    images = [{"filename": n, "split": "train", "sentences": [{"raw": f"caption {n}"}]} for n in ("a.png", "b.png")]
    (tmp / "ann.json").write_text(json.dumps({"images": images}))
    wrong = [{"filename": n, "split": "train", "captions": ["no sentences field"]} for n in ("a.png", "b.png")]
    (tmp / "ann_captions.json").write_text(json.dumps({"images": wrong}))
    (tmp / "file").write_text("a plain file")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "notes.txt").write_text("a user's notes")


def _snapshot(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


def test_the_table_is_not_empty():
    assert len(doc_rows()) >= 10


@pytest.mark.parametrize(("what", "command", "text", "code"), doc_rows(), ids=[r[0] for r in doc_rows()])
def test_documented_mistake_gives_one_line(tmp_path, what, command, text, code):
    _scratch(tmp_path)
    before = _snapshot(tmp_path)
    args = shlex.split(command.replace("$TMP", str(tmp_path)))
    result = CliRunner().invoke(app, args)
    output = " ".join(result.output.split())  # rich wraps long lines at the terminal width
    assert result.exit_code == code, f"{what}: {result.output}"
    assert text.replace("$TMP", str(tmp_path)) in output, f"{what}: {result.output}"
    assert "Traceback" not in result.output and output.count("error:") == 1, f"{what}: {result.output}"
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, f"{what}: touched an input file"
    assert not [k for k in after if k not in before and not k.startswith(("out", "c/", "c.", "cache"))], what
