"""Annotate: decide, per node, what gets quantized, and record it in ``node.meta`` (nothing is rewritten yet).

A *weight op* (conv / linear module) gets ``LAYER_QUANT`` with its weight bits and the bits of its input
activation; an activation×activation matmul gets ``LAYER_QUANT`` with ``weight_bits=None``. Every producer of
a quantized input gets ``ACT_QUANT``: a dict ``{consumer node name: ActQuant}``, so the decision is per edge
(a residual branch that also reads the tensor keeps it in float, as PT2E does).
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from eptq_fx.config import KEEP, ActPlacement, EPTQConfig, check_override_names
from eptq_fx.graph.meta import ACT_QUANT, LAYER_QUANT, ActQuant, LayerQuant
from eptq_fx.numerics.quantizers import WEIGHT_OPS, QuantWeightOp

logger = logging.getLogger(__name__)

MATMUL_FUNCTIONS = (torch.matmul, torch.bmm, operator.matmul)
MATMUL_METHODS = ("matmul", "bmm")
FUNCTIONAL_WEIGHT_OPS = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


def is_weight_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(node.target)
    return isinstance(mod, WEIGHT_OPS) or isinstance(mod, QuantWeightOp)


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or \
        (node.op == "call_method" and node.target in MATMUL_METHODS)


def is_quant_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The nodes the method treats as layers (compare points): weight ops and activation matmuls."""
    return is_weight_op(gm, node) or is_matmul(node)


def activation_inputs(node: fx.Node) -> list[fx.Node]:
    """The activation arguments of a quant op (one for conv/linear, two for matmul)."""
    n_act = 2 if is_matmul(node) else 1
    return [a for a in node.args[:n_act] if isinstance(a, fx.Node)]


def _is_float_output(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return tm is None or not hasattr(tm, "dtype") or tm.dtype.is_floating_point


def modularize_functional_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``F.linear`` / ``F.conv*`` calls whose weight is a parameter (get_attr) into module calls that share
    the same parameters, so the rest of the pipeline has one kind of weight op to handle."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FUNCTIONAL_WEIGHT_OPS:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            continue
        try:
            w = gm.get_parameter(weight.target)
        except AttributeError:  # a buffer or a computed tensor: not a weight we can own
            continue
        cls = FUNCTIONAL_WEIGHT_OPS[node.target]
        extra = dict(zip(("stride", "padding", "dilation", "groups"), node.args[3:]))
        extra.update({k: v for k, v in node.kwargs.items() if k in ("stride", "padding", "dilation", "groups")})
        if cls is nn.Linear:
            mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        else:
            groups = extra.get("groups", 1)
            if isinstance(extra.get("padding"), str):
                continue  # 'same' / 'valid' strings: leave the functional call alone
            mod = cls(w.shape[1] * groups, w.shape[0], w.shape[2:], bias=bias is not None, **extra)
        mod.weight = w
        if bias is not None:
            mod.bias = gm.get_parameter(bias.target)
        name = f"{node.name}_module"
        gm.add_submodule(name, mod)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
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


JOIN_FUNCTIONS = (operator.add, torch.add, torch.cat, torch.concat)
JOIN_METHODS = ("add",)


def _quantize_outputs_into_joins(gm: fx.GraphModule, config: EPTQConfig) -> None:
    """``ActPlacement.FUSABLE``: a conv / linear output feeding an add or cat gets a quantizer on that edge (at
    the layer's activation bits), so int8 runtimes see conv → Q and fuse the conv with its output quantization."""
    for join in gm.graph.nodes:
        is_join = (join.op == "call_function" and join.target in JOIN_FUNCTIONS) or \
            (join.op == "call_method" and join.target in JOIN_METHODS)
        if not is_join:
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
    check_override_names(config, names)
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
