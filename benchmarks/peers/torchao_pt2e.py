"""torchao PT2E static quantization: torch.export the model, prepare with X86InductorQuantizer's default config
(int8 per-channel weights, int8 activations), calibrate, convert. The converted program (quantize/dequantize
pairs around float ops) is what gets evaluated, run eagerly. 8-bit only."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from benchmarks.peers import PeerRun


def run(model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int, batch_size: int = 32, **_) -> PeerRun:
    if (w_bits, a_bits) != (8, 8):
        return PeerRun.unsupported("X86InductorQuantizer supports int8 weights and activations only (W8A8)")
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = (calib[:batch_size],)
        batch = torch.export.Dim("batch", min=1)
        exported = torch.export.export(copy.deepcopy(model).eval(), example,
                                       dynamic_shapes=({0: batch},)).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for i in range(0, len(calib), batch_size):
                prepared(calib[i:i + batch_size])
        quantized = move_exported_model_to_eval(convert_pt2e(prepared))
    return PeerRun(quantized, details={"quantizer": "X86InductorQuantizer",
                                      "evaluated": "converted q/dq program, eager"})
