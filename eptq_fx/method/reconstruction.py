"""EPTQ reconstruction: Hessian-weighted, block-wise AdaRound over a prepared (calibrated) graph.

For each block of the schedule, in topological order: the block's subgraph gets the *quantized* outputs of the
blocks before it as inputs, the *float* model's values at its compare points as targets, and trains soft
rounding (+ biases, weight scales, activation scales) to match them under a loss weighted per sample and per
layer by the label-free Hessian. Activations stream: only the values a later block still needs are kept, for
both the float and the quantized path, so peak memory follows the widest cut, not the depth.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from eptq_fx import distributed
from eptq_fx.config import EPTQConfig, HessianScope, Precision, ReconstructionConfig, Target
from eptq_fx.data import CalibSet
from eptq_fx.graph.meta import BLOCKS, HESSIAN_MEAN, RECONSTRUCTION_OUTCOME
from eptq_fx.graph.passes.batch_layout import splits_by_sample
from eptq_fx.graph.passes.block_schedule import Block, block_subgraph, schedule_blocks
from eptq_fx.graph.passes.qdq_insertion import compare_points
from eptq_fx.method import block_runner
from eptq_fx.method.activation_hessian import HessianScores
from eptq_fx.method.block_runner import fetch, module_device, module_dtype, on_device, quantizers_train_, run_block
from eptq_fx.method.checkpoint import RunCheckpoint
from eptq_fx.method.fallback import (
    active_quantizers,
    choose_network_result_,
    float_outputs,
    output_error,
    paired_standard_error,
    snapshot_rtn,
)
from eptq_fx.method.finetune import finetune_network_
from eptq_fx.method.hessian_stage import (
    HessianEstimate,
    estimate_hessian,
    rescaled_compare_points,
    width_admits_hessian,
)
from eptq_fx.method.loss_weights import channel_profiles, layer_weights, loss_terms
from eptq_fx.numerics.calibration import init_weight_scales_, input_names, quant_disabled
from eptq_fx.numerics.distance import squared_distance
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp

logger = logging.getLogger(__name__)

EVAL_SAMPLES = 256  # samples of each block's before/after test when none can be held out


@dataclass
class BlockParts:
    """The trainable pieces of one block."""

    weight_ops: dict[str, QuantWeightOp]
    act_quants: dict[str, ActQuantizer]
    cp_index: list[int]  # column of each of the block's compare points in the Hessian score matrix
    weight_pos: list[int]  # position (among the block's compare points) of each weight op, in weight_ops order


def _block_parts(gm: fx.GraphModule, block: Block, cp_names: list[str]) -> BlockParts:
    by_name = {n.name: n for n in gm.graph.nodes}
    wops, aqs, weight_pos = {}, {}, []
    for name in block.nodes:
        node = by_name[name]
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, QuantWeightOp) and mod.weight_quant.mode != "off":
            wops[node.target] = mod
            weight_pos.append(block.quant_ops.index(name))
        elif isinstance(mod, ActQuantizer) and mod.mode == "on":
            aqs[node.target] = mod
    return BlockParts(wops, aqs, [cp_names.index(n) for n in block.quant_ops], weight_pos)


def block_steps(parts: BlockParts, rc: ReconstructionConfig) -> int:
    """Optimisation steps for one block: ``rc.iters``, and under ``rc.low_bit_steps`` 2^(2(4−b)−1)·iters when
    the narrowest weights in the block have b < 4 bits: 2× at 3 bits, 8× at 2 (1000 and 4000 with the default
    500). Why: at 2 bits each rounding decision moves a weight by a quarter of its range and the soft-rounding
    variables need many more steps to settle. ResNet-20 W2A4 gained +0.7 to +1.5 from 500 to 2000 steps and
    another +1.17 from 2000 to 4000 (BENCHMARKS.md, "Steps per block by bit width" and stop 25); blocks at 4 bits
    and more keep the budget that the 4- and 8-bit figures, and issue 11's wall-time cap, were measured with."""
    bits = _narrowest_bits(parts)
    if not rc.low_bit_steps or bits is None or bits >= 4:
        return rc.iters
    return rc.iters * 2 ** (2 * (4 - bits) - 1)


