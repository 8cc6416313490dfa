"""Convert: replace fake-quantizers by the reference Q/DQ ops PT2E emits (``torch.ops.quantized_decomposed``),
with integer weights stored in the graph.

Weights become ``get_attr(int weight) → dequantize_per_channel → F.conv*/F.linear`` (``aten.conv2d`` /
``aten.linear`` ... when the graph came from torch.export); each activation quantizer
becomes ``quantize_per_tensor → dequantize_per_tensor``. Backends that pattern-match Q/DQ (Inductor, ExecuTorch,
ONNX QDQ) lower these into integer kernels; eagerly the graph computes what the fake-quant graph computed.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from eptq_fx.graph import ops
from eptq_fx.graph.meta import SOURCE_IR
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp

logger = logging.getLogger(__name__)
qd = torch.ops.quantized_decomposed


def container_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest integer dtype holding [qmin, qmax] (int8 / uint8 for ≤ 8 bits, the op's quant_min/max keep
    the real bit width)."""
    for dt in (torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return dt
    raise ValueError(f"no integer dtype holds [{qmin}, {qmax}]")


def _emit_weight_op(gm: fx.GraphModule, node: fx.Node, qop: QuantWeightOp, prefix: str,
                    aten_ir: bool = False) -> fx.Node:
    op, wq = qop.op, qop.weight_quant
    w_int = wq.int_weight(op.weight.detach())
    w_dtype = torch.int8 if wq.bits <= 8 else container_dtype(wq.qmin, wq.qmax)
    gm.register_buffer(f"{prefix}_weight_int", w_int.to(w_dtype))
    gm.register_buffer(f"{prefix}_weight_scale", wq.scale.detach().clone().float())
    gm.register_buffer(f"{prefix}_weight_zero_point", torch.zeros(w_int.shape[wq.axis], dtype=torch.int64,
                                                                               device=w_int.device))
    if op.bias is not None:
        bias = qop.effective_bias().detach().clone()  # on the accumulator grid when the input is quantized
        gm.register_parameter(f"{prefix}_bias", nn.Parameter(bias, requires_grad=False))
    g = gm.graph
    with g.inserting_before(node):
        w = g.get_attr(f"{prefix}_weight_int")
        s = g.get_attr(f"{prefix}_weight_scale")
        z = g.get_attr(f"{prefix}_weight_zero_point")
        w_dq = g.call_function(qd.dequantize_per_channel.default,
                               (w, s, z, wq.axis, wq.qmin, wq.qmax, w_dtype))
        b = g.get_attr(f"{prefix}_bias") if op.bias is not None else None
        x = node.args[0]
        fn, kind = ops.functional_for(op, aten_ir)
        seq = list if aten_ir else (lambda v: v)  # aten overloads take int[] where F.* takes tuples
        if kind == "linear":
            return g.call_function(fn, (x, w_dq, b))
        if kind == "conv_transpose":
            return g.call_function(fn, (x, w_dq, b, seq(op.stride), seq(op.padding), seq(op.output_padding),
                                        op.groups, seq(op.dilation)))
        padding = op.padding if isinstance(op.padding, str) else seq(op.padding)
        if op.padding_mode != "zeros":  # non-zero padding modes pad explicitly, as nn.Conv does
            pad = torch.ops.aten.pad.default if aten_ir else F.pad
            x = g.call_function(pad, (x, list(op._reversed_padding_repeated_twice), op.padding_mode))
            padding = seq([0] * (w_int.dim() - 2))
        return g.call_function(fn, (x, w_dq, b, seq(op.stride), padding, seq(op.dilation), op.groups))


def _emit_act_quant(gm: fx.GraphModule, node: fx.Node, aq: ActQuantizer) -> fx.Node:
    dt = container_dtype(aq.qmin, aq.qmax)
    scale, zp = float(aq.scale.detach()), int(aq.zero_point)
    with gm.graph.inserting_before(node):
        q = gm.graph.call_function(qd.quantize_per_tensor.default,
                                   (node.args[0], scale, zp, aq.qmin, aq.qmax, dt))
        return gm.graph.call_function(qd.dequantize_per_tensor.default, (q, scale, zp, aq.qmin, aq.qmax, dt))


def convert(prepared: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """Lower a calibrated / reconstructed prepared graph to Q/DQ ops with integer weights."""
    gm = prepared if inplace else copy.deepcopy(prepared)
    aten_ir = gm.meta.get(SOURCE_IR) == "aten"  # an exported input stays aten, as convert_pt2e's output
    n_w = n_a = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, QuantWeightOp) and mod.weight_quant.mode != "off":
            new = _emit_weight_op(gm, node, mod, node.name, aten_ir)
            n_w += 1
        elif isinstance(mod, ActQuantizer) and mod.mode == "on":
            new = _emit_act_quant(gm, node, mod)
            n_a += 1
        elif isinstance(mod, QuantWeightOp):  # left in float on purpose: plain module call again
            continue
        elif isinstance(mod, ActQuantizer):
            new = node.args[0]
        else:
            continue
        new.meta.update({k: v for k, v in node.meta.items() if k.startswith("eptq_fx.")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    logger.info("converted %d weight ops and %d activation quantizers to Q/DQ ops", n_w, n_a)
    return gm
