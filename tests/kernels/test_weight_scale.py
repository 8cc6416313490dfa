import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels import MIN_SCALE, minmax_weight_scale, search_weight_scale
from eptq_fx.numerics.kernels.reference import minmax_weight_scale_ref, search_weight_scale_ref, weight_error_ref
from eptq_fx.numerics.kernels.sorted_error import sorted_pays_off

from .strategies import assert_errors_match, matrices

norms = st.sampled_from([2.0, 1.0, 3.5])


def _weights_for(w, rng):
    """Random non-negative weights with a block of exact zeros (elements the HMSE criterion ignores)."""
    wts = rng.random(w.shape).astype(np.float32)
    wts[:, : w.shape[1] // 3] = 0.0
    return wts


@settings(max_examples=50, deadline=None)
@given(
    w=matrices(),
    bits=st.integers(2, 8),
    norm=norms,
    weighted=st.booleans(),
    n_grid=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_fixed_grid_matches_reference(w, bits, norm, weighted, n_grid, seed):
    """Without refinement both search the same candidates, so the chosen errors agree (ties may differ)."""
    wts = _weights_for(w, np.random.default_rng(seed)) if weighted else None
    kw = dict(norm=norm, weights=wts, n_grid=n_grid, refine=False)
    s_k, s_r = search_weight_scale(w, bits, **kw), search_weight_scale_ref(w, bits, **kw)
    assert s_k.dtype == np.float32 and s_k.shape == (w.shape[0],) and np.all(s_k > 0)
    assert_errors_match(weight_error_ref(w, s_k, bits, norm, wts), weight_error_ref(w, s_r, bits, norm, wts))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("norm, weighted", [(2.0, False), (2.0, True), (2.4, False)])
def test_refined_search_matches_reference_on_random_weights(bits, norm, weighted):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((24, 75)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    wts = _weights_for(w, rng) if weighted else None
    s_k = search_weight_scale(w, bits, norm=norm, weights=wts)
    s_r = search_weight_scale_ref(w, bits, norm=norm, weights=wts)
    assert_errors_match(weight_error_ref(w, s_k, bits, norm, wts), weight_error_ref(w, s_r, bits, norm, wts))
    assert np.mean(s_k == s_r) >= 0.9  # continuous data: exact ties are practically impossible


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_long_rows_take_the_sorted_path_and_match_reference(bits, weighted):
    """Rows long enough for the prefix-sum evaluation (sorted_error) to pay off, incl. outliers and zeros."""
    rng = np.random.default_rng(10 + bits)
    w = rng.standard_t(4, (6, 3000)).astype(np.float32)
    w[0, :1000] = 0.0
    w[1, 5] = 40.0
    w[2] = np.round(w[2] * 3) / 3  # many exact ties between values
    assert sorted_pays_off(w.shape[1], 2**bits, 2.0)
    wts = _weights_for(w, rng) if weighted else None
    s_k, s_r = search_weight_scale(w, bits, weights=wts), search_weight_scale_ref(w, bits, weights=wts)
    assert_errors_match(weight_error_ref(w, s_k, bits, 2.0, wts), weight_error_ref(w, s_r, bits, 2.0, wts))
    p2 = search_weight_scale(w, bits, weights=wts, power_of_two=True)
    p2_ref = search_weight_scale_ref(w, bits, weights=wts, power_of_two=True)
    assert_errors_match(weight_error_ref(w, p2, bits, 2.0, wts), weight_error_ref(w, p2_ref, bits, 2.0, wts))


@settings(max_examples=50, deadline=None)
@given(w=matrices(), bits=st.integers(2, 8), refine=st.booleans())
def test_mse_search_never_worse_than_minmax(w, bits, refine):
    e_search = weight_error_ref(w, search_weight_scale(w, bits, refine=refine), bits)
    e_minmax = weight_error_ref(w, minmax_weight_scale(w, bits), bits)
    assert np.all(e_search <= e_minmax * (1 + 1e-9) + 1e-300)


@settings(max_examples=30, deadline=None)
@given(w=matrices(), bits=st.integers(2, 8))
def test_refinement_never_increases_the_error(w, bits):
    coarse = weight_error_ref(w, search_weight_scale(w, bits, refine=False, n_grid=20), bits)
    fine = weight_error_ref(w, search_weight_scale(w, bits, refine=True, n_grid=20), bits)
    assert np.all(fine <= coarse * (1 + 1e-9) + 1e-300)


@settings(max_examples=50, deadline=None)
@given(w=matrices(), bits=st.integers(2, 8), min_ratio=st.sampled_from([0.2, 0.05, 1.0]))
def test_power_of_two_thresholds(w, bits, min_ratio):
    qmax = 2 ** (bits - 1) - 1
    s_k = search_weight_scale(w, bits, power_of_two=True, min_ratio=min_ratio)
    s_r = search_weight_scale_ref(w, bits, power_of_two=True, min_ratio=min_ratio)
    assert_errors_match(weight_error_ref(w, s_k, bits), weight_error_ref(w, s_r, bits))
    # t = 2**k exactly, except all-zero rows (1.0) and denormal rows, whose scale is clamped to MIN_SCALE
    regular = (np.abs(w).max(axis=1) > 0) & (s_k > MIN_SCALE)
    k = np.round(np.log2(s_k[regular].astype(np.float64) * qmax))
    np.testing.assert_array_equal(s_k[regular], (2.0**k / qmax).astype(np.float32))


def test_edge_rows():
    w = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],  # all zero: scale 1.0 by convention
            [-3.0, -1.0, -0.5, -2.0],  # negative only
            [1e-8, 1e8, -1e-8, 3.0],  # huge dynamic range
            [0.7, 0.0, 0.0, 0.0],  # a single non-zero value: exactly representable at r = 1
        ],
        dtype=np.float32,
    )
    for bits in (2, 4, 8):
        s_k = search_weight_scale(w, bits)
        assert s_k[0] == 1.0
        assert s_k[3] == np.float32(0.7 / (2 ** (bits - 1) - 1))  # zero error, ties go to the larger scale
        s_r = search_weight_scale_ref(w, bits)
        assert_errors_match(weight_error_ref(w, s_k, bits), weight_error_ref(w, s_r, bits))
    single = np.array([[-2.5]], np.float32)
    e_single = weight_error_ref(single, search_weight_scale(single, 4), 4)
    assert_errors_match(e_single, weight_error_ref(single, search_weight_scale_ref(single, 4), 4))
    assert e_single[0] <= weight_error_ref(single, minmax_weight_scale(single, 4), 4)[0] < 1e-12


