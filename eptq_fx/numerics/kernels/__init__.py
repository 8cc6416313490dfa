"""numba kernels: fake quantization and scale / range searches (float32 in, float64 arithmetic inside).

Conventions shared by the whole package: weights are 2-D ``(C, K)`` with one row per output channel; the
signed b-bit range is ``[-2**(b-1), 2**(b-1) - 1]`` and a threshold ``t`` maps to ``scale = t / qmax``;
rounding is ``rint`` (half to even); an all-zero channel or tensor gets scale 1.0. Every public function
validates its inputs and raises :class:`eptq_fx.errors.KernelInputError` on NaN/Inf, a wrong ndim or bad bits.
Each has a plain numpy twin ``<name>_ref`` in :mod:`eptq_fx.numerics.kernels.reference`.
"""

from eptq_fx.numerics.kernels.act_range import minmax_act_range, search_act_range, search_act_range_hist
from eptq_fx.numerics.kernels.common import MIN_SCALE, ZERO_RANGE_SCALE, act_range_for, signed_range, unsigned_range
from eptq_fx.numerics.kernels.fake_quant import fake_quant_per_channel, fake_quant_per_tensor, quantize_per_channel
from eptq_fx.numerics.kernels.weight_scale import minmax_weight_scale, search_weight_scale

__all__ = [
    "MIN_SCALE",
    "ZERO_RANGE_SCALE",
    "act_range_for",
    "fake_quant_per_channel",
    "fake_quant_per_tensor",
    "minmax_act_range",
    "minmax_weight_scale",
    "quantize_per_channel",
    "search_act_range",
    "search_act_range_hist",
    "search_weight_scale",
    "signed_range",
    "unsigned_range",
]
