"""Sony MCT gradient-based PTQ (``mct.gptq.pytorch_gradient_post_training_quantization``), MCT's implementation
of EPTQ: soft-rounding optimisation weighted by label-free Hessian scores (sample-layer attention on by default).

The optimisation budget is ``n_epochs`` passes over the calibration images, i.e. ``n_epochs * ceil(n / batch)``
steps; ``steps=`` picks the smallest number of epochs that reaches at least that many steps, so the budget can
be matched to ours. MCT's own default config is otherwise untouched."""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from benchmarks.peers import PeerRun
from benchmarks.peers._mct import bits_used, check_supported, import_mct, quantization_setup, representative_data


def run(model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int, n_epochs: int | None = None,
        steps: int | None = None, batch_size: int = 32, hessian_sample_attention: bool = True, **_) -> PeerRun:
    reason = check_supported(w_bits, a_bits)
    if reason:
        return PeerRun.unsupported(reason)
    steps_per_epoch = math.ceil(len(calib) / batch_size)
    if n_epochs is None:
        n_epochs = max(1, math.ceil(steps / steps_per_epoch)) if steps else 1
    mct = import_mct()
    torch.manual_seed(0)
    core_config, extra = quantization_setup(mct, model, w_bits, a_bits)

    # MCT calls log_function once per optimisation step: we use it to count steps and time them.
    stamps: list[tuple[float, float]] = []  # (wall, process CPU) at the end of each step

    def log_step(*_args) -> None:
        stamps.append((time.perf_counter(), time.process_time()))

    start = (time.perf_counter(), time.process_time())
    gptq_config = mct.gptq.get_pytorch_gptq_config(
        n_epochs=n_epochs, use_hessian_sample_attention=hessian_sample_attention, log_function=log_step)
    qmodel, _ = mct.gptq.pytorch_gradient_post_training_quantization(
        model, representative_data(calib, batch_size), core_config=core_config, gptq_config=gptq_config, **extra)
    end = (time.perf_counter(), time.process_time())
    qmodel.eval()
    used = bits_used(qmodel)
    details = {"mct_version": mct.__version__, "weight_bits_used": used["weights"],
               "act_bits_used": used["activations"], "custom_tpc": bool(extra), "n_epochs": n_epochs,
               "steps_per_epoch": steps_per_epoch, "steps_run": len(stamps),
               "hessian_sample_attention": hessian_sample_attention}
    if len(stamps) >= 2:
        for clock, suffix in ((0, "s"), (1, "cpu_s")):
            details[f"{suffix}_per_step"] = (stamps[-1][clock] - stamps[0][clock]) / (len(stamps) - 1)
            # before the first step: graph preparation, statistics, PTQ and the Hessian scores
            details[f"before_first_step_{suffix}"] = stamps[0][clock] - start[clock]
            details[f"after_last_step_{suffix}"] = end[clock] - stamps[-1][clock]
    return PeerRun(qmodel, details=details)