def test_channel_with_all_zero_weights_keeps_minmax():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 50)).astype(np.float32)
    wts = np.ones_like(w)
    wts[1] = 0.0  # every error of row 1 is 0: the tie rule picks the largest threshold, i.e. min-max
    s = search_weight_scale(w, 4, weights=wts)
    assert s[1] == minmax_weight_scale(w, 4)[1]
    np.testing.assert_array_equal(s[[0, 2]], search_weight_scale(w[[0, 2]], 4))


def test_weights_move_the_threshold_towards_heavy_elements():
    """A large weight on the outlier forces a threshold that keeps it; without weights it is clipped."""
    w = np.concatenate([np.linspace(-1, 1, 200), [8.0]]).astype(np.float32)[None, :]
    wts = np.ones_like(w)
    wts[0, -1] = 1e6
    plain, heavy = search_weight_scale(w, 4), search_weight_scale(w, 4, weights=wts)
    assert plain[0] * 7 < 8.0 * 0.9 and heavy[0] * 7 >= 8.0 * 0.9


@pytest.mark.parametrize("power_of_two", [False, True])
def test_minmax_matches_reference(power_of_two):
    w = np.array([[0.7, -0.35], [0.0, 0.0], [-3.0, 1.0]], np.float32)
    s = minmax_weight_scale(w, 4, power_of_two=power_of_two)
    np.testing.assert_array_equal(s, minmax_weight_scale_ref(w, 4, power_of_two=power_of_two))
    expected = [1.0 / 7, 1.0, 4.0 / 7] if power_of_two else [0.7 / 7, 1.0, 3.0 / 7]
    np.testing.assert_array_equal(s, np.array(expected, np.float32))


def test_result_does_not_depend_on_thread_count():
    w = np.random.default_rng(1).standard_normal((37, 90)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = search_weight_scale(w, 4)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = search_weight_scale(w, 4)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(w=np.array([[1.0, np.nan]]), bits=4), "w contains NaN"),
        (dict(w=np.ones((2, 2, 2)), bits=4), "w must be 2-D"),
        (dict(w=np.ones((2, 2)), bits=1), "bits must be an integer between 2 and 16"),
        (dict(w=np.ones((2, 2)), bits=17), "bits must be"),
        (dict(w=np.ones((2, 2)), bits=True), "bits must be"),
        (dict(w=np.ones((2, 2)), bits=4, weights=np.ones((2, 3))), "weights must have the shape"),
        (dict(w=np.ones((2, 2)), bits=4, weights=-np.ones((2, 2))), "weights must be >= 0"),
        (dict(w=np.ones((2, 2)), bits=4, weights=np.full((2, 2), np.inf)), "weights contains NaN"),
        (dict(w=np.ones((2, 2)), bits=4, min_ratio=0.0), "min_ratio must be"),
        (dict(w=np.ones((2, 2)), bits=4, min_ratio=1.5), "min_ratio must be in (0, 1]"),
        (dict(w=np.ones((2, 2)), bits=4, norm=0), "norm must be"),
        (dict(w=np.ones((2, 2)), bits=4, n_grid=0), "n_grid must be"),
    ],
)
def test_bad_inputs_raise(kwargs, needle):
    with pytest.raises(KernelInputError) as info:
        search_weight_scale(**kwargs)
    assert needle in str(info.value)


def test_minmax_rejects_nan_and_bad_bits():
    with pytest.raises(KernelInputError, match="w contains NaN"):
        minmax_weight_scale(np.array([[np.nan]]), 4)
    with pytest.raises(KernelInputError, match="bits"):
        minmax_weight_scale(np.ones((1, 1)), 20)
