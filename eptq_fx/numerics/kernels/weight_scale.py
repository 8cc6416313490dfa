"""Per-channel weight scale selection: min-max, and an (optionally weighted) Lp-error grid search.

Per row ``c`` of ``w`` (C, K) with ``m = max|w_c|``:

* candidate thresholds ``t = r * m`` for ``r`` on ``n_grid`` uniform points of ``[min_ratio, 1]`` (the last is
  exactly 1, the min-max threshold, so the search never does worse than min-max); ``n_grid == 1`` is min-max;
* a candidate's scale is ``max(float32(t / qmax), MIN_SCALE)`` -- the float32 value callers receive -- and its
  error is ``sum_k weights_k * |w_k - deq(w_k)|**norm`` in float64 (``norm=2``: MSE; weights=None: all ones;
  with Hessian-diagonal weights this is the HMSE criterion);
* ``refine``: a second grid of ``n_grid`` points on ``[r_best - step, r_best + step]`` clipped into ``(0, 1]``
  (``step`` is the coarse spacing; if ``r_best - step <= 0`` the lower end is ``r_best / 2``); the coarse best
  stays a candidate, so refining never increases the error;
* ``power_of_two``: thresholds ``2**k`` for the integers ``k`` from ``floor(log2(min_ratio * m))`` to
  ``ceil(log2(m))`` (``refine`` is ignored); the scale is ``2**k / qmax`` per the project convention;
* ties: the smaller error wins, then the larger scale;
* an all-zero row gets scale 1.0 (any non-zero scale quantizes it exactly).

Evaluation: for ``norm == 2`` and rows long enough for it to pay off, each row is sorted once and every
candidate's error comes from prefix sums (:mod:`~eptq_fx.numerics.kernels.sorted_error`, O(levels log K) instead of
O(K), equal to the direct sum within ~1e-10 relative); otherwise each candidate is one fused pass over the
row.
Rows are independent, so ``prange`` over rows is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels.common import (
    MIN_SCALE,
    ZERO_RANGE_SCALE,
    as_float_array,
    check_n_grid,
    check_positive_finite,
    keeps_torch_threads,
    signed_range,
)
from eptq_fx.numerics.kernels.sorted_error import prefix_moments, sorted_pays_off, sorted_squared_error

_F32_MAX = float(np.finfo(np.float32).max)


@njit(cache=True)
def _scale_of(threshold, qmax):
    """The float32 scale a threshold maps to, kept inside the normal float32 range."""
    s = threshold / qmax
    if s > _F32_MAX:
        s = _F32_MAX
    s = np.float64(np.float32(s))
    return s if s >= MIN_SCALE else MIN_SCALE


# ``reassoc`` lets LLVM split the float64 sum into SIMD lanes (roughly 4x faster). The summation order is
# fixed at compile time, so results stay deterministic; no other fast-math flag is set (no FMA contraction, no
# reciprocal instead of division), so every element is quantized exactly as ``fake_quant_per_channel`` does.
@njit(cache=True, fastmath={"reassoc"})
def _row_error(row, wrow, use_weights, scale, lo, hi, norm):
    acc = 0.0
    n = row.shape[0]
    if norm == 2.0 and not use_weights:
        for k in range(n):
            x = np.float64(row[k])
            q = np.rint(x / scale)
            q = lo if q < lo else (hi if q > hi else q)
            d = x - q * scale
            acc += d * d
    elif norm == 2.0:
        for k in range(n):
            x = np.float64(row[k])
            q = np.rint(x / scale)
            q = lo if q < lo else (hi if q > hi else q)
            d = x - q * scale
            acc += np.float64(wrow[k]) * (d * d)
    else:
        for k in range(n):
            x = np.float64(row[k])
            q = np.rint(x / scale)
            q = lo if q < lo else (hi if q > hi else q)
            e = abs(x - q * scale) ** norm
            acc += np.float64(wrow[k]) * e if use_weights else e
    return acc


@njit(cache=True)
def _ceil_log2(x):
    mant, exp = math.frexp(x)  # x = mant * 2**exp with mant in [0.5, 1): exact, unlike log2
    return exp - 1 if mant == 0.5 else exp


@njit(cache=True)
def _floor_log2(x):
    return math.frexp(x)[1] - 1


@njit(cache=True)
def _error(ev, scale):
    """Error of one scale; ``ev`` bundles the row, its weights and (if sorted) its sorted form."""
    row, wrow, use_weights, use_sorted, svals, hi_p, lo_p, lo, hi, norm = ev
    if use_sorted:
        return sorted_squared_error(svals, hi_p, lo_p, scale, 0.0, lo, hi)
    return _row_error(row, wrow, use_weights, scale, lo, hi, norm)


@njit(cache=True)
def _search_row(row, wrow, srow, swrow, use_weights, use_sorted, settings):
    """Best scale of one row; ``srow`` / ``swrow``: the row ascending and its weights (``use_sorted``)."""
    qmin, qmax, norm, n_grid, min_ratio, refine, power_of_two = settings
    m = 0.0
    for k in range(row.shape[0]):
        a = abs(np.float64(row[k]))
        if a > m:
            m = a
    if m == 0.0:
        return ZERO_RANGE_SCALE
    lo, hi = np.float64(qmin), np.float64(qmax)
    if use_sorted:
        hi_p, lo_p = prefix_moments(srow, swrow, use_weights)
    else:
        hi_p, lo_p = np.empty((3, 0)), np.empty((3, 0))
    ev = (row, wrow, use_weights, use_sorted, srow, hi_p, lo_p, lo, hi, norm)
    best_err, best_s, best_r = np.inf, 0.0, 1.0
    if power_of_two:
        for k in range(_ceil_log2(m), _floor_log2(min_ratio * m) - 1, -1):
            s = _scale_of(math.ldexp(1.0, k), hi)
            err = _error(ev, s)
            if err < best_err or (err == best_err and s > best_s):
                best_err, best_s = err, s
        return best_s
    for i in range(n_grid):
        r = 1.0 if i == n_grid - 1 else min_ratio + (1.0 - min_ratio) * i / (n_grid - 1)
        s = _scale_of(r * m, hi)
        err = _error(ev, s)
        if err < best_err or (err == best_err and s > best_s):
            best_err, best_s, best_r = err, s, r
    if refine and n_grid > 1:
        step = (1.0 - min_ratio) / (n_grid - 1)
        r_lo = best_r - step if best_r - step > 0.0 else best_r / 2.0
        r_hi = min(best_r + step, 1.0)
        for j in range(n_grid):
            r = r_lo + (r_hi - r_lo) * j / (n_grid - 1)
            s = _scale_of(r * m, hi)
            err = _error(ev, s)
            if err < best_err or (err == best_err and s > best_s):
                best_err, best_s = err, s
    return best_s


@njit(parallel=True, cache=True)
def _search_rows(w, weights, sorted_w, sorted_weights, use_weights, use_sorted, settings, out):
    for c in prange(w.shape[0]):
        wrow = weights[c] if use_weights else weights[0]
        srow = sorted_w[c] if use_sorted else sorted_w[0]
        swrow = sorted_weights[c] if use_sorted and use_weights else sorted_weights[0]
        out[c] = _search_row(w[c], wrow, srow, swrow, use_weights, use_sorted, settings)


def _sorted_rows(w: np.ndarray, wts: np.ndarray, use_weights: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row ascending (float64) with its weights in the same order. numpy sorts here, not numba: its
    SIMD sort is ~20x faster than numba's."""
    if not use_weights:
        return np.sort(w, axis=1).astype(np.float64), np.ones((1, 1), dtype=np.float32)
    order = np.argsort(w, axis=1)
    return np.take_along_axis(w, order, 1).astype(np.float64), np.take_along_axis(wts, order, 1)


