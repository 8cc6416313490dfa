"""Fake quantization (quantize + dequantize) and integer codes, per channel and per tensor.

Semantics, identical in the numpy twins of :mod:`eptq_fx.numerics.kernels.reference`:
``q = clip(rint(w / scale) + zero_point, qmin, qmax)`` and ``dequant = (q - zero_point) * scale``, with the
division done in float64 and ``rint`` rounding half to even. The float64 product ``q * scale`` is exact
(q has at most 17 significant bits, a float32 scale 24), so the float32 result equals the correctly rounded
float32 product.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels.common import (
    as_float_array,
    check_int,
    check_positive_finite,
    check_qrange,
    check_scales,
    keeps_torch_threads,
)


@njit(parallel=True, cache=True)
def _fake_quant_rows(w, scale, qmin, qmax, out):
    lo, hi = np.float64(qmin), np.float64(qmax)
    for c in prange(w.shape[0]):
        s = np.float64(scale[c])
        for k in range(w.shape[1]):
            q = np.rint(np.float64(w[c, k]) / s)
            q = lo if q < lo else (hi if q > hi else q)
            out[c, k] = q * s


@njit(parallel=True, cache=True)
def _quantize_rows(w, scale, qmin, qmax, out):
    lo, hi = np.float64(qmin), np.float64(qmax)
    for c in prange(w.shape[0]):
        s = np.float64(scale[c])
        for k in range(w.shape[1]):
            q = np.rint(np.float64(w[c, k]) / s)
            q = lo if q < lo else (hi if q > hi else q)
            out[c, k] = np.int32(q)


@njit(cache=True)
def _fake_quant_flat(x, scale, zero_point, qmin, qmax, out):
    lo, hi, zp = np.float64(qmin), np.float64(qmax), np.float64(zero_point)
    for i in range(x.shape[0]):
        q = np.rint(np.float64(x[i]) / scale) + zp
        q = lo if q < lo else (hi if q > hi else q)
        out[i] = (q - zp) * scale


def _checked_per_channel(w, scale, qmin, qmax) -> tuple[np.ndarray, np.ndarray, int, int]:
    w = as_float_array("w", w, ndim=2)
    scale = as_float_array("scale", scale, ndim=1)
    check_scales(scale, w.shape[0])
    lo, hi = check_qrange(qmin, qmax)
    return w, scale, lo, hi


@keeps_torch_threads
def fake_quant_per_channel(w: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Quantize-dequantize the rows of ``w`` (C, K) with one scale per row; returns float32 (C, K)."""
    w, scale, lo, hi = _checked_per_channel(w, scale, qmin, qmax)
    out = np.empty_like(w)
    _fake_quant_rows(w, scale, lo, hi, out)
    return out


@keeps_torch_threads
def quantize_per_channel(w: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes ``clip(rint(w / scale), qmin, qmax)`` of ``w`` (C, K) as int32 (C, K)."""
    w, scale, lo, hi = _checked_per_channel(w, scale, qmin, qmax)
    out = np.empty(w.shape, dtype=np.int32)
    _quantize_rows(w, scale, lo, hi, out)
    return out


def fake_quant_per_tensor(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """Affine per-tensor fake quantization of ``x`` (any shape); returns float32 of the same shape."""
    arr = np.asarray(x)
    flat = as_float_array("x", arr.reshape(-1), ndim=1)
    s = check_positive_finite("scale", scale)
    lo, hi = check_qrange(qmin, qmax)
    zp = check_int("zero_point", zero_point)
    if not lo <= zp <= hi:
        raise KernelInputError(f"zero_point must lie in [qmin, qmax] = [{lo}, {hi}], got {zp}.")
    out = np.empty_like(flat)
    _fake_quant_flat(flat, s, zp, lo, hi, out)
    return out.reshape(arr.shape)
