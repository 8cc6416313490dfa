import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels import act_range_for, minmax_act_range, search_act_range, search_act_range_hist
from eptq_fx.numerics.kernels.reference import (
    act_error_ref,
    minmax_act_range_ref,
    search_act_range_hist_ref,
    search_act_range_ref,
)

from .strategies import assert_errors_match, vectors

SCHEMES = ["asymmetric", "symmetric", "unsigned"]
schemes = st.sampled_from(SCHEMES)


def _err(x, scale_zp, bits, scheme, norm=2.0, counts=None):
    qmin, qmax = act_range_for(bits, scheme)
    return act_error_ref(x, scale_zp[0], scale_zp[1], qmin, qmax, norm, counts)


def _check_result(result, bits, scheme):
    scale, zp = result
    qmin, qmax = act_range_for(bits, scheme)
    assert isinstance(scale, float) and isinstance(zp, int)
    assert scale > 0 and np.float32(scale) == scale  # the float32 value the quantizer will use
    assert qmin <= zp <= qmax and (zp == 0 or scheme == "asymmetric")


@settings(max_examples=50, deadline=None)
@given(
    x=vectors(),
    bits=st.integers(2, 8),
    scheme=schemes,
    n_grid=st.sampled_from([1, 7, 25]),
    norm=st.sampled_from([2.0, 1.0, 2.4]),
)
def test_search_matches_reference(x, bits, scheme, n_grid, norm):
    kw = dict(n_grid=n_grid, norm=norm)
    got, ref = search_act_range(x, bits, scheme, **kw), search_act_range_ref(x, bits, scheme, **kw)
    _check_result(got, bits, scheme)
    assert_errors_match(_err(x, got, bits, scheme, norm), _err(x, ref, bits, scheme, norm))


@settings(max_examples=50, deadline=None)
@given(x=vectors(), bits=st.integers(2, 8), scheme=schemes)
def test_search_never_worse_than_minmax(x, bits, scheme):
    searched = search_act_range(x, bits, scheme, n_grid=20)
    minmax = minmax_act_range(float(x.min()), float(x.max()), bits, scheme)
    assert _err(x, searched, bits, scheme) <= _err(x, minmax, bits, scheme) * (1 + 1e-9) + 1e-300


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_default_grid_on_gaussian_and_relu_samples(scheme, bits):
    rng = np.random.default_rng(bits)
    for x in (
        rng.standard_normal(3000),
        np.maximum(rng.standard_normal(3000), 0) * 5 + rng.random(3000) * 0.01,
    ):
        x = x.astype(np.float32)
        got, ref = search_act_range(x, bits, scheme), search_act_range_ref(x, bits, scheme)
        _check_result(got, bits, scheme)
        assert_errors_match(_err(x, got, bits, scheme), _err(x, ref, bits, scheme))
        assert got == ref  # continuous data: exact ties are practically impossible


@settings(max_examples=40, deadline=None)
@given(x=vectors(), bits=st.integers(2, 8), scheme=st.sampled_from(["symmetric", "unsigned"]))
def test_power_of_two_ranges(x, bits, scheme):
    got = search_act_range(x, bits, scheme, n_grid=16, power_of_two=True)
    ref = search_act_range_ref(x, bits, scheme, n_grid=16, power_of_two=True)
    assert_errors_match(_err(x, got, bits, scheme), _err(x, ref, bits, scheme))
    qmax = act_range_for(bits, scheme)[1]
    if got[0] != 1.0 and got[0] > np.finfo(np.float32).tiny:  # not the all-zero / denormal fallbacks
        k = round(np.log2(got[0] * qmax))
        assert np.float32(2.0**k / qmax) == got[0]


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    lo=st.floats(-100, 10),
    width=st.floats(1e-3, 100),
    bits=st.integers(2, 8),
    scheme=schemes,
)
def test_hist_matches_reference_and_repeated_centres(counts, lo, width, bits, scheme):
    counts = np.array(counts, dtype=np.float64)
    counts[0] += 1  # at least one sample
    edges = lo + width * np.arange(counts.size + 1) / counts.size
    got = search_act_range_hist(counts, edges, bits, scheme, n_grid=20)
    ref = search_act_range_hist_ref(counts, edges, bits, scheme, n_grid=20)
    centres = (edges[:-1] + edges[1:]) / 2
    assert_errors_match(
        _err(centres, got, bits, scheme, counts=counts), _err(centres, ref, bits, scheme, counts=counts)
    )
    # Same as searching the samples a histogram of centres stands for (when they are float32-exact).
    samples = np.repeat(centres, counts.astype(int))
    if np.array_equal(samples.astype(np.float32), samples):
        from_samples = search_act_range(samples, bits, scheme, n_grid=20)
        assert_errors_match(_err(samples, got, bits, scheme), _err(samples, from_samples, bits, scheme))


def test_hist_of_real_histogram_close_to_sample_search():
    x = np.random.default_rng(0).standard_normal(20000).astype(np.float32)
    counts, edges = np.histogram(x, bins=2048)
    for scheme in SCHEMES:
        from_hist = search_act_range_hist(counts, edges, 8, scheme)
        from_x = search_act_range(x, 8, scheme)
        assert _err(x, from_hist, 8, scheme) <= _err(x, from_x, 8, scheme) * 1.05


