"""benchmarks.agreement's paired test against an independent reference (scipy's exact binomial test)."""
import pytest

from benchmarks.agreement import mcnemar_exact_p

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (1, 0), (3, 5), (14, 16), (2, 9), (40, 12), (7, 7)])
def test_mcnemar_exact_p_matches_binomial_test(only_a, only_b):
    n = only_a + only_b
    ref = 1.0 if n == 0 else stats.binomtest(only_a, n, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(ref, rel=1e-9)
