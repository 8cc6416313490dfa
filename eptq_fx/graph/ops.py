"""The op table: every weight op and activation matmul eptq_fx recognises, in every form it takes in a graph.

One entry per op *kind* (conv / conv-transpose / linear / mm / matmul / batch-norm) lists its targets as
``nn`` modules, ``torch.nn.functional`` / ``torch.*`` functions, ``aten`` overloads and tensor methods, and for
each target the positional argument names (with defaults), so that any call can be bound to
``{input, weight, bias, stride, ...}``. ``channel_axis`` says which axis of the weight, *as the op takes it*,
holds the output channels. Every pass asks this table; none keeps its own list.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten
_REQUIRED = object()  # marks an argument without a default


@dataclass(frozen=True)
class OpSpec:
    """How one target of a weight op / matmul / batch-norm kind lays out its arguments."""

    kind: str  # "conv" | "conv_transpose" | "linear" | "mm" | "addmm" | "matmul" | "bmm" | "batch_norm"
    signature: tuple[tuple[str, Any], ...]  # positional (name, default); _REQUIRED for none
    dims: int | None = None  # spatial dims of a conv (None: from the weight's rank)
    channel_axis: int = 0  # output-channel axis of the weight as passed to this op

    def bind(self, node: fx.Node) -> dict[str, Any] | None:
        """The call's arguments by name (defaults filled in); None when they do not fit the signature."""
        names = [n for n, _ in self.signature]
        args = node.args  # a call_method's self is args[0]: the first operand
        if len(args) > len(names) or any(k not in names for k in node.kwargs):
            return None
        bound = dict(self.signature)
        bound.update(zip(names, args))
        bound.update(node.kwargs)
        if any(v is _REQUIRED for v in bound.values()):
            return None
        return bound


def _conv_sig(dims: int) -> tuple:
    one, zero = [1] * dims, [0] * dims
    return (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", one), ("padding", zero),
            ("dilation", one), ("groups", 1))


def _conv_t_sig(dims: int) -> tuple:
    one, zero = [1] * dims, [0] * dims
    return (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None), ("stride", one), ("padding", zero),
            ("output_padding", zero), ("groups", 1), ("dilation", one))


_LINEAR_SIG = (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None))
_TWO_OPERANDS = (("input", _REQUIRED), ("other", _REQUIRED))
_BN_SIGS = {
    "functional": (("input", _REQUIRED), ("running_mean", _REQUIRED), ("running_var", _REQUIRED),
                   ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)),
    "torch": (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", _REQUIRED), ("running_mean", _REQUIRED),
              ("running_var", _REQUIRED), ("training", _REQUIRED), ("momentum", _REQUIRED), ("eps", _REQUIRED),
              ("cudnn_enabled", True)),
    "legit": (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", _REQUIRED), ("running_mean", _REQUIRED),
              ("running_var", _REQUIRED), ("momentum", _REQUIRED), ("eps", _REQUIRED)),
}

FUNCTION_TABLE: dict[Any, OpSpec] = {}
for _d, (_f, _a, _ft, _at) in enumerate(
        [(F.conv1d, aten.conv1d.default, F.conv_transpose1d, aten.conv_transpose1d.default),
         (F.conv2d, aten.conv2d.default, F.conv_transpose2d, aten.conv_transpose2d.input),
         (F.conv3d, aten.conv3d.default, F.conv_transpose3d, aten.conv_transpose3d.input)], start=1):
    FUNCTION_TABLE[_f] = FUNCTION_TABLE[_a] = OpSpec("conv", _conv_sig(_d), _d, 0)
    FUNCTION_TABLE[_ft] = FUNCTION_TABLE[_at] = OpSpec("conv_transpose", _conv_t_sig(_d), _d, 1)
for _d, _a in ((1, aten.conv1d.padding), (2, aten.conv2d.padding), (3, aten.conv3d.padding)):
    FUNCTION_TABLE[_a] = OpSpec("conv", _conv_sig(_d), _d, 0)