def _narrowest_bits(parts: BlockParts) -> int | None:
    bits = [op.weight_quant.bits for op in parts.weight_ops.values()]
    return min(bits) if bits else None


def hessian_applies(parts: BlockParts, rc: ReconstructionConfig) -> bool:
    """Whether the block's loss may be Hessian-weighted by width: its narrowest weights have at least
    ``rc.hessian_min_bits`` bits (a block without quantized weights: yes)."""
    return width_admits_hessian(_narrowest_bits(parts), rc)


def block_config(parts: BlockParts, rc: ReconstructionConfig) -> ReconstructionConfig:
    """``rc`` as one block trains under it: ``block_steps`` steps, and the relative rounding regulariser only
    where the block's narrowest weights have at most ``rc.reg_relative_max_bits`` bits (AdaRound's absolute
    ``reg_factor`` elsewhere; see ReconstructionConfig.reg_relative)."""
    changes = {}
    steps = block_steps(parts, rc)
    if steps != rc.iters:
        changes["iters"] = steps
    bits = _narrowest_bits(parts)
    if rc.reg_relative and (bits is None or bits > rc.reg_relative_max_bits):
        changes["reg_relative"] = 0.0
    return dataclasses.replace(rc, **changes) if changes else rc


_distance = squared_distance  # per-sample reconstruction distance (numerics/distance.py)


