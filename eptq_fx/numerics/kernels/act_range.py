"""Per-tensor activation ranges: min-max, and an Lp-error grid search over samples or over a histogram.

Schemes (integer range, zero point):

* ``"asymmetric"``: ``[0, 2**b - 1]``, ``zp = clip(rint(-lo / scale), 0, qmax)``;
* ``"symmetric"``: ``[-2**(b-1), 2**(b-1) - 1]``, zp 0;
* ``"unsigned"``: ``[0, 2**b - 1]``, zp 0 (negative values clip to 0 and still count in the error).

Search grid (ratios ``r_i = (i + 1) / n_grid``, i = 0..n_grid-1, so ``r = 1`` -- min-max -- is always
tried):

* symmetric / unsigned: thresholds ``t = r * M`` with ``M = max|x|`` / ``max(max x, 0)``;
  ``scale = t / qmax``; with ``power_of_two`` the thresholds are ``2**k`` for the integers k from
  ``floor(log2(M / n_grid))`` to ``ceil(log2(M))``;
* asymmetric: the full ``n_grid x n_grid`` grid of ``hi = r_h * max(max x, 0)`` and
  ``lo = r_l * min(min x, 0)`` (a side that is 0 has the single ratio 1), ``scale = (hi - lo) / qmax``.

Every candidate's scale is the float32 value ``max(float32(.), MIN_SCALE)`` the caller receives, and its error
``sum_i count_i * |x_i - deq(x_i)|**norm`` is summed in float64 with the quantizer of
``fake_quant_per_tensor``. Candidates are tried widest range first (``r`` descending; asymmetric: ``r_h``
descending, then ``r_l`` descending) and a later one must be strictly better, so ties keep the wider range.
A range that is all zero gives ``(1.0, 0)`` for every scheme.

Cost: for ``norm == 2`` and many values the errors come from sorted values and prefix sums
(:mod:`~eptq_fx.numerics.kernels.sorted_error`, O(levels log N) per candidate after one sort); otherwise each candidate
is one pass over the values, so the asymmetric ``n_grid**2`` grid costs ``n_grid**2 * N`` element evaluations.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels.common import (
    MIN_SCALE,
    ZERO_RANGE_SCALE,
    act_range_for,
    as_float_array,
    check_bits,
    check_n_grid,
    check_positive_finite,
    check_scheme,
    keeps_torch_threads,
)
from eptq_fx.numerics.kernels.sorted_error import prefix_moments, sorted_candidate_errors, sorted_pays_off
from eptq_fx.numerics.kernels.weight_scale import _ceil_log2, _floor_log2

_F32_MAX = float(np.finfo(np.float32).max)
_BLOCK = 4096  # values per block: a block stays in L1/L2 while every candidate of a chunk sweeps it
_N_CHUNKS = 16  # fixed candidate chunks for prange; fixed (not per thread count) so sums never change


# ``reassoc`` only: SIMD float64 sums with a compile-time fixed order (see weight_scale._row_error).
@njit(cache=True, fastmath={"reassoc"})
def _span_error(values, counts, use_counts, b0, b1, scale, zp, lo, hi, norm):
    acc = 0.0
    for i in range(b0, b1):
        x = values[i]
        q = np.rint(x / scale) + zp
        q = lo if q < lo else (hi if q > hi else q)
        d = x - (q - zp) * scale
        e = d * d if norm == 2.0 else abs(d) ** norm
        acc += counts[i] * e if use_counts else e
    return acc


@njit(parallel=True, cache=True)
def _candidate_errors(values, counts, use_counts, scales, zps, qmin, qmax, norm, out):
    n_cand, n = scales.shape[0], values.shape[0]
    n_chunks = min(n_cand, _N_CHUNKS)
    lo, hi = np.float64(qmin), np.float64(qmax)
    for ch in prange(n_chunks):
        g0, g1 = ch * n_cand // n_chunks, (ch + 1) * n_cand // n_chunks
        for g in range(g0, g1):
            out[g] = 0.0
        for b0 in range(0, n, _BLOCK):
            b1 = min(b0 + _BLOCK, n)
            for g in range(g0, g1):
                out[g] += _span_error(values, counts, use_counts, b0, b1, scales[g], zps[g], lo, hi, norm)


def _to_scale(spans: np.ndarray, qmax: int) -> np.ndarray:
    s = np.minimum(spans / qmax, _F32_MAX).astype(np.float32).astype(np.float64)
    return np.maximum(s, MIN_SCALE)


def _candidates(vmin: float, vmax: float, bits: int, scheme: str, n_grid: int, power_of_two: bool):
    """Candidate (scales, zero points) widest first, or None when the range is all zero."""
    qmin, qmax = act_range_for(bits, scheme)
    ratios = np.arange(n_grid, 0, -1, dtype=np.float64) / n_grid
    if scheme == "asymmetric":
        lo0, hi0 = min(vmin, 0.0), max(vmax, 0.0)
        if lo0 == 0.0 and hi0 == 0.0:
            return None
        r_hi = ratios if hi0 > 0 else np.ones(1)
        r_lo = ratios if lo0 < 0 else np.ones(1)
        hi = np.repeat(r_hi * hi0, r_lo.size)
        lo = np.tile(r_lo * lo0, r_hi.size)
        scales = _to_scale(hi - lo, qmax)
        zps = np.clip(np.rint(-lo / scales), qmin, qmax)
        return scales, zps
    top = max(abs(vmin), abs(vmax)) if scheme == "symmetric" else max(vmax, 0.0)
    if top == 0.0:
        return None
    if power_of_two:
        ks = np.arange(_ceil_log2(top), _floor_log2(top / n_grid) - 1, -1)
        thresholds = np.ldexp(1.0, ks)
    else:
        thresholds = ratios * top
    scales = _to_scale(thresholds, qmax)
    return scales, np.zeros_like(scales)


@keeps_torch_threads
def candidate_errors(values, counts, scales, zps, qmin: int, qmax: int, norm: float, method: str = "auto"):
    """Error of every candidate ``(scales[g], zps[g])`` over float64 ``values`` (``counts`` None: all ones).

    ``method``: ``"direct"`` (one pass over the values per candidate, any norm), ``"sorted"`` (norm 2 only:
    sort once, then O(levels log N) per candidate) or ``"auto"`` (sorted where it is cheaper).
    """
    if method == "auto":
        method = "sorted" if sorted_pays_off(values.size, qmax - qmin + 1, norm) else "direct"
    errs = np.empty_like(scales)
    use_counts = counts is not None
    counts = counts if use_counts else np.ones(1)
    if method == "direct":
        _candidate_errors(values, counts, use_counts, scales, zps, qmin, qmax, norm, errs)
        return errs
    if norm != 2.0:
        raise KernelInputError("the sorted error evaluation needs norm 2.")
    if not use_counts:
        values = np.sort(values)
    elif (np.diff(values) < 0).any():  # histogram centres arrive sorted already
        order = np.argsort(values, kind="stable")
        values, counts = np.ascontiguousarray(values[order]), np.ascontiguousarray(counts[order])
    hi, lo = prefix_moments(values, counts, use_counts)
    sorted_candidate_errors(values, hi, lo, scales, zps, qmin, qmax, errs)
    return errs


def _search(values, counts, bits, scheme, n_grid, norm, power_of_two) -> tuple[float, int]:
    if power_of_two and scheme == "asymmetric":
        raise KernelInputError("power_of_two needs zero point 0: use scheme 'symmetric' or 'unsigned'.")
    cands = _candidates(float(values.min()), float(values.max()), bits, scheme, n_grid, power_of_two)
    if cands is None:
        return ZERO_RANGE_SCALE, 0
    scales, zps = cands
    qmin, qmax = act_range_for(bits, scheme)
    errs = candidate_errors(values, counts, scales, zps, qmin, qmax, norm)
    best = int(np.argmin(errs))  # first minimum: ties keep the wider range
    return float(scales[best]), int(zps[best])


def _check_common(bits, scheme, n_grid, norm) -> tuple[int, str, int, float]:
    return check_bits(bits), check_scheme(scheme), check_n_grid(n_grid), check_positive_finite("norm", norm)


@keeps_torch_threads
def search_act_range(
    x: np.ndarray, bits: int, scheme: str, *, n_grid: int = 100, norm: float = 2.0, power_of_two: bool = False
) -> tuple[float, int]:
    """Lp-optimal ``(scale, zero_point)`` for the 1-D samples ``x`` (see the module docstring)."""
    x = as_float_array("x", x, ndim=1)
    if x.size == 0:
        raise KernelInputError("x is empty: an activation range needs at least one sample.")
    bits, scheme, n_grid, norm = _check_common(bits, scheme, n_grid, norm)
    return _search(x.astype(np.float64), None, bits, scheme, n_grid, norm, bool(power_of_two))


@keeps_torch_threads
def search_act_range_hist(
    counts: np.ndarray,
    edges: np.ndarray,
    bits: int,
    scheme: str,
    *,
    n_grid: int = 100,
    norm: float = 2.0,
    power_of_two: bool = False,
) -> tuple[float, int]:
    """Like :func:`search_act_range` on a histogram, every bin's mass sitting at the bin centre.

    The range searched is that of the centres of the non-empty bins (``counts`` (B,) >= 0, ``edges`` (B+1,)
    strictly increasing), so streaming calibration can accumulate one histogram over many batches.
    """
    counts = as_float_array("counts", counts, ndim=1, dtype=np.float64)
    edges = as_float_array("edges", edges, ndim=1, dtype=np.float64)
    if edges.size != counts.size + 1 or counts.size == 0:
        raise KernelInputError(
            f"edges must have len(counts) + 1 entries, got {edges.size} for {counts.size} bins."
        )
    if (np.diff(edges) <= 0).any():
        raise KernelInputError("edges must be strictly increasing.")
    if (counts < 0).any():
        raise KernelInputError("counts must be >= 0.")
    keep = counts > 0
    if not keep.any():
        raise KernelInputError("counts are all zero: the histogram holds no samples.")
    bits, scheme, n_grid, norm = _check_common(bits, scheme, n_grid, norm)
    centres = np.ascontiguousarray((0.5 * (edges[:-1] + edges[1:]))[keep])
    return _search(
        centres, np.ascontiguousarray(counts[keep]), bits, scheme, n_grid, norm, bool(power_of_two)
    )


def minmax_act_range(
    xmin: float, xmax: float, bits: int, scheme: str, *, power_of_two: bool = False
) -> tuple[float, int]:
    """``(scale, zero_point)`` covering ``[min(xmin, 0), max(xmax, 0)]`` (the range always includes 0)."""
    for name, v in (("xmin", xmin), ("xmax", xmax)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not np.isfinite(v)
        ):
            raise KernelInputError(f"{name} must be a finite number, got {v!r}.")
    if xmin > xmax:
        raise KernelInputError(f"xmin must be <= xmax, got xmin={xmin}, xmax={xmax}.")
    bits, scheme = check_bits(bits), check_scheme(scheme)
    if power_of_two and scheme == "asymmetric":
        raise KernelInputError("power_of_two needs zero point 0: use scheme 'symmetric' or 'unsigned'.")
    cands = _candidates(float(xmin), float(xmax), bits, scheme, 1, power_of_two)
    if cands is None:
        return ZERO_RANGE_SCALE, 0
    scales, zps = cands
    return float(scales[0]), int(zps[0])
