"""Partition a traced model into reconstruction blocks, from the graph topology alone.

``schedule_blocks`` writes ``node.meta[BLOCK]`` (the block index) on every compute node (every node that is
not a placeholder, get_attr or output) and stores the list of ``Block`` s in ``gm.meta[BLOCKS]``.
``block_subgraph`` turns one block into a standalone GraphModule, which is what block-wise reconstruction runs.

The "block" granularity finds the single-entry/single-exit structure of the dataflow graph. With all
placeholders merged into a virtual source and the output as the sink, a *cut point* is a node that every
source-to-sink path goes through: it dominates the sink and post-dominates the source. Cut points split the
graph into *regions* (the nodes after one cut point up to and including the next). The rule:

1. A region with more than one node necessarily branches and joins (otherwise its inner nodes would be cut
   points). If it also contains a quant op it is a *structured* region (a residual block, an inverted
   residual with skip, an attention or MLP sub-block with its skip, a token- or channel-mixing sub-block)
   and becomes a block of its own.
2. Every other region is a *chain* step. Consecutive chain steps are concatenated into one block (a stem
   conv-BN-ReLU, an inverted residual without skip, a classifier head).
3. A block without a quant op (e.g. the ReLU after a residual add) is merged into the previous block, or into
   the next one when it is the first.

Consequences, by construction: a ResNet BasicBlock is one block (its trailing ReLU included); a pre-norm
transformer layer gives TWO blocks, attention (LN, q/k/v, both matmuls, proj, add) and MLP (LN, fc1, fc2,
add), because the add between them is a cut point with nothing else in between; likewise an MLP-Mixer layer
gives a token-mixing block and a channel-mixing block. Nothing depends on module names or types beyond the
``is_quant_op`` predicate, so inserted quantizer nodes and folded BNs change nothing. The flip side of rule
2: a network without any skip (VGG-style) is a single block, and ConvMixer's pointwise conv, which sits
outside its residual, forms a block of its own (the last one shares the head's block).

Nodes outside the source-to-sink flow are placed afterwards: a *constant* node (no placeholder among its
ancestors, e.g. a function of a parameter only) joins the block of its earliest user, a *dead* node (no
path to the output) joins the latest block among its inputs. A value that is returned AND used further on
(intermediate features) is not treated as a skip to the output, so it does not merge the blocks after it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
from torch import fx

from eptq_fx.errors import ConfigError
from eptq_fx.graph import ops
from eptq_fx.graph.meta import BLOCK, BLOCKS, COMPARE_POINT
from eptq_fx.graph.passes.batch_layout import splits_by_sample

logger = logging.getLogger(__name__)

# Key in ``gm.meta`` under which schedule_blocks stores the list of Blocks.

GRANULARITIES = ("layer", "block", "network")
_NON_COMPUTE = ("placeholder", "get_attr", "output")
_SOURCE, _SINK = "<source>", "<sink>"  # virtual nodes; fx node names never contain '<'

@dataclass(frozen=True)
class Block:
    """One reconstruction block. All names are fx node names, in topological order.

    ``inputs``: values produced outside the block (placeholders or earlier compute nodes) and used inside;
    get_attr nodes are not inputs, block_subgraph re-reads them. ``outputs``: values produced inside and used
    by a later block or by the graph output. ``quant_ops``: the compare points inside."""

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    quant_ops: tuple[str, ...]


def default_is_quant_op(node: fx.Node) -> bool:
    """Weight ops: conv / linear modules and functions, matmuls; or a node already marked as compare point."""
    if COMPARE_POINT in node.meta:
        return True
    gm = node.graph.owning_module
    if node.op == "call_module":
        return ops.is_weight_op_node(gm, node)
    spec = ops.spec_of(node)  # functional / aten forms: weight ops and matmuls alike
    return spec is not None and spec.kind != "batch_norm"


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in _NON_COMPUTE]


def _constant_and_live_nodes(gm: fx.GraphModule) -> tuple[set[fx.Node], set[fx.Node]]:
    """Constants: compute nodes with no placeholder ancestor. Live: compute nodes with a path to the output."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op not in _NON_COMPUTE and all(
                m in constant for m in node.all_input_nodes)):
            constant.add(node)
    live: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.op == "output" or any(u in live for u in node.users):
            live.add(node)
    return constant, live


