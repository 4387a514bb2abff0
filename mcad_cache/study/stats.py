"""Paired statistics of a seed study: Δ with a t-interval, Wilcoxon signed-rank, Holm, minimal detectable Δ.

Every test comes from a library, none is written here: the paired t-interval and t-test are ``scipy.stats.ttest_rel``,
the signed-rank test is ``scipy.stats.wilcoxon``, Holm's step-down correction is statsmodels'
``multipletests(method="holm")``, and the power analysis is statsmodels' ``TTestPower`` (one-sample t-test on the
paired differences, nobs = number of pairs). This module only arranges their inputs and outputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05  # two-sided significance level of every test and the 1 - 0.95 of the t-interval (convention)
POWER = 0.8  # power of the minimal detectable Δ (the 80 %; Cohen's convention)


@dataclass(frozen=True)
class PairedDelta:
    """The paired comparison of two presets over the same seeds, Δ = ``a - b`` per seed.

    Units are those of the inputs (RSUM points for a study). NaN where a value is undefined (fewer than 2 pairs, or
    zero spread for the t quantities).
    """

    a: str  # name of the first preset (the one whose gain is measured)
    b: str  # name of the preset it is compared against
    num_pairs: int  # n, seeds present in both
    mean_delta: float  # mean of the n paired differences a - b
    std_delta: float  # sample standard deviation (ddof = 1) of the paired differences
    ci_low: float  # lower end of the 95 % t-interval of the mean difference (scipy ttest_rel)
    ci_high: float  # upper end of that interval
    t_p: float  # two-sided paired t-test p-value (scipy ttest_rel)
    wilcoxon_p: float  # two-sided Wilcoxon signed-rank p-value (scipy wilcoxon, zero differences dropped)
    wilcoxon_p_holm: float  # wilcoxon_p after Holm's correction over the study's family of comparisons
    mde: float  # minimal detectable |Δ| at POWER, ALPHA two-sided, given n and std_delta (statsmodels TTestPower)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (NaN stays NaN: ``json.dumps`` writes it as ``NaN``)."""
        return asdict(self)


