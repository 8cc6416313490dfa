"""Compile a converted model with Inductor so its Q/DQ patterns run as oneDNN int8 kernels.

Inductor fuses ``dequantize → conv/linear → quantize`` into int8 oneDNN kernels only when it may treat the
integer weights as constants and prepack them: that is ``torch._inductor.config.freezing``, off by default.
Without it ``torch.compile`` leaves the dequantized weights in float (W8A8 no faster than float). The flag is set
only around this module's calls (compilation happens lazily, on the first call of each new shape), never globally.
Weights of fewer than 8 bits are stored in int8 containers, so they lower to the same int8 kernels: 4-bit weights
give int8 speed, not more (oneDNN has no int4 convolution); activations below 8 bits likewise run in uint8.

On x86 CPUs without VNNI (AVX2-only) oneDNN multiplies u8 × s8 pairs with ``vpmaddubsw``, whose int16 pair sums
saturate for 8-bit weights: the compiled model then computes wrong outputs (measured: a single W8A8 linear off
by a third of its output range, exact with 7-bit weights). So 8-bit weights are refused on such CPUs unless the
caller accepts that; 7-bit weights (``weight_bits=7``, the "reduce range" of fbgemm / ORT) are exact there.
"""
from __future__ import annotations

import logging

import torch
from torch import fx, nn

from eptq_fx.errors import ModelError

qd = torch.ops.quantized_decomposed
_SAFE_WITHOUT_VNNI = (-64, 63)  # 7-bit weights: the int16 pair sums of vpmaddubsw cannot overflow

logger = logging.getLogger(__name__)


class InductorModule(nn.Module):
    """A compiled converted model; calls run under ``no_grad`` with Inductor's freezing enabled for them only."""

    def __init__(self, model: fx.GraphModule, **compile_kwargs):
        super().__init__()
        try:
            model.eval()
        except NotImplementedError:  # a torch.export module (PT2E's convert_pt2e output) fixes its mode at export
            pass
        self.model = model
        self._compiled = torch.compile(self.model, backend="inductor", **compile_kwargs)

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        # freezing only acts on inference graphs: no autograd state, so the weights can be folded and prepacked
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self._compiled(*args, **kwargs)


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI), so oneDNN's u8 × s8 int8 kernels do not saturate."""
    return bool(torch.cpu._is_vnni_supported())


def saturating_weights(model: nn.Module) -> list[str]:
    """Weights whose integer range exceeds 7 bits (they may saturate in int8 kernels on CPUs without VNNI)."""
    if not isinstance(model, fx.GraphModule):
        return []
    names = []
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is qd.dequantize_per_channel.default:
            qmin, qmax = int(node.args[4]), int(node.args[5])
            if qmin < _SAFE_WITHOUT_VNNI[0] or qmax > _SAFE_WITHOUT_VNNI[1]:
                names.append(str(node.args[0].target) if isinstance(node.args[0], fx.Node) else node.name)
    return names


def compile_for_inductor(model: fx.GraphModule, allow_saturation: bool = False, **compile_kwargs) -> InductorModule:
    """``torch.compile`` a converted model (from ``quantize`` / ``convert``) so that Inductor reaches oneDNN's int8
    convolution / linear kernels on x86 CPUs. ``compile_kwargs`` go to ``torch.compile`` (``dynamic``, ``mode``).

    On a CPU without VNNI, 8-bit weights raise ``ModelError`` (oneDNN would saturate them) unless
    ``allow_saturation=True``; quantize with ``weight_bits=7`` and ``first_last_8bit=False`` instead."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"compile_for_inductor needs the converted model from eptq_fx.quantize, got "
                         f"{type(model).__name__}.")
    wide = saturating_weights(model)
    if wide and not cpu_has_vnni():
        if not allow_saturation:
            raise ModelError(
                f"This CPU has no VNNI, so oneDNN's int8 kernels saturate 8-bit weights ({len(wide)} layers, e.g. "
                f"{wide[0]}) and give wrong outputs: quantize with weight_bits=7, first_last_8bit=False, or pass "
                f"allow_saturation=True.")
        logger.warning("CPU without VNNI: %d layers with 8-bit weights may saturate in oneDNN int8 kernels",
                       len(wide))
    if any(p.requires_grad for p in model.parameters()):
        # freezing folds parameters into constants: a trainable one would silently stop training
        logger.info("compile_for_inductor: parameters are frozen into the compiled graph (inference only)")
    return InductorModule(model, **compile_kwargs)
