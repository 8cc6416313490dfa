"""The sorted / prefix-sum error evaluation against the direct one-pass evaluation on the same candidates."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels import act_range_for, search_act_range
from eptq_fx.numerics.kernels.act_range import _candidates, candidate_errors
from eptq_fx.numerics.kernels.reference import act_error_ref, search_act_range_ref
from eptq_fx.numerics.kernels.sorted_error import sorted_pays_off

from .strategies import vectors


def _both(values, counts, bits, scheme, n_grid):
    cands = _candidates(float(values.min()), float(values.max()), bits, scheme, n_grid, False)
    if cands is None:
        return None
    scales, zps = cands
    qmin, qmax = act_range_for(bits, scheme)
    args = (values, counts, scales, zps, qmin, qmax, 2.0)
    return candidate_errors(*args, method="sorted"), candidate_errors(*args, method="direct")


def _assert_close(sorted_errs, direct_errs, values, counts, bits):
    """Relative 1e-9, plus the cancellation bound of sorted_error (eps * 12 q**2 of the signal energy)."""
    energy = float(np.sum((counts if counts is not None else 1.0) * values.astype(np.float64) ** 2))
    atol = 2.2e-16 * 12 * (2.0**bits) ** 2 * energy
    np.testing.assert_allclose(sorted_errs, direct_errs, rtol=1e-9, atol=atol)


@settings(max_examples=50, deadline=None)
@given(
    x=vectors(max_len=200),
    bits=st.integers(2, 12),
    scheme=st.sampled_from(["asymmetric", "symmetric", "unsigned"]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sorted_matches_direct_on_every_candidate(x, bits, scheme, weighted, seed):
    values = np.random.default_rng(seed).permutation(x.astype(np.float64))  # unsorted on purpose
    counts = None
    if weighted:  # Hessian-like weights, some exactly zero
        counts = np.random.default_rng(seed + 1).random(values.size) * (np.arange(values.size) % 3 != 0)
    both = _both(values, counts, bits, scheme, n_grid=12)
    if both is not None:
        _assert_close(*both, values, counts, bits)


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_sorted_matches_direct_on_heavy_tailed_samples(bits):
    rng = np.random.default_rng(bits)
    values = (rng.standard_t(3, 20000) * 1e3).astype(np.float32).astype(np.float64)
    for scheme in ("asymmetric", "symmetric", "unsigned"):
        sorted_errs, direct_errs = _both(values, None, bits, scheme, n_grid=15)
        np.testing.assert_allclose(sorted_errs, direct_errs, rtol=1e-9)


@pytest.mark.parametrize("scheme, n_grid", [("asymmetric", 20), ("symmetric", 100), ("unsigned", 100)])
def test_large_tensor_search_takes_the_sorted_path_and_matches_reference(scheme, n_grid):
    x = np.random.default_rng(0).standard_normal(40000).astype(np.float32)
    assert sorted_pays_off(x.size, 256, 2.0)
    x[:5] = [40.0, -25.0, 1e-8, 0.0, 17.0]  # outliers worth clipping
    got = search_act_range(x, 8, scheme, n_grid=n_grid)
    ref = search_act_range_ref(x, 8, scheme, n_grid=n_grid)
    qmin, qmax = act_range_for(8, scheme)
    e_got, e_ref = (act_error_ref(x, s, z, qmin, qmax) for s, z in (got, ref))
    assert e_got <= e_ref * (1 + 1e-5) and e_ref <= e_got * (1 + 1e-5)


def test_sorted_method_refuses_other_norms():
    with pytest.raises(KernelInputError, match="norm 2"):
        candidate_errors(np.ones(3), None, np.ones(1), np.zeros(1), 0, 255, 1.0, method="sorted")