def _flow_graph(gm: fx.GraphModule, flow_nodes: set[fx.Node]) -> nx.DiGraph:
    """DiGraph over ``flow_nodes`` plus a virtual source (all placeholders) and sink (the output)."""
    graph = nx.DiGraph()
    graph.add_nodes_from([_SOURCE, _SINK])
    for node in gm.graph.nodes:
        if node in flow_nodes:
            for m in node.all_input_nodes:
                if m.op == "placeholder":
                    graph.add_edge(_SOURCE, node)
                elif m in flow_nodes:
                    graph.add_edge(m, node)
        elif node.op == "output":
            # Returning a value that the computation also uses later (intermediate features) is an exit,
            # not a skip: only values with no later consumer lead into the sink, so that such exits do not
            # erase the cut points after them. Returned placeholders bypass nothing and are ignored.
            for m in node.all_input_nodes:
                if m in flow_nodes and not any(u in flow_nodes for u in m.users):
                    graph.add_edge(m, _SINK)
    return graph


def _dominator_chain(graph: nx.DiGraph, start, end) -> set:
    """Every node that lies on all start-to-end paths (walk up the dominator tree of ``end``)."""
    idom = nx.immediate_dominators(graph, start)
    chain, node = set(), end
    while node != start and node in idom:
        chain.add(node)
        node = idom[node]
    return chain


def _cut_points(graph: nx.DiGraph) -> set[fx.Node]:
    if not nx.has_path(graph, _SOURCE, _SINK):
        return set()
    dominate_sink = _dominator_chain(graph, _SOURCE, _SINK)
    postdominate_source = _dominator_chain(graph.reverse(copy=False), _SINK, _SOURCE)
    return (dominate_sink & postdominate_source) - {_SOURCE, _SINK}


def _region_index(gm: fx.GraphModule, flow_nodes: set[fx.Node], cuts: set[fx.Node]) -> dict[fx.Node, int]:
    """Region of a flow node = number of cut points strictly upstream of it (all paths share them)."""
    region: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node in flow_nodes:
            preds = [m for m in node.all_input_nodes if m in flow_nodes]
            region[node] = max((region[m] + (m in cuts) for m in preds), default=0)
    return region


def _block_partition(gm: fx.GraphModule, is_quant_op: Callable[[fx.Node], bool]) -> dict[fx.Node, int]:
    constant, live = _constant_and_live_nodes(gm)
    flow_nodes = {n for n in _compute_nodes(gm) if n in live and n not in constant}
    cuts = _cut_points(_flow_graph(gm, flow_nodes))
    region = _region_index(gm, flow_nodes, cuts)

    regions: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in region:
            regions.setdefault(region[node], []).append(node)

    # Rules 1 and 2: structured regions stand alone, runs of chain steps are concatenated.
    groups: list[list[fx.Node]] = []
    previous_was_chain = False
    for index in sorted(regions):
        nodes = regions[index]
        structured = len(nodes) > 1 and any(is_quant_op(n) for n in nodes)
        if not structured and previous_was_chain:
            groups[-1].extend(nodes)
        else:
            groups.append(list(nodes))
        previous_was_chain = not structured

    # Rule 3: groups without a quant op join their predecessor (the first one joins its successor).
    merged: list[list[fx.Node]] = []
    pending: list[fx.Node] = []
    for nodes in groups:
        if any(is_quant_op(n) for n in nodes):
            merged.append(pending + nodes)
            pending = []
        elif merged:
            merged[-1].extend(nodes)
        else:
            pending.extend(nodes)
    if pending:  # no quant op anywhere
        merged.append(pending)

    assignment = {n: i for i, nodes in enumerate(merged) for n in nodes}
    # Dead nodes follow their latest input; constants (placed in reverse order) their earliest user.
    for node in gm.graph.nodes:
        if node.op not in _NON_COMPUTE and node not in assignment and node not in constant:
            assignment[node] = max((assignment[m] for m in node.all_input_nodes if m in assignment), default=0)
    for node in reversed(gm.graph.nodes):
        if node.op not in _NON_COMPUTE and node not in assignment:
            assignment[node] = min((assignment[u] for u in node.users if u in assignment), default=0)
    return assignment


def _layer_partition(gm: fx.GraphModule, is_quant_op: Callable[[fx.Node], bool]) -> dict[fx.Node, int]:
    """Each quant op starts a block; other nodes join the last quant op before them in graph order."""
    assignment, current = {}, -1
    for node in _compute_nodes(gm):
        if is_quant_op(node):
            current += 1
        assignment[node] = max(current, 0)
    return assignment


