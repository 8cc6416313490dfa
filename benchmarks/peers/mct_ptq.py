"""Sony MCT post-training quantization (``mct.ptq.pytorch_post_training_quantization``): statistics over the
calibration images, default error-method threshold selection, BatchNorm folding, shift-negative correction and
bias correction as MCT's CoreConfig defaults have them. See ``_mct`` for how bit widths are set."""
from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.peers import PeerRun
from benchmarks.peers._mct import bits_used, check_supported, import_mct, quantization_setup, representative_data


def run(model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int, batch_size: int = 32, **_) -> PeerRun:
    reason = check_supported(w_bits, a_bits)
    if reason:
        return PeerRun.unsupported(reason)
    mct = import_mct()
    torch.manual_seed(0)
    core_config, extra = quantization_setup(mct, model, w_bits, a_bits)
    qmodel, _ = mct.ptq.pytorch_post_training_quantization(
        model, representative_data(calib, batch_size), core_config=core_config, **extra)
    qmodel.eval()
    used = bits_used(qmodel)
    return PeerRun(qmodel, details={"mct_version": mct.__version__, "weight_bits_used": used["weights"],
                                    "act_bits_used": used["activations"], "custom_tpc": bool(extra)})
