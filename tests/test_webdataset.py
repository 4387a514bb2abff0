"""Shard reading: every skip reason with exact keys, truncation with the last good key, workers, collate, index."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader

from mcad_cache.data import (
    SKIP_REASONS,
    DecodePolicy,
    SampleDataset,
    ShardIndex,
    SkipReport,
    collate_samples,
    expand_shards,
    iter_samples,
)
from mcad_cache.data.tar import scan_shard
from mcad_cache.errors import DataError
from tests.data_fixtures import (
    caption_json,
    good_sample,
    image_bytes,
    png_header_only,
    write_members,
    write_samples,
)

PNG = image_bytes("RGB", (32, 24))


@pytest.fixture()
def bad_shards(tmp_path):
    """Two shards with one sample per skip reason (except shard-level ones) and a few good samples."""
    a = write_members(
        tmp_path / "a-000000.tar",
        [
            ("good1.png", PNG),
            ("good1.json", caption_json("one", "two", "three")),
            ("noimg.json", caption_json("x")),
            ("twoimg.png", PNG),
            ("twoimg.jpg", image_bytes(fmt="JPEG")),
            ("twoimg.txt", b"x"),
            ("nocap.png", PNG),
            ("badjson.png", PNG),
            ("badjson.json", b"{oops"),
            ("emptycap.png", PNG),
            ("emptycap.json", caption_json("", "...", " ")),
            ("corrupt.png", b"garbage"),
            ("corrupt.txt", b"a caption"),
            ("huge.png", png_header_only(20_000, 20_000)),
            ("huge.txt", b"a caption"),
            ("thin.png", png_header_only(4000, 10)),
            ("thin.txt", b"a caption"),
            ("split.png", PNG),
            ("good2.png", PNG),
            ("good2.txt", b"good two"),
            ("split.json", caption_json("s")),
            ("dup.png", PNG),
            ("dup.txt", b"d"),
            ("dup.png", PNG),
            ("upper.JPG", image_bytes(fmt="JPEG")),
            ("upper.txt", b"u"),
            ("cross.png", PNG),
            ("cross.txt", b"first"),
        ],
    )
    b = write_samples(tmp_path / "b-000000.tar", [good_sample("cross"), good_sample("good3", 2)])
    return a, b


EXPECTED = {
    "good1": None,
    "noimg": "missing_image",
    "twoimg": "multiple_images",
    "nocap": "missing_caption",
    "badjson": "caption_error",
    "emptycap": "empty_caption",
    "corrupt": "decode_error",
    "huge": "too_many_pixels",
    "thin": "extreme_aspect",
    "split": "split_sample",
    "good2": None,
    "dup": "duplicate_key",
    "upper": "missing_image",
    "cross": None,
}


def test_every_reason_with_exact_keys(bad_shards):
    a, b = bad_shards
    samples = list(iter_samples([str(a), str(b)]))
    got_a = {s.key: s.skip for s in samples if s.shard == str(a)}
    assert got_a == EXPECTED
    assert list(got_a) == list(EXPECTED)  # tar order, one entry per key
    got_b = [(s.key, s.skip) for s in samples if s.shard == str(b)]
    assert got_b == [("cross", "duplicate_key"), ("good3", None)]
    good = {s.key: s.captions for s in samples if s.skip is None}
    assert good == {
        "good1": ["one", "two", "three"],
        "good2": ["good two"],
        "cross": ["first"],
        "good3": ["caption 0 of good3", "caption 1 of good3"],
    }
    assert all(s.image.mode == "RGB" for s in samples if s.skip is None)
    assert all(s.image is None and s.captions == [] for s in samples if s.skip)
    report = SkipReport()
    for s in samples:
        report.add(s)
    assert report.num_ok == 4 and report.num_skipped == 12
    assert report.counts["missing_image"] == 2 and report.counts["duplicate_key"] == 2
    assert set(report.counts) == set(SKIP_REASONS)
    assert (str(b), "cross", "duplicate_key") in report.examples


def test_strict_names_shard_key_reason(bad_shards):
    a, _ = bad_shards
    with pytest.raises(DataError) as err:
        list(iter_samples(str(a), strict=True))
    assert err.value.reason == "missing_image" and err.value.key == "noimg" and err.value.shard == str(a)
    assert "noimg" in str(err.value) and "missing_image" in str(err.value)
    report = SkipReport(strict=True)
    with pytest.raises(DataError):
        for s in iter_samples(str(a)):
            report.add(s)
    assert report.num_ok == 1


def _three_samples(tmp_path):
    return write_samples(tmp_path / "t.tar", [good_sample(k) for k in ("k0", "k1", "k2")])


@pytest.mark.parametrize("cut", ["mid_member", "at_boundary", "mid_header"])
def test_truncated_shard_reports_last_good_key(tmp_path, cut):
    path = _three_samples(tmp_path)
    members = scan_shard(str(path)).members
    k2_png = next(m for m in members if m.name == "k2.png")
    size = {"mid_member": k2_png.offset + 10, "at_boundary": k2_png.offset, "mid_header": k2_png.offset - 300}[cut]
    with open(path, "r+b") as f:
        f.truncate(size)
    samples = list(iter_samples(str(path)))
    assert [(s.key, s.skip) for s in samples] == [("k0", None), ("k1", None), ("k2", "truncated_shard")]
    assert "last good key 'k1'" in samples[-1].detail


def test_cut_exactly_after_a_sample_drops_it_as_unprovable(tmp_path):
    path = _three_samples(tmp_path)
    end = max(m.offset + m.size for m in scan_shard(str(path)).members)
    with open(path, "r+b") as f:
        f.truncate((end + 511) // 512 * 512)  # all data present, end-of-archive blocks missing
    assert [(s.key, s.skip) for s in iter_samples(str(path))][-1] == ("k2", "truncated_shard")


def test_corrupt_header_mid_file_is_truncation(tmp_path):
    path = _three_samples(tmp_path)
    k1 = next(m for m in scan_shard(str(path)).members if m.name == "k1.png")  # second member of k1
    with open(path, "r+b") as f:
        f.seek(k1.offset - 512)
        f.write(b"\x01" * 100)
    samples = list(iter_samples(str(path)))
    assert [(s.key, s.skip) for s in samples] == [("k0", None), ("k1", "truncated_shard")]
    assert "corrupt tar header" in samples[-1].detail


def test_unreadable_and_missing_shards(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"")
    assert [(s.key, s.skip) for s in iter_samples(str(bad))] == [("", "unreadable_shard")]
    with pytest.raises(ValueError, match="no shard files match"):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_expand_shards_braces_globs_dedup(tmp_path):
    for i in range(3):
        _three_samples(tmp_path).rename(tmp_path / f"s-{i:06d}.tar")
    got = expand_shards([str(tmp_path / "s-{000000..000001}.tar"), str(tmp_path / "s-*.tar")])
    assert got == [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    assert expand_shards(tmp_path) == got  # a folder: the .tar files inside it


def test_decode_images_false_yields_bytes(tmp_path):
    path = _three_samples(tmp_path)
    s = next(iter_samples(str(path), decode_images=False))
    assert isinstance(s.image, bytes) and s.image.startswith(b"\x89PNG") and s.source_mode == "RGB"


def test_decode_images_false_still_checks_headers(bad_shards):
    a, _ = bad_shards
    got = {s.key: s.skip for s in iter_samples(str(a), decode_images=False)}
    assert got["huge"] == "too_many_pixels" and got["thin"] == "extreme_aspect" and got["corrupt"] == "decode_error"


def _to_tensor(im):
    return torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sample_dataset_workers_see_each_sample_once(bad_shards, tmp_path, num_workers):
    a, b = bad_shards
    c = write_samples(tmp_path / "c-000000.tar", [good_sample(f"c{i}") for i in range(3)])
    ds = SampleDataset([str(a), str(b), str(c)], image_transform=_to_tensor)
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate_samples)
    report, keys = SkipReport(), []
    for batch in loader:
        report.add_batch(batch)
        keys += batch["key"]
        if batch["image"] is not None:
            assert batch["image"].shape == (len(batch["key"]), 3, 24, 32) and batch["image"].dtype == torch.uint8
    assert sorted(keys) == ["c0", "c1", "c2", "cross", "good1", "good2", "good3"]
    assert report.num_skipped == 12 and report.counts["duplicate_key"] == 2


def test_sample_dataset_splits_shards_across_ranks_and_workers(tmp_path):
    paths = [write_samples(tmp_path / f"s-{i}.tar", [good_sample(f"k{i}")]) for i in range(5)]
    parts = [
        SampleDataset([str(p) for p in paths], rank=r, world_size=2).shards_for_worker(w, 2)
        for r in range(2)
        for w in range(2)
    ]
    flat = sorted(s for part in parts for s in part)
    assert flat == sorted(str(p) for p in paths) and len(parts[0]) == 2


def test_collate_keeps_pil_without_transform(tmp_path):
    path = _three_samples(tmp_path)
    batch = collate_samples(list(SampleDataset(str(path))))
    assert batch["key"] == ["k0", "k1", "k2"] and len(batch["image"]) == 3 and batch["skipped"] == []


def test_shard_index_random_access(bad_shards):
    a, b = bad_shards
    index = ShardIndex([str(a), str(b)])
    assert index.read_captions("good3") == ["caption 0 of good3", "caption 1 of good3"]
    assert index.read_image_bytes("good1") == PNG
    assert index.entry("cross").shard == str(a) and ("cross", str(b)) in index.duplicates
    with pytest.raises(KeyError, match="nope"):
        index.read_image_bytes("nope")
    pid = os.getpid()
    assert index._pid == pid
    index.close()


def test_policy_is_used(tmp_path):
    path = _three_samples(tmp_path)
    skips = {s.skip for s in iter_samples(str(path), policy=DecodePolicy(max_pixels=100))}
    assert skips == {"too_many_pixels"}
