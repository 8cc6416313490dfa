"""The Hessian stage of EPTQ: everything second-order that reconstruction consumes, computed once, up front.

``estimate_hessian`` runs between ``calibrate`` and ``reconstruct`` and returns a ``HessianEstimate``; the
reconstruction receives it instead of computing it itself, so a caller can inspect, reuse or replace the
scores (and the uniform-weight ablation is simply an estimate without activation scores)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from eptq_fx import distributed
from eptq_fx.config import EPTQConfig
from eptq_fx.data import CalibSet
from eptq_fx.graph.passes.qdq_insertion import compare_points, weight_ops
from eptq_fx.method.activation_hessian import HessianScores, label_free_hessian
from eptq_fx.method.weight_hessian import weight_hessian
from eptq_fx.numerics.calibration import quant_disabled


@dataclass(frozen=True)
class HessianEstimate:
    """``activation``: label-free Hessian scores of every compare point (None: uniform weights, the ablation);
    ``weight``: per weight op (module name) the diagonal weight Hessian used for HMSE thresholds, or None
    when ``config.weight_range`` is not ``"hmse"``."""

    activation: HessianScores | None
    weight: dict[str, torch.Tensor] | None

    def scores(self, n_samples: int, n_points: int) -> torch.Tensor:
        """(N, L) per-sample, per-compare-point scores; all ones for uniform weights."""
        if self.activation is None:
            return torch.ones(n_samples, n_points)
        return self.activation.scores


def estimate_hessian(prepared: fx.GraphModule, calib: CalibSet, config: EPTQConfig,
                     progress: bool = True) -> HessianEstimate:
    """Compute the Hessians ``config`` asks for on the float model (quantizers disabled; ``prepared`` is not
    modified)."""
    rc = config.reconstruction
    act = None
    wh = None
    hc = config.hessian
    local, _ = distributed.shard(calib)  # under torchrun each rank scores its own samples, gathered below
    if distributed.is_active():  # a cache entry would hold one shard's scores
        hc = dataclasses.replace(hc, cache_dir=None)
    with quant_disabled(prepared):
        if rc.hessian_weighting:
            act = label_free_hessian(prepared, compare_points(prepared), local, hc, seed=config.seed,
                                     per_channel=rc.hessian_per_channel, progress=progress)
            if distributed.is_active():  # every rank holds the scores of all samples, in global order
                act = HessianScores(act.names, distributed.gather_rows(act.scores),
                                    int(distributed.gather_rows(torch.tensor([act.n_probes])).max()),
                                    None if act.per_channel is None else
                                    {k: distributed.gather_rows(v) for k, v in act.per_channel.items()})
        if config.weight_range == "hmse":
            names = list(weight_ops(prepared))
            full = weight_hessian(prepared, [f"{n}.op" for n in names], calib, config.hessian, seed=config.seed,
                                  progress=progress)
            wh = {n: full[f"{n}.op"] for n in names}
    return HessianEstimate(act, wh)
