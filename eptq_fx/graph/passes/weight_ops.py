"""Give every weight op one form: a call of an ``nn`` conv / conv-transpose / linear module.

Graphs reach us with weight ops as modules (symbolic_trace), as ``torch.nn.functional`` / ``torch.*`` calls on
``get_attr`` weights (dynamo, hand-written functional models) or as aten overloads on lifted parameters,
buffers or constants (torch.export). The op table (``eptq_fx.graph.ops``) recognises all of them; this pass
replaces each call whose weight is a stored tensor (or a pure function of stored tensors, such as the
transpose ``aten.addmm`` takes) by a module call computing the same, so that folding, quantization, the
Hessians and reconstruction deal with one kind of weight op. ``convert`` turns them back into functional /
aten calls.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn as nn

from eptq_fx.graph import ops

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _owner_name(gm: fx.GraphModule, node: fx.Node, bound: dict, claimed: set[str]) -> str | None:
    """Name the new module after the module that held the weight (``layer1.0.conv1.weight`` →
    ``layer1.0.conv1``), so names match the nn.Module path, if nothing else in the graph reads that module."""
    weight = bound.get("weight")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight")):
        return None
    owner = str(weight.target).rsplit(".", 1)[0]
    if owner in claimed:
        return None
    try:
        mod = gm.get_submodule(owner)
    except AttributeError:
        return None
    held = set(dict(mod.named_parameters(recurse=False))) | set(dict(mod.named_buffers(recurse=False)))
    if list(mod.children()) or held - {"weight", "bias"}:
        return None
    mine = {weight, bound.get("bias")}
    for other in gm.graph.nodes:
        if other.op in ("get_attr", "call_module") and other not in mine and \
                (str(other.target) == owner or str(other.target).startswith(owner + ".")):
            return None
    return owner


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _install(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def modularize_weight_ops(gm: fx.GraphModule) -> int:
    """Rewrite functional / aten weight ops with stored weights into module calls, in place; returns how many.

    A bias that is computed from activations (not stored) stays a separate add after the module call."""
    cache: dict = {}
    claimed: set[str] = set()
    count = 0
    for node in list(gm.graph.nodes):
        call = ops.weight_call(gm, node)
        if call is None:
            continue
        kind, bound, w = call
        module = ops.module_for(kind, bound, w)
        if module is None:
            logger.info("weight op %s has arguments no nn module takes: left functional (float)", node.name)
            continue
        weight_arg = bound.get("weight")
        stored = ops.constant_value(gm, weight_arg, cache) if isinstance(weight_arg, fx.Node) else None
        if isinstance(stored, nn.Parameter) and stored is w:
            module.weight = stored  # share the parameter, as the module path does
        else:
            module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        bias = bound.get("bias")
        late_bias = None
        if bias is not None:
            b = ops.constant_value(gm, bias, cache)
            if isinstance(b, nn.Parameter):
                module.bias = b
            elif b is not None:
                module.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
            else:
                late_bias = bias
        name = _owner_name(gm, node, bound, claimed) or _free_name(gm, f"{node.name}_module")
        claimed.add(name)
        _install(gm, name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (bound["input"],))
            out = new
            if late_bias is not None:
                if kind != "linear":  # (C,) → (C, 1, ...): broadcast over the spatial dims
                    late_bias = gm.graph.call_function(aten.view.default, (late_bias, [-1] + [1] * (w.dim() - 2)))
                out = gm.graph.call_function(aten.add.Tensor, (new, late_bias))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace",
                                                                      "nn_module_stack")})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    logger.info("modularized %d functional / aten weight ops", count)
    return count