FUNCTION_TABLE[aten.convolution.default] = OpSpec(  # kind ("conv" or "conv_transpose") decided per call
    "convolution", (("input", _REQUIRED), ("weight", _REQUIRED), ("bias", _REQUIRED), ("stride", _REQUIRED),
                    ("padding", _REQUIRED), ("dilation", _REQUIRED), ("transposed", _REQUIRED),
                    ("output_padding", _REQUIRED), ("groups", _REQUIRED)))
FUNCTION_TABLE[F.linear] = FUNCTION_TABLE[aten.linear.default] = OpSpec("linear", _LINEAR_SIG, None, 0)
# x @ W with a stored W of shape (in, out): a linear layer whose output channels are W's last axis
FUNCTION_TABLE[aten.mm.default] = OpSpec("mm", _TWO_OPERANDS, None, 1)
FUNCTION_TABLE[aten.addmm.default] = OpSpec(
    "addmm", (("bias", _REQUIRED), ("input", _REQUIRED), ("other", _REQUIRED), ("beta", 1), ("alpha", 1)), None, 1)
for _f in (torch.matmul, operator.matmul, aten.matmul.default):
    FUNCTION_TABLE[_f] = OpSpec("matmul", _TWO_OPERANDS, None, -1)
for _f in (torch.bmm, aten.bmm.default):
    FUNCTION_TABLE[_f] = OpSpec("bmm", _TWO_OPERANDS, None, -1)
METHOD_TABLE: dict[str, OpSpec] = {
    "matmul": OpSpec("matmul", _TWO_OPERANDS, None, -1), "__matmul__": OpSpec("matmul", _TWO_OPERANDS, None, -1),
    "bmm": OpSpec("bmm", _TWO_OPERANDS, None, -1), "mm": OpSpec("mm", _TWO_OPERANDS, None, 1),
}
BATCHNORM_TABLE: dict[Any, OpSpec] = {
    F.batch_norm: OpSpec("batch_norm", _BN_SIGS["functional"]),
    torch.batch_norm: OpSpec("batch_norm", _BN_SIGS["torch"]),
    aten.batch_norm.default: OpSpec("batch_norm", _BN_SIGS["torch"]),
    aten._native_batch_norm_legit_no_training.default: OpSpec("batch_norm", _BN_SIGS["legit"]),
}
# targets whose result is a tuple (output, saved mean, saved invstd): users read item 0 through getitem
BATCHNORM_TUPLE_OUTPUT = {aten._native_batch_norm_legit_no_training.default}

# Weight modules: (base class, output-channel axis of .weight). Subclasses count only if they keep the base
# forward (a weight-standardised conv rescales its weight in forward).
WEIGHT_MODULES: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.Conv1d, 0), (nn.Conv2d, 0), (nn.Conv3d, 0),
    (nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 1), (nn.ConvTranspose3d, 1),
    (nn.Linear, 0),
)
WEIGHT_MODULE_TYPES = tuple(base for base, _ in WEIGHT_MODULES)
ACTIVATION_MATMUL_KINDS = ("matmul", "bmm", "mm")


def module_channel_axis(module: nn.Module) -> int | None:
    """Output-channel axis of a weight module's ``.weight``; None for anything that is not one."""
    for base, axis in WEIGHT_MODULES:
        if isinstance(module, base) and type(module).forward is base.forward:
            return axis
    return None


def is_weight_module(module: nn.Module) -> bool:
    return module_channel_axis(module) is not None


def spec_of(node: fx.Node) -> OpSpec | None:
    """The table entry for a call_function / call_method node (weight op, matmul or batch-norm), if any."""
    try:
        if node.op == "call_function":
            return FUNCTION_TABLE.get(node.target) or BATCHNORM_TABLE.get(node.target)
        if node.op == "call_method":
            return METHOD_TABLE.get(str(node.target))
    except TypeError:  # unhashable target
        return None
    return None


def is_batchnorm_function(node: fx.Node) -> bool:
    try:
        return node.op == "call_function" and node.target in BATCHNORM_TABLE
    except TypeError:
        return False


