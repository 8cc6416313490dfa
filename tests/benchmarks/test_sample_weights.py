"""benchmarks.sample_weights' effective sample share against its numpy definition and its two limits."""
import numpy as np
import pytest
import torch

from benchmarks.sample_weights import effective_share, rank_correlation, spread


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effective_share_matches_numpy(seed):
    w = np.random.default_rng(seed).gamma(0.7, 1.0, size=200)
    assert effective_share(torch.tensor(w)) == pytest.approx(w.sum() ** 2 / (len(w) * (w ** 2).sum()), rel=1e-12)


def test_effective_share_limits_and_tempering():
    assert effective_share(torch.ones(50)) == pytest.approx(1.0)
    one_hot = torch.zeros(50)
    one_hot[3] = 2.0
    assert effective_share(one_hot) == pytest.approx(1 / 50)
    s = torch.tensor(np.random.default_rng(3).lognormal(0.0, 1.0, size=500))
    assert spread(s, 0.5)["share"] > spread(s, 1.0)["share"]  # the tempered weights spread less
    assert spread(s, 0.0)["share"] == pytest.approx(1.0)


def test_rank_correlation_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    a = rng.normal(size=300)
    b = -a + rng.normal(size=300)
    assert rank_correlation(torch.tensor(a), torch.tensor(b)) == pytest.approx(stats.spearmanr(a, b)[0], rel=1e-9)
