"""Capture: turn what the user holds into a ``torch.fx.GraphModule`` we may rewrite (never the user's object).

Accepted: an ``nn.Module`` (traced with ``symbolic_trace``, or captured with ``torch.export`` where
symbolic_trace fails or leaves weights inside opaque calls), a ``GraphModule`` from symbolic_trace or
``torch._dynamo.export``, and a ``torch.export.ExportedProgram`` or its ``.module()``. Exported graphs lose
their input guard (calibration, the Hessians and reconstruction run them at other batch sizes); a batch size
fixed at export is recorded in ``gm.meta[STATIC_BATCH]`` so data is only fed at that size.
"""
from __future__ import annotations

import copy
import inspect
import logging
import operator
import re
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import _assert_is_none

from eptq_fx.errors import ModelError, TraceError
from eptq_fx.graph import ops
from eptq_fx.graph.meta import SOURCE_IR, STATIC_BATCH

CAPTURE_METHODS = ("auto", "symbolic_trace", "export")
# functions that take a 2-D stored tensor without being a matrix product: no reason to look deeper
_NOT_OPAQUE = {torch.nn.functional.embedding, torch.ops.aten.embedding.default}
_NOT_OPAQUE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.EmbeddingBag, nn.RNNBase)

logger = logging.getLogger(__name__)