def is_matmul(node: fx.Node) -> bool:
    """An activation × activation product (both operands computed in the graph)."""
    spec = spec_of(node)
    return spec is not None and spec.kind in ACTIVATION_MATMUL_KINDS


def is_weight_op_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call of a weight module (or of an already wrapped one: ``QuantWeightOp`` keeps ``.op``)."""
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(str(node.target))
    inner = getattr(mod, "op", None)
    return is_weight_module(mod) or (isinstance(inner, nn.Module) and is_weight_module(inner)
                                     and hasattr(mod, "weight_quant"))


def is_quant_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """What the method treats as a layer (a compare point): weight ops and activation matmuls."""
    return is_weight_op_node(gm, node) or is_matmul(node)


def activation_inputs(node: fx.Node) -> list[fx.Node]:
    """The activation operands of a quant op (one for a weight op, two for a matmul)."""
    n_act = 2 if is_matmul(node) else 1
    return [a for a in node.args[:n_act] if isinstance(a, fx.Node)]


# ------------------------------------------------------------------------------------- stored tensors


def _mutating(node: fx.Node) -> bool:
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def constant_value(gm: fx.GraphModule, arg: Any, _cache: dict | None = None) -> torch.Tensor | None:
    """The value of ``arg`` if it is a stored tensor (parameter, buffer, plain tensor attribute) or a pure
    function of stored tensors only (a transpose, a clone, a dtype cast ...); None otherwise.

    A sub-expression touched by an in-place op anywhere (``clone()`` then ``zero_()`` on a slice) is not
    treated as constant: evaluating it without the mutation would give the wrong tensor."""
    cache = {} if _cache is None else _cache
    if not isinstance(arg, fx.Node):
        return None
    if arg in cache:
        return cache[arg]
    value = None
    if arg.op == "get_attr":
        owner, _, attr = str(arg.target).rpartition(".")
        try:
            v = getattr(gm.get_submodule(owner) if owner else gm, attr)
        except AttributeError:
            v = None
        value = v if isinstance(v, torch.Tensor) else None
    elif arg.op in ("call_function", "call_method") and arg.all_input_nodes \
            and not _mutating(arg) and not any(_mutating(u) for u in arg.users):
        inputs = {n: constant_value(gm, n, cache) for n in arg.all_input_nodes}
        if all(v is not None for v in inputs.values()):
            args = fx.node.map_arg(arg.args, lambda n: inputs[n])
            kwargs = fx.node.map_arg(arg.kwargs, lambda n: inputs[n])
            with torch.no_grad():
                try:
                    out = arg.target(*args, **kwargs) if arg.op == "call_function" else \
                        getattr(args[0], arg.target)(*args[1:], **kwargs)
                except Exception:  # not evaluable outside the graph (e.g. needs symbolic sizes)
                    out = None
            value = out if isinstance(out, torch.Tensor) else None
    cache[arg] = value
    return value


def weight_call(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict[str, Any], torch.Tensor] | None:
    """A call_function / call_method weight op with a stored weight: ``(kind, bound args, weight)`` with the
    weight laid out as the equivalent nn module stores it (kind: "conv", "conv_transpose" or "linear")."""
    spec = spec_of(node)
    if spec is None or spec.kind == "batch_norm":
        return None
    bound = spec.bind(node)
    if bound is None:
        return None
    kind = spec.kind
    weight_arg = bound.get("weight", bound.get("other"))
    if not isinstance(bound.get("input"), fx.Node) or constant_value(gm, bound["input"]) is not None:
        return None  # the 'activation' is itself constant: nothing to calibrate
    w = constant_value(gm, weight_arg)
    if w is None or not w.is_floating_point():
        return None
    if kind == "convolution":
        if not isinstance(bound["transposed"], bool):
            return None
        kind = "conv_transpose" if bound["transposed"] else "conv"
    if kind in ("mm", "addmm", "matmul"):
        if w.dim() != 2:
            return None
        if kind == "addmm" and (bound["beta"] != 1 or bound["alpha"] != 1):
            return None
        bound = {"input": bound["input"], "bias": bound.get("bias")}
        return "linear", bound, w.t()
    if kind == "bmm":
        return None
    return kind, bound, w


def module_for(kind: str, bound: dict[str, Any], w: torch.Tensor) -> nn.Module | None:
    """An nn module computing the same as the bound functional call (weights filled in by the caller)."""
    if kind == "linear":
        return nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    dims = w.dim() - 2
    if dims not in (1, 2, 3):
        return None
    groups = bound.get("groups", 1)
    if not isinstance(groups, int):
        return None
    common = dict(stride=bound["stride"], padding=bound["padding"], dilation=bound["dilation"], groups=groups,
                  bias=False, device="meta")
    if any(not isinstance(common[k], (int, str, list, tuple)) for k in ("stride", "padding", "dilation")):
        return None
    if kind == "conv":
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        return cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), **common)
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    return cls(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), output_padding=bound["output_padding"],
               **common)


def functional_for(module: nn.Module, aten_ir: bool) -> tuple[Callable, str]:
    """The call a weight module lowers to: an aten overload for aten graphs, else ``torch.nn.functional``."""
    if isinstance(module, nn.Linear):
        return (aten.linear.default if aten_ir else F.linear), "linear"
    dims = module.weight.dim() - 2
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        fns = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input) \
            if aten_ir else (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
        return fns[dims - 1], "conv_transpose"
    if aten_ir:
        fns = (aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding) if isinstance(module.padding, str) \
            else (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
    else:
        fns = (F.conv1d, F.conv2d, F.conv3d)
    return fns[dims - 1], "conv"


def is_aten_graph(gm: fx.GraphModule) -> bool:
    """Whether the graph is in aten IR (torch.export / its ``.module()``): its calls are OpOverloads."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return bool(calls) and sum(isinstance(n.target, torch._ops.OpOverload) for n in calls) > len(calls) // 2


