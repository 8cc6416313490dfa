"""Compile a converted model with Inductor so its Q/DQ patterns run as oneDNN int8 kernels.

Inductor fuses ``dequantize → conv/linear → quantize`` into int8 oneDNN kernels only when it may treat the
integer weights as constants and prepack them: that is ``torch._inductor.config.freezing``, off by default.
Without it ``torch.compile`` leaves the dequantized weights in float (W8A8 no faster than float). The flag is set
only around this module's calls (compilation happens lazily, on the first call of each new shape), never globally.
Weights of fewer than 8 bits are stored in int8 containers, so they lower to the same int8 kernels: 4-bit weights
give int8 speed, not more (oneDNN has no int4 convolution); activations below 8 bits likewise run in uint8.
"""
from __future__ import annotations

import logging

import torch
from torch import fx, nn

from eptq_fx.errors import ModelError

logger = logging.getLogger(__name__)


class InductorModule(nn.Module):
    """A compiled converted model; calls run under ``no_grad`` with Inductor's freezing enabled for them only."""

    def __init__(self, model: fx.GraphModule, **compile_kwargs):
        super().__init__()
        self.model = model.eval()
        self._compiled = torch.compile(self.model, backend="inductor", **compile_kwargs)

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        # freezing only acts on inference graphs: no autograd state, so the weights can be folded and prepacked
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self._compiled(*args, **kwargs)


def compile_for_inductor(model: fx.GraphModule, **compile_kwargs) -> InductorModule:
    """``torch.compile`` a converted model (from ``quantize`` / ``convert``) so that Inductor reaches oneDNN's int8
    convolution / linear kernels on x86 CPUs. ``compile_kwargs`` go to ``torch.compile`` (``dynamic``, ``mode``)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"compile_for_inductor needs the converted model from eptq_fx.quantize, got "
                         f"{type(model).__name__}.")
    if any(p.requires_grad for p in model.parameters()):
        # freezing folds parameters into constants: a trainable one would silently stop training
        logger.info("compile_for_inductor: parameters are frozen into the compiled graph (inference only)")
    return InductorModule(model, **compile_kwargs)
