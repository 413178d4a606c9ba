import numpy as np
import pytest
from scipy import stats as sp

from distrep import stats as S


@pytest.fixture
def samples():
    rng = np.random.default_rng(0)
    return rng.normal(96.5, 0.2, 20), rng.normal(96.3, 0.4, 20), rng.normal(95.0, 2.0, 13)


def test_hand_computed_values():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 6.0]
    assert S.mean(a) == 2.5
    assert S.std(a) == pytest.approx(np.sqrt(5 / 3))          # sum of squares 5, n-1 = 3
    assert S.std(a, ddof=0) == pytest.approx(np.sqrt(5 / 4))
    # d = a - b = [-1, 0, -1, -2]: mean -1, s_d = sqrt(2/3), t = -1 / (s_d / 2) = -2.449...
    paired = S.paired_t(a, b)
    assert paired.t == pytest.approx(-1 / (np.sqrt(2 / 3) / 2)) and paired.df == 3
    assert S.cohens_dz(a, b) == pytest.approx(-1 / np.sqrt(2 / 3))
    # pooled: s_a^2 = 5/3, s_b^2 = 11/3, s_p^2 = 8/3; t = -1 / sqrt(8/3 * 1/2)
    assert S.student_t(a, b).t == pytest.approx(-1 / np.sqrt(8 / 3 / 2)) and S.student_t(a, b).df == 6
    assert S.cohens_d(a, b) == pytest.approx(-1 / np.sqrt(8 / 3))
    # 95% interval of [1, 2, 3, 4]: 2.5 ± 3.182446 * 1.290994 / 2
    assert S.t_interval(a) == pytest.approx([2.5 - 2.0542603, 2.5 + 2.0542603], abs=1e-6)
    # the report's row: the sample and the population std (the author's code printed the latter)
    row = S.summarize(a)
    assert row["std"] == pytest.approx(np.sqrt(5 / 3)) and row["std_pop"] == pytest.approx(np.sqrt(5 / 4))
    assert (row["n"], row["min"], row["max"]) == (4, 1.0, 4.0)


def test_against_scipy(samples):
    a, b, c = samples
    for x, y in ((a, b), (a, c), (b, c)):
        ref = sp.ttest_ind(x, y)
        got = S.student_t(x, y)
        assert got.t == pytest.approx(ref.statistic) and got.p == pytest.approx(ref.pvalue)
        ref = sp.ttest_ind(x, y, equal_var=False)
        got = S.welch_t(x, y)
        assert got.t == pytest.approx(ref.statistic) and got.p == pytest.approx(ref.pvalue)
        assert got.df == pytest.approx(ref.df)
    ref = sp.ttest_rel(a, b)
    got = S.paired_t(a, b)
    assert got.t == pytest.approx(ref.statistic) and got.p == pytest.approx(ref.pvalue)
    lo, hi = sp.t.interval(0.95, len(c) - 1, loc=c.mean(), scale=sp.sem(c))
    assert S.t_interval(c) == pytest.approx([lo, hi])


def test_every_interval_contains_its_mean(samples):
    rng = np.random.default_rng(1)
    for x in (*samples, rng.exponential(size=5), np.array([3.0, 3.0, 3.0])):
        lo, hi = S.t_interval(x)
        assert lo <= S.mean(x) <= hi


def test_holm_matches_a_worked_example():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06 by the running max), 0.5 (x1)
    got = S.holm([0.03, 0.5, 0.01, 0.02])
    assert got == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert S.holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])         # monotone: 0.6 x 1 raised to 0.8
    assert S.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])         # capped: 0.6 x 2 = 1.2
    got = S.holm([0.01, np.nan, 0.04])
    assert got[0] == pytest.approx(0.02) and np.isnan(got[1]) and got[2] == pytest.approx(0.04)


def test_zero_spread_gives_infinite_t_not_an_error():
    same = S.paired_t([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])                # d constant 0.5
    assert same.t == np.inf and same.p == 0.0
    assert S.paired_t([0.5, 1.5, 2.5], [1.0, 2.0, 3.0]).t == -np.inf      # the limit keeps its sign
    assert np.isnan(S.paired_t([1.0, 2.0], [1.0, 2.0]).t)


def test_pairwise_rows_name_their_tests(samples):
    a, b, c = samples
    rows = S.pairwise({"A": a, "B": b, "C": c[:13]}, paired=False)
    assert [(r["a"], r["b"]) for r in rows] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert "paired" not in rows[0] and rows[0]["student"].test.startswith("Student")
    rows = S.pairwise({"A": a, "B": b}, paired=True)
    assert rows[0]["paired"].test == "paired t-test" and rows[0]["paired_holm"] == rows[0]["paired"].p
    summary = S.summarize(a)
    assert summary["n"] == 20 and summary["ci_low"] < summary["mean"] < summary["ci_high"]


