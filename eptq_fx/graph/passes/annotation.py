"""Annotate: decide, per node, what gets quantized, and record it in ``node.meta`` (nothing is rewritten yet).

A *weight op* (conv / linear module) gets ``LAYER_QUANT`` with its weight bits and the bits of its input
activation; an activation×activation matmul gets ``LAYER_QUANT`` with ``weight_bits=None``. Every producer of
a quantized input gets ``ACT_QUANT``: a dict ``{consumer node name: ActQuant}``, so the decision is per edge
(a residual branch that also reads the tensor keeps it in float, as PT2E does).
"""
from __future__ import annotations

import logging

import torch.fx as fx
import torch.nn as nn

from eptq_fx.config import KEEP, ActPlacement, EPTQConfig, check_override_names
from eptq_fx.graph import ops as op_table
from eptq_fx.graph.meta import ACT_QUANT, LAYER_QUANT, ActQuant, LayerQuant
from eptq_fx.graph.passes.weight_ops import modularize_weight_ops

logger = logging.getLogger(__name__)

def is_weight_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    return op_table.is_weight_op_node(gm, node)


is_matmul = op_table.is_matmul
is_quant_op = op_table.is_quant_op
activation_inputs = op_table.activation_inputs


def _is_float_output(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return tm is None or not hasattr(tm, "dtype") or tm.dtype.is_floating_point


def modularize_functional_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Kept for callers of the old name: ``modularize_weight_ops`` on ``gm``, returning ``gm``."""
    modularize_weight_ops(gm)
    return gm


def _layer_bits(name: str, module: nn.Module | None, config: EPTQConfig, edge: bool) -> tuple:
    w_bits, a_bits = config.weight_bits, config.act_bits
    if edge and config.first_last_8bit:
        w_bits, a_bits = max(8, w_bits), max(8, a_bits)
    for o in config.overrides:
        if o.matches(name, module):
            w_bits = w_bits if o.weight_bits is KEEP else o.weight_bits
            a_bits = a_bits if o.act_bits is KEEP else o.act_bits
    return w_bits, a_bits


def _quantize_outputs_into_joins(gm: fx.GraphModule, config: EPTQConfig) -> None:
    """``ActPlacement.FUSABLE``: a conv / linear output feeding an add or cat gets a quantizer on that edge (at
    the layer's activation bits), so int8 runtimes see conv → Q and fuse the conv with its output quantization."""
    for join in gm.graph.nodes:
        if not op_table.is_join(join):
            continue
        for producer in join.all_input_nodes:
            lq = producer.meta.get(LAYER_QUANT)
            if lq is None or lq.act_bits is None or not is_weight_op(gm, producer) or not _is_float_output(producer):
                continue
            producer.meta.setdefault(ACT_QUANT, {})[join.name] = ActQuant(lq.act_bits, config.act_scheme)


def annotate(gm: fx.GraphModule, config: EPTQConfig) -> fx.GraphModule:
    """Record ``LAYER_QUANT`` on quant ops and ``ACT_QUANT`` on the producers of their quantized inputs."""
    ops = [n for n in gm.graph.nodes if is_quant_op(gm, n)]
    weight_ops = [n for n in ops if is_weight_op(gm, n)]
    names = [str(n.target) if n.op == "call_module" else n.name for n in ops]
    check_override_names(config, names, [gm.get_submodule(n.target) if n.op == "call_module" else None
                                         for n in ops])
    edges = {weight_ops[0], weight_ops[-1]} if weight_ops else set()
    for node, name in zip(ops, names):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        w_bits, a_bits = _layer_bits(name, module, config, node in edges)
        if module is None:
            w_bits = None  # activation × activation: no weights
        node.meta[LAYER_QUANT] = LayerQuant(name=name, weight_bits=w_bits, act_bits=a_bits)
        if a_bits is None:
            continue
        for producer in activation_inputs(node):
            if not _is_float_output(producer):
                logger.info("input %s of %s is not floating point: left unquantized", producer.name, name)
                continue
            producer.meta.setdefault(ACT_QUANT, {})[node.name] = ActQuant(a_bits, config.act_scheme)
    if config.act_placement is ActPlacement.FUSABLE:
        _quantize_outputs_into_joins(gm, config)
    n_w = sum(1 for n in ops if n.meta[LAYER_QUANT].weight_bits is not None)
    logger.info("annotated %d quant ops (%d with quantized weights)", len(ops), n_w)
    gm.graph.lint()
    gm.recompile()
    return gm