class _Trainer:
    """Optimises one block; owns the schedule of β, the act phase-in and the optimiser."""

    def __init__(self, parts: BlockParts, rc: ReconstructionConfig):
        self.parts, self.rc = parts, rc
        # what round-to-nearest had, to fall back on if the optimised block ends up worse (see revert_)
        self.rtn_state = {
            "weights": [(op.weight_quant.scale.detach().clone(),
                         None if op.op.bias is None else op.op.bias.detach().clone())
                        for op in parts.weight_ops.values()],
            "acts": [aq.scale.detach().clone() for aq in parts.act_quants.values()],
        }
        groups = []
        for op in parts.weight_ops.values():
            wq = op.weight_quant
            wq.init_soft_(op.weight.detach(), rc.gamma, rc.zeta)
            groups.append({"params": [wq.alpha], "lr": rc.lr_round})
            if rc.train_bias and op.op.bias is not None:
                op.op.bias.requires_grad_(True)
                groups.append({"params": [op.op.bias], "lr": rc.lr_bias})
            if rc.train_weight_scale:
                wq.log_gain.requires_grad_(True)
                groups.append({"params": [wq.log_gain], "lr": rc.lr_scale})
        for aq in parts.act_quants.values():
            aq.drop_prob = rc.qdrop
            if rc.train_act_scale:
                aq.train_scale = True
                aq.log_gain.requires_grad_(True)
                groups.append({"params": [aq.log_gain], "lr": rc.lr_scale})
        self.opt = torch.optim.Adam(groups) if groups else None

    def set_drop_draw(self, seed: int, idx: torch.Tensor, shard: distributed.Shard | None) -> None:
        """QDrop masks of this step: drawn for the whole minibatch ``idx`` (the same on every rank), each rank
        taking the rows of the samples it holds."""
        rows = None
        if shard is not None:
            rows = torch.nonzero((idx >= shard.start) & (idx < shard.stop)).flatten()
        for j, aq in enumerate(self.parts.act_quants.values()):
            aq.drop_draw = (seed * 131 + j, len(idx), rows)

    def beta(self, step: int) -> float | None:
        """None during warm-up (no rounding regulariser), then β annealed from beta_start to beta_end."""
        rc = self.rc
        start = int(rc.warmup * rc.iters)
        if step < start:
            return None
        frac = (step - start) / max(1, rc.iters - start)
        return rc.beta_end + (rc.beta_start - rc.beta_end) * max(0.0, 1.0 - frac)

    def set_phase(self, step: int) -> None:
        # activation quantization fades in over the first half of the steps: p·x + (1−p)·Q(x), p: 1 → 0
        p = max(0.0, 1.0 - step / (0.5 * self.rc.iters)) if self.rc.act_phase_in else 0.0
        for aq in self.parts.act_quants.values():
            aq.float_mix = p

    def round_loss(self, beta: float, layer_w: torch.Tensor) -> torch.Tensor:
        total, count = torch.zeros(()), 0
        for w, op in zip(layer_w, self.parts.weight_ops.values()):
            h = op.weight_quant.soft_h()
            total = total + w * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
            count += h.numel()
        if self.rc.reg_relative > 0:  # scale-free: relative to the round-to-nearest loss, per weight
            return self.rc.reg_relative * self.rtn_loss * total / max(1, count)
        return self.rc.reg_factor * total

    def revert_(self) -> None:
        """Back to round-to-nearest: scales and biases as they were, rounding decisions = nearest."""
        with torch.no_grad():
            for op, (scale, bias) in zip(self.parts.weight_ops.values(), self.rtn_state["weights"]):
                wq = op.weight_quant
                wq.scale.copy_(scale)
                if bias is not None:
                    op.op.bias.copy_(bias)
                up = torch.round(op.weight / scale.view(wq._bshape)) > wq.w_floor
                wq.alpha.copy_(torch.where(up, 1.0, -1.0))
            for aq, scale in zip(self.parts.act_quants.values(), self.rtn_state["acts"]):
                aq.scale.copy_(scale)

    def finish(self) -> None:
        for op in self.parts.weight_ops.values():
            op.weight_quant.harden_()
            op.weight_quant.alpha.requires_grad_(False)
            op.weight_quant.log_gain.requires_grad_(False)
            op.weight_quant.fold_gain_()
            if op.op.bias is not None:
                op.op.bias.requires_grad_(False)
        for aq in self.parts.act_quants.values():
            aq.float_mix, aq.drop_prob, aq.train_scale, aq.drop_draw = 0.0, 0.0, False, None
            aq.log_gain.requires_grad_(False)
            aq.fold_gain_()


