"""Where each value of a graph holds its samples, found by running the graph at two batch sizes.

Block-wise reconstruction caches every value that crosses a block boundary, and the layer outputs it compares,
one row per calibration sample, and trains on minibatches of rows; the label-free Hessian scores each sample
at each layer output. Both need to know which dim of a value is the sample index. Most graphs keep it on dim 0
throughout, but not all: ``nn.MultiheadAttention`` works sequence-first inside, ``(L, N, E)``, runs its output
projection on ``(L·N, E)`` rows and its attention products on ``(N·H, L, L)``. Shapes alone tell these apart:
the sample dim is the one dim whose size follows the batch size, and a value where the batch size shows up
only multiplied into another dim has no dim of its own for the samples.

``annotate_batch_dims_`` writes ``node.meta[BATCH_DIM]`` on every node whose value is a tensor: the sample dim,
or ``None`` when the samples share a dim with something else (or the value does not depend on the batch).
``splits_by_sample`` is the question the scheduler and the reconstruction ask: can this value be cached and
drawn from row by row? Unannotated nodes (a graph nobody ran) are taken to be batch-first, as before.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from eptq_fx.graph.meta import BATCH_DIM, BATCH_LAYOUT

logger = logging.getLogger(__name__)

PROBE_SIZES = (2, 3)  # two batch sizes, neither 1 (a size-1 dim would be ambiguous) and small enough to be cheap


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph and records the shape of every tensor value, without touching the graph's meta."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


def _sample_dim(small: tuple[int, ...], large: tuple[int, ...], sizes: tuple[int, int]) -> int | None:
    if len(small) != len(large):
        return None
    changed = [d for d, (a, b) in enumerate(zip(small, large)) if a != b]
    if len(changed) == 1 and (small[changed[0]], large[changed[0]]) == sizes:
        return changed[0]
    return None


def batch_dims(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, int | None]:
    """{node name: sample dim or None} for every node whose value is a tensor. ``inputs``: the model's
    positional inputs with at least ``max(PROBE_SIZES)`` samples on dim 0 (calibration data)."""
    shapes = []
    with torch.no_grad():
        for size in PROBE_SIZES:
            recorder = _ShapeRecorder(gm)
            recorder.run(*(t[:size] for t in inputs))
            shapes.append(recorder.shapes)
    small, large = shapes
    return {name: _sample_dim(small[name], large[name], PROBE_SIZES) for name in small if name in large}


def annotate_batch_dims_(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Write ``node.meta[BATCH_DIM]`` (see the module docstring); with fewer samples than the probe needs,
    leave the graph unannotated (every value is then taken to be batch-first)."""
    if not inputs or inputs[0].shape[0] < max(PROBE_SIZES):
        return
    dims = batch_dims(gm, inputs)
    for node in gm.graph.nodes:
        if node.name in dims:
            node.meta[BATCH_DIM] = dims[node.name]
        else:
            node.meta.pop(BATCH_DIM, None)
    gm.meta[BATCH_LAYOUT] = True
    odd = [name for name, d in dims.items() if d != 0]
    if odd:
        logger.info("%d of %d tensor values do not hold the samples on dim 0 (e.g. %s): blocks are not cut "
                    "there", len(odd), len(dims), odd[:3])


def splits_by_sample(node: fx.Node) -> bool:
    """Whether a node's value can be cached and drawn from row by row: its samples lie along dim 0."""
    return node.meta.get(BATCH_DIM, 0) == 0
