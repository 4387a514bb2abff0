"""MCAD losses: known answers, hand-derived gradients, slow references, masks, presets, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mcad_cache import losses as L
from mcad_cache.distill import DistillBatch, distill_forward
from mcad_cache.losses import (
    LossConfig,
    MCADLoss,
    StudentOutputs,
    TeacherTargets,
    feature_loss,
    itc_loss,
    kd_loss,
    preset,
)

B, K, D, DC, C = 4, 5, 8, 6, 7


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _teacher(g: torch.Generator, *, b: int = B, k: int = K, with_invalid: bool = True) -> TeacherTargets:
    valid_i2t = torch.ones(b, k, dtype=torch.bool)
    valid_t2i = torch.ones(b, k, dtype=torch.bool)
    if with_invalid:
        valid_i2t[0, -2:] = False
        valid_t2i[1, -1] = False
    is_pos_i2t = torch.zeros(b, k, dtype=torch.bool)
    is_pos_i2t[:, 0] = True
    is_pos_t2i = torch.zeros(b, k, dtype=torch.bool)
    is_pos_t2i[:, 1] = True
    clip_image, clip_text = _unit(g, b, DC), _unit(g, b, DC)
    cand_text, cand_image = _unit(g, b, k, DC), _unit(g, b, k, DC)
    return TeacherTargets(
        clip_image_emb=clip_image,
        clip_text_emb=clip_text,
        clip_logit_scale=100.0,
        clip_topk_sims_i2t=torch.einsum("bd,bkd->bk", clip_image, cand_text),
        clip_topk_sims_t2i=torch.einsum("bd,bkd->bk", clip_text, cand_image),
        clip_topk_text_emb=cand_text,
        clip_topk_image_emb=cand_image,
        itm_logits_i2t=3 * torch.randn(b, k, 2, generator=g),
        itm_logits_t2i=3 * torch.randn(b, k, 2, generator=g),
        ss_sims_i2t=torch.rand(b, k, generator=g),
        ss_sims_t2i=torch.rand(b, k, generator=g),
        ss_logit_scale=1 / 0.07,
        fused_cls_i2t=torch.randn(b, k, C, generator=g),
        fused_cls_t2i=torch.randn(b, k, C, generator=g),
        valid_i2t=valid_i2t,
        valid_t2i=valid_t2i,
        is_positive_i2t=is_pos_i2t,
        is_positive_t2i=is_pos_t2i,
        topk_logits_i2t=torch.log_softmax(2 * torch.randn(b, k, generator=g), -1),
        topk_logits_t2i=torch.log_softmax(2 * torch.randn(b, k, generator=g), -1),
    )


def _student(g: torch.Generator, *, b: int = B, k: int = K, requires_grad: bool = True) -> StudentOutputs:
    leaves = [_unit(g, b, D), _unit(g, b, D), _unit(g, b, k, D), _unit(g, b, k, D), torch.tensor(math.log(14.0))]
    for t in leaves:
        t.requires_grad_(requires_grad)
    img, txt, cand_txt, cand_img, log_scale = leaves
    return StudentOutputs(
        image_emb=img,
        text_emb=txt,
        logit_scale=log_scale.exp(),
        image_feat=torch.randn(b, 10, generator=g),
        text_feat=torch.randn(b, 9, generator=g),
        topk_text_emb=cand_txt,
        topk_image_emb=cand_img,
    )


def _loss(cfg: LossConfig) -> MCADLoss:
    return MCADLoss(cfg, student_dim=D, student_image_feat_dim=10, student_text_feat_dim=9, clip_dim=DC, fused_dim=C)


# ------------------------------------------------------------------------------------------------ kd_loss
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_loss_zero_iff_student_equals_teacher(temperature):
    g = _gen()
    logits = 5 * torch.randn(3, 7, generator=g)
    assert kd_loss(logits, logits.clone(), temperature=temperature).item() == 0.0
    # Shifting a row by a constant leaves the softmax unchanged: still zero (up to rounding).
    assert kd_loss(logits + 3.0, logits, temperature=temperature).abs().item() < 1e-5
    other = logits + torch.randn(3, 7, generator=g)
    assert kd_loss(other, logits, temperature=temperature).item() > 1e-4


def test_kd_loss_known_value_and_tau_squared_scaling():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25), q = (0.5, 0.5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # With τ = 2 both sides are halved: p = softmax(teacher / 2); loss scaled by τ².
    p = torch.softmax(teacher / 2, -1)[0]
    exp2 = 4 * float((p * (p.log() - math.log(0.5))).sum())
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(exp2, rel=1e-5)


def test_kd_loss_gradient_matches_hand_derived_and_finite_difference():
    # L = τ² / R · Σ_r KL(p_r || q_r), q = softmax(z / τ)  =>  dL/dz = τ (q - p) / R.
    tau = 2.0
    z = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.5]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0], [0.2, 2.2, 0.1]])
    loss = kd_loss(z, t, temperature=tau)
    loss.backward()
    p = torch.softmax(t / tau, -1)
    q = torch.softmax(z.detach() / tau, -1)
    expected = tau * (q - p) / 2
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-6)
    # Central finite differences (float64 copy of the formula through the float32 function).
    eps = 1e-3
    fd = torch.zeros_like(z)
    for i in range(2):
        for j in range(3):
            zp, zm = z.detach().clone(), z.detach().clone()
            zp[i, j] += eps
            zm[i, j] -= eps
            fd[i, j] = (kd_loss(zp, t, temperature=tau) - kd_loss(zm, t, temperature=tau)) / (2 * eps)
    torch.testing.assert_close(fd, expected, rtol=2e-2, atol=2e-4)


def test_kd_loss_masked_candidates_do_not_change_loss_or_grad():
    g = _gen(1)
    s = torch.randn(3, 5, generator=g)
    t = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s1 = s.clone().requires_grad_()
    loss = kd_loss(s1, t, temperature=1.5, mask=mask)
    loss.backward()
    # Reference: each row restricted to its valid entries.
    ref = sum(kd_loss(s[r, mask[r]][None], t[r, mask[r]][None], temperature=1.5) for r in range(3)) / 3
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # Arbitrary (even huge / inf) values at masked entries change nothing.
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e6
    t2[~mask] = float("inf")
    s2.requires_grad_()
    loss2 = kd_loss(s2, t2, temperature=1.5, mask=mask)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(s2.grad[mask], s1.grad[mask])
    assert torch.all(s1.grad[~mask] == 0)


def test_kd_loss_rows_without_valid_candidates_are_dropped():
    s = torch.tensor([[0.0, 1.0], [5.0, -5.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    loss = kd_loss(s, t, mask=mask)
    assert loss.item() == pytest.approx(kd_loss(s[:1], t[:1]).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[1] == 0)
    none_valid = kd_loss(s, t, mask=torch.zeros(2, 2, dtype=torch.bool))
    assert none_valid.item() == 0.0


def test_kd_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


# ------------------------------------------------------------------------------------------------ itc / feature
def test_itc_loss_matches_open_clip_cliploss():
    from open_clip.loss import ClipLoss

    g = _gen(2)
    img, txt = _unit(g, 6, D), _unit(g, 6, D)
    scale = torch.tensor(20.0)
    ours = itc_loss(scale * img @ txt.t())
    ref = ClipLoss()(img, txt, scale)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    # Known answer: perfectly separated pairs with a huge scale give ~0; uniform logits give log B.
    assert itc_loss(torch.eye(4) * 1e4).item() < 1e-6
    assert itc_loss(torch.zeros(4, 4)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_feature_loss_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert feature_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert feature_loss(a, torch.tensor([[0.0, 1.0], [0.0, -1.0]])).item() == pytest.approx((1 + 2) / 2)
    # mse acts on L2-normalised features (CLIP-KD): ‖ŝ − t̂‖² = 2 (1 − cos), whatever the head's output norm.
    b = torch.tensor([[0.0, 3.0], [0.0, -0.5]])
    assert feature_loss(a, b, kind="mse").item() == pytest.approx((2 * 1 + 2 * 2) / 2)
    assert feature_loss(a * 100, b, kind="mse").item() == pytest.approx(feature_loss(a, b, kind="mse").item())
    with pytest.raises(ValueError):
        feature_loss(a, b, kind="l3")


def test_itm_scores_options():
    x = torch.tensor([[[1.0, 3.0], [2.0, -1.0]]])
    torch.testing.assert_close(L.itm_scores(x, kind="pos_logit"), torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(L.itm_scores(x, kind="log_odds"), torch.tensor([[2.0, -3.0]]))


# ------------------------------------------------------------------------------------------------ fusion / mixture
def _slow_softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_logit_fusion_against_slow_reference():
    g = _gen(3)
    teacher = _teacher(g)
    cfg = preset(
        "mcad",
        integration="logit_fusion",
        w_fusion_clip=0.7,
        w_fusion_itm=0.4,
        w_fusion_ss=0.2,
        topk_temperature=2.0,
        tau_itm=0.5,
        itm_score="log_odds",
    )
    loss_fn = _loss(cfg)
    log_p = loss_fn.topk_teacher_log_probs(teacher, "i2t", None)
    for b in range(B):
        idx = [j for j in range(K) if teacher.valid_i2t[b, j]]
        z = []
        for j in idx:
            s_clip = float(teacher.clip_topk_sims_i2t[b, j])
            s_itm = float(teacher.itm_logits_i2t[b, j, 1] - teacher.itm_logits_i2t[b, j, 0])
            s_ss = float(teacher.ss_sims_i2t[b, j])
            z.append((0.7 * s_clip * 100.0 + 0.4 * s_itm / 0.5 + 0.2 * s_ss / 0.07) / 2.0)
        ref = _slow_softmax(z)
        got = log_p[b, idx].exp().tolist()
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)
        assert torch.all(log_p[b, [j for j in range(K) if j not in idx]] == float("-inf"))


def test_mixture_against_slow_reference():
    g = _gen(4)
    teacher = _teacher(g)
    cfg = preset("mcad-online", integration="mixture", w_fusion_clip=3.0, w_fusion_itm=1.0, topk_temperature=1.5)
    log_p = _loss(cfg).topk_teacher_log_probs(teacher, "t2i", None)
    for b in range(B):
        idx = [j for j in range(K) if teacher.valid_t2i[b, j]]
        p_clip = _slow_softmax([float(teacher.clip_topk_sims_t2i[b, j]) * 100.0 / 1.5 for j in idx])
        p_itm = _slow_softmax([float(teacher.itm_logits_t2i[b, j, 1]) / 1.5 for j in idx])
        ref = [0.75 * a + 0.25 * c for a, c in zip(p_clip, p_itm, strict=True)]
        got = log_p[b, idx].exp().tolist()
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)
        assert sum(got) == pytest.approx(1.0, abs=1e-5)


def test_mixture_log_probs_single_teacher_is_log_softmax():
    z = torch.randn(3, 4, generator=_gen(5))
    torch.testing.assert_close(L.mixture_log_probs([z], weights=[2.0], temperature=2.0), F.log_softmax(z / 2, -1))


# ------------------------------------------------------------------------------------------------ modified features
@torch.no_grad()
def test_modified_topk_sims_against_slow_reference():
    g = _gen(6)
    teacher = _teacher(g)
    cfg = preset("mcad-online", gate_init=0.3)
    loss_fn = _loss(cfg)
    integ = loss_fn.integration
    with torch.no_grad():
        integ.proj_image.weight.normal_(generator=g)
        integ.proj_text.weight.normal_(generator=g)
    mod = loss_fn._modified(teacher)
    gv, gt = (float(x.detach()) for x in integ.gates())
    assert gv == pytest.approx(0.3, rel=1e-5)
    for b in range(B):
        for j in range(K):
            h = teacher.fused_cls_i2t[b, j]
            v = teacher.clip_image_emb[b] + gv * F.normalize(integ.proj_image(h), dim=0)
            t = teacher.clip_topk_text_emb[b, j] + gt * F.normalize(integ.proj_text(h), dim=0)
            ref = float((F.normalize(v, dim=0) @ F.normalize(t, dim=0)).detach())
            assert float(mod["topk_sims_i2t"][b, j]) == pytest.approx(ref, abs=1e-5)
        # Anchor image: fused states pooled with the teacher's ITM softmax over valid candidates.
        idx = [j for j in range(K) if teacher.valid_i2t[b, j]]
        w = _slow_softmax([float(teacher.itm_logits_i2t[b, j, 1]) for j in idx])
        hbar = sum(wi * teacher.fused_cls_i2t[b, j] for wi, j in zip(w, idx, strict=True))
        v = F.normalize(teacher.clip_image_emb[b] + gv * F.normalize(integ.proj_image(hbar), dim=0), dim=0)
        torch.testing.assert_close(mod["image"][b], v, rtol=1e-5, atol=1e-6)


def test_modified_features_start_at_clip_and_stay_anchored():
    g = _gen(7)
    teacher = _teacher(g)
    mod0 = _loss(preset("mcad-online", gate_init=0.0))._modified(teacher)
    torch.testing.assert_close(mod0["image"], teacher.clip_image_emb)
    torch.testing.assert_close(mod0["topk_sims_i2t"], teacher.clip_topk_sims_i2t)
    # Default gate (0.01): within arcsin(0.01) of CLIP; any gate < max_gate = 0.5 keeps the angle <= arcsin(0.5).
    mod = _loss(preset("mcad-online"))._modified(teacher)
    cos = (mod["image"] * teacher.clip_image_emb).sum(-1)
    assert torch.all(cos > math.cos(0.0101))
    big_loss = _loss(preset("mcad-online", gate_init=0.4999))
    with torch.no_grad():  # push the projection straight against the CLIP feature: the worst case
        big_loss.integration.proj_text.weight.normal_(generator=g)
    big = big_loss._modified(teacher)
    assert torch.all((big["text"] * teacher.clip_text_emb).sum(-1) >= math.cos(math.asin(0.5)) - 1e-5)


def test_student_sees_integration_outputs_detached():
    g = _gen(8)
    loss_fn = _loss(preset("mcad-online", gate_init=0.2))
    student = _student(g)
    out = loss_fn(student, _teacher(g))
    student_part = out["loss"] - out["integration_loss"]
    int_params = list(loss_fn.integration.parameters())
    grads = torch.autograd.grad(student_part, int_params, allow_unused=True, retain_graph=True)
    assert all(gr is None or torch.all(gr == 0) for gr in grads)
    # ... and the integration objective never reaches the student.
    leaves = [student.image_emb, student.text_emb, student.topk_text_emb, student.topk_image_emb]
    grads = torch.autograd.grad(out["integration_loss"], leaves, allow_unused=True)
    assert all(gr is None for gr in grads)


def test_integration_module_learns_from_informative_fused_features():
    # Fused features that identify the ground-truth pair: training only the integration objective must lower it
    # and open the gates (the module learns to use the single-stream signal).
    g = _gen(9)
    b, k = 8, 4
    teacher = _teacher(g, b=b, k=k, with_invalid=False)
    code = torch.randn(b, C, generator=g)
    fused_i2t = 0.1 * torch.randn(b, k, C, generator=g)
    fused_t2i = 0.1 * torch.randn(b, k, C, generator=g)
    fused_i2t[:, 0] += code  # candidate 0 of image i is its caption: shares the pair's fused code
    fused_t2i[:, 1] += code
    teacher.fused_cls_i2t, teacher.fused_cls_t2i = fused_i2t, fused_t2i
    itm_i2t = torch.zeros(b, k, 2)
    itm_i2t[:, 0, 1] = 5.0
    itm_t2i = torch.zeros(b, k, 2)
    itm_t2i[:, 1, 1] = 5.0
    teacher.itm_logits_i2t, teacher.itm_logits_t2i = itm_i2t, itm_t2i
    teacher.clip_logit_scale = 10.0
    loss_fn = _loss(preset("mcad-online"))
    opt = torch.optim.Adam(loss_fn.integration.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        objective = L.integration_objective(loss_fn.config, teacher, loss_fn._modified(teacher))
        first = objective.item() if first is None else first
        opt.zero_grad()
        objective.backward()
        opt.step()
    assert objective.item() < 0.7 * first
    assert min(abs(v) for v in loss_fn.diagnostics().values()) > 0.1  # sign is symmetric with P


# ------------------------------------------------------------------------------------------------ presets / module
EXPECTED_KEYS = {
    "contrastive": {"itc_loss"},
    "clip-kd": {"itc_loss", "kd_i2t_loss", "kd_t2i_loss"},
    "clip-kd-feat": {"itc_loss", "kd_i2t_loss", "kd_t2i_loss", "feat_loss"},
    "single-topk": {"itc_loss", "topk_i2t_loss", "topk_t2i_loss"},
    "mcad": {"itc_loss", "kd_i2t_loss", "kd_t2i_loss", "topk_i2t_loss", "topk_t2i_loss", "feat_loss"},
    "mcad-rank": {"itc_loss", "kd_i2t_loss", "kd_t2i_loss", "topk_i2t_loss", "topk_t2i_loss", "feat_loss"},
    "mcad-online": {
        "itc_loss",
        "kd_i2t_loss",
        "kd_t2i_loss",
        "topk_i2t_loss",
        "topk_t2i_loss",
        "feat_loss",
        "integration_loss",
    },
}


@pytest.mark.parametrize("name", L.PRESETS)
def test_each_preset_returns_exactly_its_keys(name):
    g = _gen(10)
    cfg = preset(name)
    assert cfg.loss_keys() == EXPECTED_KEYS[name]
    out = _loss(cfg)(_student(g), _teacher(g))
    assert set(out) == EXPECTED_KEYS[name] | {"loss"}
    assert all(v.dtype == torch.float32 and v.ndim == 0 and torch.isfinite(v) for v in out.values())
    # `loss` is the student's loss: the teacher-side integration_loss is logged apart (issue 10, fault 4)
    total = sum(v for k, v in out.items() if k.endswith("_loss") and k != "integration_loss")
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("name", L.PRESETS)
def test_required_inputs_are_sufficient(name):
    # Only the fields required_inputs() names are given: forward must work.
    g = _gen(11)
    cfg = preset(name)
    req = cfg.required_inputs()
    full_s, full_t = _student(g), _teacher(g)
    s = StudentOutputs(
        **{f: (getattr(full_s, f) if f in req["student"] else None) for f in full_s.__dataclass_fields__}
    )
    t = TeacherTargets(
        **{f: (getattr(full_t, f) if f in req["teacher"] else None) for f in full_t.__dataclass_fields__}
    )
    out = _loss(cfg)(s, t)
    assert set(out) == EXPECTED_KEYS[name] | {"loss"}


def test_zero_weight_drops_term_and_missing_input_names_field():
    cfg = preset("mcad-online", w_topk_t2i=0.0)
    assert "topk_t2i_loss" not in cfg.loss_keys()
    g = _gen(12)
    s = _student(g)
    s.topk_text_emb = None
    with pytest.raises(ValueError, match="topk_text_emb"):
        _loss(cfg)(s, _teacher(g))


def test_preset_and_config_validation():
    with pytest.raises(ValueError, match="known presets"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown loss field"):
        preset("mcad-online", w_nothing=1.0)
    with pytest.raises(ValueError):
        preset("mcad-online", integration="average")
    with pytest.raises(ValueError):
        preset("mcad-online", kd_temperature=0.0)
    assert preset("clip-kd", kd_temperature=2).kd_temperature == 2.0


def test_mcad_logit_scale_gradient_and_kd_at_teacher_equals_zero():
    # When the student reproduces the CLIP teacher exactly (same embeddings, same scale), in-batch KD is 0.
    g = _gen(13)
    teacher = _teacher(g)
    img = teacher.clip_image_emb.clone().requires_grad_()
    s = StudentOutputs(image_emb=img, text_emb=teacher.clip_text_emb.clone(), logit_scale=torch.tensor(100.0))
    out = MCADLoss(preset("clip-kd"), student_dim=DC)(s, teacher)
    assert out["kd_i2t_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kd_t2i_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_full_mcad_preset_gives_every_student_and_loss_parameter_a_finite_gradient():
    from mcad_cache.student import create_student

    torch.manual_seed(0)
    model = create_student("tiny")
    g = _gen(14)
    b, k = 3, 2
    images = torch.rand(b, 3, 64, 64, generator=g)
    captions = ["a red bus", "two dogs in the snow", "a bowl of fruit"]
    cand_captions = ["a blue bus", "a red car", "one dog", "snow", "fruit", "a bowl"]
    cand_images = torch.rand(b * k, 3, 64, 64, generator=g)
    teacher = _teacher(g, b=b, k=k, with_invalid=False)
    # The real student path: one forward of anchors + candidates, candidates gathered by index (distill.step).
    batch = DistillBatch(
        keys=[f"s{i}" for i in range(b)],
        images=images,
        texts=captions + cand_captions,
        extra_images=cand_images,
        topk_text_index=torch.arange(b, b + b * k).view(b, k),
        topk_image_index=torch.arange(b, b + b * k).view(b, k),
        targets=teacher,
    )
    loss_fn = MCADLoss(
        preset("mcad-online"),
        student_dim=model.embed_dim,
        student_image_feat_dim=model.image_feat_dim,
        student_text_feat_dim=model.text_feat_dim,
        clip_dim=DC,
        fused_dim=C,
    )
    losses = distill_forward(model, loss_fn, batch)
    assert set(losses) == EXPECTED_KEYS["mcad-online"] | {"loss"}
    losses["loss"].backward()
    named = [("student." + n, p) for n, p in model.named_parameters()]
    named += [("loss." + n, p) for n, p in loss_fn.named_parameters()]
    missing = [n for n, p in named if p.grad is None]
    bad = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert missing == [] and bad == []
    # The heads and the integration module really learn: non-zero gradients.
    assert all(p.grad.abs().sum() > 0 for _, p in loss_fn.named_parameters())
    assert model.log_logit_scale.grad.abs() > 0


def test_losses_are_float32_inside_a_bf16_autocast_region():
    g = _gen(15)
    loss_fn = _loss(preset("mcad-online", gate_init=0.2))
    student, teacher = _student(g, requires_grad=False), _teacher(g)
    ref = loss_fn(student, teacher)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = loss_fn(student, teacher)
    for key, value in ref.items():
        assert got[key].dtype == torch.float32
        assert got[key].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), key


def test_free_student_embeddings_descend_every_mcad_term():
    # Sign / wiring check: free student embeddings optimised on the full mcad loss lower every student-side term.
    g = _gen(16)
    teacher = _teacher(g, with_invalid=True)
    teacher.clip_logit_scale = 20.0
    raw = [torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)]
    raw += [torch.randn(B, K, D, generator=g), torch.randn(B, K, D, generator=g)]
    for t in raw:
        t.requires_grad_()
    log_scale = torch.tensor(math.log(20.0), requires_grad=True)
    loss_fn = _loss(preset("mcad-online"))
    opt = torch.optim.Adam([*raw, log_scale, *loss_fn.parameters()], lr=0.1)

    def run() -> dict[str, torch.Tensor]:
        s = StudentOutputs(
            image_emb=F.normalize(raw[0], dim=-1),
            text_emb=F.normalize(raw[1], dim=-1),
            logit_scale=log_scale.exp(),
            topk_text_emb=F.normalize(raw[2], dim=-1),
            topk_image_emb=F.normalize(raw[3], dim=-1),
        )
        return loss_fn(s, teacher)

    first = {k: v.item() for k, v in run().items()}
    for _ in range(50):
        out = run()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in run().items()}
    for key in ("kd_i2t_loss", "kd_t2i_loss", "topk_i2t_loss", "topk_t2i_loss", "feat_loss", "integration_loss"):
        assert last[key] < 0.5 * first[key], (key, first[key], last[key])


def test_nan_in_invalid_candidate_slots_changes_nothing():
    g = _gen(17)
    teacher = _teacher(g)
    loss_fn = _loss(preset("mcad-online", gate_init=0.2))
    student = _student(g)
    ref = loss_fn(student, teacher)
    for d, names in L.PER_CANDIDATE.items():
        invalid = ~getattr(teacher, f"valid_{d}")
        for name in names:
            getattr(teacher, name)[invalid] = float("nan")
    out = loss_fn(student, teacher)
    for key, value in ref.items():
        assert out[key].item() == pytest.approx(value.item(), rel=1e-6), key
    out["loss"].backward()
    grads = [p.grad for p in loss_fn.parameters()] + [student.image_emb.grad, student.topk_text_emb.grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_itc_multi_positive_against_slow_reference():
    g = _gen(18)
    logits = 4 * torch.randn(4, 4, generator=g)
    # Identity positives: exactly the plain (open_clip) ITC.
    assert itc_loss(logits, positives=torch.eye(4, dtype=torch.bool)).item() == pytest.approx(
        itc_loss(logits).item(), rel=1e-6
    )
    keys = ["a", "b", "c", "a"]  # anchor 3 is another caption of image "a"
    caps = ["A dog ", "a cat", "a dog", "x"]  # caption 2 repeats caption 0's text
    pos = L.duplicate_positives(keys, caps)
    expected_pos = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(pos, expected_pos)
    total = 0.0
    for mat, p in ((logits, pos), (logits.t(), pos.t())):
        for i in range(4):
            probs = _slow_softmax(mat[i].tolist())
            total += -math.log(sum(probs[j] for j in range(4) if p[i, j])) / 4
    assert itc_loss(logits, positives=pos).item() == pytest.approx(total / 2, rel=1e-5)
    with pytest.raises(ValueError):
        itc_loss(logits, positives=torch.ones(3, 3, dtype=torch.bool))