@pytest.mark.parametrize("scheme", SCHEMES)
def test_degenerate_and_edge_inputs(scheme):
    assert search_act_range(np.zeros(10, np.float32), 8, scheme) == (1.0, 0)
    assert minmax_act_range(0.0, 0.0, 8, scheme) == (1.0, 0)
    assert search_act_range_hist(np.array([3.0]), np.array([-1.0, 1.0]), 8, scheme) == (1.0, 0)  # centre 0
    single = search_act_range(np.array([5.0], np.float32), 8, scheme)
    if scheme != "asymmetric":  # zero error at r = 1; ties keep the widest range
        assert single == (float(np.float32(5.0 / act_range_for(8, scheme)[1])), 0)
    huge = np.array([1e-8, 1e8, -1e-8, 3.0, 0.0], np.float32)
    got = search_act_range(huge, 8, scheme)
    _check_result(got, 8, scheme)
    assert_errors_match(
        _err(huge, got, 8, scheme), _err(huge, search_act_range_ref(huge, 8, scheme), 8, scheme)
    )


def test_negative_only_inputs():
    x = np.array([-3.0, -1.0, -0.25], np.float32)
    assert search_act_range(x, 8, "asymmetric")[1] == 255  # the whole range lies below zero
    assert search_act_range(x, 8, "unsigned") == (1.0, 0)  # nothing above zero: everything clips to 0
    assert minmax_act_range(-2.0, -1.0, 8, "asymmetric") == (float(np.float32(2 / 255)), 255)
    sym = search_act_range(x, 4, "symmetric")
    assert_errors_match(
        _err(x, sym, 4, "symmetric"), _err(x, search_act_range_ref(x, 4, "symmetric"), 4, "symmetric")
    )


@pytest.mark.parametrize("power_of_two", [False, True])
def test_minmax_known_values(power_of_two):
    schemes = ["symmetric", "unsigned"] + ([] if power_of_two else ["asymmetric"])
    for scheme in schemes:
        got = minmax_act_range(-1.0, 3.0, 8, scheme, power_of_two=power_of_two)
        assert got == minmax_act_range_ref(-1.0, 3.0, 8, scheme, power_of_two=power_of_two)
    if power_of_two:
        assert minmax_act_range(-1.0, 3.0, 8, "symmetric", power_of_two=True) == (
            float(np.float32(4 / 127)),
            0,
        )
    else:
        assert minmax_act_range(-1.0, 3.0, 8, "asymmetric") == (float(np.float32(4 / 255)), 64)  # rint(63.75)
        assert minmax_act_range(-1.0, 3.0, 8, "symmetric") == (float(np.float32(3 / 127)), 0)
        assert minmax_act_range(-1.0, 3.0, 8, "unsigned") == (float(np.float32(3 / 255)), 0)
        assert minmax_act_range(1.0, 3.0, 8, "asymmetric") == (float(np.float32(3 / 255)), 0)  # includes 0


def test_result_does_not_depend_on_thread_count():
    x = np.random.default_rng(3).standard_normal(9000).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = search_act_range(x, 4, "asymmetric", n_grid=30)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = search_act_range(x, 4, "asymmetric", n_grid=30)
    finally:
        numba.set_num_threads(before)
    assert one == many


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: search_act_range(np.array([1.0, np.nan]), 8, "symmetric"), "x contains NaN"),
        (lambda: search_act_range(np.ones((2, 2)), 8, "symmetric"), "x must be 1-D"),
        (lambda: search_act_range(np.ones(0), 8, "symmetric"), "x is empty"),
        (lambda: search_act_range(np.ones(3), 1, "symmetric"), "bits must be"),
        (lambda: search_act_range(np.ones(3), 8, "signed"), "scheme must be one of"),
        (lambda: search_act_range(np.ones(3), 8, "asymmetric", power_of_two=True), "power_of_two needs"),
        (lambda: search_act_range(np.ones(3), 8, "symmetric", norm=-1.0), "norm must be"),
        (lambda: search_act_range_hist(np.ones(3), np.arange(3.0), 8, "symmetric"), "len(counts) + 1"),
        (lambda: search_act_range_hist(np.ones(2), np.array([0.0, 2.0, 1.0]), 8, "symmetric"), "strictly"),
        (lambda: search_act_range_hist(-np.ones(2), np.arange(3.0), 8, "symmetric"), "counts must be >= 0"),
        (lambda: search_act_range_hist(np.zeros(2), np.arange(3.0), 8, "symmetric"), "counts are all zero"),
        (
            lambda: search_act_range_hist(np.ones(2), np.array([0.0, 1.0, np.inf]), 8, "symmetric"),
            "edges contains",
        ),
        (lambda: minmax_act_range(float("nan"), 1.0, 8, "symmetric"), "xmin must be a finite number"),
        (lambda: minmax_act_range(2.0, 1.0, 8, "symmetric"), "xmin must be <= xmax"),
        (lambda: minmax_act_range(0.0, 1.0, 8, "asymmetric", power_of_two=True), "power_of_two needs"),
    ],
)
def test_bad_inputs_raise(call, needle):
    with pytest.raises(KernelInputError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)
