"""Retrieval evaluation: dual encoders, ITM re-ranking of single-stream teachers, cached teachers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mcad_cache.errors import CacheSchemaError, DataError
from mcad_cache.eval import (
    encode_retrieval_set,
    evaluate_cache,
    evaluate_dual,
    evaluate_single_stream,
    itc_topk,
)
from mcad_cache.metrics import retrieval_metrics

DIM = 8


class TinyTeacher:
    """Deterministic single-stream teacher: ITC embeddings from pixels / characters, ITM from both."""

    name = "tiny"
    kind = "single"
    preprocess_cfg: dict = {}
    tokenizer_cfg: dict = {}
    logit_scale = 10.0

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w_img = torch.randn(3 * 4 * 4, DIM, generator=gen)
        self.w_tok = torch.randn(128, DIM, generator=gen)
        self.device = torch.device("cpu")
        self.itm_calls = 0

    def fingerprint(self) -> dict:
        return {"name": self.name}

    def tokenize(self, texts):
        ids = torch.zeros(len(texts), 12, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, text in enumerate(texts):
            codes = [ord(c) % 128 for c in text[:12]]
            ids[r, : len(codes)] = torch.tensor(codes)
            mask[r, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _text_vec(self, tokens):
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        return (self.w_tok[ids] * mask[..., None]).sum(1)

    def encode_image(self, images):
        return nn.functional.normalize(images.flatten(1) @ self.w_img, dim=-1)

    def encode_text(self, tokens):
        return nn.functional.normalize(self._text_vec(tokens), dim=-1)

    def image_tokens(self, images):
        return images.flatten(1)[:, None, :].repeat(1, 2, 1)  # [B, 2, 48]

    def itm_from_tokens(self, image_tokens, tokens):
        self.itm_calls += image_tokens.shape[0]
        img = image_tokens[:, 0] @ self.w_img
        pos = torch.tanh((img * self._text_vec(tokens)).sum(-1) / 10)
        return torch.stack([-pos, 2 * pos], dim=-1), torch.zeros(image_tokens.shape[0], 4)

    def itm_dense(self, images, captions):
        """Slow reference: ITM positive logit of every (image, caption) pair, [N_i, N_t]."""
        out = torch.zeros(len(images), len(captions))
        for i in range(len(images)):
            for t, caption in enumerate(captions):
                logits, _ = self.itm_from_tokens(self.image_tokens(images[i : i + 1]), self.tokenize([caption]))
                out[i, t] = logits[0, 1]
        return out


class TinyStudent(nn.Module):
    """A student-like module: ``encode_text(input_ids, attention_mask)`` (keyword fields, not a dict)."""

    def __init__(self, teacher: TinyTeacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.scale = nn.Parameter(torch.ones(()))

    def tokenize(self, texts):
        return self.teacher.tokenize(texts)

    def encode_image(self, images):
        return self.teacher.encode_image(images) * self.scale.detach()

    def encode_text(self, tokens):  # the signature students and teachers share (teachers.base.TextEncoder)
        return self.teacher.encode_text(tokens)


def make_batches(num_images=9, batch_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, 4, 4, generator=gen)
    words = ["red", "blue", "cat", "dog", "sun", "car", "sea", "hat", "map", "owl"]
    captions = []
    for i in range(num_images):
        n = 1 + (i % 3)  # uneven: 1, 2, 3 captions
        captions.append([f"{words[i % 10]} {words[(i * j + 3) % 10]} {j}" for j in range(n)])
    keys = [f"s{i:03d}" for i in range(num_images)]
    batches = [
        {"key": keys[s : s + batch_size], "image": images[s : s + batch_size], "captions": captions[s : s + batch_size]}
        for s in range(0, num_images, batch_size)
    ]
    return batches, images, captions


def test_dual_eval_matches_full_matrix():
    teacher = TinyTeacher()
    batches, images, captions = make_batches()
    flat = [c for caps in captions for c in caps]
    rs = encode_retrieval_set(teacher, batches, text_batch_size=5)
    assert rs.num_images == 9 and rs.num_texts == len(flat)
    assert rs.txt2img.tolist() == [i for i, caps in enumerate(captions) for _ in caps]
    sims = teacher.encode_image(images) @ teacher.encode_text(teacher.tokenize(flat)).T
    out = evaluate_dual(rs, chunk_size=2)
    assert out["metrics"] == pytest.approx(retrieval_metrics(sims, rs.txt2img))
    assert out["protocol"]["num_images"] == 9 and out["protocol"]["num_captions"] == len(flat)
    assert out["protocol"]["captions_per_image"] == {"min": 1, "max": 3, "mean": pytest.approx(len(flat) / 9)}
    # A student (keyword tokens) gives the same embeddings through the same code path.
    rs_student = encode_retrieval_set(TinyStudent(teacher), batches)
    assert torch.allclose(rs_student.text_emb, rs.text_emb) and torch.allclose(rs_student.image_emb, rs.image_emb)


def test_skipped_or_duplicate_sample_is_an_error():
    teacher = TinyTeacher()
    batches, _, _ = make_batches(num_images=4)
    bad = dict(batches[0], skip=[None, "decode_error", None, None])
    with pytest.raises(DataError, match="s001"):
        encode_retrieval_set(teacher, [bad])
    bad = dict(batches[0], skipped=[{"key": "s777", "shard": "x.tar", "skip": "decode_error", "detail": ""}])
    with pytest.raises(DataError, match="s777"):
        encode_retrieval_set(teacher, [bad])
    with pytest.raises(DataError, match="duplicate_key"):
        encode_retrieval_set(teacher, [batches[0], batches[0]])


@pytest.mark.parametrize(("k_test", "score"), [(3, "itm"), (4, "itm+itc"), (100, "itm+itc")])
def test_single_stream_rerank_matches_dense_reference(k_test, score):
    teacher = TinyTeacher()
    batches, images, captions = make_batches()
    flat = [c for caps in captions for c in caps]
    rs = encode_retrieval_set(teacher, batches)
    out = evaluate_single_stream(teacher, rs, list(reversed(batches)), k_test=k_test, score=score, pair_batch_size=5)
    # Dense reference: ALBEF fill, -inf outside each query's ITC top-k.
    itc = rs.image_emb @ rs.text_emb.T
    itm = teacher.itm_dense(images, flat)
    full = itm + (itc if score == "itm+itc" else 0)
    k_i2t, k_t2i = min(k_test, len(flat)), min(k_test, 9)
    dense_i2t = torch.full_like(full, float("-inf"))
    top = itc.topk(k_i2t, dim=1).indices
    dense_i2t.scatter_(1, top, full.gather(1, top))
    dense_t2i = torch.full_like(full.T, float("-inf"))
    top = itc.T.topk(k_t2i, dim=1).indices
    dense_t2i.scatter_(1, top, full.T.gather(1, top))
    ref_i2t = retrieval_metrics(dense_i2t, rs.txt2img)
    ref_t2i = retrieval_metrics(dense_t2i.T, rs.txt2img)
    for key, value in out["metrics"].items():
        if key.startswith("i2t"):
            assert value == pytest.approx(ref_i2t[key]), key
        elif key.startswith("t2i"):
            assert value == pytest.approx(ref_t2i[key]), key
    assert ("ITC cosine" in out["protocol"]["score"]) == (score == "itm+itc")
    assert bool(out["notices"]) == (k_test == 100)


def test_single_stream_missing_image_on_second_pass():
    teacher = TinyTeacher()
    batches, _, _ = make_batches()
    rs = encode_retrieval_set(teacher, batches)
    with pytest.raises(DataError, match="not found again"):
        evaluate_single_stream(teacher, rs, batches[:1], k_test=3)


def test_itc_topk_chunked_equals_full():
    gen = torch.Generator().manual_seed(3)
    q = nn.functional.normalize(torch.randn(13, 5, generator=gen), dim=-1)
    g = nn.functional.normalize(torch.randn(7, 5, generator=gen), dim=-1)
    sims, idx = itc_topk(q, g, k=4, chunk_size=3)
    ref = (q @ g.T).topk(4, dim=1)
    assert torch.equal(idx, ref.indices) and torch.allclose(sims, ref.values)
    with pytest.raises(ValueError, match="k=8"):
        itc_topk(q, g, k=8)


class FakeReader:
    """Stands in for CacheReader (docs/architecture.md contract) built from a TinyTeacher run."""

    def __init__(self, teacher, batches, images, captions, *, k, kind="single", manifest=None):
        self.kind, self.k, self.manifest = kind, k, manifest or {}
        rs = encode_retrieval_set(teacher, batches)
        flat = [c for caps in captions for c in caps]
        self.num_images, self.num_texts = rs.num_images, rs.num_texts
        self.image_keys = np.array(rs.image_keys)
        self.image_valid = np.ones(rs.num_images, bool)
        self.txt2img = rs.txt2img.numpy().astype(np.int32)
        self._img, self._txt = rs.image_emb.half().numpy(), rs.text_emb.half().numpy()  # fp16 storage
        self._itm = teacher.itm_dense(images, flat)
        self._sims = torch.from_numpy(self._img).float() @ torch.from_numpy(self._txt).float().T

    def image_emb(self, rows):
        return self._img[rows].astype(np.float32)

    def text_emb(self, rows):
        return self._txt[rows].astype(np.float32)

    def topk(self, direction, rows, *, k=None, fused=True):
        k = k or self.k
        if k > self.k:
            raise CacheSchemaError(f"k={k} > cache k={self.k}")
        sims = self._sims if direction == "i2t" else self._sims.T
        itm = self._itm if direction == "i2t" else self._itm.T
        v, i = sims[torch.as_tensor(rows)].topk(self.k, dim=1)
        logits = torch.stack([-itm[torch.as_tensor(rows)].gather(1, i), itm[torch.as_tensor(rows)].gather(1, i)], -1)
        return {
            "idx": i[:, :k].int().numpy(),
            "sims": v[:, :k].numpy(),
            "itm_logits": logits[:, :k].numpy(),
            "valid": np.ones((len(rows), k), bool),
        }


def test_cache_eval_equals_live_teacher():
    teacher = TinyTeacher()
    batches, images, captions = make_batches()
    reader = FakeReader(teacher, batches, images, captions, k=6)
    cached = evaluate_cache(reader, k_test=4, score="itm+itc", chunk_size=4)
    # The live evaluation on the fp16-rounded embeddings must match exactly.
    rs = encode_retrieval_set(teacher, batches)
    rs.image_emb, rs.text_emb = rs.image_emb.half().float(), rs.text_emb.half().float()
    live = evaluate_single_stream(teacher, rs, batches, k_test=4, score="itm+itc")
    assert cached["metrics"] == pytest.approx(live["metrics"])
    assert "cached" in cached["protocol"]["score"]
    dual = evaluate_cache(FakeReader(teacher, batches, images, captions, k=6, kind="dual"))
    assert dual["metrics"] == pytest.approx(evaluate_dual(rs)["metrics"])


def test_cache_eval_refusals():
    teacher = TinyTeacher()
    batches, images, captions = make_batches()
    with pytest.raises(CacheSchemaError, match="k=6"):
        evaluate_cache(FakeReader(teacher, batches, images, captions, k=6), k_test=8)
    forced = FakeReader(
        teacher, batches, images, captions, k=6, manifest={"fingerprint": {"candidates": {"force_positives": True}}}
    )
    with pytest.raises(CacheSchemaError, match="force_positives"):
        evaluate_cache(forced, k_test=4)
    sourced = FakeReader(
        teacher, batches, images, captions, k=6,
        manifest={"fingerprint": {"candidates": {"source": "cache", "source_cache": {"teacher": {"name": "clip"}}}}},
    )  # fmt: skip
    with pytest.raises(CacheSchemaError, match="another cache \\('clip'\\)"):
        evaluate_cache(sourced, k_test=4)
    invalid = FakeReader(teacher, batches, images, captions, k=6)
    invalid.image_valid[2] = False
    with pytest.raises(DataError, match="s002"):
        evaluate_cache(invalid, k_test=4)