def paired_delta(
    a_values: Sequence[float], b_values: Sequence[float], *, a: str = "a", b: str = "b", alpha: float = ALPHA
) -> PairedDelta:
    """Paired Δ = a - b over seeds, with a (1 - alpha) t-interval, the t-test and Wilcoxon p-values and the MDE.

    Args:
        a_values: one value per seed for preset ``a`` (e.g. RSUM, 0-600), [n] float.
        b_values: the same seeds' values for preset ``b``, in the same order, [n] float.
        a, b: preset names stored in the result.
        alpha: two-sided significance level.
    Returns:
        A ``PairedDelta`` whose ``wilcoxon_p_holm`` equals ``wilcoxon_p`` (a family of one); ``holm`` sets it.
    Raises:
        ValueError: the two sequences differ in length or hold a non-finite value.
    """
    x = np.asarray(a_values, dtype=np.float64)
    y = np.asarray(b_values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need equal 1-D shapes, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired values must be finite")
    d = x - y
    n = int(d.size)
    nan = float("nan")
    mean = float(d.mean()) if n else nan
    std = float(d.std(ddof=1)) if n > 1 else nan
    ci_low = ci_high = t_p = w_p = nan
    if n > 1 and std > 0:
        res = stats.ttest_rel(x, y)
        ci = res.confidence_interval(confidence_level=1.0 - alpha)
        ci_low, ci_high, t_p = float(ci.low), float(ci.high), float(res.pvalue)
    elif n > 1:  # every difference equal: the interval is that point, the t statistic undefined
        ci_low = ci_high = mean
    if n > 0 and np.any(d != 0):
        with warnings.catch_warnings():  # scipy warns when zeros or ties force the normal approximation
            warnings.simplefilter("ignore", UserWarning)
            w_p = float(stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)
    elif n > 0:
        w_p = 1.0  # no non-zero difference: no evidence against Δ = 0 (scipy raises on an all-zero sample)
    return PairedDelta(
        a=a,
        b=b,
        num_pairs=n,
        mean_delta=mean,
        std_delta=std,
        ci_low=ci_low,
        ci_high=ci_high,
        t_p=t_p,
        wilcoxon_p=w_p,
        wilcoxon_p_holm=w_p,
        mde=minimal_detectable_delta(std, n, alpha=alpha),
    )


def holm(deltas: Sequence[PairedDelta], *, alpha: float = ALPHA) -> list[PairedDelta]:
    """Holm's step-down correction of the Wilcoxon p-values over one family of comparisons (statsmodels).

    Args:
        deltas: the family (e.g. mcad against every other preset of the study).
        alpha: family-wise error rate.
    Returns:
        The same comparisons in the same order with ``wilcoxon_p_holm`` set; a NaN p-value stays NaN and is left
        out of the family.
    """
    from statsmodels.stats.multitest import multipletests

    finite = [i for i, d in enumerate(deltas) if math.isfinite(d.wilcoxon_p)]
    out = [replace(d, wilcoxon_p_holm=float("nan")) for d in deltas]
    if finite:
        _, adjusted, _, _ = multipletests([deltas[i].wilcoxon_p for i in finite], alpha=alpha, method="holm")
        for i, p in zip(finite, adjusted, strict=True):
            out[i] = replace(deltas[i], wilcoxon_p_holm=float(p))
    return out


def minimal_detectable_delta(std_delta: float, num_pairs: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest |Δ| a two-sided paired t-test over ``num_pairs`` pairs detects with ``power``, given ``std_delta``.

    MDE = d* x std_delta, where d* is the standardised effect size solved by statsmodels'
    ``TTestPower().solve_power(nobs=num_pairs, alpha=alpha, power=power)`` (noncentral t).

    Returns:
        The MDE in the units of ``std_delta``; NaN when ``num_pairs < 2`` or ``std_delta`` is NaN; 0 when it is 0.
    """
    if num_pairs < 2 or not math.isfinite(std_delta):
        return float("nan")
    if std_delta == 0:
        return 0.0
    from statsmodels.stats.power import TTestPower

    d = TTestPower().solve_power(effect_size=None, nobs=num_pairs, alpha=alpha, power=power, alternative="two-sided")
    return float(d) * std_delta


def pairs_needed(std_delta: float, target_mde: float, *, alpha: float = ALPHA, power: float = POWER) -> int:
    """Fewest paired seeds whose two-sided paired t-test detects ``target_mde`` with ``power``, given ``std_delta``.

    The smallest integer n >= 2 with statsmodels ``TTestPower().power(effect_size=target_mde / std_delta, nobs=n)``
    >= ``power`` (power grows with n: doubling, then bisection). statsmodels' continuous ``solve_power`` is not used
    here because its noncentral t returns NaN for some large effects; a NaN two-sided power is replaced by the
    one-sided power at alpha / 2 (the near tail alone, a lower bound). Returns 2 when ``std_delta`` is 0 and 0 when
    it is not finite.

    Raises:
        ValueError: ``target_mde <= 0``.
    """
    if target_mde <= 0:
        raise ValueError(f"target_mde must be > 0, got {target_mde}")
    if not math.isfinite(std_delta):
        return 0
    if std_delta == 0:
        return 2
    from statsmodels.stats.power import TTestPower

    solver, effect = TTestPower(), target_mde / std_delta

    def enough(n: int) -> bool:
        p = float(solver.power(effect_size=effect, nobs=n, alpha=alpha, alternative="two-sided"))
        if not math.isfinite(p):  # the far tail's NaN: the near tail alone is a lower bound of the power
            p = float(solver.power(effect_size=effect, nobs=n, alpha=alpha / 2, alternative="larger"))
        return math.isfinite(p) and p >= power

    lo, hi = 1, 2  # invariant: lo is not enough (or < 2), hi is tried next
    while not enough(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return max(2, hi)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof = 1) of a sequence; std NaN for one value, both NaN for none."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")
