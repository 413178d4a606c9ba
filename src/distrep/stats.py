"""Statistics over per-run results: small pure functions over arrays.

Inputs are 1-d arrays of one value per run (e.g. final test accuracy ``[runs]``). Intervals are
``[2]`` arrays (lower, upper). Two-sample tests return a :class:`TTest` that names the test it
is, so a report can say which test each p-value comes from. The tests are SciPy's; the small
functions here add what a report needs around them: NaN for too few runs, the limits of t when
the spread is exactly zero, and the degrees of freedom.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
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


@contextmanager
def _constant_samples_allowed():
    """SciPy warns of "catastrophic cancellation" whenever one sample is constant (its values all
    equal: two runs at the same accuracy), though a pooled or Welch variance taken with the other
    sample is exact; the cases where no spread is left at all are handled here before SciPy is
    called (:func:`_ratio`). So that warning, and only it, is not passed on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred in moment calculation",
                                RuntimeWarning)
        yield


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
    name = "Student (unpaired, pooled variance)"
    if min(na, nb) < 1:
        return TTest(float("nan"), float("nan"), float("nan"), name)
    if pooled_std(a, b) > 0:
        with _constant_samples_allowed():
            r = _sp.ttest_ind(a, b, equal_var=True)
        return TTest(float(r.statistic), float(df), float(r.pvalue), name)
    t = _ratio(mean(a) - mean(b), pooled_std(a, b) * np.sqrt(1 / na + 1 / nb))   # the limits
    return TTest(t, float(df), _two_sided(t, df), name)


def welch_t(a, b) -> TTest:
    """Unpaired t-test without equal variances: t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b),
    df by Welch–Satterthwaite: (v_a + v_b)^2 / (v_a^2/(n_a-1) + v_b^2/(n_b-1)), v = s^2/n."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return TTest(float("nan"), float("nan"), float("nan"), "Welch (unpaired, unequal variances)")
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    denom = va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)
    df = (va + vb) ** 2 / denom if denom > 0 else float("nan")
    if va + vb > 0:
        with _constant_samples_allowed():
            r = _sp.ttest_ind(a, b, equal_var=False)
        return TTest(float(r.statistic), float(df), float(r.pvalue), "Welch (unpaired, unequal variances)")
    t = _ratio(mean(a) - mean(b), np.sqrt(va + vb))
    return TTest(t, float(df), _two_sided(t, df), "Welch (unpaired, unequal variances)")


def paired_t(a, b) -> TTest:
    """Paired t-test over matched runs: d = a - b, t = mean(d) / (s_d / sqrt(n)), df = n - 1.
    Valid when run i of both models shares its initial first-layer weights (paired design)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 1:
        return TTest(float("nan"), float("nan"), float("nan"), "paired t-test")
    if std(d) > 0:
        r = _sp.ttest_rel(np.asarray(a, np.float64), np.asarray(b, np.float64))
        return TTest(float(r.statistic), float(len(d) - 1), float(r.pvalue), "paired t-test")
    t = _ratio(mean(d), std(d) / np.sqrt(len(d)))                               # the limits
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


