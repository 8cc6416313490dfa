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


def _join_source(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """The value a join input reads, through data-movement ops (identity, slice, pad, reshape), and the first op of that
    chain (None when the join reads the value directly)."""
    first = None
    while op_table.is_data_movement(gm, node) and isinstance(node.args[0], fx.Node) and len(node.users) == 1:
        first, node = node, node.args[0]
    return node, first


def _quantize_join_inputs(gm: fx.GraphModule, config: EPTQConfig, only_bits: int | None = None) -> None:
    """``ActPlacement.FUSABLE``: the inputs of an add or cat are quantized wherever that lets an int8 runtime run
    the join in integers. A conv / linear output gets a quantizer on that edge (at the layer's activation bits),
    so runtimes see conv → Q and fuse the conv with its output quantization; a value that is quantized anyway
    for another layer (the ReLU output a residual shortcut carries) feeds the join through that same quantizer,
    so the join and the layer share one Q/DQ pair, as PT2E's X86InductorQuantizer annotates a residual. Values
    that no layer quantizes (a transformer's residual stream) stay float. ``only_bits``: only at that
    activation width."""
    for join in gm.graph.nodes:
        if not op_table.is_join(join):
            continue
        for arg in join.all_input_nodes:
            source, first = _join_source(gm, arg)
            consumer = (first or join).name
            if not _is_float_output(source):
                continue
            lq, edges = source.meta.get(LAYER_QUANT), source.meta.get(ACT_QUANT)
            if edges:  # already quantized for a layer: share that quantizer
                spec = next(iter(edges.values()))
                if only_bits is None or spec.bits == only_bits:
                    edges.setdefault(consumer, spec)
            elif lq is not None and lq.act_bits is not None and is_weight_op(gm, source) and \
                    (only_bits is None or lq.act_bits == only_bits):
                source.meta[ACT_QUANT] = {consumer: ActQuant(lq.act_bits, config.act_scheme)}


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
    if config.act_placement is not ActPlacement.INPUTS:
        _quantize_join_inputs(gm, config, only_bits=8 if config.act_placement is ActPlacement.AUTO else None)
    n_w = sum(1 for n in ops if n.meta[LAYER_QUANT].weight_bits is not None)
    logger.info("annotated %d quant ops (%d with quantized weights)", len(ops), n_w)
    gm.graph.lint()
    gm.recompile()
    return gm
