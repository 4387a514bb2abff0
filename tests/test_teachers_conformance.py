"""Every teacher passes the conformance suite of ``tests/teacher_conformance.py``: the fake (dual and single), and
the tiny clip, albef and blip teachers (random init or a tiny local folder; CPU, seconds)."""

from __future__ import annotations

import pytest
from fake_teacher import FakeTeacher
from teacher_conformance import TeacherConformance

from mcad_cache.teachers import create_teacher


class TestFakeDual(TeacherConformance):
    @pytest.fixture
    def make_teacher(self):
        return lambda: create_teacher("fake", device="cpu")

    @pytest.fixture
    def teacher(self, make_teacher):
        return make_teacher()

    def test_fake_dual_is_the_fake_class(self, teacher):
        assert type(teacher) is FakeTeacher


class TestFakeSingle(TeacherConformance):
    @pytest.fixture
    def make_teacher(self):
        return lambda: create_teacher("fake", model="single", device="cpu")

    @pytest.fixture
    def teacher(self, make_teacher):
        return make_teacher()


class TestClip(TeacherConformance):
    @pytest.fixture
    def make_teacher(self):
        return lambda: create_teacher("clip", model="tiny", device="cpu")

    @pytest.fixture
    def teacher(self, tiny_clip_teacher):
        return tiny_clip_teacher


class TestAlbef(TeacherConformance):
    @pytest.fixture
    def make_teacher(self, tiny_bert_tokenizer_dir):
        return lambda: create_teacher("albef", model="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")

    @pytest.fixture
    def teacher(self, tiny_albef_teacher):
        return tiny_albef_teacher


class TestBlip(TeacherConformance):
    @pytest.fixture
    def make_teacher(self, tiny_blip_dir):
        return lambda: create_teacher("blip", pretrained=str(tiny_blip_dir), device="cpu", local_files_only=True)

    @pytest.fixture(scope="class")
    def teacher(self, tiny_blip_dir):
        return create_teacher("blip", pretrained=str(tiny_blip_dir), device="cpu", local_files_only=True)
