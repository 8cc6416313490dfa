"""Squared quantization error from sorted values and prefix sums: O(levels * log N) per candidate, not O(N).

For ``norm == 2`` the error of a per-tensor quantizer (scale ``s``, zero point ``z``) splits over its levels:
the values that round to level ``q`` are one run of the *sorted* values, between the rounding boundaries
``(q - 0.5 - z) * s`` and ``(q + 0.5 - z) * s`` (the end levels' runs are open-ended: clipping), and

    sum_{x in run q} c * (x - v_q)**2 = S2_q - 2 v_q S1_q + v_q**2 S0_q,     v_q = (q - z) * s,

with ``S0, S1, S2`` the run's sums of ``c``, ``c*x`` and ``c*x**2``. Prefix sums make each run two look-ups.

Accuracy: prefix sums are accumulated with Neumaier compensation (a high and a low part per entry), so a run's
sums carry a relative error of about one rounding, not ``N`` of them. The subtraction above then loses
about ``log10(12 * q**2)`` digits (a run's error is ~``n s**2 / 12`` against ``S2 ~ n v_q**2``): below
1e-10 relative for up to 12 bits. A value lying exactly on a boundary may land in the other run than
``rint`` (half to even) puts it in, which changes nothing: it is equally far from both levels.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


def sorted_pays_off(n: int, levels: int, norm: float) -> bool:
    """Whether to use the sorted evaluation for ``n`` values and ``levels`` integer levels: it costs about
    ``levels * log2(n)`` per candidate against ``n`` for a direct pass, and is accurate enough (see above) for
    norm 2 up to 4096 levels (12 bits)."""
    return norm == 2.0 and levels <= 4096 and n > 0 and levels * (math.log2(n) + 4) < n / 2


@njit(cache=True)
def prefix_moments(values, counts, use_counts):
    """Compensated prefix sums ``(hi, lo)`` of shape (3, N + 1): rows ``c``, ``c*x``, ``c*x**2``."""
    n = values.shape[0]
    hi = np.zeros((3, n + 1))
    lo = np.zeros((3, n + 1))
    for k in range(3):
        total, comp = 0.0, 0.0
        for i in range(n):
            c = counts[i] if use_counts else 1.0
            a = c if k == 0 else (c * values[i] if k == 1 else c * values[i] * values[i])
            t = total + a
            if abs(total) >= abs(a):  # Neumaier: keep the rounding error of every addition
                comp += (total - t) + a
            else:
                comp += (a - t) + total
            total = t
            hi[k, i + 1] = total
            lo[k, i + 1] = comp
    return hi, lo


@njit(cache=True)
def _lower_bound(values, x, lo, hi):
    """First index in [lo, hi) whose value is >= x (hi if none); values ascending."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def _level(x, scale, zp, qmin, qmax):
    q = np.rint(x / scale) + zp
    return int(qmin if q < qmin else (qmax if q > qmax else q))


@njit(cache=True)
def sorted_squared_error(values, hi, lo, scale, zp, qmin, qmax):
    """Squared error of one quantizer over ascending ``values`` with moments from :func:`prefix_moments`."""
    n = values.shape[0]
    q_first = _level(values[0], scale, zp, qmin, qmax)
    q_last = _level(values[n - 1], scale, zp, qmin, qmax)
    total, j0 = 0.0, 0
    for q in range(q_first, q_last + 1):
        j1 = n if q == q_last else _lower_bound(values, (q + 0.5 - zp) * scale, j0, n)
        if j1 > j0:
            s0 = (hi[0, j1] - hi[0, j0]) + (lo[0, j1] - lo[0, j0])
            s1 = (hi[1, j1] - hi[1, j0]) + (lo[1, j1] - lo[1, j0])
            s2 = (hi[2, j1] - hi[2, j0]) + (lo[2, j1] - lo[2, j0])
            v = (q - zp) * scale
            e = s2 - 2.0 * v * s1 + v * v * s0
            if e > 0.0:  # a run quantized (almost) exactly may come out a rounding below zero
                total += e
            j0 = j1
    return total


@njit(parallel=True, cache=True)
def sorted_candidate_errors(values, hi, lo, scales, zps, qmin, qmax, out):
    # One candidate per iteration, each summed by a single thread in a fixed order: deterministic.
    for g in prange(scales.shape[0]):
        out[g] = sorted_squared_error(values, hi, lo, scales[g], zps[g], qmin, qmax)
