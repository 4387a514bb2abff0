"""Issue 13, data safety: a truncated shard reports the key whose member is cut and keeps every complete sample;
PIL's lenient truncated-image flag is reset before any decode; shard identity is content + path under the data root,
so two splits' ``shard-000000.tar`` are never confused."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import good_sample, write_samples
from PIL import Image, ImageFile

from mcad_cache.data import iter_samples
from mcad_cache.data.decode import DecodePolicy, decode_image
from mcad_cache.data.identity import data_root, shard_records, shard_records_diff
from mcad_cache.data.skips import SampleSkip
from mcad_cache.data.tar import scan_shard
from mcad_cache.data.verify import verify_shards


@pytest.mark.parametrize("member", ["k2.json", "k2.png"])
def test_truncated_shard_names_the_cut_key_and_keeps_complete_samples(tmp_path, member):
    """Old code, cut inside k2.json: k1 (complete) was dropped and reported as the cut sample; k2 was not named."""
    path = write_samples(tmp_path / "t.tar", [good_sample(k) for k in ("k0", "k1", "k2")])
    cut = next(m for m in scan_shard(str(path)).members if m.name == member)
    with open(path, "r+b") as f:
        f.truncate(cut.offset + 3)
    samples = [(s.key, s.skip) for s in iter_samples(str(path))]
    assert samples == [("k0", None), ("k1", None), ("k2", "truncated_shard")]
    report = verify_shards([str(path)], policy=DecodePolicy())
    shard = report.shards[0]
    assert shard.truncated and shard.cut_key == "k2" and shard.last_good_key == "k1" and report.num_ok == 2


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def test_decode_resets_a_lenient_pil_flag(caplog):
    """Old code: with ``LOAD_TRUNCATED_IMAGES = True`` a truncated PNG decoded with grey fill (only a warning)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(SampleSkip) as err:
            decode_image(_truncated_png(), policy=DecodePolicy())
        assert err.value.reason == "decode_error" and ImageFile.LOAD_TRUNCATED_IMAGES is False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert any("LOAD_TRUNCATED_IMAGES" in r.getMessage() for r in caplog.records)


def _import_like(root: Path, seed: int) -> list[str]:
    """Two splits, each with a ``shard-000000.tar``, and an importer's index.json at ``root``."""
    paths = []
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        keys = [f"{split}{i}" for i in range(2)]
        paths.append(str(write_samples(root / split / "shard-000000.tar", [good_sample(k, seed + 1) for k in keys])))
    (root / "index.json").write_text(json.dumps({"format": "mcad-cache-shards"}))
    return paths


def test_shard_identity_is_content_and_path_under_the_data_root(tmp_path):
    """Old code compared by file name: a cache built on train was accepted for test (both ``shard-000000.tar``)."""
    train, test = _import_like(tmp_path / "a", seed=0)
    assert data_root([train]) == tmp_path / "a" / "train" and data_root([train, test]) == tmp_path / "a"
    recorded = shard_records([train])
    assert recorded[0]["path"] == "train/shard-000000.tar" and recorded[0]["name"] == "shard-000000.tar"
    assert shard_records_diff(recorded, shard_records([train])) == []
    lines = shard_records_diff(recorded, shard_records([test]))
    assert len(lines) == 2 and lines[0].startswith("train/shard-000000.tar (sha256 ")
    assert lines[1].startswith("test/shard-000000.tar (sha256 ") and "in the run's data, not in the cache" in lines[1]
    moved = tmp_path / "moved"  # same content elsewhere: still the same data
    shutil.copytree(tmp_path / "a", moved)
    assert shard_records_diff(recorded, shard_records([str(moved / "train" / "shard-000000.tar")])) == []
    other_train, _ = _import_like(tmp_path / "b", seed=1)  # another import, same keys, same names
    (line,) = shard_records_diff(recorded, shard_records([other_train]))
    assert line.startswith("train/shard-000000.tar: content differs")


def test_token_lengths_and_truncation_counts(tiny_bert_tokenizer_dir):
    """Old code: nothing counted truncated captions (docs/data.md said the build did)."""
    import open_clip
    from transformers import AutoTokenizer

    from mcad_cache.data.truncation import compare_truncation, token_lengths, truncation_stats

    texts = ["a dog", "a photo of a dog " * 20]
    clip_tok = open_clip.get_tokenizer("ViT-B-32")
    clip_len = token_lengths(clip_tok, texts)
    ids = clip_tok(texts)  # the reference: the truncated ids hold <eot> (49407) only if the caption fits
    assert clip_len.tolist()[0] == int((ids[0] != 0).sum()) and clip_len[1] > 77 and int(ids[1, -1]) == 49407
    bert = AutoTokenizer.from_pretrained(str(tiny_bert_tokenizer_dir))
    bert_len = token_lengths(bert, texts)
    assert bert_len[0] == len(bert("a dog")["input_ids"]) and bert_len[1] > 16
    assert token_lengths(object(), texts) is None  # unknown tokenizer: nothing counted
    stats = truncation_stats(np.asarray([5, 20, 77, 78]), context_length=77)
    assert stats["num_truncated"] == 1 and stats["share_truncated"] == 0.25 and stats["max_tokens"] == 78
    share, message = compare_truncation(
        np.asarray([5, 40, 90]), np.asarray([5, 40, 90]), teacher_context=77, student_context=32
    )
    assert share == pytest.approx(1 / 3) and "student cuts 2 at 32" in message and "teacher cuts 1 at 77" in message
    assert compare_truncation(np.asarray([5]), np.asarray([5]), teacher_context=77, student_context=32)[1] is None