def _join_where_samples_merge(gm: fx.GraphModule, assignment: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Blocks meet only at values that hold the samples on dim 0 (``batch_layout``): reconstruction caches
    what crosses a block boundary row by row. A value that does not (inside nn.MultiheadAttention: (L, N, E),
    (L·N, E); a tensor without a sample dim) and is used in a later block joins every block from its own to
    that one, in place (block numbers stay topological)."""
    joined = True
    while joined:
        joined = False
        for node in gm.graph.nodes:
            if node not in assignment or splits_by_sample(node):
                continue
            lo = assignment[node]
            hi = max((assignment[u] for u in node.users if u in assignment), default=lo)
            if hi > lo:
                for m, b in assignment.items():
                    if lo < b <= hi:
                        assignment[m] = lo
                joined = True
    return assignment


def _make_blocks(gm: fx.GraphModule, assignment: dict[fx.Node, int],
                 is_quant_op: Callable[[fx.Node], bool]) -> list[Block]:
    # Partitions number their blocks in topological order; only make the numbering dense.
    renumber = {old: new for new, old in enumerate(sorted(set(assignment.values())))}
    members: list[list[fx.Node]] = [[] for _ in renumber]
    for node in _compute_nodes(gm):
        members[renumber[assignment[node]]].append(node)

    block_of = {n: i for i, nodes in enumerate(members) for n in nodes}
    blocks = []
    for index, nodes in enumerate(members):
        inside = set(nodes)
        inputs = {m: None for n in nodes for m in n.all_input_nodes if m not in inside and m.op != "get_attr"}
        outputs = [n for n in nodes if any(u.op == "output" or (u in block_of and block_of[u] != index)
                                           for u in n.users)]
        blocks.append(Block(
            index=index,
            nodes=tuple(n.name for n in nodes),
            inputs=tuple(m.name for m in sorted(inputs, key=_position(gm))),
            outputs=tuple(n.name for n in outputs),
            quant_ops=tuple(n.name for n in nodes if is_quant_op(n)),
        ))
    return blocks


def _position(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def plan_blocks(gm: fx.GraphModule, granularity: str = "block",
                is_quant_op: Callable[[fx.Node], bool] | None = None) -> list[Block]:
    """The blocks ``schedule_blocks`` would record, without touching ``gm``."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    is_quant_op = is_quant_op or default_is_quant_op
    if granularity == "network":
        assignment = {n: 0 for n in _compute_nodes(gm)}
    elif granularity == "layer":
        assignment = _layer_partition(gm, is_quant_op)
    else:
        assignment = _block_partition(gm, is_quant_op)
    return _make_blocks(gm, _join_where_samples_merge(gm, assignment), is_quant_op)


def schedule_blocks(gm: fx.GraphModule, granularity: str = "block",
                    is_quant_op: Callable[[fx.Node], bool] | None = None) -> fx.GraphModule:
    """Assign every compute node to a reconstruction block (``node.meta[BLOCK]``) and store the ``Block``
    list in ``gm.meta[BLOCKS]``. ``granularity``: "layer" (one block per quant op), "block" (topological
    blocks, see the module docstring) or "network" (one block). Returns ``gm``."""
    blocks = plan_blocks(gm, granularity, is_quant_op)
    block_of = {name: b.index for b in blocks for name in b.nodes}
    for node in gm.graph.nodes:
        if node.name in block_of:
            node.meta[BLOCK] = block_of[node.name]
        else:
            node.meta.pop(BLOCK, None)  # a stale index from an earlier scheduling
    gm.meta[BLOCKS] = blocks
    logger.info("schedule_blocks(%s): %d blocks, quant ops per block %s", granularity, len(blocks),
                [len(b.quant_ops) for b in blocks])
    gm.graph.lint()
    gm.recompile()
    return gm


def block_subgraph(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A standalone GraphModule for ``block`` that shares ``gm``'s submodules and parameters.

    Takes one positional argument per ``block.inputs`` and returns the tuple
    ``(*block outputs, *quant-op outputs)``, both in the order recorded in ``block``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name in block.inputs:
        env[by_name[name]] = graph.placeholder(name)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:  # only get_attr nodes can be missing: re-read them from the shared root
            if node.op != "get_attr":
                raise ValueError(f"Block {block.index} uses {node.name!r}, which is not among its inputs.")
            env[node] = graph.node_copy(node)
        return env[node]

    for name in block.nodes:
        node = by_name[name]
        env[node] = graph.node_copy(node, lookup)
    results = [env[by_name[name]] for name in (*block.outputs, *block.quant_ops)]
    graph.output(tuple(results))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"Block{block.index}")