def _train_block(sub, block, parts, q_vals, f_out, layer_w, profiles, rc, gen, n_train: int,
                 eval_idx: torch.Tensor, progress, shard: distributed.Shard | None = None,
                 block_hs: list[HessianScores] = ()) -> tuple[float, float]:
    """``n_train`` / ``eval_idx``: global sample indices (training draws from the first n_train; the block's
    before/after test runs on eval_idx). Under torch.distributed each rank holds only its shard's values."""
    split = (lambda idx: (idx, idx)) if shard is None else shard.split
    device, dtype = module_device(sub), module_dtype(sub)
    autocast = rc.compute_precision is Precision.BFLOAT16
    pick, f_targets, term_w, profiles, reg_w = loss_terms(block, parts, f_out, layer_w, profiles, rc, block_hs)
    if reg_w is None:
        reg_w = layer_w.mean(0)[parts.weight_pos]  # the regulariser is weighted like the layer's loss term
    term_w = on_device(term_w, device)
    profiles = [None if p is None else on_device(p, device) for p in profiles]

    def block_loss(idx: torch.Tensor, train: bool = False, power: list[float] | None = None,
                   per_sample: bool = False) -> torch.Tensor:
        # idx: global sample indices; q_vals / f_targets hold this rank's samples only (all of them in 1 process).
        # power: [Σ target², Σ error²] accumulated here (the SQNR of what the loss compares, for the log).
        # per_sample: this rank's per-sample losses instead of their (global minibatch) mean
        g, loc = split(idx)
        if len(loc) == 0:
            return torch.zeros(0) if per_sample else torch.zeros(())
        with torch.autocast((device or torch.device("cpu")).type, torch.bfloat16, enabled=train and autocast):
            preds = pick(sub(*(fetch(q_vals[name][loc], device, dtype) for name in block.inputs)))
        targets = [fetch(f_targets[j][loc], device, dtype) for j in range(len(preds))]
        per_term = torch.stack([_distance(p.to(dtype), t, None if profiles[j] is None else profiles[j][g])
                                for j, (p, t) in enumerate(zip(preds, targets))], 1)
        if power is not None:
            power[0] += sum(float(t.pow(2).sum()) for t in targets)
            power[1] += float(per_term.sum())
        weighted = (per_term * term_w[g]).sum(1)
        if per_sample:
            return weighted.float()
        # under torch.distributed: this rank's share of the global minibatch mean, summed over ranks below
        return weighted.sum() / len(idx) if distributed.is_active() else weighted.mean()

    def global_loss(idx: torch.Tensor, power: list[float] | None = None) -> float:
        return float(distributed.all_sum_(block_loss(idx, power=power).detach().reshape(1).clone())[0])

    with torch.no_grad():
        # round-to-nearest, the baseline the block must beat, sample by sample for the paired test below
        rtn_per_sample = block_loss(eval_idx, per_sample=True)
        loss_before = global_loss(eval_idx)
    trainer = _Trainer(parts, rc)
    trainer.rtn_loss = loss_before
    # QDrop masks are seeded per step from the block's generator (drawn only when used, so a qdrop=0 run keeps
    # its minibatch sequence)
    drop_seed = int(torch.randint(0, 2 ** 30, (1,), generator=gen)) * 1_000_003 if rc.qdrop > 0 else 0
    if trainer.opt is not None:
        quantizers_train_(sub, True)  # unfolded BatchNorms keep their running statistics
        for step in tqdm(range(rc.iters), desc=f"block {block.index}", disable=not progress, leave=False):
            trainer.set_phase(step)
            idx = torch.randint(0, n_train, (rc.batch_size,), generator=gen)
            if rc.qdrop > 0.0:
                trainer.set_drop_draw(drop_seed + step, idx, shard)
            loss = block_loss(idx, train=True)
            beta = trainer.beta(step)
            if beta is not None and parts.weight_ops and distributed.is_lead():  # once, not once per rank
                loss = loss + trainer.round_loss(beta, reg_w)
            trainer.opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False only on a rank that holds none of this minibatch
                loss.backward()
            distributed.all_reduce_grads_(p for g in trainer.opt.param_groups for p in g["params"])
            trainer.opt.step()
        quantizers_train_(sub, False)
    trainer.finish()
    power = [0.0, 0.0]
    with torch.no_grad():
        loss_after = global_loss(eval_idx, power)
        se = paired_standard_error(block_loss(eval_idx, per_sample=True) - rtn_per_sample, len(eval_idx))
        margin = rc.block_fallback_z * se
        if not loss_after <= loss_before + margin:  # a NaN (diverged) counts as worse
            # too few steps to settle the rounding: keep round-to-nearest rather than ship a worse block
            trainer.revert_()
            logger.info("block %d: optimised loss %.4g > round-to-nearest %.4g (+%.1f standard errors), kept "
                        "round-to-nearest", block.index, loss_after, loss_before, (loss_after - loss_before) / se
                        if se > 0 else math.inf)
            power = [0.0, 0.0]
            loss_after = global_loss(eval_idx, power)
        elif loss_after > loss_before:
            logger.info("block %d: optimised loss %.4g > round-to-nearest %.4g by %.1f standard errors of the "
                        "paired difference (<= %g): kept the optimised block", block.index, loss_after,
                        loss_before, (loss_after - loss_before) / se, rc.block_fallback_z)
    sqnr = 10.0 * math.log10(power[0] / power[1]) if power[1] > 0 else float("inf")
    return loss_before, loss_after, sqnr


