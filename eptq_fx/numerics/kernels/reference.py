"""Plain vectorised numpy twins (``*_ref``) of the numba kernels, written from the specification.

They skip input validation (the kernels' wrappers own it) and favour obviousness over speed: whole-array
numpy expressions, one grid point (or one chunk of candidates) at a time. Grid, scale and tie rules are those
documented in :mod:`eptq_fx.numerics.kernels.weight_scale` and :mod:`eptq_fx.numerics.kernels.act_range`.
"""

from __future__ import annotations

import numpy as np

_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


def _signed(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _unsigned(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def _as_scale(spans) -> np.ndarray:
    """float64 spans -> the float32 scale actually used, clamped into the normal float32 range."""
    s = np.minimum(np.asarray(spans, dtype=np.float64), _F32_MAX).astype(np.float32).astype(np.float64)
    return np.maximum(s, _TINY)


def _log2_ceil(x: np.ndarray) -> np.ndarray:
    mant, exp = np.frexp(x)
    return np.where(mant == 0.5, exp - 1, exp)


def _log2_floor(x: np.ndarray) -> np.ndarray:
    return np.frexp(x)[1] - 1


# ---------------------------------------------------------------------------------------------- fake quant
def quantize_per_channel_ref(w, scale, qmin, qmax) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)[:, None]
    return np.clip(np.rint(np.asarray(w, dtype=np.float64) / s), qmin, qmax).astype(np.int32)


def fake_quant_per_channel_ref(w, scale, qmin, qmax) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)[:, None]
    return (quantize_per_channel_ref(w, scale, qmin, qmax) * s).astype(np.float32)