def test_one_run_per_model_gives_nan_statistics_not_an_error():
    """A one-run experiment (a quick look) still gets a report: every spread-based figure NaN."""
    rows = S.pairwise({"A": [0.9], "B": [0.8]}, paired=True)
    r = rows[0]
    assert r["diff"] == pytest.approx(0.1)
    for key in ("student", "welch", "paired"):
        assert np.isnan(r[key].t) and np.isnan(r[key].p) and np.isnan(r[f"{key}_holm"])
    assert np.isnan(r["d"]) and np.isnan(r["dz"])
    # one run against three: the pooled spread is defined (df = 2) and comes from B alone
    assert S.pooled_std([1.0], [1.0, 2.0, 3.0]) == pytest.approx(np.sqrt(2 / 2))
    assert S.student_t([1.0], [1.0, 2.0, 3.0]).df == 2


def test_rank_tests_and_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.normal(90, 1, 12)
    b = a - 0.5 + rng.normal(0, 0.3, 12)
    assert S.rank_test(a, b, paired=True).p == pytest.approx(sp.wilcoxon(a, b).pvalue)
    assert S.rank_test(a, b, paired=False).p == pytest.approx(
        sp.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    assert np.isnan(S.rank_test(a, a, paired=True).p), "no non-zero difference: no test"
    for paired in (True, False):
        lo, hi = S.bootstrap_diff(a, b, paired)
        assert lo < S.mean(a) - S.mean(b) < hi
        assert np.array_equal(S.bootstrap_diff(a, b, paired), [lo, hi]), "seeded: reproducible"
    # a paired interval is narrower here: the runs share most of their variation
    assert np.ptp(S.bootstrap_diff(a, b, True)) < np.ptp(S.bootstrap_diff(a, b, False))
    assert np.isnan(S.bootstrap_diff(a[:1], b[:1], True)).all()
    w = S.welch_from_stats(96.55, 0.16, 6, 96.62, 0.17, 20)
    assert w.p == pytest.approx(sp.ttest_ind_from_stats(96.55, 0.16, 6, 96.62, 0.17, 20, equal_var=False).pvalue)


def test_pairwise_leaves_diverged_runs_out():
    a = np.array([90.0, 91.0, np.nan, 92.0, 90.5])
    b = np.array([89.0, 90.5, 88.0, np.nan, 89.5])
    (row,) = S.pairwise({"a": a, "b": b}, paired=True)
    assert row["n_a"] == 4 and row["n_b"] == 4 and row["n_pairs"] == 3
    assert row["paired"].df == 2 and row["student"].df == 6
    assert row["diff"] == pytest.approx(np.nanmean(a) - np.nanmean(b))


def test_a_constant_sample_is_tested_without_scipys_cancellation_warning():
    """Two runs at the same accuracy (92.1666...% on 600 images) beside a sample that varies:
    the pooled and Welch variances are exact, and SciPy's "catastrophic cancellation" warning,
    which leaked into every such report, is not passed on."""
    import warnings
    constant, varied = np.array([553 / 6, 553 / 6]), np.array([91.0, 92.5, 90.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student, welch = S.student_t(constant, varied), S.welch_t(constant, varied)
    sp = np.sqrt(np.var(varied, ddof=1) * 2 / 3)                    # (n_b - 1) s_b^2 / (n_a + n_b - 2)
    assert student.t == pytest.approx((constant.mean() - varied.mean()) / (sp * np.sqrt(1 / 2 + 1 / 3)))
    assert welch.t == pytest.approx((constant.mean() - varied.mean()) / np.sqrt(np.var(varied, ddof=1) / 3))


def test_probability_of_improvement_by_hand_and_against_mann_whitney():
    """a = [1, 2, 3], b = [2, 2, 0]: over all nine pairs of runs a wins 1 (1 > 0), 2 + two ties
    (2 against 2, 2, 0) and 3 times (3): (1 + 2 + 3) / 9; over the matched runs a loses, ties and
    wins: 1.5 / 3. Unpaired it is Mann-Whitney's U of a over n_a n_b; it is 1 - P(b > a)."""
    a, b = [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]
    assert S.probability_of_improvement(a, b, paired=False) == pytest.approx(6 / 9)
    assert S.probability_of_improvement(a, b, paired=True) == pytest.approx(0.5)
    rng = np.random.default_rng(4)
    x, y = rng.integers(80, 90, 11).astype(float), rng.integers(82, 92, 7).astype(float)
    u = sp.mannwhitneyu(x, y, alternative="two-sided").statistic
    assert S.probability_of_improvement(x, y, paired=False) == pytest.approx(u / (11 * 7))
    assert S.probability_of_improvement(y, x, paired=False) == pytest.approx(1 - u / (11 * 7))
    assert np.isnan(S.probability_of_improvement([], y, paired=False))
    # pairwise takes it over the runs its other statistics use: the matched, finished ones
    (row,) = S.pairwise({"a": np.array([1.0, 2.0, np.nan, 3.0]), "b": np.array([2.0, 2.0, 9.0, 0.0])},
                        paired=True)
    assert row["p_improve"] == pytest.approx(0.5)
    (row,) = S.pairwise({"a": np.array([1.0, 2.0, np.nan, 3.0]), "b": np.array([2.0, 2.0, 0.0])},
                        paired=False)
    assert row["p_improve"] == pytest.approx(6 / 9)
    # and so does compare's pair (claims.one_pair): matched runs where paired
    from distrep.claims import one_pair
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.0])
    assert one_pair(a, b, paired=True)["p_improve"] == pytest.approx(0.5)
    assert one_pair(a, b, paired=False)["p_improve"] == pytest.approx(6 / 9)
