"""Candidate bank (issue 11): the bank path equals the exact online path on the first step when filled from the same
weights; a bank run resumes exactly; the bank's bookkeeping (writes, reads, EMA, in-batch gradients) is right."""

from __future__ import annotations

import json

import pytest
import torch
from distill_fixtures import MemoryCache, make_shards
from fake_teacher import FakeTeacher

import mcad_cache.distill.join as join
import mcad_cache.pipelines.distill as distill
from mcad_cache.config import DistillConfig
from mcad_cache.distill import create_distill
from mcad_cache.distill.bank import BankCandidates, CandidateBank, EmaModel, _live_where_anchor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=12, per_shard=6)


@pytest.fixture(scope="module")
def caches(shards):
    return {
        "clip": MemoryCache(shards, FakeTeacher(kind="dual"), k=4, path="clip"),
        "albef": MemoryCache(shards, FakeTeacher(kind="single", seed=1), k=4, permute=True, path="albef"),
    }


@pytest.fixture
def use_caches(monkeypatch, caches):
    registry = dict(caches)
    monkeypatch.setattr(join, "open_cache", lambda path: registry[str(path)])
    return registry


def cfg(tmp_path, shards, **kw):
    base = dict(
        cache=("clip", "albef"), data=tuple(shards), out=str(tmp_path / "run"), student="tiny", preset="single-topk",
        k=3, batch_size=4, steps=3, warmup_steps=1, workers=0, threads=1, shuffle_buffer=5, log_every=1, seed=0,
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


# ------------------------------------------------------------------------------------------------ bank vs online
@pytest.mark.parametrize("bank_text", ["bank", "online"])
def test_bank_equals_online_on_the_first_step(tmp_path, shards, use_caches, bank_text):
    online = create_distill(cfg(tmp_path, shards, candidates="online"))
    bank = create_distill(cfg(tmp_path, shards, candidates="bank", bank_text=bank_text))
    assert online.index is not None and bank.index is None  # the bank path needs no random access to the shards
    raw = next(iter(online.stream(0)))
    b_on, b_bank = online.join(raw, 1), bank.join(raw, 1)
    assert b_on.extra_images is not None and b_bank.extra_images is None  # no candidate image is fetched
    assert bank.candidates.online_texts == (bank_text == "online") and not bank.candidates.online_images
    for d in (online, bank):  # eval mode: no dropout, BatchNorm on running stats (the fill's mode)
        d.model.eval()
        d.loss_module.eval()
    assert all(torch.equal(p, q) for p, q in zip(online.model.parameters(), bank.model.parameters(), strict=True))
    with torch.no_grad():
        ref = online.forward(online.model, online.loss_module, b_on)
        got = bank.forward(bank.model, bank.loss_module, b_bank)
    assert set(got) == set(ref)
    assert float(ref["topk_i2t_loss"]) > 0 and float(ref["topk_t2i_loss"]) > 0
    for key in ref:
        assert float(got[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-6), key
    # the fill encoded every item: the bank holds the student's own embeddings (checked on two images, by key)
    src = bank.candidates
    assert isinstance(src, BankCandidates) and src.bank.filled
    rows = bank.single.image_rows(raw["key"][:2])
    with torch.no_grad():
        emb = bank.model.encode_image(raw["image"][:2])
    assert torch.allclose(src.bank.image_emb[torch.as_tensor(rows, dtype=torch.long)], emb, atol=1e-5)


def test_bank_gradient_reaches_anchors_only(tmp_path, shards, use_caches):
    """Bank candidates carry no gradient: the loss's gradient w.r.t. the student differs from online, while the
    forward value is equal; both are finite."""
    online = create_distill(cfg(tmp_path, shards, candidates="online", preset="single-topk"))
    bank = create_distill(cfg(tmp_path, shards, candidates="bank", preset="single-topk"))
    raw = next(iter(online.stream(0)))
    grads = []
    for d in (online, bank):
        d.model.eval()
        out = d.forward(d.model, d.loss_module, d.join(raw, 1))
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in d.model.parameters() if p.grad is not None]))
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert 0.0 < float(cos) < 0.99999  # related, not identical


