"""The network-level fallback: EPTQ is kept only if it brings the *network output* closer to float than
round-to-nearest does, on calibration samples the reconstruction did not train on.

Why at the output: each block's local loss can improve while the network's accuracy falls (the errors the
blocks leave behind compound differently than the block losses say), so the per-block test alone does not stop
EPTQ from ending below RTN."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from eptq_fx import distributed
from eptq_fx.data import CalibSet
from eptq_fx.graph.passes.qdq_insertion import act_quantizers, weight_ops
from eptq_fx.numerics.calibration import quant_disabled


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


def restore_rtn_(prepared: fx.GraphModule, state: RTNState) -> None:
    """Every quantizer back to round-to-nearest, exactly as a ``method="rtn"`` run leaves it."""
    with torch.no_grad():
        for name, op in weight_ops(prepared).items():
            scale, bias = state.weights[name]
            wq = op.weight_quant
            if wq.mode == "off":
                continue
            wq.scale.copy_(scale)
            wq.log_gain.zero_()
            if bias is not None:
                op.op.bias.copy_(bias)
            wq.mode, wq.alpha, wq.w_floor = "round", None, torch.empty(0)
        for name, aq in act_quantizers(prepared).items():
            aq.scale.copy_(state.acts[name])
            aq.log_gain.zero_()


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