def rank_test(a, b, paired: bool) -> TTest:
    """The rank-based counterpart of the t-test, for results far from normal (ReLU2's runs:
    one at 85 %, the rest at 30-45 %): Wilcoxon's signed-rank test on the differences of
    matched runs when ``paired``, else the Mann-Whitney U test. SciPy's implementations
    (exact distributions for small n); ``t`` holds the test's own statistic, ``df`` is NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    name = "Wilcoxon signed-rank" if paired else "Mann-Whitney U"
    try:
        if paired:
            d = a - b
            if len(d) < 1 or not np.any(d != 0):
                return TTest(float("nan"), float("nan"), float("nan"), name)
            r = _sp.wilcoxon(a, b)
        else:
            if min(len(a), len(b)) < 1:
                return TTest(float("nan"), float("nan"), float("nan"), name)
            r = _sp.mannwhitneyu(a, b, alternative="two-sided")
    except ValueError:
        return TTest(float("nan"), float("nan"), float("nan"), name)
    return TTest(float(r.statistic), float("nan"), float(r.pvalue), name)


def probability_of_improvement(a, b, paired: bool) -> float:
    """P(A > B) + ½ P(A = B), the chance that a run of ``a`` beats a run of ``b`` (ties count
    half): over matched runs when ``paired`` (the share of pairs i with a_i > b_i), else over
    every pair of a run of each, U_a / (n_a n_b) with U_a the Mann-Whitney statistic of ``a``
    (rliable's probability of improvement). It reads what a mean hides where the runs are
    bimodal (ReLU2's: one at 85 %, the rest at 30-45 %). NaN when a side has no runs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 1:
        return float("nan")
    if paired:
        return float(np.mean((a > b) + 0.5 * (a == b)))
    x, y = a[:, None], b[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def bootstrap_diff(a, b, paired: bool, confidence: float = 0.95, resamples: int = 4999,
                   seed: int = 0) -> np.ndarray:
    """Percentile bootstrap interval ``[2]`` for mean(a) - mean(b) (runs resampled in matched
    pairs when ``paired``), by :func:`scipy.stats.bootstrap` with a fixed seed so a report is
    reproducible. NaN when fewer than two runs (or pairs) are left or the values are constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return np.array([np.nan, np.nan])
    if paired:
        data, statistic = (a - b,), lambda d, axis=-1: np.mean(d, axis=axis)
    else:
        data = (a, b)
        statistic = lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis)
    if all(np.ptp(d) == 0 for d in data):
        return np.array([np.nan, np.nan])
    import inspect
    seeded = ({"rng": np.random.default_rng(seed)} if "rng" in inspect.signature(_sp.bootstrap).parameters
              else {"random_state": np.random.default_rng(seed)})     # SciPy < 1.15
    r = _sp.bootstrap(data, statistic, confidence_level=confidence, n_resamples=resamples,
                      method="percentile", **seeded)
    return np.array([r.confidence_interval.low, r.confidence_interval.high], dtype=np.float64)


def welch_from_stats(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float,
                     n_b: int) -> TTest:
    """Welch's t-test from summary statistics (sample stds), e.g. a run set against a published
    mean ± std: SciPy's ``ttest_ind_from_stats(equal_var=False)``."""
    if min(n_a, n_b) < 2 or not all(np.isfinite([mean_a, std_a, mean_b, std_b])):
        return TTest(float("nan"), float("nan"), float("nan"), "Welch (from summary statistics)")
    r = _sp.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False)
    va, vb = std_a ** 2 / n_a, std_b ** 2 / n_b
    denom = va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1)
    df = (va + vb) ** 2 / denom if denom > 0 else float("nan")
    return TTest(float(r.statistic), float(df), float(r.pvalue), "Welch (from summary statistics)")


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
    d_z, a rank test (Wilcoxon signed-rank if paired, else Mann-Whitney U), the probability of
    improvement (``p_improve``, over the same runs) and a bootstrap interval of the mean
    difference; Holm-adjusted p-values across all pairs, separately for each test.

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
            row["rank"] = rank_test(x[both], y[both], paired=True)
            row["bootstrap"] = bootstrap_diff(x[both], y[both], paired=True)
            row["p_improve"] = probability_of_improvement(x[both], y[both], paired=True)
        else:
            row["rank"] = rank_test(xs, ys, paired=False)
            row["bootstrap"] = bootstrap_diff(xs, ys, paired=False)
            row["p_improve"] = probability_of_improvement(xs, ys, paired=False)
        rows.append(row)
    for test in ("student", "welch", "paired", "rank"):
        have = [r for r in rows if test in r]
        for r, adj in zip(have, holm([r[test].p for r in have])):
            r[f"{test}_holm"] = float(adj)
    return rows
