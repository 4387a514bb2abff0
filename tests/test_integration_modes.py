"""Integration modes as objects in one table: declared inputs are exactly what is read, and the table is the only
place a mode is named (a mode added to it is validated, required and used with no other change)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_losses import _gen, _loss, _student, _teacher

from mcad_cache.losses import INTEGRATIONS, Integration, LossConfig, TeacherTargets, kd_loss_from_log_probs, preset
from mcad_cache.losses.functional import masked_log_softmax

CONFIGS = {
    "none": dict(integration="none"),
    "fusion_clip_itm": dict(integration="logit_fusion", w_fusion_clip=1.0, w_fusion_itm=1.0),
    "fusion_itm_only": dict(integration="logit_fusion", w_fusion_clip=0.0, w_fusion_itm=1.0),
    "fusion_ss_only": dict(integration="logit_fusion", w_fusion_clip=0.0, w_fusion_itm=0.0, w_fusion_ss=1.0),
    "mixture_all": dict(integration="mixture", w_fusion_clip=1.0, w_fusion_itm=0.5, w_fusion_ss=0.25),
    "modified": dict(integration="modified_features", gate_init=0.2),
}


def _only(teacher: TeacherTargets, fields: set[str]) -> TeacherTargets:
    return TeacherTargets(
        **{f.name: (getattr(teacher, f.name) if f.name in fields else None) for f in dataclasses.fields(teacher)}
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_declared_inputs_are_exactly_what_the_mode_reads(name):
    g = _gen(21)
    cfg = preset("mcad", **CONFIGS[name])
    full = _teacher(g)
    need = cfg.required_inputs()["teacher"]
    loss_fn = _loss(cfg)
    restricted = _only(full, need)
    modified = loss_fn._modified(full) if loss_fn.integration is not None else None
    modified_r = loss_fn._modified(restricted) if loss_fn.integration is not None else None
    for d in ("i2t", "t2i"):
        ref = loss_fn.topk_teacher_log_probs(full, d, modified)
        got = loss_fn.topk_teacher_log_probs(restricted, d, modified_r)
        torch.testing.assert_close(got, ref)  # fields outside the declaration change nothing
    # and each declared per-direction field is really read: dropping it fails or changes the distribution
    for field in sorted(n for n in need if n.endswith(("_i2t", "_t2i")) and not n.startswith(("valid_", "is_pos"))):
        d = field[-3:]
        dropped = _only(full, need - {field})
        try:
            mod_d = loss_fn._modified(dropped) if loss_fn.integration is not None else None
            out = loss_fn.topk_teacher_log_probs(dropped, d, mod_d)
        except ValueError:
            continue
        ref = loss_fn.topk_teacher_log_probs(full, d, modified)
        assert not torch.allclose(out, ref), f"{name}: {field} is declared but not read"


def test_unknown_mode_lists_the_table():
    with pytest.raises(ValueError, match="none.*logit_fusion.*mixture.*modified_features"):
        preset("mcad", integration="bogus")


class UniformTeacher(Integration):
    """A test-only mode: the uniform distribution over the valid candidates (reads nothing but the mask)."""

    name = "uniform_test"

    def topk_inputs(self, config: LossConfig, direction: str) -> set[str]:
        return set()

    def teacher_log_probs(self, config, teacher, direction, modified):
        mask = getattr(teacher, f"valid_{direction}")
        return masked_log_softmax(torch.zeros(mask.shape), mask)


def test_a_mode_added_to_the_table_works_with_no_other_change(monkeypatch):
    monkeypatch.setitem(INTEGRATIONS, "uniform_test", UniformTeacher())
    cfg = preset("single-topk", integration="uniform_test")
    assert cfg.required_inputs()["teacher"] == {"valid_i2t", "valid_t2i"}
    g = _gen(22)
    student, teacher = _student(g), _teacher(g)
    out = _loss(cfg)(student, _only(teacher, {"valid_i2t", "valid_t2i"}))
    # top-k KD against a uniform teacher, by hand
    for d, query, cand in (
        ("i2t", student.image_emb, student.topk_text_emb),
        ("t2i", student.text_emb, student.topk_image_emb),
    ):
        mask = getattr(teacher, f"valid_{d}")
        logits = student.logit_scale * torch.einsum("bd,bkd->bk", query, cand)
        uniform = masked_log_softmax(torch.zeros(mask.shape), mask)
        expected = cfg.w_topk_i2t * kd_loss_from_log_probs(logits, uniform, mask=mask)
        assert out[f"topk_{d}_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
