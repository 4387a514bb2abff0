"""Dynamic padding (issue 11): captions are padded to the longest one in the batch, capped at the context length,
and the student's text embeddings do not change."""

from __future__ import annotations

import torch

from mcad_cache.student import create_student


def test_dynamic_padding_leaves_embeddings_unchanged():
    torch.manual_seed(0)
    model = create_student("tiny").eval()
    texts = ["a dog", "a red bus on a street with two men and a woman sitting at a table", "cat"]
    fixed = model.tokenize(texts)  # the default: static shapes (ONNX export traces them)
    dynamic = model.tokenize(texts, padding="longest")
    cap = model.config.context_length
    assert fixed["input_ids"].shape[1] == cap
    longest = int(fixed["attention_mask"].sum(1).max())
    assert dynamic["input_ids"].shape[1] == longest <= cap
    assert torch.equal(dynamic["input_ids"], fixed["input_ids"][:, :longest])
    short = model.tokenize(["a dog", "cat"], padding="longest")
    assert short["input_ids"].shape[1] == 4  # [CLS] a dog [SEP]
    with torch.no_grad():
        a = model.encode_text(fixed)
        b = model.encode_text(dynamic)
        c = model.encode_text(short)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(c, a[[0, 2]], atol=1e-6)
    feats = model.forward_text(dynamic["input_ids"], dynamic["attention_mask"])[1]
    assert torch.allclose(feats, model.forward_text(fixed["input_ids"], fixed["attention_mask"])[1], atol=1e-5)