# Ops that join activations (residual adds, concatenations): the FUSABLE placement quantizes the weight-op
# outputs that feed them, so int8 runtimes see conv → Q and can run the join in integers.
_JOIN_FUNCTIONS = (operator.add, torch.add, torch.cat, torch.concat, aten.add.Tensor, aten.cat.default)
_JOIN_METHODS = ("add",)


def is_join(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _JOIN_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _JOIN_METHODS)


# Ops that only move or select values (a residual shortcut's stride-2 slice and channel pad, reshapes): an int8
# runtime can run them on quantized data, so the FUSABLE placement looks through them to the value they read.
_MOVE_FUNCTIONS = (operator.getitem, torch.reshape, torch.flatten, torch.permute, torch.transpose,
                   torch.nn.functional.pad, aten.slice.Tensor, aten.constant_pad_nd.default, aten.view.default,
                   aten.reshape.default, aten.permute.default, aten.transpose.int, aten.flatten.using_ints)
_MOVE_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "contiguous")
_MOVE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def is_data_movement(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MOVE_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _MOVE_MODULES)
    return node.op == "call_method" and node.target in _MOVE_METHODS



def is_batchnorm_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A BatchNorm left in the graph (a module or any functional / aten form): one BN folding could not fold."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.batchnorm._BatchNorm)
    return is_batchnorm_function(node)


def rescaled_downstream(gm: fx.GraphModule, node: fx.Node, is_quantizer: Callable[[fx.Node], bool]) -> bool:
    """Whether a BatchNorm rescales ``node``'s output before it reaches the next quantizer, weight op or matmul
    (through elementwise ops, data movement and joins); ``is_quantizer`` says which nodes quantize."""
    seen, todo = set(), list(node.users)
    while todo:
        n = todo.pop()
        if n in seen or n.op == "output" or is_quantizer(n) or is_quant_op(gm, n):
            continue
        seen.add(n)
        if is_batchnorm_node(gm, n):
            return True
        todo.extend(n.users)
    return False
