"""Ranking losses over the cached candidate order (issue 10 item 3): ListMLE and pairwise against slow references,
the mcad-rank preset, masking, and that a student gradient step moves toward the teacher's order."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mcad_cache.losses import MCADLoss, StudentOutputs, TeacherTargets, listmle_loss, pairwise_rank_loss, preset


def _slow_listmle(z: list[float], teacher: list[float], valid: list[bool]) -> float:
    order = sorted((j for j in range(len(z)) if valid[j]), key=lambda j: -teacher[j])
    total = 0.0
    for pos, j in enumerate(order):
        total += math.log(sum(math.exp(z[m]) for m in order[pos:])) - z[j]
    return total / len(order)


def _slow_pairwise(z: list[float], teacher: list[float], valid: list[bool]) -> float:
    pairs = [
        (a, b) for a, b in itertools.permutations(range(len(z)), 2) if valid[a] and valid[b] and teacher[a] > teacher[b]
    ]
    return sum(math.log1p(math.exp(-(z[a] - z[b]))) for a, b in pairs) / len(pairs)


def test_listmle_and_pairwise_match_slow_references_with_masks():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, generator=g) * 3
    teacher = torch.log_softmax(torch.randn(3, 5, generator=g), -1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 0] = False
    rows_l = [_slow_listmle(z[r].tolist(), teacher[r].tolist(), mask[r].tolist()) for r in range(3)]
    rows_p = [_slow_pairwise(z[r].tolist(), teacher[r].tolist(), mask[r].tolist()) for r in range(3)]
    assert listmle_loss(z, teacher, mask=mask).item() == pytest.approx(sum(rows_l) / 3, rel=1e-5)
    assert pairwise_rank_loss(z, teacher, mask=mask).item() == pytest.approx(sum(rows_p) / 3, rel=1e-5)
    # only the teacher's order matters (a sharper teacher with the same order gives the same loss)
    assert listmle_loss(z, 5 * teacher, mask=mask).item() == pytest.approx(listmle_loss(z, teacher, mask=mask).item())
    # temperature divides the student logits
    assert listmle_loss(z, teacher, temperature=2.0).item() == pytest.approx(listmle_loss(z / 2, teacher).item())


def test_ranking_loss_is_lowest_for_the_teachers_order():
    teacher = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -2.0]]), -1)
    agree = torch.tensor([[4.0, 2.0, 0.0, -4.0]])
    reverse = agree.flip(-1)
    for fn in (listmle_loss, pairwise_rank_loss):
        assert fn(agree, teacher).item() < fn(reverse, teacher).item()


def test_mcad_rank_preset_uses_listmle_on_derived_targets_both_directions():
    cfg = preset("mcad-rank")
    assert cfg.topk_loss == "listmle" and cfg.integration == "derived"
    g = torch.Generator().manual_seed(1)
    b, k, d = 4, 5, 8
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    student = StudentOutputs(unit(b, d), unit(b, d), torch.tensor(10.0), topk_text_emb=unit(b, k, d),
                             topk_image_emb=unit(b, k, d))  # fmt: skip
    teacher = TeacherTargets(
        clip_image_emb=unit(b, 6), clip_text_emb=unit(b, 6), clip_logit_scale=100.0,
        topk_logits_i2t=torch.log_softmax(torch.randn(b, k, generator=g), -1),
        topk_logits_t2i=torch.log_softmax(torch.randn(b, k, generator=g), -1),
    )  # fmt: skip
    out = MCADLoss(cfg, student_dim=d, clip_dim=6)(student, teacher)
    s_i2t = 10.0 * torch.einsum("bd,bkd->bk", student.image_emb, student.topk_text_emb)
    assert out["topk_i2t_loss"].item() == pytest.approx(0.5 * listmle_loss(s_i2t, teacher.topk_logits_i2t).item())
    assert "topk_t2i_loss" in out
    with pytest.raises(ValueError, match="topk_logits_t2i"):
        MCADLoss(cfg, student_dim=d, clip_dim=6)(
            student, TeacherTargets(**{**teacher.__dict__, "topk_logits_t2i": None})
        )
