"""Unit bookkeeping of the build engine: rank ownership, unit-aligned batches independent of arrival order, and
per-unit buffers flushed exactly when their last batch arrives."""

from __future__ import annotations

import numpy as np
import pytest

from mcad_cache.build.fingerprint import check_config, supports_itm
from mcad_cache.build.units import UnitAccumulator, UnitBatcher, owned_units, slots_in_unit
from mcad_cache.config import BuildConfig
from mcad_cache.errors import ConfigError


def test_owned_units_round_robin():
    mask = np.array([True, False, True, True, True, False, True])
    assert owned_units(mask, rank=0, world_size=1) == [0, 2, 3, 4, 6]
    assert owned_units(mask, rank=0, world_size=2) == [0, 2, 4, 6]
    assert owned_units(mask, rank=1, world_size=2) == [3]
    assert owned_units(mask, rank=2, world_size=3) == [2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_do_not_depend_on_arrival_order(seed):
    # 11 rows, units of 4 rows, batches of 3: unit 0 -> [0,1,2] [3]; unit 1 -> [4,5,6] [7]; unit 2 -> [8,9,10]
    batcher = UnitBatcher(rows_per_unit=4, batch_size=3, num_rows=11, todo_units=[0, 2])
    order = np.random.default_rng(seed).permutation(11)
    released = {}
    for row in order.tolist():
        got = batcher.add(row, f"img{row}")
        if got is not None:
            unit, j, rows, items = got
            released[(unit, j)] = (rows, items)
    assert released == {
        (0, 0): ([0, 1, 2], ["img0", "img1", "img2"]),
        (0, 1): ([3], ["img3"]),
        (2, 0): ([8, 9, 10], ["img8", "img9", "img10"]),
    }
    assert batcher.pending == {}  # rows of unit 1 (not to do) were dropped
    assert [batcher.slots_per_unit(u) for u in (0, 1, 2)] == [2, 2, 1]
    assert [slots_in_unit(u, stop=min(4 * u + 4, 11), rows_per_unit=4, batch_size=3) for u in (0, 1, 2)] == [2, 2, 1]


def test_accumulator_flushes_on_last_slot():
    acc = UnitAccumulator(lambda unit: 2 if unit == 0 else 1)
    buf = acc.get(0, lambda: {"rows": []})
    buf["rows"].append(0)
    assert acc.slot_done(0) is None
    acc.get(0, lambda: {"rows": ["never made"]})["rows"].append(3)
    assert acc.slot_done(0) == {"rows": [0, 3]}
    acc.get(1, lambda: {"rows": [4]})
    assert acc.slot_done(1) == {"rows": [4]} and acc.buffers == {}


def test_check_config_names_every_problem():
    with pytest.raises(ConfigError) as err:
        check_config(BuildConfig(data=(), k=0, emb_dtype="bf16", rank=2, world_size=2))
    msg = str(err.value)
    for part in ("k must be > 0", "emb_dtype must be one of", "no --data shards", "rank=2, world_size=2"):
        assert part in msg


def test_supports_itm_follows_the_single_stream_protocol():
    from fake_teacher import FakeTeacher

    assert supports_itm(FakeTeacher(kind="single"))
    assert not supports_itm(FakeTeacher(kind="dual"))  # no image_tokens / itm_from_tokens
    assert not supports_itm(object())
