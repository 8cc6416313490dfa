"""Capture: trace a copy of the user's model into a ``torch.fx.GraphModule``."""
from __future__ import annotations

import copy
import logging
import operator
import re
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import _assert_is_none

from eptq_fx.errors import ModelError, TraceError

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
    """Strip DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def capture(model: nn.Module, example_inputs: tuple | None = None, leaf_modules: Sequence[type | str] = (),
            concrete_args: dict | None = None, autowrap_functions: Sequence[Callable] = ()) -> fx.GraphModule:
    """Trace a deep copy of ``model`` (in eval mode) into a GraphModule; the user's model is never mutated.

    ``leaf_modules``: module classes or qualified names kept as opaque calls (for code fx cannot trace);
    ``concrete_args``: forward arguments fixed to constants (e.g. flags that drive Python control flow).
    ``example_inputs`` (optional) are run once through the traced graph to check it works on real data.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"capture needs an nn.Module, got {type(model).__name__}.")
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        gm.eval()
        return gm
    model = unwrap(model)
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
