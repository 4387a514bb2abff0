"""Plain functional losses: ITC, KD (full and from log-probabilities), feature alignment, ITM scores, fusion/mixture.

Conventions (STYLE.md): ``sims`` are cosines in [-1, 1]; ``logits = logit_scale * sims`` with a *linear* logit scale;
KD uses ``log_softmax(logits / τ)`` on both sides and ``KL(p_T || q_S) * τ²`` (Hinton et al. 2015; timm's
``LogitDistillationTask``), in float32. Masked (invalid) entries are removed from every softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ITM_SCORES = ("pos_logit", "log_odds")
FEATURE_KINDS = ("cosine", "mse")
TOPK_LOSSES = ("kl", "listmle", "pairwise")


def itc_loss(logits_i2t: Tensor, *, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP on ground truth: pair i is image i with caption i.

    Source: CLIP (Radford et al. 2021, Fig. 3 pseudo-code); open_clip ``ClipLoss``. With ``positives`` (ours), each
    row's loss is ``-log Σ_{j positive} softmax(row)_j`` (multi-positive InfoNCE), so in-batch duplicates (the same
    caption text on two images, as in web alt-text) are not pushed apart; without it this is exactly ``ClipLoss``.

    Args:
        logits_i2t: [B, B] ``logit_scale * image_emb @ text_emb.T``; rows are image queries.
        positives: [B, B] bool or None, ``positives[i, j]`` = caption j also matches image i; the diagonal is
            always treated as positive.
    Returns:
        Scalar float32: ``(CE(logits_i2t, arange B) + CE(logits_i2t.T, arange B)) / 2`` (multi-positive form when
        ``positives`` is given).
    Raises:
        ValueError: ``logits_i2t`` is not square, or ``positives`` has another shape.
    """
    if logits_i2t.ndim != 2 or logits_i2t.shape[0] != logits_i2t.shape[1]:
        raise ValueError(f"itc_loss needs square [B, B] logits, got {tuple(logits_i2t.shape)}")
    logits = logits_i2t.float()
    n = logits.shape[0]
    if positives is None:
        labels = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    if positives.shape != logits.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must match logits {tuple(logits.shape)}")
    pos = positives.bool().to(logits.device) | torch.eye(n, dtype=torch.bool, device=logits.device)
    rows = -torch.logsumexp(F.log_softmax(logits, -1).masked_fill(~pos, float("-inf")), -1).mean()
    cols = -torch.logsumexp(F.log_softmax(logits.t(), -1).masked_fill(~pos.t(), float("-inf")), -1).mean()
    return (rows + cols) / 2


def duplicate_positives(image_keys: list[str], captions: list[str]) -> Tensor:
    """In-batch positives for ``itc_loss``: pairs (i, j) whose images are the same sample or whose captions are the
    same text (compared after ``strip().lower()``).

    Args:
        image_keys: B sample keys (``__key__``) of the anchor images.
        captions: B anchor captions.
    Returns:
        [B, B] bool on CPU, True on the diagonal.
    Raises:
        ValueError: the two lists differ in length.
    """
    if len(image_keys) != len(captions):
        raise ValueError(f"{len(image_keys)} image keys vs {len(captions)} captions")
    keys = list(image_keys)
    texts = [c.strip().lower() for c in captions]
    same_key = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
    same_text = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.bool)
    return same_key | same_text


