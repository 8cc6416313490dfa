"""The Hessian stage of EPTQ: everything second-order that reconstruction consumes, computed once, up front.

``estimate_hessian`` runs between ``calibrate`` and ``reconstruct`` and returns a ``HessianEstimate``; the
reconstruction receives it instead of computing it itself, so a caller can inspect, reuse or replace the
scores (and the uniform-weight ablation is simply an estimate without activation scores)."""
from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from eptq_fx import distributed
from eptq_fx.config import EPTQConfig, HessianScope, ReconstructionConfig, Target
from eptq_fx.data import CalibSet
from eptq_fx.errors import HessianError
from eptq_fx.graph.ops import rescaled_downstream
from eptq_fx.graph.passes.block_schedule import plan_blocks
from eptq_fx.graph.passes.qdq_insertion import compare_points, weight_ops
from eptq_fx.method.activation_hessian import HessianScores, label_free_hessian
from eptq_fx.method.block_runner import ensure_batch_layout_
from eptq_fx.method.weight_hessian import weight_hessian
from eptq_fx.numerics.calibration import quant_disabled
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HessianEstimate:
    """``activation``: label-free Hessian scores of every compare point (None: uniform weights, the ablation);
    ``weight``: per weight op (module name) the diagonal weight Hessian used for HMSE thresholds, or None
    when ``config.weight_range`` is not ``"hmse"``."""

    activation: HessianScores | None
    weight: dict[str, torch.Tensor] | None
    # Target.BLOCK: scores of the block outputs that are not compare points themselves (same probes)
    block_outputs: HessianScores | None = None
    # False: ``activation`` only ranks the layers (eptq_fx.report); the reconstruction loss weighs all alike
    weighs: bool = True

    def scores(self, n_samples: int, n_points: int) -> torch.Tensor:
        """(N, L) per-sample, per-compare-point scores; all ones for uniform weights."""
        if self.activation is None or not self.weighs:
            return torch.ones(n_samples, n_points)
        return self.activation.scores


def rescaled_compare_points(gm: fx.GraphModule) -> set[str]:
    """Compare points whose output a BatchNorm that stayed in the graph rescales before the next quantizer."""
    def quantizer(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ActQuantizer)

    by_name = {n.name: n for n in gm.graph.nodes}
    return {c for c in compare_points(gm) if rescaled_downstream(gm, by_name[c], quantizer)}


def width_admits_hessian(narrowest_bits: int | None, rc: ReconstructionConfig) -> bool:
    """Whether a block whose narrowest quantized weights have ``narrowest_bits`` bits (None: it has none) may be
    Hessian-weighted: at least ``rc.hessian_min_bits``."""
    return narrowest_bits is None or narrowest_bits >= rc.hessian_min_bits


def _narrowest_weight_bits(gm: fx.GraphModule, by_name: dict[str, fx.Node], node_names) -> int | None:
    bits = [mod.weight_quant.bits for name in node_names if by_name[name].op == "call_module"
            for mod in [gm.get_submodule(str(by_name[name].target))]
            if isinstance(mod, QuantWeightOp) and mod.weight_quant.mode != "off"]
    return min(bits) if bits else None


def weighs_by_hessian(gm: fx.GraphModule, rc: ReconstructionConfig) -> bool:
    """Whether any block's loss is Hessian-weighted: ``hessian_weighting``, a block within ``hessian_scope``
    whose narrowest weights have at least ``hessian_min_bits`` bits (or none). When none is, the Hessian is not
    computed at all."""
    if not rc.hessian_weighting:
        return False
    if rc.hessian_scope is HessianScope.ALL and rc.hessian_min_bits <= 1:  # every block (the default)
        return True
    rescaled = None if rc.hessian_scope is HessianScope.ALL else rescaled_compare_points(gm)
    if rescaled is not None and not rescaled:
        return False
    by_name = {n.name: n for n in gm.graph.nodes}
    for block in plan_blocks(gm, rc.granularity):
        if rescaled is not None and not rescaled & set(block.quant_ops):
            continue
        if width_admits_hessian(_narrowest_weight_bits(gm, by_name, block.nodes), rc):
            return True
    return False


