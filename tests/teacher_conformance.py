"""A reusable conformance suite for teachers (the zarr style of store test suites: ``zarr.testing.store.StoreTests``).

Subclass :class:`TeacherConformance` as ``class TestMyTeacher(TeacherConformance)`` and give it a ``teacher`` fixture
that builds the teacher and a ``make_teacher`` fixture that builds a second, identical one; pytest then runs every
check below on it. A new teacher passes this suite before it is registered. Checked: protocol membership (the
``Teacher`` / ``TextEncoder`` protocols, and ``SingleStreamTeacher`` exactly when ``kind == "single"``), the registry
name, shapes / dtypes / L2 norm of both embeddings, determinism, row independence of batching, fingerprint stability
across instances, tokenize -> encode_text, and single-stream consistency (``itm`` equals ``itm_from_tokens`` of
``image_tokens``; ``encode_image_from_tokens`` equals ``encode_image``; text states equal the direct path).
"""

from __future__ import annotations

import json

import pytest
import torch

from mcad_cache.teachers import list_teachers
from mcad_cache.teachers.base import SingleStreamTeacher, Teacher, TextEncoder, TextStateTeacher

CAPTIONS = ["a dog sitting on the grass", "two cats", "a man riding a red car in the street at night"]
ATOL = 1e-5


def _images(teacher: Teacher, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = int(teacher.preprocess_cfg["image_size"])
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class TeacherConformance:
    """The checks every teacher passes. Subclasses provide the ``teacher`` and ``make_teacher`` fixtures."""

    @pytest.fixture
    def teacher(self) -> Teacher:
        raise NotImplementedError("a conformance subclass provides the teacher fixture")

    @pytest.fixture
    def make_teacher(self):  # noqa: ANN201 - returns a zero-argument factory
        raise NotImplementedError("a conformance subclass provides the make_teacher fixture")

    def test_protocol_membership(self, teacher):
        assert isinstance(teacher, Teacher) and isinstance(teacher, TextEncoder)
        assert teacher.kind in ("dual", "single")
        assert isinstance(teacher, SingleStreamTeacher) == (teacher.kind == "single")
        if isinstance(teacher, TextStateTeacher):
            assert teacher.kind == "single"

    def test_registered_name(self, teacher):
        assert teacher.name in list_teachers()

    def test_encode_image_shape_dtype_norm(self, teacher):
        emb = teacher.encode_image(_images(teacher))
        assert emb.dtype == torch.float32 and emb.ndim == 2 and emb.shape[0] == 3
        assert torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-4, rtol=0)

    def test_tokenize_encode_text_round_trip(self, teacher):
        tokens = teacher.tokenize(CAPTIONS)
        assert set(tokens) >= {"input_ids", "attention_mask"}
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        assert ids.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == len(CAPTIONS)
        assert ids.shape[1] <= teacher.tokenizer_cfg["context_length"]
        assert mask[:, 0].all() and (mask.sum(1) >= 2).all()  # every caption keeps at least [CLS]-like + a word
        emb = teacher.encode_text(tokens)
        assert emb.dtype == torch.float32 and emb.shape[0] == len(CAPTIONS)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-4, rtol=0)
        assert emb.shape[1] == teacher.encode_image(_images(teacher, 1)).shape[1]  # one ITC space
        assert not torch.allclose(emb[0], emb[1], atol=1e-3)  # different captions, different embeddings

    def test_batching_does_not_change_a_row(self, teacher):
        batch = teacher.encode_text(teacher.tokenize(CAPTIONS))
        for i, caption in enumerate(CAPTIONS):
            torch.testing.assert_close(teacher.encode_text(teacher.tokenize([caption]))[0], batch[i], atol=1e-4, rtol=0)
        images = _images(teacher)
        batch = teacher.encode_image(images)
        torch.testing.assert_close(teacher.encode_image(images[1:2])[0], batch[1], atol=1e-4, rtol=0)

    def test_deterministic(self, teacher):
        images, tokens = _images(teacher), teacher.tokenize(CAPTIONS)
        assert torch.equal(teacher.encode_image(images), teacher.encode_image(images))
        assert torch.equal(teacher.encode_text(tokens), teacher.encode_text(tokens))

    def test_fingerprint_stable_and_json(self, teacher, make_teacher):
        fp = teacher.fingerprint()
        assert {"name", "kind", "weights_sha256", "preprocess_cfg", "tokenizer_cfg"} <= set(fp)
        assert fp["name"] == teacher.name and fp["kind"] == teacher.kind
        assert json.loads(json.dumps(fp)) == fp
        assert teacher.fingerprint() == fp
        other = make_teacher()
        assert other.fingerprint() == fp
        torch.testing.assert_close(other.encode_image(_images(other)), teacher.encode_image(_images(teacher)))

    def test_logit_scale_is_a_positive_linear_multiplier(self, teacher):
        assert isinstance(float(teacher.logit_scale), float) and float(teacher.logit_scale) > 1.0

    def test_single_stream_consistency(self, teacher):
        images, tokens = _images(teacher), teacher.tokenize(CAPTIONS)
        if not isinstance(teacher, SingleStreamTeacher):
            with pytest.raises(TypeError):
                teacher.itm(images, tokens)  # type: ignore[attr-defined]
            return
        image_tokens = teacher.image_tokens(images)
        assert image_tokens.ndim == 3 and image_tokens.shape[0] == 3 and image_tokens.dtype == torch.float32
        torch.testing.assert_close(
            teacher.encode_image_from_tokens(image_tokens), teacher.encode_image(images), atol=ATOL, rtol=0
        )
        itm_logits, fused_cls = teacher.itm_from_tokens(image_tokens, tokens)
        assert itm_logits.shape == (3, 2) and fused_cls.ndim == 2 and fused_cls.shape[0] == 3
        assert itm_logits.dtype == torch.float32 and fused_cls.dtype == torch.float32
        direct_logits, direct_cls = teacher.itm(images, tokens)
        torch.testing.assert_close(direct_logits, itm_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(direct_cls, fused_cls, atol=ATOL, rtol=0)
        # one image's tokens reused for every caption == the image repeated
        one = image_tokens[:1].expand(len(CAPTIONS), -1, -1)
        rep_logits, _ = teacher.itm(images[:1].expand(len(CAPTIONS), -1, -1, -1), tokens)
        torch.testing.assert_close(teacher.itm_from_tokens(one, tokens)[0], rep_logits, atol=1e-4, rtol=0)

    def test_text_states_equal_the_direct_path(self, teacher):
        if not isinstance(teacher, TextStateTeacher):
            pytest.skip(f"{teacher.name} has no text-only encoder states")
        images, tokens = _images(teacher), teacher.tokenize(CAPTIONS)
        image_tokens = teacher.image_tokens(images)
        via_states = teacher.itm_from_text_tokens(image_tokens, teacher.text_tokens(tokens), tokens["attention_mask"])
        direct = teacher.itm_from_tokens(image_tokens, tokens)
        torch.testing.assert_close(via_states[0], direct[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(via_states[1], direct[1], atol=1e-4, rtol=0)
