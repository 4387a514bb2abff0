"""Worker-independent sample order (issue 11): the same seed gives the same batches and the same run for any number
of DataLoader workers; chunked reading equals a whole-shard read, skips and truncation included."""

from __future__ import annotations

import json

import pytest
import torch
from distill_fixtures import MemoryCache, make_shards
from fake_teacher import FakeTeacher

import mcad_cache.distill.join as join
import mcad_cache.pipelines.distill as distill
from mcad_cache.config import DistillConfig
from mcad_cache.data.webdataset import iter_samples
from mcad_cache.distill import create_distill
from mcad_cache.distill.chunks import ChunkDataset, _cuts, iter_chunk_samples, plan_chunks


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=16, per_shard=4)


def _record(s):
    return (s.key, s.skip, s.captions) if hasattr(s, "key") else (s["key"], s["skip"], s["captions"])


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_chunked_read_equals_whole_shard_read(tmp_path, chunk_size):
    make_shards(tmp_path / "ok", num_samples=11, per_shard=5)
    # a truncated copy of the last shard and a shard that is not a tar: their skips must come out the same
    other = make_shards(tmp_path / "other", num_samples=4, per_shard=4, prefix="t")  # keys of its own
    data = open(other[0], "rb").read()
    (tmp_path / "ok/train-0009.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "ok/train-0010.tar").write_bytes(b"not a tar")
    paths = sorted(str(p) for p in (tmp_path / "ok").glob("*.tar"))
    ref = [_record(s) for s in iter_samples(paths)]
    assert any(r[1] == "truncated_shard" for r in ref) and any(r[1] == "unreadable_shard" for r in ref)
    for workers in (0, 2):
        got = [_record(s) for s in iter_chunk_samples(ChunkDataset(paths, chunk_size=chunk_size), workers=workers)]
        assert got == ref, workers


def test_cuts_never_split_a_sample():
    from mcad_cache.data.tar import Member, ShardScan

    # key "b" has members on both sides of "c": no cut may fall between them
    names = [("a", "jpg"), ("a", "txt"), ("b", "jpg"), ("c", "jpg"), ("c", "txt"), ("b", "txt"), ("d", "jpg")]
    scan = ShardScan(path="x", members=[Member(f"{k}.{e}", k, e, i, 1) for i, (k, e) in enumerate(names)])
    assert _cuts(scan, 1) == [(0, 2), (2, 6), (6, 7)]


def test_ranks_split_chunks_disjointly(shards):
    chunks = plan_chunks(shards, chunk_size=3)
    keys = [[s["key"] for s in iter_chunk_samples(ChunkDataset(shards, chunk_size=3, rank=r, world_size=2),
                                                  workers=1)] for r in range(2)]  # fmt: skip
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(s.key for s in iter_samples(shards))
    assert len(chunks) == 8  # 4 shards of 4 samples in chunks of 3: 3 + 1 per shard


def test_workers_give_identical_batches_and_loss(tmp_path, shards, monkeypatch):
    caches = {
        "clip": MemoryCache(shards, FakeTeacher(kind="dual"), k=4, path="clip"),
        "albef": MemoryCache(shards, FakeTeacher(kind="single", seed=1), k=4, permute=True, path="albef"),
    }
    monkeypatch.setattr(join, "open_cache", lambda path: caches[str(path)])
    keys, metrics = {}, {}
    for workers in (0, 1, 2):
        config = DistillConfig(
            cache=("clip", "albef"), data=tuple(shards), out=str(tmp_path / f"w{workers}"), student="tiny",
            preset="single-topk", k=3, batch_size=4, steps=5, warmup_steps=1, workers=workers, threads=1,
            shuffle_buffer=6, log_every=1, seed=3,
        )  # fmt: skip
        d = create_distill(config)
        keys[workers] = [list(b["key"]) for e in (0, 1) for b in d.stream(e)]
        distill.run(config)
        rows = [json.loads(x) for x in (tmp_path / f"w{workers}/metrics.jsonl").read_text().splitlines()]
        metrics[workers] = [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in rows]
    assert keys[0] == keys[1] == keys[2]
    assert keys[0][:4] != keys[0][4:]  # epochs are shuffled differently
    assert len(metrics[0]) == 5 and metrics[0] == metrics[1] == metrics[2]


def test_cpu_budget_never_oversubscribes():
    from mcad_cache.runtime import resolve_cpu_budget

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # the issue-11 measurement: on 2 cores, 1 thread + 1 worker (6.0 s) beat torch's 2 threads + 2 workers (28.3 s)
    assert resolve_cpu_budget(threads=0, workers=-1, device=cpu, cores=2) == (1, 1)
    assert resolve_cpu_budget(threads=0, workers=-1, device=cpu, cores=1) == (1, 0)
    assert resolve_cpu_budget(threads=0, workers=-1, device=cpu, cores=16) == (12, 4)
    assert resolve_cpu_budget(threads=0, workers=-1, device=cuda, cores=16) == (4, 8)
    for cores in range(1, 65):
        for device in (cpu, cuda):
            threads, workers = resolve_cpu_budget(threads=0, workers=-1, device=device, cores=cores)
            assert threads >= 1 and workers >= 0 and threads + workers <= max(cores, 1 + workers), (cores, device)
            assert threads + workers <= cores or cores == 1
    # an explicit value is kept, the other takes what is left
    assert resolve_cpu_budget(threads=0, workers=2, device=cpu, cores=8) == (6, 2)
    assert resolve_cpu_budget(threads=3, workers=-1, device=cpu, cores=4) == (3, 1)
    assert resolve_cpu_budget(threads=2, workers=5, device=cpu, cores=2) == (2, 5)  # both explicit: as asked
