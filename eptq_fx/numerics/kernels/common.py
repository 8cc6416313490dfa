"""Input checks and integer-range helpers shared by the numba kernels' public wrappers.

The kernels themselves never validate: every public wrapper calls these helpers first, so a bad array fails
with a one-line :class:`~eptq_fx.errors.KernelInputError` instead of a numba crash or a silent NaN.
"""

from __future__ import annotations

import functools
import numbers

import numba
import numpy as np
import torch

from eptq_fx.errors import KernelInputError

MIN_BITS, MAX_BITS = 2, 16
# The smallest scale any search returns: the smallest *normal* float32. Channels whose values are so tiny that
# max|w|/qmax underflows get this instead of a denormal or zero scale (which would make w/scale blow up).
MIN_SCALE = float(np.finfo(np.float32).tiny)
# Scale given to a channel / tensor whose values are all zero: any non-zero scale quantizes it exactly.
ZERO_RANGE_SCALE = 1.0
ACT_SCHEMES = ("asymmetric", "symmetric", "unsigned")


def keeps_torch_threads(fn):
    """Run a wrapper's parallel numba kernels with torch's thread count, and leave torch's count as it was.

    numba's OpenMP threading layer starts its pool with one thread per core and leaves that count set in the
    calling thread, where torch's intra-op pool (also OpenMP) reads it: ``torch.set_num_threads(1)`` silently
    became 2 threads after ``prepare`` computed the weight scales, so ``--threads`` and every 1-thread benchmark
    ran with 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
    return wrapper


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise KernelInputError(f"bits must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}.")
    return int(bits)


def signed_range(bits: int) -> tuple[int, int]:
    """Signed symmetric range of the project: ``(-2**(b-1), 2**(b-1) - 1)``, e.g. ``(-8, 7)`` for 4 bits."""
    bits = check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """Unsigned range ``(0, 2**b - 1)`` used by the asymmetric and unsigned activation schemes."""
    bits = check_bits(bits)
    return 0, 2**bits - 1


def act_range_for(bits: int, scheme: str) -> tuple[int, int]:
    """Integer range of an activation scheme (see :data:`ACT_SCHEMES`)."""
    check_scheme(scheme)
    return signed_range(bits) if scheme == "symmetric" else unsigned_range(bits)


def check_scheme(scheme: object) -> str:
    if scheme not in ACT_SCHEMES:
        raise KernelInputError(f"scheme must be one of {ACT_SCHEMES}, got {scheme!r}.")
    return scheme  # type: ignore[return-value]


def as_float_array(name: str, a: object, ndim: int | None, dtype=np.float32) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype``; refuses non-numeric data, a wrong ndim and NaN/Inf.

    The finiteness check runs *after* the conversion, so a float64 value that overflows float32 is caught too.
    """
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise KernelInputError(f"{name} must be a real numeric array, got dtype {arr.dtype}.")
    if ndim is not None and arr.ndim != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {arr.shape}.")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes Inf, reported just below
        arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise KernelInputError(f"{name} contains NaN or Inf (after conversion to {np.dtype(dtype).name}).")
    return arr


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise KernelInputError(f"{name} must be an integer, got {value!r}.")
    return int(value)


def check_qrange(qmin: object, qmax: object) -> tuple[int, int]:
    lo, hi = check_int("qmin", qmin), check_int("qmax", qmax)
    if not -(2**31) <= lo < hi <= 2**31 - 1:
        raise KernelInputError(f"need qmin < qmax within int32, got qmin={lo}, qmax={hi}.")
    return lo, hi


def check_positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise KernelInputError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_n_grid(n_grid: object) -> int:
    n = check_int("n_grid", n_grid)
    if not 1 <= n <= 100_000:
        raise KernelInputError(f"n_grid must be between 1 and 100000, got {n}.")
    return n


def check_scales(scale: np.ndarray, n_channels: int) -> None:
    if scale.shape != (n_channels,):
        raise KernelInputError(
            f"scale must have shape ({n_channels},) (one per row of w), got {scale.shape}."
        )
    if (scale <= 0).any():
        raise KernelInputError("scale must be > 0 everywhere.")