@keeps_torch_threads
def search_weight_scale(
    w: np.ndarray,
    bits: int,
    *,
    norm: float = 2.0,
    weights: np.ndarray | None = None,
    n_grid: int = 100,
    min_ratio: float = 0.2,
    refine: bool = True,
    power_of_two: bool = False,
) -> np.ndarray:
    """Per-row scale of ``w`` (C, K) minimising the (weighted) Lp quantization error; float32 (C,).

    See the module docstring for the grid, tie-breaking and edge-case rules.
    """
    w = as_float_array("w", w, ndim=2)
    qmin, qmax = signed_range(bits)
    norm = check_positive_finite("norm", norm)
    n_grid = check_n_grid(n_grid)
    min_ratio = check_positive_finite("min_ratio", min_ratio)
    if min_ratio > 1.0:
        raise KernelInputError(f"min_ratio must be in (0, 1], got {min_ratio}.")
    if weights is None:
        wts, use_weights = np.ones((1, 1), dtype=np.float32), False
    else:
        wts, use_weights = as_float_array("weights", weights, ndim=2), True
        if wts.shape != w.shape:
            raise KernelInputError(f"weights must have the shape of w {w.shape}, got {wts.shape}.")
        if (wts < 0).any():
            raise KernelInputError("weights must be >= 0 (they weight squared errors).")
    out = np.empty(w.shape[0], dtype=np.float32)
    if w.shape[1] == 0:
        out[:] = ZERO_RANGE_SCALE
        return out
    use_sorted = sorted_pays_off(w.shape[1], qmax - qmin + 1, norm)
    sorted_w, sorted_wts = _sorted_rows(w, wts, use_weights) if use_sorted else (np.empty((1, 0)), wts)
    settings = (qmin, qmax, norm, n_grid, min_ratio, bool(refine), bool(power_of_two))
    _search_rows(w, wts, sorted_w, sorted_wts, use_weights, use_sorted, settings, out)
    return out


def minmax_weight_scale(w: np.ndarray, bits: int, *, power_of_two: bool = False) -> np.ndarray:
    """``max|w_c| / qmax`` per row (threshold rounded up to a power of two if asked); zero rows get 1.0."""
    w = as_float_array("w", w, ndim=2)
    _, qmax = signed_range(bits)
    m = np.abs(w).max(axis=1).astype(np.float64) if w.shape[1] else np.zeros(w.shape[0])
    out = np.empty(w.shape[0], dtype=np.float32)
    for c, mc in enumerate(m):
        if mc == 0.0:
            out[c] = ZERO_RANGE_SCALE
        else:
            t = math.ldexp(1.0, _ceil_log2(mc)) if power_of_two else mc
            out[c] = _scale_of(t, float(qmax))
    return out