def fake_quant_per_tensor_ref(x, scale, zero_point, qmin, qmax) -> np.ndarray:
    x64 = np.asarray(x, dtype=np.float64)
    q = np.clip(np.rint(x64 / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------- weight scales
def weight_error_ref(w, scale, bits, norm=2.0, weights=None) -> np.ndarray:
    """Per-row float64 error ``sum weights * |w - deq(w)|**norm`` of the signed ``bits`` quantizer."""
    qmin, qmax = _signed(bits)
    w64 = np.asarray(w, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    deq = np.clip(np.rint(w64 / s), qmin, qmax) * s
    e = np.abs(w64 - deq) ** norm
    if weights is not None:
        e = e * np.asarray(weights, dtype=np.float64)
    return e.sum(axis=1)


def _pick(errs: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per column: the scale with the smallest error, the largest such scale on a tie. Shapes (G, C)."""
    best_err = errs.min(axis=0)
    return np.where(errs == best_err, scales, -np.inf).max(axis=0)


def _pick_with_ratio(errs, scales, ratios):
    best_s = _pick(errs, scales)
    rows = np.argmax((scales == best_s) & (errs == errs.min(axis=0)), axis=0)
    cols = np.arange(errs.shape[1])
    return best_s, errs[rows, cols], ratios[rows, cols]


def minmax_weight_scale_ref(w, bits, *, power_of_two=False) -> np.ndarray:
    _, qmax = _signed(bits)
    m = np.abs(np.asarray(w, dtype=np.float64)).max(axis=1)
    zero = m == 0
    m = np.where(zero, 1.0, m)
    t = np.ldexp(1.0, _log2_ceil(m)) if power_of_two else m
    return np.where(zero, 1.0, _as_scale(t / qmax)).astype(np.float32)


def search_weight_scale_ref(
    w, bits, *, norm=2.0, weights=None, n_grid=100, min_ratio=0.2, refine=True, power_of_two=False
) -> np.ndarray:
    _, qmax = _signed(bits)
    w = np.asarray(w, dtype=np.float32)
    n_rows = w.shape[0]
    m = np.abs(w.astype(np.float64)).max(axis=1) if w.shape[1] else np.zeros(n_rows)
    zero = m == 0
    m = np.where(zero, 1.0, m)

    def evaluate(thresholds: np.ndarray):  # thresholds (G, C) -> scales, errors (G, C)
        scales = _as_scale(thresholds / qmax)
        errs = np.stack([weight_error_ref(w, s, bits, norm, weights) for s in scales])
        return scales, errs

    if power_of_two:
        k_hi, k_lo = _log2_ceil(m), _log2_floor(min_ratio * m)
        offsets = np.arange(int((k_hi - k_lo).max()) + 1)[:, None]
        ks = np.maximum(k_hi - offsets, k_lo)  # rows past a channel's k_lo repeat k_lo: harmless duplicates
        scales, errs = evaluate(np.ldexp(1.0, ks))
        best = _pick(errs, scales)
    else:
        grid = np.ones(1) if n_grid == 1 else min_ratio + (1 - min_ratio) * np.arange(n_grid) / (n_grid - 1)
        grid[-1] = 1.0
        ratios = np.repeat(grid[:, None], n_rows, axis=1)
        scales, errs = evaluate(ratios * m)
        best, best_err, best_r = _pick_with_ratio(errs, scales, ratios)
        if refine and n_grid > 1:
            step = (1 - min_ratio) / (n_grid - 1)
            r_lo = np.where(best_r - step > 0, best_r - step, best_r / 2)
            r_hi = np.minimum(best_r + step, 1.0)
            fine = r_lo + (r_hi - r_lo) * np.arange(n_grid)[:, None] / (n_grid - 1)
            f_scales, f_errs = evaluate(fine * m)
            best = _pick(np.vstack([best_err[None], f_errs]), np.vstack([best[None], f_scales]))
    return np.where(zero, 1.0, best).astype(np.float32)


# ---------------------------------------------------------------------------------------------- activations
def act_error_ref(values, scale, zero_point, qmin, qmax, norm=2.0, counts=None) -> float:
    # Not fake_quant_per_tensor_ref: that rounds the dequantized values to float32, the error must not.
    x64 = np.asarray(values, dtype=np.float64)
    q = np.clip(np.rint(x64 / scale) + zero_point, qmin, qmax)
    deq = (q - zero_point) * scale
    e = np.abs(x64 - deq) ** norm
    return float((e * counts).sum() if counts is not None else e.sum())


def _act_candidates_ref(vmin, vmax, bits, scheme, n_grid, power_of_two):
    qmin, qmax = _signed(bits) if scheme == "symmetric" else _unsigned(bits)
    ratios = (n_grid - np.arange(n_grid)) / n_grid  # exact (i+1)/n_grid, widest first
    if scheme == "asymmetric":
        lo0, hi0 = min(vmin, 0.0), max(vmax, 0.0)
        if lo0 == 0 and hi0 == 0:
            return None
        hr = ratios if hi0 > 0 else np.ones(1)
        lr = ratios if lo0 < 0 else np.ones(1)
        hi, lo = np.meshgrid(hr * hi0, lr * lo0, indexing="ij")
        hi, lo = hi.ravel(), lo.ravel()
        scales = _as_scale((hi - lo) / qmax)
        return scales, np.clip(np.rint(-lo / scales), qmin, qmax), qmin, qmax
    top = max(abs(vmin), abs(vmax)) if scheme == "symmetric" else max(vmax, 0.0)
    if top == 0:
        return None
    if power_of_two:
        top_arr = np.array([top])
        ks = np.arange(int(_log2_ceil(top_arr)[0]), int(_log2_floor(top_arr / n_grid)[0]) - 1, -1)
        t = np.ldexp(1.0, ks)
    else:
        t = ratios * top
    scales = _as_scale(t / qmax)
    return scales, np.zeros_like(scales), qmin, qmax


def _act_errors_ref(values, counts, scales, zps, qmin, qmax, norm) -> np.ndarray:
    """Errors of every candidate, a chunk of candidates x all values at a time."""
    x = np.asarray(values, dtype=np.float64)[None, :]
    out = []
    step = max(1, 2_000_000 // x.size)
    for g0 in range(0, scales.size, step):
        s, z = scales[g0 : g0 + step, None], zps[g0 : g0 + step, None]
        q = np.clip(np.rint(x / s) + z, qmin, qmax)
        e = np.abs(x - (q - z) * s) ** norm
        out.append((e * counts).sum(axis=1) if counts is not None else e.sum(axis=1))
    return np.concatenate(out)


def _act_search_ref(values, counts, bits, scheme, n_grid, norm, power_of_two):
    cands = _act_candidates_ref(float(values.min()), float(values.max()), bits, scheme, n_grid, power_of_two)
    if cands is None:
        return 1.0, 0
    scales, zps, qmin, qmax = cands
    best = int(np.argmin(_act_errors_ref(values, counts, scales, zps, qmin, qmax, norm)))  # first: widest
    return float(scales[best]), int(zps[best])


def search_act_range_ref(x, bits, scheme, *, n_grid=100, norm=2.0, power_of_two=False):
    return _act_search_ref(
        np.asarray(x, dtype=np.float32).ravel(), None, bits, scheme, n_grid, norm, power_of_two
    )


def search_act_range_hist_ref(counts, edges, bits, scheme, *, n_grid=100, norm=2.0, power_of_two=False):
    counts, edges = np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    keep = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[keep]
    return _act_search_ref(centres, counts[keep], bits, scheme, n_grid, norm, power_of_two)


def minmax_act_range_ref(xmin, xmax, bits, scheme, *, power_of_two=False):
    lo, hi = min(xmin, 0.0), max(xmax, 0.0)
    if lo == 0 and hi == 0:
        return 1.0, 0
    if scheme == "asymmetric":
        qmax = 2**bits - 1
        s = float(_as_scale((hi - lo) / qmax))
        return s, int(np.clip(np.rint(-lo / s), 0, qmax))
    qmax = _signed(bits)[1] if scheme == "symmetric" else _unsigned(bits)[1]
    t = max(-lo, hi) if scheme == "symmetric" else hi
    if t == 0:
        return 1.0, 0
    if power_of_two:
        t = float(np.ldexp(1.0, _log2_ceil(np.array([t]))[0]))
    return float(_as_scale(t / qmax)), 0
