"""Read a dynamic size where it is used, not where the graph first read it.

A torch.export graph with a dynamic batch dimension reads the batch size once from its input
(``sym_size_int = aten.sym_size.int(x, 0)``) and every later reshape, view or expand takes that one value:
in a ViT / DeiT, every attention layer's ``reshape(B, N, 3, heads, d)``. To the block schedule that integer is
a dataflow edge from the network's input into every layer, so no node dominates the rest of the graph and
the whole transformer became a single reconstruction block (DeiT-tiny: 47 of its 50 weight ops in block 0).

``localize_shape_reads_`` gives each user of such a read its own ``aten.sym_size.int`` of a tensor it already
takes whose shape carries the same symbol (the reshape's own input), so the value is the same and the edge
stays inside the layer. Users with no such tensor keep the original read. The traced value (``meta["val"]``)
is what decides equality, so graphs without it (``symbolic_trace``) are left alone.
"""
from __future__ import annotations

import torch
import torch.fx as fx

_SYM_SIZE = torch.ops.aten.sym_size.int


def _local_source(user: fx.Node, read: fx.Node, symbol: str) -> tuple[fx.Node, int] | None:
    """(tensor argument of ``user``, dim) whose traced size at dim is ``symbol``; None if it has none."""
    for arg in user.all_input_nodes:
        if arg is read or arg is read.args[0]:
            continue
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            for dim, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and str(size) == symbol:
                    return arg, dim
    return None


def localize_shape_reads_(gm: fx.GraphModule) -> int:
    """Rewrite in place; returns how many uses now read their size locally."""
    moved = 0
    for read in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SYM_SIZE]:
        val = read.meta.get("val")
        if not isinstance(val, torch.SymInt):
            continue
        for user in list(read.users):
            source = _local_source(user, read, str(val))
            if source is None:
                continue
            with gm.graph.inserting_before(user):
                local = gm.graph.call_function(_SYM_SIZE, source)
            local.meta["val"] = val
            user.replace_input_with(read, local)
            moved += 1
        if not read.users:
            gm.graph.erase_node(read)
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved
