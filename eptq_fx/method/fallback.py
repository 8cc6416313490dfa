"""The network-level fallback: EPTQ is kept only if it brings the *network output* closer to float than
round-to-nearest does, on calibration samples the reconstruction did not train on.

Why at the output: each block's local loss can improve while the network's accuracy falls (the errors the
blocks leave behind compound differently than the block losses say), so the per-block test alone does not stop
EPTQ from ending below RTN."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from eptq_fx import distributed
from eptq_fx.data import CalibSet
from eptq_fx.graph.passes.qdq_insertion import act_quantizers, weight_ops
from eptq_fx.numerics.calibration import quant_disabled

logger = logging.getLogger(__name__)


@dataclass
class RTNState:
    """What round-to-nearest had, per quantizer: enough to put every quantizer back exactly."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # op name -> (scale, bias)
    acts: dict[str, torch.Tensor]  # quantizer name -> scale


def snapshot_rtn(prepared: fx.GraphModule) -> RTNState:
    weights = {name: (op.weight_quant.scale.detach().clone(),
                      None if op.op.bias is None else op.op.bias.detach().clone())
               for name, op in weight_ops(prepared).items()}
    acts = {name: aq.scale.detach().clone() for name, aq in act_quantizers(prepared).items()}
    return RTNState(weights, acts)


def restore_rtn_(prepared: fx.GraphModule, state: RTNState, only: set[str] | None = None) -> None:
    """Every quantizer (or those named in ``only``) back to round-to-nearest, exactly as a ``method="rtn"`` run
    leaves it."""
    with torch.no_grad():
        for name, op in weight_ops(prepared).items():
            scale, bias = state.weights[name]
            wq = op.weight_quant
            if wq.mode == "off" or (only is not None and name not in only):
                continue
            wq.scale.copy_(scale)
            wq.log_gain.zero_()
            if bias is not None:
                op.op.bias.copy_(bias)
            wq.mode, wq.alpha, wq.w_floor = "round", None, torch.empty(0)
        for name, aq in act_quantizers(prepared).items():
            if only is not None and name not in only:
                continue
            aq.scale.copy_(state.acts[name])
            aq.log_gain.zero_()


def active_quantizers(prepared: fx.GraphModule) -> list[str]:
    """Names of the weight ops with quantized weights and of the activation quantizers, sorted."""
    return sorted([n for n, op in weight_ops(prepared).items() if op.weight_quant.mode != "off"]
                  + list(act_quantizers(prepared)))


def choose_network_result_(prepared: fx.GraphModule, calib: CalibSet, hold_idx: torch.Tensor,
                           f_hold: list[torch.Tensor], rtn: RTNState, rtn_err: float, risen: set[str]) -> str:
    """Keep the reconstruction, part of it, or round-to-nearest, whichever brings the network output on the
    held-out samples closest to float, in that order of preference; returns "eptq", "partial" or "rtn".

    "partial": the quantizers in ``risen`` (those of the blocks whose held-out loss ended above round-to-nearest's
    but within ``block_fallback_z`` standard errors, so were kept) go back to round-to-nearest, the blocks that
    improved keep their result. Tried only when the whole reconstruction is further from float than
    round-to-nearest: at W8A8 on the Fashion-MNIST Mixer half the blocks rose a little and the whole result was
    discarded with them, the three blocks that had improved (the patch embedding 7x) included."""
    eptq_err = output_error(prepared, calib, hold_idx, f_hold)
    logger.info("network output error on %d held-out samples: round-to-nearest %.4g, EPTQ %.4g",
                len(hold_idx), rtn_err, eptq_err)
    if eptq_err <= rtn_err:
        return "eptq"
    if risen:
        restore_rtn_(prepared, rtn, only=risen)
        partial_err = output_error(prepared, calib, hold_idx, f_hold)
        if partial_err <= rtn_err:
            logger.warning("EPTQ moved the network output further from float than round-to-nearest (%.4g > %.4g "
                           "on held-out samples); with the %d quantizers of the blocks whose held-out loss had "
                           "risen back at round-to-nearest it is %.4g: kept that", eptq_err, rtn_err, len(risen),
                           partial_err)
            return "partial"
    restore_rtn_(prepared, rtn)  # a NaN (diverged) also ends here
    logger.warning("EPTQ moved the network output further from float than round-to-nearest (%.4g > %.4g on "
                   "held-out samples): kept round-to-nearest", eptq_err, rtn_err)
    return "rtn"


def output_leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (any nesting), in order."""
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def output_error(prepared: fx.GraphModule, calib: CalibSet, idx: torch.Tensor, float_out: list[torch.Tensor],
                 batch_size: int = 256) -> float:
    """Mean per-sample squared distance of the quantized network's outputs to ``float_out`` over ``idx``."""
    was_training = prepared.training
    prepared.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            sel = idx[i:i + batch_size]
            outs = output_leaves(prepared(*calib.take(sel)))
            total += sum(float((o - f[i:i + batch_size]).pow(2).sum()) for o, f in zip(outs, float_out))
    prepared.train(was_training)
    return total / max(1, len(idx))


def float_outputs(prepared: fx.GraphModule, calib: CalibSet, idx: torch.Tensor,
                  batch_size: int = 256) -> list[torch.Tensor]:
    was_training = prepared.training
    prepared.eval()
    chunks: list[list[torch.Tensor]] = []
    with torch.no_grad(), quant_disabled(prepared):
        for i in range(0, len(idx), batch_size):
            chunks.append(output_leaves(prepared(*calib.take(idx[i:i + batch_size]))))
    prepared.train(was_training)
    return [torch.cat([c[j] for c in chunks]) for j in range(len(chunks[0]))] if chunks else []


def paired_standard_error(diff: torch.Tensor, n: int) -> float:
    """Standard error of the mean of a paired per-sample difference over ``n`` samples (this rank holds
    ``diff`` for its own samples; the sums are taken over all ranks). 0 for fewer than 2 samples."""
    sums = distributed.all_sum_(torch.stack([diff.double().sum(), diff.double().pow(2).sum()]))
    if n < 2:
        return 0.0
    mean = float(sums[0]) / n
    var = max(0.0, (float(sums[1]) - n * mean * mean) / (n - 1))
    return math.sqrt(var / n)
