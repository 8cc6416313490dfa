"""The passes as ``torch.fx.passes.infra`` passes: each is a callable over a GraphModule returning ``PassResult``,
usable alone or in a ``PassManager``; ``prepare_pass_manager`` is the pipeline ``prepare`` runs, with graph
lint and our ``node.meta`` invariants checked after every pass.

    from torch.fx.passes.infra.pass_manager import PassManager
    from eptq_fx.graph.passes.infra import FoldBatchNorm, ModularizeWeightOps, check_graph
    result = PassManager([ModularizeWeightOps(), FoldBatchNorm()], run_checks_after_each_pass=True)(gm)
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager
from torch.fx.passes.shape_prop import ShapeProp

from eptq_fx.config import EPTQConfig
from eptq_fx.errors import ModelError
from eptq_fx.graph import ops
from eptq_fx.graph.meta import ACT_QUANT, COMPARE_POINT, INSERTED, LAYER_QUANT
from eptq_fx.graph.passes.annotation import annotate
from eptq_fx.graph.passes.block_schedule import schedule_blocks
from eptq_fx.graph.passes.bn_folding import fold_batchnorm
from eptq_fx.graph.passes.qdq_insertion import insert_qdq
from eptq_fx.graph.passes.shape_reads import localize_shape_reads_
from eptq_fx.graph.passes.weight_ops import modularize_weight_ops


def _signature(gm: fx.GraphModule) -> tuple:
    return tuple((n.op, str(n.target), len(n.users)) for n in gm.graph.nodes)


class LocalizeShapeReads(PassBase):
    """Each use of a dynamic size reads it from a tensor it already takes (see ``shape_reads``), so a batch
    size read once at the input does not tie every later layer into one reconstruction block."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, localize_shape_reads_(graph_module) > 0)


class ModularizeWeightOps(PassBase):
    """Functional / aten weight ops with stored weights → module calls (see ``weight_ops``)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, modularize_weight_ops(graph_module) > 0)


class FoldBatchNorm(PassBase):
    """Fold every foldable BatchNorm (module, functional or aten) into the weight module feeding it."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        before = _signature(graph_module)
        fold_batchnorm(graph_module)
        return PassResult(graph_module, _signature(graph_module) != before)


class PropagateShapes(PassBase):
    """Record each node's ``tensor_meta`` by running ``example_inputs`` (lets Annotate skip integer tensors)."""

    def __init__(self, example_inputs: tuple) -> None:
        super().__init__()
        self.example_inputs = example_inputs

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*self.example_inputs)
        return PassResult(graph_module, False)


class Annotate(PassBase):
    """Record what gets quantized (``LAYER_QUANT`` / ``ACT_QUANT``) from ``config``; rewrites nothing."""

    def __init__(self, config: EPTQConfig) -> None:
        super().__init__()
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        annotate(graph_module, self.config)
        return PassResult(graph_module, any(LAYER_QUANT in n.meta for n in graph_module.graph.nodes))


class InsertQDQ(PassBase):
    """Insert the fake-quantizers ``Annotate`` asked for."""

    def __init__(self, power_of_two: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.power_of_two, self.seed = power_of_two, seed

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        before = _signature(graph_module)
        insert_qdq(graph_module, power_of_two=self.power_of_two, seed=self.seed)
        return PassResult(graph_module, _signature(graph_module) != before)


class ScheduleBlocks(PassBase):
    """Partition into reconstruction blocks (``node.meta[BLOCK]``, ``gm.meta[BLOCKS]``)."""

    def __init__(self, granularity: str = "block") -> None:
        super().__init__()
        self.granularity = granularity

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        schedule_blocks(graph_module, self.granularity)
        return PassResult(graph_module, False)  # meta only: the graph itself is unchanged


def check_graph(gm: fx.GraphModule) -> None:
    """Graph lint plus the ``node.meta`` invariants the passes rely on; raises ``ModelError`` naming the node."""
    gm.graph.lint()
    names = {n.name for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if LAYER_QUANT in node.meta and not ops.is_quant_op(gm, node):
            raise ModelError(f"node {node.name} carries a layer annotation but is no weight op or matmul; "
                             f"a pass moved it without its meta.")
        for consumer in node.meta.get(ACT_QUANT, {}):
            if consumer not in names:
                raise ModelError(f"activation annotation on {node.name} names a missing consumer {consumer}.")
        if node.meta.get(INSERTED) == "act_quant" and node.op != "call_module":
            raise ModelError(f"inserted quantizer {node.name} is not a module call.")
        if COMPARE_POINT in node.meta and LAYER_QUANT not in node.meta:
            raise ModelError(f"compare point {node.name} has no layer annotation.")


def prepare_pass_manager(config: EPTQConfig, example_inputs: tuple | None = None) -> PassManager:
    """The pass pipeline of ``prepare``: localize shape reads → modularize → fold BN → (shapes) → annotate →
    insert Q/DQ, with ``check_graph`` after each. Modularizing first lets BN fold into functional / aten convs
    too."""
    passes = [LocalizeShapeReads(), ModularizeWeightOps(), FoldBatchNorm()]
    if example_inputs is not None:
        passes.append(PropagateShapes(example_inputs))
    passes += [Annotate(config), InsertQDQ(power_of_two=config.power_of_two, seed=config.seed)]
    pm = PassManager(passes, run_checks_after_each_pass=True)
    pm.add_checks(check_graph)
    return pm
