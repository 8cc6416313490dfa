"""Fold every foldable BatchNorm into the weight op (conv / conv-transpose / linear) that feeds it.

In eval mode a BatchNorm is a per-channel affine map ``y = x * s + t`` with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``. When its only input is the output of a weight op, that map can be pushed into the weight
op's parameters (``W' = W * s`` per output channel, ``b' = b * s + t``), which removes the BN from the graph and lets
quantization see the weights that are actually applied.

Every form in the op table is handled: ``call_module`` BatchNorm modules, ``F.batch_norm`` / ``torch.batch_norm``
(how timm's ``BatchNormAct2d`` and dynamo graphs trace), ``aten.batch_norm`` (torch.export) and
``aten._native_batch_norm_legit_no_training`` (decomposed exports, read through ``getitem(·, 0)``), with
statistics stored as parameters, buffers or constants. The producer must be a weight *module*: run
``modularize_weight_ops`` first so functional / aten convs count too (``prepare`` does).
A BN that cannot be folded exactly stays where it is and the reason is logged.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from eptq_fx.graph import ops
from eptq_fx.graph.meta import FOLDED_BN

logger = logging.getLogger(__name__)

_BN_FORWARDS = {nn.BatchNorm1d.forward, nn.SyncBatchNorm.forward}  # BatchNorm1d/2d/3d share one forward


class _CannotFold(Exception):
    """Internal: carries the reason a BN stays in the graph (logged, never raised to the caller)."""

    def __init__(self, reason: str, level: int = logging.INFO) -> None:
        super().__init__(reason)
        self.level = level


@dataclass(frozen=True)
class _BNStats:
    """What folding needs from one BatchNorm, independent of its form."""

    name: str
    input_node: fx.Node
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold each BatchNorm into its producing weight op, in place on ``gm``; returns ``gm``.

    The weight op that absorbs a BN gets ``node.meta[FOLDED_BN] = <bn name>`` and a fresh module object with new
    ``nn.Parameter`` s, so modules shared with the caller's model are never mutated. See ``folded_pairs``.
    """
    use_targets = [n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    aliases = _module_aliases(gm)
    n_folded = 0
    for node in list(gm.graph.nodes):
        if not _is_batchnorm_node(gm, node):
            continue
        bn_label = _bn_label(node)
        try:
            stats = _bn_stats(gm, node)
            producer, module, out_axis = _foldable_producer(gm, stats, use_targets, aliases)
        except _CannotFold as why:
            logger.log(why.level, "Not folding BatchNorm '%s': %s.", bn_label, why)
            continue
        folded = _replace_with_folded_module_(gm, str(producer.target), module, out_axis, stats)
        aliases[id(folded)] = [str(producer.target)]  # a chained BN may fold into the copy next
        previous = producer.meta.get(FOLDED_BN)
        producer.meta[FOLDED_BN] = stats.name if previous is None else f"{previous}+{stats.name}"
        if node.target in ops.BATCHNORM_TUPLE_OUTPUT:  # (out, mean, invstd): only item 0 is read
            for item in list(node.users):
                item.replace_all_uses_with(producer)
                gm.graph.erase_node(item)
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        n_folded += 1
        logger.debug("Folded BatchNorm '%s' into '%s'.", stats.name, producer.target)
    logger.info("Folded %d BatchNorm layer(s).", n_folded)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def folded_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(weight module name, BN name)`` for every BN folded by ``fold_batchnorm``, in graph order."""
    pairs: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if FOLDED_BN in node.meta:
            pairs.extend((str(node.target), bn) for bn in node.meta[FOLDED_BN].split("+"))
    return pairs


# ----------------------------------------------------------------------------------------------- BN side


def _is_batchnorm_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.batchnorm._BatchNorm)
    return ops.is_batchnorm_function(node)


def _bn_label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _bn_stats(gm: fx.GraphModule, node: fx.Node) -> _BNStats:
    if node.op == "call_module":
        return _module_bn_stats(gm, node)
    return _functional_bn_stats(gm, node)


def _module_bn_stats(gm: fx.GraphModule, node: fx.Node) -> _BNStats:
    bn = gm.get_submodule(str(node.target))
    if type(bn).forward not in _BN_FORWARDS:
        raise _CannotFold(f"{type(bn).__name__} overrides BatchNorm.forward")
    if bn.training:
        raise _CannotFold("it is in training mode (call model.eval() first)", logging.WARNING)
    if bn.running_mean is None or bn.running_var is None:
        raise _CannotFold("it has no running statistics (track_running_stats=False)")
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        raise _CannotFold("its lazy running statistics are not initialised yet")
    input_node = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(input_node, fx.Node):
        raise _CannotFold("its input is not a graph value")
    return _BNStats(str(node.target), input_node, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                    float(bn.eps))


def _functional_bn_stats(gm: fx.GraphModule, node: fx.Node) -> _BNStats:
    bound = ops.BATCHNORM_TABLE[node.target].bind(node)
    if bound is None:
        raise _CannotFold("its arguments do not match the batch_norm signature")
    if node.target in ops.BATCHNORM_TUPLE_OUTPUT and any(
            not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0) for u in node.users):
        raise _CannotFold("its saved statistics (outputs 1, 2) are used")
    if bound.get("training", False) is not False:
        raise _CannotFold(f"training={bound['training']!r} (batch statistics are used)", logging.WARNING)
    if not isinstance(bound["eps"], (int, float)):
        raise _CannotFold("its eps is not a constant")
    if not isinstance(bound["input"], fx.Node):
        raise _CannotFold("its input is not a graph value")
    mean, var = bound["running_mean"], bound["running_var"]
    if mean is None or var is None:
        raise _CannotFold("it has no running statistics (running_mean/running_var is None)")
    return _BNStats(
        name=_functional_bn_name(mean, node),
        input_node=bound["input"],
        running_mean=_constant_tensor(gm, mean, "running_mean"),
        running_var=_constant_tensor(gm, var, "running_var"),
        weight=None if bound["weight"] is None else _constant_tensor(gm, bound["weight"], "weight"),
        bias=None if bound["bias"] is None else _constant_tensor(gm, bound["bias"], "bias"),
        eps=float(bound["eps"]),
    )


def _functional_bn_name(mean_arg: Any, node: fx.Node) -> str:
    # "layer1.0.bn1.running_mean" -> "layer1.0.bn1": the module that owns the statistics names the BN.
    if isinstance(mean_arg, fx.Node) and mean_arg.op == "get_attr" and "." in str(mean_arg.target):
        return str(mean_arg.target).rsplit(".", 1)[0]
    return node.name


def _constant_tensor(gm: fx.GraphModule, arg: Any, what: str) -> torch.Tensor:
    value = ops.constant_value(gm, arg)
    if value is None:
        raise _CannotFold(f"its {what} is computed in the graph, not a stored tensor")
    return value


# ----------------------------------------------------------------------------------------- producer side


def _module_aliases(gm: fx.GraphModule) -> dict[int, list[str]]:
    """Every qualified name under which each module object is reachable (a module can be registered twice)."""
    aliases: dict[int, list[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    return aliases


def _count_uses(names: list[str], use_targets: list[Any]) -> int:
    """Graph nodes touching the module: calling it, an ancestor (leaf call) or reading one of its attributes."""
    def touches(target: str, name: str) -> bool:
        return target == name or target.startswith(name + ".") or name.startswith(target + ".")
    return sum(any(touches(str(t), name) for name in names) for t in use_targets)


def _known_rank(node: fx.Node) -> int | None:
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is not None and hasattr(tensor_meta, "shape"):
        return len(tensor_meta.shape)
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _foldable_producer(
    gm: fx.GraphModule, stats: _BNStats, use_targets: list[Any], aliases: dict[int, list[str]]
) -> tuple[fx.Node, nn.Module, int]:
    producer = stats.input_node
    if producer.op != "call_module":
        raise _CannotFold(f"its input '{producer.name}' is not a conv/linear module")
    module = gm.get_submodule(str(producer.target))
    out_axis = ops.module_channel_axis(module)
    if out_axis is None:
        raise _CannotFold(f"its producer '{producer.target}' ({type(module).__name__}) is not a supported weight op")
    if parametrize.is_parametrized(module) or "weight" not in module._parameters or module._forward_pre_hooks:
        raise _CannotFold(f"'{producer.target}' computes its weight at call time (parametrization or hook)")
    if len(producer.users) != 1:
        others = ", ".join(u.name for u in producer.users if u is not stats.input_node)
        raise _CannotFold(f"the output of '{producer.target}' is also used by other nodes ({others})")
    if _count_uses(aliases[id(module)], use_targets) != 1:
        raise _CannotFold(f"the module '{producer.target}' is used more than once in the graph (shared weights)")
    out_channels = module.weight.shape[out_axis] * (module.groups if out_axis == 1 else 1)
    if stats.running_mean.shape != (out_channels,) or stats.running_var.shape != (out_channels,):
        raise _CannotFold(f"its {stats.running_mean.numel()} channels do not match the {out_channels} outputs "
                          f"of '{producer.target}'")
    # BN normalises axis 1; a linear layer's features are the last axis, so they coincide only for 2-D outputs.
    expected_rank = 2 if isinstance(module, nn.Linear) else module.weight.dim()
    rank = _known_rank(producer)
    if rank is not None and rank != expected_rank:
        raise _CannotFold(f"the output of '{producer.target}' has rank {rank}, BN's channel axis would not be "
                          "its output-channel axis")
    return producer, module, out_axis


# ------------------------------------------------------------------------------------------------ folding


def _replace_with_folded_module_(
    gm: fx.GraphModule, target: str, module: nn.Module, out_axis: int, stats: _BNStats
) -> nn.Module:
    """Install at ``target`` a shallow copy of ``module`` whose weight and bias carry the folded BN."""
    weight = module.weight
    device = weight.device
    as64 = {"dtype": torch.float64, "device": device}
    mean = stats.running_mean.detach().to(**as64)
    var = stats.running_var.detach().to(**as64)
    gamma = torch.ones_like(mean) if stats.weight is None else stats.weight.detach().to(**as64)
    beta = torch.zeros_like(mean) if stats.bias is None else stats.bias.detach().to(**as64)
    scale = gamma / torch.sqrt(var + stats.eps)

    new_weight = _scale_output_channels(weight.detach().to(torch.float64), scale, out_axis, module)
    old_bias = module.bias
    bias64 = torch.zeros_like(mean) if old_bias is None else old_bias.detach().to(**as64)
    new_bias = (bias64 - mean) * scale + beta
    bias_dtype = weight.dtype if old_bias is None else old_bias.dtype
    bias_grad = weight.requires_grad if old_bias is None else old_bias.requires_grad

    folded = copy.copy(module)
    # copy.copy shares the registries with the original; new dicts keep the original module untouched.
    folded._parameters = dict(module._parameters)
    folded._buffers = dict(module._buffers)
    folded._modules = dict(module._modules)
    folded.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
    folded.bias = nn.Parameter(new_bias.to(bias_dtype), requires_grad=bias_grad)
    owner_path, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(owner_path), attr, folded)
    return folded


def _scale_output_channels(weight: torch.Tensor, scale: torch.Tensor, out_axis: int, module: nn.Module) -> torch.Tensor:
    if out_axis == 0:  # conv / linear: (out, in/groups, *k)
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    # conv-transpose: (in, out/groups, *k); group g owns input rows g*in/groups.. and output channels
    # g*out/groups.., so view the weight as (groups, in/groups, out/groups, *k) to line each output up with its scale.
    groups = module.groups
    in_channels, out_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel)
    grouped_scale = scale.reshape(groups, 1, out_per_group, *([1] * len(kernel)))
    return (grouped * grouped_scale).reshape(weight.shape)
