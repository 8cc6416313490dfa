"""Insert fake-quantizers where ``annotate`` decided: wrap weight ops in ``QuantWeightOp`` and put an
``ActQuantizer`` call on each quantized activation edge. The result is the *prepared* model (PT2E's
``prepare_pt2e`` counterpart): it observes during calibration and fake-quantizes afterwards.
"""
from __future__ import annotations

import logging

import torch.fx as fx
import torch.nn as nn

from eptq_fx.graph.meta import ACT_QUANT, COMPARE_POINT, INSERTED, LAYER_QUANT
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp

logger = logging.getLogger(__name__)

ACT_QUANT_PREFIX = "eptq_act_quant_"


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def insert_qdq(gm: fx.GraphModule, power_of_two: bool = False, seed: int = 0) -> fx.GraphModule:
    """Rewrite an annotated graph into the prepared (fake-quant) graph."""
    # weights: swap each quantized conv / linear for its wrapper (same qualified name, so names stay stable)
    for node in gm.graph.nodes:
        lq = node.meta.get(LAYER_QUANT)
        if lq is None:
            continue
        node.meta[COMPARE_POINT] = node.name
        if lq.weight_bits is not None and node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, QuantWeightOp):
                _set_submodule(gm, node.target, QuantWeightOp(module, lq.weight_bits))
    # activations: one quantizer per (producer, spec), shared by the consumers that asked for that spec
    count = 0
    for producer in list(gm.graph.nodes):
        edges = producer.meta.get(ACT_QUANT)
        if not edges:
            continue
        made: dict = {}
        for consumer_name, spec in edges.items():
            consumer = next(n for n in producer.users if n.name == consumer_name)
            if spec not in made:
                name = f"{ACT_QUANT_PREFIX}{count}"
                count += 1
                gm.add_submodule(name, ActQuantizer(spec, power_of_two=power_of_two, seed=seed + count))
                with gm.graph.inserting_after(producer):
                    q = gm.graph.call_module(name, (producer,))
                q.meta[INSERTED] = "act_quant"
                q.meta["eptq_fx.quantizes"] = producer.name
                made[spec] = q
            consumer.replace_input_with(producer, made[spec])
    logger.info("inserted %d activation quantizers", count)
    link_input_quantizers_(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def link_input_quantizers_(gm: fx.GraphModule) -> None:
    """Tell each weight op which quantizer feeds it (its bias then lives on the integer accumulator grid); an
    op called from several places, or with an unquantized input, keeps a float bias."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantWeightOp):
            calls.setdefault(node.target, []).append(node)
    for target, nodes in calls.items():
        src = nodes[0].args[0] if len(nodes) == 1 and nodes[0].args else None
        aq = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        gm.get_submodule(target).link_input_(aq if isinstance(aq, ActQuantizer) else None)


def weight_ops(gm: fx.GraphModule) -> dict[str, QuantWeightOp]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, QuantWeightOp)}


def act_quantizers(gm: fx.GraphModule) -> dict[str, ActQuantizer]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, ActQuantizer)}


def compare_points(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes whose outputs reconstruction matches and the Hessian weighs, in graph order."""
    return [n.name for n in gm.graph.nodes if COMPARE_POINT in n.meta]