# ------------------------------------------------------------------------------------------------ resume
class StopAfter:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, iterable, description="", total=None):
        for i, item in enumerate(iterable):
            if i == self.n:
                raise KeyboardInterrupt
            yield item


def _metrics(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in rows]


@pytest.mark.parametrize("ema,refresh", [(0.0, 0), (0.5, 2)])
def test_bank_resume_is_exact(tmp_path, shards, use_caches, ema, refresh):
    from safetensors.torch import load_file

    kw = dict(steps=5, checkpoint_every=2, candidates="bank", bank_ema=ema, bank_refresh_every=refresh)
    distill.run(cfg(tmp_path / "a", shards, **kw))
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg(tmp_path / "b", shards, **kw), progress=StopAfter(3))
    ckpt = tmp_path / "b/run/checkpoints/step_00000002"
    assert (ckpt / "candidates.safetensors").is_file()
    distill.run(cfg(tmp_path / "b", shards, **kw))
    assert _metrics(tmp_path / "b/run/metrics.jsonl") == _metrics(tmp_path / "a/run/metrics.jsonl")
    for name in ("model.safetensors", "loss.safetensors"):
        wa, wb = load_file(str(tmp_path / "a/run/final" / name)), load_file(str(tmp_path / "b/run/final" / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ba = load_file(str(tmp_path / "a/run/checkpoints/step_00000005/candidates.safetensors"))
    bb = load_file(str(tmp_path / "b/run/checkpoints/step_00000005/candidates.safetensors"))
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert ("ema.log_logit_scale" in ba) == (ema > 0)
    assert int(ba["bank.steps"][0]) == 5


def test_bank_resume_refuses_a_missing_bank(tmp_path, shards, use_caches):
    from mcad_cache.errors import CheckpointError

    distill.run(cfg(tmp_path, shards, steps=2, candidates="online"))
    (tmp_path / "run/config.json").write_text(
        (tmp_path / "run/config.json").read_text().replace('"candidates": "online"', '"candidates": "bank"')
    )
    with pytest.raises(CheckpointError, match="candidates.safetensors"):
        distill.run(cfg(tmp_path, shards, steps=2, candidates="bank"))


# ------------------------------------------------------------------------------------------------ the bank itself
def test_bank_write_read_and_state():
    bank = CandidateBank(num_images=5, num_texts=3, dim=2)
    assert not bank.filled
    bank.steps = 4
    bank.write("image", torch.tensor([3, -1, 1, 3]), torch.tensor([[1.0, 0], [9, 9], [0, 1], [0.6, 0.8]]), step=4)
    assert bank.filled
    got = bank.read("image", torch.tensor([[3, 1], [-1, 0]]))
    assert torch.equal(got, torch.tensor([[[0.6, 0.8], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]))  # last write wins
    bank.steps = 6
    age = bank.age("image", torch.tensor([3, 0, -1]))
    assert age[0] == 2 and torch.isnan(age[1:]).all()
    other = CandidateBank(num_images=5, num_texts=3, dim=2)
    other.load_state_dict(bank.state_dict())
    assert all(torch.equal(v, bank.state_dict()[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="shape"):
        CandidateBank(num_images=4, num_texts=3, dim=2).load_state_dict(bank.state_dict())


def test_ema_update_formula():
    live = torch.nn.Linear(2, 2)
    ema = EmaModel(live, momentum=0.75)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)
    assert torch.allclose(ema.model.weight, 0.75 * before + 0.25 * live.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_in_batch_candidates_keep_their_gradient():
    live = torch.randn(2, 3, requires_grad=True)
    bank = torch.zeros(2, 2, 3)
    rows = torch.tensor([[7, 4], [-1, 7]])
    out = _live_where_anchor(bank, rows, torch.tensor([4, 7]), live)
    assert torch.equal(out[0, 0], live[1].detach()) and torch.equal(out[0, 1], live[0].detach())
    assert torch.equal(out[1, 0], torch.zeros(3))  # an empty slot stays a bank read
    out.sum().backward()
    assert torch.equal(live.grad, torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_bank_mode_is_recorded_and_checked(tmp_path, shards, use_caches):
    from mcad_cache.errors import ConfigError

    with pytest.raises(ConfigError, match="--candidates"):
        create_distill(cfg(tmp_path, shards, candidates="queue"))
    with pytest.raises(ConfigError, match="--bank-text"):
        create_distill(cfg(tmp_path, shards, candidates="bank", bank_text="both"))
    with pytest.raises(ConfigError, match="--bank-ema"):
        create_distill(cfg(tmp_path, shards, candidates="bank", bank_ema=1.0))
    d = create_distill(cfg(tmp_path, shards, candidates="bank", bank_text="online"))
    assert d.resolved["candidates"] == "bank" and d.resolved["bank_text"] == "online"


def test_any_batch_size_and_k(tmp_path, shards, use_caches):
    """The bank is indexed by cache row: batch size, shuffle and k' change nothing about what it can serve."""
    for batch_size, k, shuffle in ((2, 1, 0), (6, 4, 50)):
        summary = distill.run(
            cfg(tmp_path / f"b{batch_size}", shards, candidates="bank", batch_size=batch_size, k=k, steps=2,
                shuffle_buffer=shuffle)
        )  # fmt: skip
        assert summary["steps"] == 2


def test_bank_rows_follow_the_candidate_cache(tmp_path, shards, use_caches, caches):
    """Rows of the (reversed) single-stream cache index the bank: a candidate's bank row is its key's row there."""
    d = create_distill(cfg(tmp_path, shards, candidates="bank"))
    raw = next(iter(d.stream(0)))
    batch = d.join(raw, 1)
    albef = caches["albef"]
    assert batch.anchor_image_rows.tolist() == albef.image_rows(raw["key"]).tolist()
    top = albef.topk("i2t", albef.image_rows(raw["key"]), k=3)
    assert batch.topk_text_rows.tolist() == top["idx"].tolist()


# ------------------------------------------------------------------------------------------------ the fill
def test_fill_encodes_the_candidate_rows_only(tmp_path, shards, use_caches):
    """The fill encodes exactly the rows some cached top-k list names, with the values a fill of every row gives;
    with text candidates online it encodes no caption."""
    import numpy as np

    run = create_distill(cfg(tmp_path, shards, candidates="bank"))
    enc = run.candidates.encoder
    reader = enc.reader
    dims = dict(num_images=reader.num_images, num_texts=reader.num_texts, dim=run.model.embed_dim)
    full, part, no_text = CandidateBank(**dims), CandidateBank(**dims), CandidateBank(**dims)
    enc.candidates_only = False
    enc(run.model, full, step=0)
    assert enc.last_counts == {"images": reader.num_images, "texts": reader.num_texts}
    enc.candidates_only = True
    enc(run.model, part, step=0)
    enc(run.model, no_text, step=0, texts=False)
    named = {
        "image": reader.topk("t2i", np.arange(reader.num_texts), fused=False)["idx"],
        "text": reader.topk("i2t", np.arange(reader.num_images), fused=False)["idx"],
    }
    for which, emb_full, emb_part, stamp in (
        ("image", full.image_emb, part.image_emb, part.image_step),
        ("text", full.text_emb, part.text_emb, part.text_step),
    ):
        want = sorted({int(r) for r in np.asarray(named[which]).ravel() if r >= 0})
        got = torch.nonzero(stamp == 0).flatten().tolist()
        assert got == want, which
        assert torch.allclose(emb_part[want], emb_full[want], atol=1e-6), which
        assert not emb_part[[r for r in range(stamp.numel()) if r not in want]].any(), which
    assert enc.last_counts["texts"] == 0 and bool((no_text.text_step == -1).all())
    assert torch.equal(no_text.image_emb, part.image_emb)
    # the rows an epoch's batches read are all filled
    for i, raw in enumerate(run.stream(0)):
        batch = run.join(raw, i + 1)
        for rows, stamp in ((batch.topk_image_rows, part.image_step), (batch.topk_text_rows, part.text_step)):
            assert bool((stamp[rows[rows >= 0]] == 0).all())
