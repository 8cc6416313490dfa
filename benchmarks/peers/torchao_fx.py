"""torch.ao FX graph-mode static post-training quantization: x86 default qconfig mapping (int8 activations with
reduce_range, per-channel int8 weights), calibrate, convert to the x86 int8 kernels. 8-bit only."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from benchmarks.peers import PeerRun


def run(model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int, batch_size: int = 32, **_) -> PeerRun:
    if (w_bits, a_bits) != (8, 8):
        return PeerRun.unsupported("torch.ao FX static quantization has int8 kernels only (W8A8)")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao; still works
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              example_inputs=(calib[:1],))
        with torch.no_grad():
            for i in range(0, len(calib), batch_size):
                prepared(calib[i:i + batch_size])
        quantized = convert_fx(prepared)
    return PeerRun(quantized, details={"backend": "x86", "int8_kernels": True})