def masked_log_softmax(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log_softmax`` over the last dim restricted to ``mask``; masked entries are ``-inf``.

    Args:
        logits: [..., K] float (upcast to float32).
        mask: [..., K] bool or None (all valid). A row with no valid entry is computed as if all its entries were
            valid (so it stays NaN-free); callers drop such rows.
    Returns:
        [..., K] float32 log-probabilities.
    """
    logits = logits.float()
    if mask is None:
        return F.log_softmax(logits, dim=-1)
    row_ok = mask.any(dim=-1, keepdim=True)
    eff = mask | ~row_ok
    return F.log_softmax(logits.masked_fill(~eff, float("-inf")), dim=-1)


def kd_loss_from_log_probs(
    student_logits: Tensor, teacher_log_probs: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``τ² · mean_rows KL(p_T || softmax(student_logits / τ))`` for a teacher given as log-probabilities.

    Args:
        student_logits: [..., K] scaled student logits (before τ), any float dtype; computed in float32.
        teacher_log_probs: [..., K] teacher log-probabilities already at temperature τ (e.g. a mixture), float32.
        temperature: τ > 0.
        mask: [..., K] bool, False entries are removed from the student softmax and from the sum; the teacher must
            put zero mass there. Rows with no True entry are left out of the mean.
    Returns:
        Scalar float32 (0 with a gradient path when no row is valid).
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_log_probs.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = masked_log_softmax(student_logits.float() / temperature, mask)
    log_p = teacher_log_probs.float()
    if mask is None:
        term = log_p.exp() * (log_p - log_q)
        row_kl = term.sum(-1)
        return row_kl.mean() * temperature**2
    mask = mask.bool()
    log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
    log_q = torch.where(mask, log_q, torch.zeros_like(log_q))
    p = torch.where(mask, log_p.exp(), torch.zeros_like(log_p))
    row_kl = (p * (log_p - log_q)).sum(-1)
    row_ok = mask.any(-1)
    if not bool(row_ok.any()):
        return student_logits.float().sum() * 0.0
    return row_kl[row_ok].mean() * temperature**2


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Distribution distillation ``τ² · mean_rows KL(softmax(t / τ) || softmax(s / τ))`` over the last dim.

    Source: Hinton et al. 2015; timm ``LogitDistillationTask`` (``log_softmax`` on both sides, ``τ²`` scaling).
    The gradient with respect to ``student_logits`` is ``τ · (q - p) / R`` for R averaged rows.

    Args:
        student_logits: [..., K] scaled student logits (``logit_scale * sims``), any float dtype; float32 inside.
        teacher_logits: [..., K] teacher logits on the same candidates; float16 from a cache is fine.
        temperature: τ > 0, dimensionless.
        mask: [..., K] bool or None; False entries are excluded from both softmaxes. Rows without any True entry are
            dropped from the mean.
    Returns:
        Scalar float32, exactly 0 when ``student_logits == teacher_logits`` on the valid entries.
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_log_probs = masked_log_softmax(teacher_logits.float() / temperature, mask)
    return kd_loss_from_log_probs(student_logits, teacher_log_probs, temperature=temperature, mask=mask)


def feature_loss(student: Tensor, teacher: Tensor, *, kind: str = "cosine") -> Tensor:
    """Feature alignment between (already projected) student features and teacher features, both L2-normalised.

    Source: CLIP-KD (Yang et al. 2024) feature distillation: MSE on L2-normalised features (their weight 2000 on the
    element mean at D = 512 is about 8 · (1 − cos)); MCAD aligns features (form not public).

    Args:
        student: [B, Dc] student features mapped into the teacher's space, float (normalised here).
        teacher: [B, Dc] teacher features (CLIP or modified), float32, no gradient needed (normalised here).
        kind: ``"cosine"`` = mean over B of ``1 - cos(student, teacher)``; ``"mse"`` = mean over B of the squared
            L2 distance of the normalised vectors, ``‖ŝ − t̂‖² = 2 (1 − cos)`` (CLIP-KD's form; independent of Dc).
    Returns:
        Scalar float32; 0 when the two point the same way.
    Raises:
        ValueError: shapes differ or unknown ``kind``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"feature_loss: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if kind == "mse":
        s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
        return (s - t).pow(2).sum(-1).mean()
    raise ValueError(f"feature_loss kind must be one of {FEATURE_KINDS}, got {kind!r}")


def _teacher_order(teacher_log_probs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Candidate order by descending teacher probability (invalid last) and the validity in that order."""
    lp = teacher_log_probs.float()
    valid = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask.bool()
    key = torch.where(valid, torch.nan_to_num(lp, nan=-1e30, neginf=-1e30), torch.full_like(lp, -float("inf")))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    return order, torch.gather(valid, -1, order)


def listmle_loss(
    student_logits: Tensor, teacher_log_probs: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """ListMLE over the teacher's order of each query's valid candidates: ``−log P_PL(π_T | s / τ)``.

    Source: Xia et al. 2008 (ListMLE); distilling a cross-encoder's *order* of hard negatives instead of its
    concentrated scores: CPRD (CVPR 2024). Per query, ``Σ_j [logsumexp_{l ≥ j} z_{π_l} − z_{π_j}]`` over the valid
    candidates sorted by teacher probability (π_T), ``z = student_logits / τ``; divided by the number of valid
    candidates (our choice, so K does not scale the weight); mean over queries with at least two valid candidates.

    Args:
        student_logits: [B, K] scaled student logits.
        teacher_log_probs: [B, K] teacher log-probabilities (only their order is used).
        temperature: τ > 0 on the student logits.
        mask: [B, K] bool or None (all valid).
    Returns:
        Scalar float32 (0 with a gradient path when no query has two valid candidates).
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_log_probs.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    order, valid = _teacher_order(teacher_log_probs, mask)
    z = torch.gather(student_logits.float() / temperature, -1, order).masked_fill(~valid, -float("inf"))
    tail = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)  # logsumexp over positions l >= j
    per = torch.where(valid, tail - z, torch.zeros_like(z)).sum(-1)
    n = valid.sum(-1)
    ok = n >= 2
    if not bool(ok.any()):
        return student_logits.float().sum() * 0.0
    return (per[ok] / n[ok].float()).mean()


def pairwise_rank_loss(
    student_logits: Tensor, teacher_log_probs: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Pairwise logistic ranking loss (RankNet) over the teacher's preferences among a query's valid candidates.

    Source: Burges et al. 2005 (RankNet); order distillation as in CPRD (CVPR 2024). For every valid pair with
    ``p_T(a) > p_T(b)``: ``softplus(−(z_a − z_b))``, ``z = student_logits / τ``; mean over those pairs, then over
    queries that have one (our normalisation).

    Args:
        student_logits: [B, K] scaled student logits.
        teacher_log_probs: [B, K] teacher log-probabilities (only their order is used; ties give no pair).
        temperature: τ > 0 on the student logits.
        mask: [B, K] bool or None.
    Returns:
        Scalar float32.
    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_log_probs.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = torch.ones_like(student_logits, dtype=torch.bool) if mask is None else mask.bool()
    lp = torch.nan_to_num(teacher_log_probs.float(), nan=-1e30, neginf=-1e30)
    z = student_logits.float() / temperature
    prefer = (lp[:, :, None] > lp[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    loss = F.softplus(-(z[:, :, None] - z[:, None, :]))
    n = prefer.sum((1, 2))
    ok = n > 0
    if not bool(ok.any()):
        return student_logits.float().sum() * 0.0
    per = torch.where(prefer, loss, torch.zeros_like(loss)).sum((1, 2))
    return (per[ok] / n[ok].float()).mean()


def itm_scores(itm_logits: Tensor, *, kind: str = "pos_logit") -> Tensor:
    """Single-stream match score from raw ITM logits.

    Args:
        itm_logits: [..., 2] raw logits, class 1 = match.
        kind: ``"pos_logit"`` = ``itm_logits[..., 1]`` (ALBEF ``evaluation`` and BLIP re-rank by it);
            ``"log_odds"`` = ``itm_logits[..., 1] - itm_logits[..., 0]`` = log p(match) / p(no match).
    Returns:
        [...] float32.
    Raises:
        ValueError: last dim is not 2 or unknown ``kind``.
    """
    if itm_logits.shape[-1] != 2:
        raise ValueError(f"itm_logits must end in 2 classes, got {tuple(itm_logits.shape)}")
    x = itm_logits.float()
    if kind == "pos_logit":
        return x[..., 1]
    if kind == "log_odds":
        return x[..., 1] - x[..., 0]
    raise ValueError(f"itm_score must be one of {ITM_SCORES}, got {kind!r}")


def logit_fusion_logits(
    scores: list[Tensor], *, weights: list[float], temperatures: list[float], mask: Tensor | None = None
) -> Tensor:
    """Fused teacher logits ``z = Σ_m w_m · s_m / τ_m`` (``p_T = softmax(z / τ_kd)`` over the candidates).

    Args:
        scores: M tensors [B, K] (e.g. CLIP cosines, ITM scores), float.
        weights: M weights w_m >= 0; terms with w_m = 0 are skipped.
        temperatures: M teacher temperatures τ_m > 0.
        mask: [B, K] bool; invalid entries become ``-inf``.
    Returns:
        [B, K] float32 logits.
    """
    z = None
    for s, w, t in zip(scores, weights, temperatures, strict=True):
        if w == 0:
            continue
        term = w * s.float() / t
        z = term if z is None else z + term
    if z is None:
        raise ValueError("logit fusion needs at least one positive weight")
    if mask is not None:
        z = z.masked_fill(~mask.bool(), float("-inf"))
    return z


def mixture_log_probs(
    logits: list[Tensor], *, weights: list[float], temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Log of a distribution mixture ``p_T = Σ_m w̄_m softmax(z_m / τ)`` with ``w̄ = w / Σ w``.

    Computed stably as ``logsumexp_m(log w̄_m + log_softmax(z_m / τ))``.

    Args:
        logits: M tensors [B, K], each teacher's logits ``s_m / τ_m``.
        weights: M weights >= 0 (renormalised to sum 1; zero weights skipped).
        temperature: KD τ > 0 applied to every teacher before its softmax.
        mask: [B, K] bool or None; every teacher's softmax is restricted to it.
    Returns:
        [B, K] float32 log-probabilities (``-inf`` at masked entries).
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("mixture needs at least one positive weight")
    parts = [
        math.log(w / total) + masked_log_softmax(z.float() / temperature, mask)
        for z, w in zip(logits, weights, strict=True)
        if w > 0
    ]
    return torch.logsumexp(torch.stack(parts, dim=0), dim=0)


__all__ = [
    "FEATURE_KINDS",
    "ITM_SCORES",
    "TOPK_LOSSES",
    "duplicate_positives",
    "feature_loss",
    "itc_loss",
    "itm_scores",
    "kd_loss",
    "kd_loss_from_log_probs",
    "listmle_loss",
    "logit_fusion_logits",
    "masked_log_softmax",
    "mixture_log_probs",
    "pairwise_rank_loss",
]
