"""Statistics over per-run results: small pure functions over arrays.

Inputs are 1-d arrays of one value per run (e.g. final test accuracy ``[runs]``). Intervals are
``[2]`` arrays (lower, upper). Two-sample tests return a :class:`TTest` that names the test it
is, so a report can say which test each p-value comes from. Distributions come from SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats as _sp


def mean(x) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64)))


def std(x, ddof: int = 1) -> float:
    """Standard deviation; ddof=1 is the sample value, ddof=0 the population value (what the
    author's code printed)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.std(x, ddof=ddof)) if len(x) > ddof else float("nan")


def t_interval(x, confidence: float = 0.95) -> np.ndarray:
    """Confidence interval for the mean: mean ± t_{(1+c)/2, n-1} · s / sqrt(n). Returns [2]."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return np.array([np.nan, np.nan])
    half = _sp.t.ppf((1 + confidence) / 2, n - 1) * std(x) / np.sqrt(n)
    return np.array([mean(x) - half, mean(x) + half])


@dataclass(frozen=True)
class TTest:
    """A two-sided t-test: statistic, degrees of freedom, p-value and which test it was."""

    t: float
    df: float
    p: float
    test: str


def _two_sided(t: float, df: float) -> float:
    if np.isnan(t) or df <= 0:
        return float("nan")
    return float(2 * _sp.t.sf(abs(t), df))


def _ratio(num: float, den: float) -> float:
    """num / den with the limits a t statistic takes when the spread is zero (NaN when the
    spread is undefined: too few runs)."""
    if np.isnan(den) or np.isnan(num):
        return float("nan")
    if den > 0:
        return num / den
    return float("nan") if num == 0 else float(np.copysign(np.inf, num))


def pooled_std(a, b) -> float:
    """s_p = sqrt((sum (a - mean_a)^2 + sum (b - mean_b)^2) / (n_a + n_b - 2)); NaN if n_a + n_b < 3."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    df = len(a) + len(b) - 2
    if df <= 0:
        return float("nan")
    return float(np.sqrt((np.sum((a - a.mean()) ** 2) + np.sum((b - b.mean()) ** 2)) / df))


def student_t(a, b) -> TTest:
    """Unpaired t-test with pooled variance (equal variances assumed):
    t = (mean_a - mean_b) / (s_p sqrt(1/n_a + 1/n_b)), s_p^2 = ((n_a-1)s_a^2 + (n_b-1)s_b^2)/(n_a+n_b-2),
    df = n_a + n_b - 2. (The author's code used this test.)"""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = len(a), len(b)
    df = na + nb - 2
    if min(na, nb) < 1:
        return TTest(float("nan"), float("nan"), float("nan"), "Student (unpaired, pooled variance)")
    t = _ratio(mean(a) - mean(b), pooled_std(a, b) * np.sqrt(1 / na + 1 / nb))
    return TTest(t, float(df), _two_sided(t, df), "Student (unpaired, pooled variance)")


def welch_t(a, b) -> TTest:
    """Unpaired t-test without equal variances: t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b),
    df by Welch–Satterthwaite: (v_a + v_b)^2 / (v_a^2/(n_a-1) + v_b^2/(n_b-1)), v = s^2/n."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return TTest(float("nan"), float("nan"), float("nan"), "Welch (unpaired, unequal variances)")
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    t = _ratio(mean(a) - mean(b), np.sqrt(va + vb))
    denom = va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)
    df = (va + vb) ** 2 / denom if denom > 0 else float("nan")
    return TTest(t, float(df), _two_sided(t, df), "Welch (unpaired, unequal variances)")


def paired_t(a, b) -> TTest:
    """Paired t-test over matched runs: d = a - b, t = mean(d) / (s_d / sqrt(n)), df = n - 1.
    Valid when run i of both models shares its initial first-layer weights (paired design)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 1:
        return TTest(float("nan"), float("nan"), float("nan"), "paired t-test")
    t = _ratio(mean(d), std(d) / np.sqrt(len(d)))
    return TTest(t, float(len(d) - 1), _two_sided(t, len(d) - 1), "paired t-test")


def cohens_d(a, b) -> float:
    """Effect size with the pooled standard deviation: (mean_a - mean_b) / s_p."""
    if min(len(a), len(b)) < 1:
        return float("nan")
    return _ratio(mean(a) - mean(b), pooled_std(a, b))


def cohens_dz(a, b) -> float:
    """Paired effect size: mean(d) / s_d for d = a - b."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return _ratio(mean(d), std(d)) if len(d) else float("nan")


def holm(pvalues) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values: sort ascending, p_(i) * (m - i + 1) (i from 1),
    running maximum, capped at 1; NaNs stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, p[idx] * (m - i)))
        out[idx] = running
    return out


def summarize(x) -> dict[str, float]:
    """mean, sample std, population std, 95% t-interval, n, min, max of ``x [runs]``
    (all NaN when ``x`` is empty)."""
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return {key: float("nan") for key in ("mean", "std", "std_pop", "ci_low", "ci_high",
                                              "min", "max")} | {"n": 0}
    lo, hi = t_interval(x)
    return {"mean": mean(x), "std": std(x), "std_pop": std(x, 0), "ci_low": float(lo),
            "ci_high": float(hi), "n": len(x), "min": float(x.min()), "max": float(x.max())}


def pairwise(values: dict[str, np.ndarray], paired: bool) -> list[dict]:
    """Every pair of models: Student, Welch and (if ``paired``) paired t-tests with Cohen's d and
    d_z; Holm-adjusted p-values across all pairs, separately for each test.

    NaN marks a run without a result (it diverged): unpaired statistics leave it out, paired
    ones leave out its pair. ``n_a``, ``n_b`` and ``n_pairs`` say how many runs each used."""
    rows = []
    for a, b in combinations(values, 2):
        x, y = np.asarray(values[a], np.float64), np.asarray(values[b], np.float64)
        xs, ys = x[~np.isnan(x)], y[~np.isnan(y)]
        row = {"a": a, "b": b, "diff": mean(xs) - mean(ys) if len(xs) and len(ys) else float("nan"),
               "d": cohens_d(xs, ys), "student": student_t(xs, ys), "welch": welch_t(xs, ys),
               "n_a": len(xs), "n_b": len(ys)}
        if paired and len(x) == len(y):
            both = ~np.isnan(x) & ~np.isnan(y)
            row["paired"], row["dz"] = paired_t(x[both], y[both]), cohens_dz(x[both], y[both])
            row["n_pairs"] = int(both.sum())
        rows.append(row)
    for test in ("student", "welch", "paired"):
        have = [r for r in rows if test in r]
        for r, adj in zip(have, holm([r[test].p for r in have])):
            r[f"{test}_holm"] = float(adj)
    return rows
