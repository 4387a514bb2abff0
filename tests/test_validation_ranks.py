"""Validation during distill reads every val shard, even under torchrun: rank 0 validates alone, so its dataset must
not split the shards across the ranks (``SampleDataset`` reads the rank from ``torch.distributed`` unless told)."""

from __future__ import annotations

import pytest
import torch
from distill_fixtures import make_shards

from mcad_cache.distill import validation
from mcad_cache.distill.validation import Validator
from mcad_cache.student import create_student


def test_validation_reads_every_val_shard_as_rank_1_of_2(tmp_path, monkeypatch):
    """Old code: as rank 1 of 2 the validator read only the second of the two val shards (6 of 12 images)."""
    shards = make_shards(tmp_path / "val", num_samples=12, per_shard=6)
    torch.manual_seed(0)
    model = create_student("tiny")
    validator = Validator(model, shards=shards, run_dir=tmp_path, every=0, total_steps=1, batch_size=4, workers=0)
    seen: list[int] = []
    encode = validation.encode_retrieval_set

    def counting(model, loader, **kw):
        rs = encode(model, loader, **kw)
        seen.append(sum(len(batch["key"]) for batch in loader))
        return rs

    monkeypatch.setattr(validation, "encode_retrieval_set", counting)
    alone = validator.evaluate()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as rank 1 of a 2-rank torchrun
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    as_rank_1 = validator.evaluate()
    assert seen == [12, 12]
    assert as_rank_1 == pytest.approx(alone, abs=0)
