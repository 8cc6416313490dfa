"""Hypothesis strategies and tolerance helpers shared by the kernel tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Mixture of ordinary, tiny, huge, zero and negative values: the cases where float arithmetic goes wrong.


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (hypothesis wants bounds and samples exactly representable)."""
    return float(np.float32(x))


_special = st.sampled_from(
    [f32(v) for v in (0.0, -0.0, 1e-8, -1e-8, 1e8, -1e8, 0.5, -0.5, 1.5, 2.5, 1e-38, 3e34)]
)
finite_f32 = st.one_of(st.floats(-1e3, 1e3, width=32), st.floats(f32(-1e-4), f32(1e-4), width=32), _special)


def matrices(max_rows: int = 5, max_cols: int = 40) -> st.SearchStrategy[np.ndarray]:
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_cols))
    return hnp.arrays(np.float32, shape, elements=finite_f32)


def vectors(max_len: int = 60) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, st.integers(1, max_len), elements=finite_f32)


def assert_errors_match(e_kernel, e_ref, rtol: float = 1e-5) -> None:
    """Both choices minimise the same error up to float64 summation order: equal within ``rtol``."""
    e_kernel, e_ref = np.atleast_1d(np.asarray(e_kernel, float)), np.atleast_1d(np.asarray(e_ref, float))
    assert np.all(e_kernel <= e_ref * (1 + rtol) + 1e-300), (e_kernel, e_ref)
    assert np.all(e_ref <= e_kernel * (1 + rtol) + 1e-300), (e_kernel, e_ref)