def _split(n: int, rc: ReconstructionConfig) -> tuple[int, torch.Tensor]:
    """(samples to train on = the first n_train, held-out indices for the fallback tests). With too few
    samples to spare a held-out part, everything trains and the tests run on the training samples."""
    n_hold = int(n * rc.fallback_holdout)
    if n_hold < 8 or n - n_hold < 8:
        return n, torch.arange(min(EVAL_SAMPLES, n))
    return n - n_hold, torch.arange(n - n_hold, n)


def reconstruct(prepared: fx.GraphModule, calib: CalibSet, config: EPTQConfig, resume_dir: str | None = None,
                progress: bool = True, hessian: HessianEstimate | None = None) -> fx.GraphModule:
    """Run EPTQ on a calibrated prepared graph (in place; returns it).

    ``hessian``: the result of ``estimate_hessian`` on the same graph, data and config (computed here when
    not given). Its weight Hessian (``weight_range="hmse"``) first sets the weight thresholds. At the end,
    the network output on the held-out calibration samples decides between the result and round-to-nearest
    (``ReconstructionConfig.fallback``)."""
    rc = config.reconstruction
    if config.power_of_two:  # a trained step would leave the power-of-two grid
        rc = dataclasses.replace(rc, train_weight_scale=False, train_act_scale=False)
    t0 = time.perf_counter()
    cps = compare_points(prepared)
    block_runner.ensure_batch_layout_(prepared, calib)
    # a compare point whose samples share a dim with something else cannot be compared sample by sample:
    # its block matches the block outputs instead (which hold the samples on dim 0, by the schedule)
    per_sample = {n.name for n in prepared.graph.nodes if splits_by_sample(n)}
    # rank 0 creates the run directory, the others then check it (same model / config / whole data)
    ckpt = distributed.lead_first(lambda: RunCheckpoint.open(resume_dir, prepared, config, calib)) \
        if resume_dir else None
    if hessian is None:
        hessian = estimate_hessian(prepared, calib, config, progress=progress)
    if hessian.weight is not None:
        init_weight_scales_(prepared, config, hessian.weight)
    hs = hessian.activation
    # where Target.BLOCK looks up its per-sample output weights (nowhere when the loss weighs samples alike)
    block_hs = [t for t in (hs, hessian.block_outputs) if t is not None] if hessian.weighs else []
    scores = hessian.scores(calib.n, len(cps))
    # HessianScope.RESCALED: the blocks outside the scope train with a uniform loss
    in_scope = (lambda block: True) if rc.hessian_scope is HessianScope.ALL else \
        (lambda block, rescaled=rescaled_compare_points(prepared): bool(rescaled & set(block.quant_ops)))
    uniform_rc = dataclasses.replace(rc, hessian_weighting=False, hessian_per_channel=False)
    if hs is not None:  # for eptq_fx.report
        prepared.meta[HESSIAN_MEAN] = dict(zip(cps, hs.scores.mean(0).tolist()))
    local, shard = distributed.shard(calib)  # under torchrun: this rank's samples; else all of them
    n_train, hold_idx = _split(calib.n, rc)
    if rc.fallback:
        rtn = snapshot_rtn(prepared)
        f_hold = float_outputs(prepared, calib, hold_idx)
        rtn_err = output_error(prepared, calib, hold_idx, f_hold)
    schedule_blocks(prepared, rc.granularity)
    blocks: list[Block] = prepared.meta[BLOCKS]
    last_use = {}
    for b in blocks:
        for name in b.inputs:
            last_use[name] = b.index
    # the data's inputs, by placeholder (node) name; an unused optional argument takes no data
    by_target = {n.target: n.name for n in prepared.graph.nodes if n.op == "placeholder"}
    f_vals = {by_target[t]: x for t, x in zip(input_names(prepared), local.tensors)}
    q_vals = dict(f_vals)
    store = rc.cache_precision
    risen: set[str] = set()  # quantizers of the blocks whose held-out loss ended above round-to-nearest's
    for block in tqdm(blocks, desc="EPTQ blocks", disable=not progress):
        sub = block_subgraph(prepared, block)
        parts = _block_parts(prepared, block, cps)
        n_out = len(block.outputs)
        comparable = all(name in per_sample for name in block.quant_ops)
        with quant_disabled(prepared):
            f_out = run_block(sub, f_vals, block, None, store=store, keep=None if comparable else n_out)
        f_targets = f_out[n_out:]
        done = ckpt is not None and ckpt.restore_block_(block.index, parts)
        if done and ckpt.rose.get(block.index):
            risen |= set(parts.weight_ops) | set(parts.act_quants)
        if not done and parts.cp_index and not comparable \
                and not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in f_out):
            logger.warning("block %d: neither its layer outputs (%s) nor its outputs can be compared sample by "
                           "sample; kept round-to-nearest", block.index, ",".join(block.quant_ops))
            done = True
        if not done and parts.cp_index:
            gen = torch.Generator().manual_seed(config.seed * 100_003 + block.index)
            weighted = in_scope(block) and hessian_applies(parts, rc)
            brc = block_config(parts, rc if weighted else uniform_rc)
            if comparable:
                layer_w = layer_weights(scores, parts, brc, [t[0].numel() for t in f_targets])
            else:  # the block outputs' distance stands for its layers, as under Target.BLOCK
                brc = dataclasses.replace(brc, target=Target.BLOCK)
                layer_w = torch.ones(calib.n, len(parts.cp_index))
            profiles = channel_profiles(hs, parts, cps, brc)
            tb = time.perf_counter()
            before, after, sqnr = _train_block(sub, block, parts, q_vals, f_out, layer_w, profiles, brc, gen,
                                         n_train, hold_idx, progress, shard if distributed.is_active() else None,
                                         block_hs if weighted else [])
            q_out = run_block(sub, q_vals, block, None, keep=n_out, store=store)
            # the SQNR of what the loss compares (this rank's held-out samples; no extra pass over the block)
            logger.info("block %d (%s): loss %.4g -> %.4g, held-out SQNR %.1f dB, %.1f s", block.index,
                        ",".join(block.quant_ops), before, after, sqnr, time.perf_counter() - tb)
            rose = after > before  # kept within block_fallback_z: the network-level choice may still revert it
            if rose:
                risen |= set(parts.weight_ops) | set(parts.act_quants)
            if ckpt is not None and distributed.is_lead():
                ckpt.save_block(block.index, parts, rose=rose)
        else:
            q_out = run_block(sub, q_vals, block, None, keep=n_out, store=store)
        for j, name in enumerate(block.outputs):
            f_vals[name], q_vals[name] = f_out[j], q_out[j]
        for name in [k for k in f_vals if last_use.get(k, -1) <= block.index]:
            f_vals.pop(name, None)
            q_vals.pop(name, None)
    if rc.finetune_iters:
        if not rc.fallback:
            f_hold = float_outputs(prepared, calib, hold_idx)
        finetune_network_(prepared, calib, rc, n_train, hold_idx, f_hold, config.seed, progress)
    kept, reverted = "unchecked", []
    if rc.fallback:
        kept = choose_network_result_(prepared, calib, hold_idx, f_hold, rtn, rtn_err, risen)
        reverted = {"partial": sorted(risen), "rtn": active_quantizers(prepared)}.get(kept, [])
    prepared.meta[RECONSTRUCTION_OUTCOME] = {"kept": kept, "reverted": reverted}  # for eptq_fx.report
    logger.info("EPTQ reconstruction: %d blocks (%s), %d steps each, %.1f s", len(blocks), rc.granularity,
                rc.iters, time.perf_counter() - t0)
    return prepared
