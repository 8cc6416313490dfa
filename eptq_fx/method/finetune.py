"""Network-wise fine-tuning after the block-wise reconstruction.

Block by block, each block matches the float model's outputs given the *quantized* inputs the blocks before it
produce, but nothing sees how the errors the blocks leave behind add up at the network output. This stage
trains, through the whole network at once, what can still move continuously once every rounding decision is
made: biases (on their accumulator grid), per-channel weight scales and activation scales. Its loss is the
squared distance of the quantized network's output to the float network's, per sample: the EPTQ objective at
the output itself, where the label-free Hessian of the output with respect to itself is the identity. The
rounding decisions stay as the blocks chose them (the integer weights do not change), and the result is kept
only if the network output on the held-out calibration samples gets closer to float.

Under torch.distributed every rank runs the same steps on the same whole minibatch (the step is small; it
needs no gradient reduction and the ranks stay identical)."""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from eptq_fx.config import ReconstructionConfig
from eptq_fx.data import CalibSet
from eptq_fx.graph.passes.qdq_insertion import act_quantizers, weight_ops
from eptq_fx.method.fallback import float_outputs, output_error, output_leaves

logger = logging.getLogger(__name__)


def _trainable(prepared: fx.GraphModule, rc: ReconstructionConfig) -> list[dict]:
    """Adam parameter groups: biases, weight-scale gains and activation-scale gains of active quantizers."""
    groups = []
    for op in weight_ops(prepared).values():
        if op.weight_quant.mode == "off":
            continue
        if rc.train_bias and op.op.bias is not None:
            groups.append({"params": [op.op.bias], "lr": rc.lr_bias * rc.finetune_lr})
        if rc.train_weight_scale:
            groups.append({"params": [op.weight_quant.log_gain], "lr": rc.lr_scale * rc.finetune_lr})
    for aq in act_quantizers(prepared).values():
        if aq.mode == "on" and rc.train_act_scale:
            aq.train_scale = True
            groups.append({"params": [aq.log_gain], "lr": rc.lr_scale * rc.finetune_lr})
    return groups


def _snapshot(groups: list[dict], prepared: fx.GraphModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The trained tensors and the scales their gains fold into, to restore if the stage does not help."""
    keep = [p for g in groups for p in g["params"]]
    keep += [op.weight_quant.scale for op in weight_ops(prepared).values()]
    keep += [aq.scale for aq in act_quantizers(prepared).values()]
    return [t.detach().clone() for t in keep], keep


def _finish(prepared: fx.GraphModule, groups: list[dict]) -> None:
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(False)
    for op in weight_ops(prepared).values():
        op.weight_quant.fold_gain_()
    for aq in act_quantizers(prepared).values():
        aq.train_scale = False
        aq.fold_gain_()


def finetune_network_(prepared: fx.GraphModule, calib: CalibSet, rc: ReconstructionConfig, n_train: int,
                      hold_idx: torch.Tensor, f_hold: list[torch.Tensor], seed: int,
                      progress: bool = False) -> tuple[float, float]:
    """``rc.finetune_iters`` steps over the first ``n_train`` calibration samples (in place). Returns the
    network output's error on ``hold_idx`` before and after; the stage is undone when "after" is not lower."""
    groups = _trainable(prepared, rc)
    before = output_error(prepared, calib, hold_idx, f_hold)
    if not groups:  # nothing left to train (every quantizer off, or every trainable part disabled)
        return before, before
    saved, live = _snapshot(groups, prepared)
    gen = torch.Generator().manual_seed(seed * 7_919 + 17)
    targets = float_outputs(prepared, calib, torch.arange(n_train))
    was_training = prepared.training
    prepared.eval()  # no QDrop, BatchNorms that could not be folded keep their statistics
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    for _ in tqdm(range(rc.finetune_iters), desc="EPTQ network", disable=not progress, leave=False):
        idx = torch.randint(0, n_train, (rc.batch_size,), generator=gen)
        outs = output_leaves(prepared(*calib.take(idx)))
        loss = sum((o - t[idx].to(o.device)).pow(2).flatten(1).sum(1).mean() for o, t in zip(outs, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _finish(prepared, groups)
    prepared.train(was_training)
    after = output_error(prepared, calib, hold_idx, f_hold)
    if not after < before:  # a NaN (diverged) counts as worse
        with torch.no_grad():
            for t, v in zip(live, saved):
                t.copy_(v)
        logger.info("network fine-tuning: held-out output error %.4g -> %.4g, not kept", before, after)
        return before, before
    logger.info("network fine-tuning: held-out output error %.4g -> %.4g", before, after)
    return before, after
