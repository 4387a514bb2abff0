"""TextStateCache: reused text-only states give the same ITM scores as encoding every pair from scratch."""

from __future__ import annotations

import pytest
import torch

from mcad_cache.teachers.text_states import TextStateCache, supports_text_states

CAPTIONS = [f"a {c} {t} on a table" for c in ("red", "blue", "green") for t in ("cup", "book", "lamp")]


def test_cached_states_score_like_the_per_pair_path(tiny_albef_teacher):
    teacher = tiny_albef_teacher
    assert supports_text_states(teacher)
    images = torch.randn(3, 3, teacher.preprocess_cfg["image_size"], teacher.preprocess_cfg["image_size"],
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    image_tokens = teacher.image_tokens(images)
    pairs = [(i, t) for i in range(3) for t in (8, 0, 4, 4, 7)]  # repeats and out-of-order rows
    sel = [i for i, _ in pairs]
    rows = [t for _, t in pairs]
    ref_logits, ref_fused = teacher.itm_from_tokens(image_tokens[sel], teacher.tokenize([CAPTIONS[t] for t in rows]))
    cache = TextStateCache(teacher, CAPTIONS, block=4, max_bytes=10**9)
    states, mask = cache.get(rows)
    logits, fused = teacher.itm_from_text_tokens(image_tokens[sel], states, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref_fused, atol=1e-5, rtol=1e-5)
    assert sorted(cache.blocks) == [0, 1, 2]  # rows 0..8 in blocks of 4


def test_memory_bound_evicts_oldest_blocks_and_values_do_not_change(tiny_albef_teacher):
    cache = TextStateCache(tiny_albef_teacher, CAPTIONS, block=2)
    first, _ = cache.get([0, 3])
    one_block = cache.bytes // 2
    small = TextStateCache(tiny_albef_teacher, CAPTIONS, block=2, max_bytes=one_block)
    again, _ = small.get([0, 3])  # block 0, then block 1 evicts it
    assert list(small.blocks) == [1] and small.bytes == one_block
    torch.testing.assert_close(again, first)


def test_teacher_without_text_states_is_refused():
    with pytest.raises(TypeError, match="no text-only encoder states"):
        TextStateCache(object(), CAPTIONS)