def estimate_hessian(prepared: fx.GraphModule, calib: CalibSet, config: EPTQConfig,
                     progress: bool = True) -> HessianEstimate:
    """Compute the Hessians ``config`` asks for on the float model (quantizers disabled; ``prepared`` is not
    modified)."""
    rc = config.reconstruction
    ensure_batch_layout_(prepared, calib)  # where each compare point holds its samples
    if rc.hessian_weighting and not weighs_by_hessian(prepared, rc):  # no block in scope: a uniform loss
        rc = dataclasses.replace(rc, hessian_weighting=False)
    act = None
    wh = None
    hc = config.hessian
    local, _ = distributed.shard(calib)  # under torchrun each rank scores its own samples, gathered below
    if distributed.is_active():  # a cache entry would hold one shard's scores
        hc = dataclasses.replace(hc, cache_dir=None)
    with quant_disabled(prepared):
        blk = None
        if not rc.hessian_weighting and hc.report_scores:
            # the loss weighs every sample alike; the scores still rank the layers' sensitivity (eptq_fx.report)
            probes = min(hc.max_probes, hc.report_probes)
            ranking = dataclasses.replace(hc, max_probes=probes, min_probes=min(hc.min_probes, probes))
            try:
                act = label_free_hessian(prepared, compare_points(prepared),
                                         local.subset(hc.report_samples, config.seed), ranking, seed=config.seed,
                                         progress=progress)
                act = _gathered(act)
            except HessianError as e:  # nothing downstream needs them: say so and go on without
                logger.warning("no Hessian scores for the report: %s", e)
        if rc.hessian_weighting:
            cps = compare_points(prepared)
            extra = _block_output_points(prepared, config, cps)
            act = label_free_hessian(prepared, cps + extra, local, hc, seed=config.seed,
                                     per_channel=rc.hessian_per_channel, progress=progress)
            act = _gathered(act)
            if extra:
                act, blk = _columns(act, cps), _columns(act, extra)
        if config.weight_range == "hmse":
            names = list(weight_ops(prepared))
            full = weight_hessian(prepared, [f"{n}.op" for n in names], calib, config.hessian, seed=config.seed,
                                  progress=progress)
            wh = {n: full[f"{n}.op"] for n in names}
    return HessianEstimate(act, wh, blk, weighs=rc.hessian_weighting)


def _gathered(act: HessianScores) -> HessianScores:
    """Under torch.distributed every rank holds the scores of all samples, in global order."""
    if not distributed.is_active():
        return act
    return HessianScores(act.names, distributed.gather_rows(act.scores),
                         int(distributed.gather_rows(torch.tensor([act.n_probes])).max()),
                         None if act.per_channel is None else
                         {k: distributed.gather_rows(v) for k, v in act.per_channel.items()})


def _block_output_points(prepared: fx.GraphModule, config: EPTQConfig, cps: list[str]) -> list[str]:
    """Under Target.BLOCK, the block outputs to score besides the compare points: single tensors (not tuples,
    which reach their users through getitem) that do not feed the model output directly (there J = I and the
    score is the same for every sample)."""
    rc = config.reconstruction
    if rc.target is not Target.BLOCK:
        return []
    by_name = {n.name: n for n in prepared.graph.nodes}
    names = []
    for block in plan_blocks(prepared, rc.granularity):
        for name in block.outputs:
            users = by_name[name].users
            if name in cps or name in names or any(u.op == "output" for u in users) or \
                    any(u.target is operator.getitem for u in users):
                continue
            names.append(name)
    return names


def _columns(scores: HessianScores, names: list[str]) -> HessianScores:
    idx = [scores.names.index(n) for n in names]
    per_channel = None if scores.per_channel is None else {n: scores.per_channel[n] for n in names}
    return HessianScores(list(names), scores.scores[:, idx], scores.n_probes, per_channel)