class _Tracer(fx.Tracer):
    """A tracer that treats chosen module types/names as leaves and remembers where it is, so a failure can name
    the module that broke tracing."""

    # defaults: torch.load re-creates a pickled GraphModule by tracing it again with a no-argument subclass of
    # the tracer class that made it
    def __init__(self, leaf_modules: Sequence[type | str] = (), autowrap_functions: Sequence[Callable] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append((qualname, type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


_SPECIALIZATION_CHECKS = (operator.eq, torch._assert, _assert_is_none)


def _drop_specialization_asserts_(graph: fx.Graph, concrete_args: dict) -> None:
    """fx keeps each concrete arg as a placeholder whose only use is an assertion of its fixed value. That use
    would make the arg look like a data input to every later stage (calibration, block inputs), while the
    traced code already uses the fixed value: drop the assertion. An arg with a default stays in the
    signature, unused (callers may still pass it); one without is removed, so data holds real inputs only."""
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if not any(re.fullmatch(rf"{re.escape(str(k))}(_\d+)?", str(node.target)) for k in concrete_args):
            continue
        checks = list(node.users) + [u for c in node.users for u in c.users]
        if all(c.op == "call_function" and c.target in _SPECIALIZATION_CHECKS for c in checks):
            for c in reversed(checks):
                graph.erase_node(c)
            if not node.args:
                graph.erase_node(node)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel wrappers and ``torch.compile``'s OptimizedModule (whose
    ``forward(*args, **kwargs)`` hides the model's inputs; its original module holds the same parameters)."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, OptimizedModule):
            model = model._orig_mod
        else:
            return model


def _adopt_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a user's GraphModule, with an export's input guard removed and its IR / batch size noted."""
    gm = copy.deepcopy(gm)
    gm.eval()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)  # shape guards of the export: we feed other batch sizes on purpose
    gm.graph.lint()
    gm.recompile()
    # torch.export records each input's shape ("val"); a plain int batch dim means the graph was traced
    # for that batch size only (its views / reshapes may spell it out)
    batch_dims = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() > 0:
            batch_dims.add(val.shape[0] if isinstance(val.shape[0], int) else None)
    if len(batch_dims) == 1 and None not in batch_dims:
        gm.meta[STATIC_BATCH] = batch_dims.pop()
    gm.meta[SOURCE_IR] = "aten" if ops.is_aten_graph(gm) else "torch"
    return gm


def opaque_weight_calls(gm: fx.GraphModule) -> list[str]:
    """Calls that hold matrix / kernel weights the op table cannot see into (a leaf module such as
    ``nn.MultiheadAttention``, a function fx wrapped such as torchvision's ``shifted_window_attention``)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if ops.is_weight_module(mod) or isinstance(mod, _NOT_OPAQUE_MODULES):
                continue
            if any(p.dim() >= 2 for p in mod.parameters()):
                found.append(str(node.target))
        elif node.op == "call_function" and ops.spec_of(node) is None and node.target not in _NOT_OPAQUE:
            stored = [ops.constant_value(gm, a) for a in node.all_input_nodes if a.op == "get_attr"]
            if any(t is not None and t.is_floating_point() and t.dim() >= 2 for t in stored) and \
                    ops.constant_value(gm, node) is None:
                found.append(node.name)
    return found


def _export(root: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Capture through torch.export with a dynamic batch dimension (specialised if the model fixes it)."""
    dims = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None
                 for t in example_inputs)
    with torch.no_grad():
        ep = torch.export.export(root, tuple(example_inputs), dynamic_shapes=dims, strict=False)
    return _adopt_graph_module(ep.module())


def _default_concrete_args(model: nn.Module) -> dict:
    """Forward arguments with a non-tensor default (``attn_mask=None``, ``is_causal=False``) are fixed to it,
    so they are not data inputs (timm's ViT / DeiT take two such arguments)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


def capture(model, example_inputs: tuple | None = None, leaf_modules: Sequence[type | str] = (),
            concrete_args: dict | None = None, autowrap_functions: Sequence[Callable] = (),
            method: str = "auto") -> fx.GraphModule:
    """A GraphModule of a deep copy of ``model`` (in eval mode); the user's model is never mutated.

    ``model``: an nn.Module, a GraphModule (symbolic_trace, dynamo export, ``ExportedProgram.module()``) or an
    ``ExportedProgram``. ``method`` (nn.Module only): "symbolic_trace", "export" (``torch.export`` with a
    dynamic batch dimension; needs ``example_inputs``) or "auto": symbolic_trace, falling back to export
    when tracing fails or leaves weights inside opaque calls and ``example_inputs`` are given.
    ``leaf_modules``: module classes or qualified names kept as opaque calls (for code fx cannot trace);
    ``concrete_args``: forward arguments fixed to constants (e.g. flags that drive Python control flow);
    forward arguments with a non-tensor default are fixed to it unless given here.
    ``example_inputs`` (optional) are run once through the traced graph to check it works on real data.
    """
    if method not in CAPTURE_METHODS:
        raise ModelError(f"capture method must be one of {CAPTURE_METHODS}, got {method!r}.")
    if isinstance(model, torch.export.ExportedProgram):
        return _adopt_graph_module(model.module())
    if not isinstance(model, nn.Module):
        raise ModelError(f"capture needs an nn.Module, a GraphModule or an ExportedProgram, got "
                         f"{type(model).__name__}.")
    if isinstance(model, fx.GraphModule):
        gm = _adopt_graph_module(model)
        # functions fx or dynamo kept whole (dynamo's F.multi_head_attention_forward, an fx.wrap'ed helper)
        # and torch.nn modules fx keeps as leaves by default (nn.MultiheadAttention) hide weights; other
        # leaf modules in a user's GraphModule were the user's choice and stay
        whole = {m.name for m in gm.graph.nodes if m.op == "call_function"} | {
            str(m.target) for m in gm.graph.nodes if m.op == "call_module"
            and type(gm.get_submodule(str(m.target))).__module__.startswith("torch.nn.")}
        hidden = [n for n in opaque_weight_calls(gm) if n in whole]
        if hidden and method != "symbolic_trace" and example_inputs is not None and gm.meta[SOURCE_IR] != "aten":
            try:
                exported = _export(gm, example_inputs)
            except Exception as e:
                logger.warning("weights inside %s stay in float: torch.export failed on the graph (%s: %s)",
                               hidden[:5], type(e).__name__, str(e)[:200])
                return gm
            logger.info("re-captured the graph with torch.export: weights inside %s", hidden[:5])
            return exported
        return gm
    model = unwrap(model)
    if method == "export":
        if example_inputs is None:
            raise ModelError("capture(method='export') needs example_inputs; pass a batch of model inputs.")
        return _export_or_raise(copy.deepcopy(model).eval(), example_inputs)
    try:
        gm = _symbolic_capture(model, example_inputs, leaf_modules, concrete_args, autowrap_functions)
    except TraceError:
        if method == "auto" and example_inputs is not None:
            logger.info("symbolic_trace failed: capturing %s with torch.export", type(model).__name__)
            return _export_or_raise(copy.deepcopy(model).eval(), example_inputs)
        raise
    opaque = [] if leaf_modules else opaque_weight_calls(gm)  # leaves the user chose stay leaves
    if opaque and method == "auto" and example_inputs is not None:
        try:
            exported = _export(copy.deepcopy(model).eval(), example_inputs)
        except Exception as e:  # keep the traced graph: its opaque calls stay in float
            logger.warning("weights inside %s are not visible to symbolic_trace and torch.export failed "
                           "(%s: %s); those stay in float", opaque[:5], type(e).__name__, str(e)[:200])
            return gm
        logger.info("captured with torch.export: symbolic_trace leaves weights inside %s", opaque[:5])
        return exported
    if opaque and method == "auto":
        logger.warning("weights inside %s are not visible to symbolic_trace; pass example_inputs (or "
                       "method='export') to capture them with torch.export", opaque[:5])
    return gm


def _export_or_raise(root: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    try:
        return _export(root, example_inputs)
    except Exception as e:
        raise TraceError(f"torch.export could not capture {type(root).__name__}: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}; export it yourself and pass the "
                         f"ExportedProgram.") from e


def _symbolic_capture(model: nn.Module, example_inputs, leaf_modules, concrete_args,
                      autowrap_functions) -> fx.GraphModule:
    if concrete_args is None:
        concrete_args = _default_concrete_args(model) or None
    in_training = [name for name, m in model.named_modules() if name and m.training]
    if model.training or in_training:  # e.g. a BatchNorm left in train() would use batch statistics
        what = "the model is" if model.training else f"module(s) {', '.join(in_training[:5])} are"
        logger.warning("%s in training mode: quantizing an eval-mode copy (running BatchNorm statistics, no "
                       "dropout); your model is left as it was", what)
    root = copy.deepcopy(model).eval()
    tracer = _Tracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:  # fx raises many types (TraceError, TypeError, AttributeError, ...)
        cause = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        if tracer.stack:
            name, kind = tracer.stack[-1]
            raise TraceError(
                f"torch.fx could not trace module {name!r} ({kind}): {cause}. Pass leaf_modules=[{kind}] (or "
                f"its name {name!r}) to keep it as an opaque call, or concrete_args={{...}} to fix the inputs "
                f"that drive its Python control flow."
            ) from e
        # the model's own forward: it cannot be its own leaf
        raise TraceError(
            f"torch.fx could not trace the forward of {type(root).__name__}: {cause}. Pass concrete_args={{...}} "
            f"to fix the arguments that drive its Python control flow, or move that code into a submodule "
            f"and pass it in leaf_modules."
        ) from e
    if concrete_args:
        _drop_specialization_asserts_(graph, concrete_args)
    for node in graph.nodes:  # `from __future__ import annotations` makes fx record types as strings, which
        if isinstance(node.type, str):  # GraphModule.__reduce__ cannot import: torch.save would fail
            node.type = None
    gm = fx.GraphModule(tracer.root, graph, type(root).__name__)
    gm.eval()
    gm.meta[SOURCE_IR] = "torch"
    if example_inputs is not None:
        with torch.no_grad():
            try:
                gm(*example_inputs)
            except Exception as e:
                raise TraceError(
                    f"The traced graph fails on example_inputs: {type(e).__name__}: {e}. Python control flow that "
                    f"depends on input values was frozen during tracing; mark that module as a leaf."
                ) from e
    return gm
