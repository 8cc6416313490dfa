"""Mixed precision under a weight-memory budget: per-layer weight bit widths chosen from the label-free Hessian.

For every weight layer l and candidate width b, the expected increase of the output loss is estimated the way
EPTQ weighs its reconstruction loss: the layer's label-free Hessian score tr(JᵀJ) (mean over samples), spread
over the D elements of its output, times the squared output error that quantizing *only this layer* to b bits
(MSE threshold, round-to-nearest) causes on calibration samples:

    cost_l(b) = tr_l / D_l · E‖y_l(Q_b(W_l)) − y_l(W_l)‖²

Q_b rounds to nearest (``WidthCost.ROUND_TO_NEAREST``) or with error feedback (``WidthCost.ERROR_FEEDBACK``:
column by column, each column's error compensated on the columns still to round, from the layer's input second
moments), the closer estimate of what reconstruction reaches at that width.

The choice minimises Σ cost_l(b_l) under Σ size_l(b_l) ≤ budget (a multiple-choice knapsack, as HAWQ-v3 solves
with its Hessian). It is solved exactly by merging Pareto fronts of (bytes, cost) layer by layer: with a few
candidates per layer the fronts stay small, and no solver dependency is needed. The widths are then handed to
EPTQ as ``Override(name=..., weight_bits=...)`` entries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from eptq_fx.config import KEEP, EPTQConfig, Override, WidthCost
from eptq_fx.data import CalibSet
from eptq_fx.errors import ConfigError
from eptq_fx.graph.meta import HESSIAN_MEAN, LAYER_QUANT
from eptq_fx.graph.passes.qdq_insertion import weight_ops
from eptq_fx.method.activation_hessian import label_free_hessian
from eptq_fx.method.fallback import float_outputs, output_error
from eptq_fx.numerics import kernels
from eptq_fx.numerics.calibration import quant_disabled
from eptq_fx.numerics.quantizers import QuantWeightOp, signed_range, weight_as_rows

logger = logging.getLogger(__name__)

MP_SAMPLES = 256  # calibration samples used to measure each layer's output error and Hessian score
# samples of the network-output cost (WidthCost.NETWORK_OUTPUT): one forward pass per layer and width
NETWORK_COST_SAMPLES = 64


@dataclass(frozen=True)
class LayerChoice:
    name: str  # qualified module name
    numel: int  # weight elements
    hessian: float  # mean over samples of tr(JᵀJ) at the layer's output
    costs: dict[int, float]  # candidate bits -> estimated output-loss increase
    bits: int  # chosen
    fixed: bool  # not chosen by the knapsack (first/last layer at 8 bits, or set by a user override)


@dataclass(frozen=True)
class MixedPrecisionChoice:
    layers: tuple[LayerChoice, ...]
    budget_bytes: int
    used_bytes: int
    uniform8_bytes: int

    def overrides(self) -> tuple[Override, ...]:
        return tuple(Override(name=layer.name, weight_bits=layer.bits) for layer in self.layers if not layer.fixed)

    def as_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes,
                "uniform8_bytes": self.uniform8_bytes,
                "layers": [{"name": c.name, "bits": c.bits, "fixed": c.fixed, "numel": c.numel,
                            "hessian": c.hessian, "costs": {str(b): v for b, v in c.costs.items()}}
                           for c in self.layers]}


def weight_bytes(numel: int, bits: int) -> float:
    return numel * bits / 8.0


def solve_knapsack(sizes: list[dict[int, float]], costs: list[dict[int, float]], budget: float) -> list[int]:
    """Exact multiple-choice knapsack: one key per layer from ``sizes[l]``/``costs[l]`` (same keys), total size
    ≤ budget, total cost minimal. Returns the chosen key per layer; raises ConfigError when nothing fits."""
    # each state: (size, cost, choices); keep only the Pareto front (smaller size and smaller cost)
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for size_l, cost_l in zip(sizes, costs):
        merged = [(s + size_l[b], c + cost_l[b], ch + (b,)) for s, c, ch in front for b in size_l
                  if s + size_l[b] <= budget + 1e-9]
        if not merged:
            raise ConfigError("weight_memory is below the smallest size the candidate widths allow; raise it "
                              "or add a smaller width to weight_candidates.")
        merged.sort(key=lambda t: (t[0], t[1]))
        front = []
        for state in merged:
            if not front or state[1] < front[-1][1]:
                front.append(state)
    return list(min(front, key=lambda t: t[1])[2])


def _budget_bytes(config: EPTQConfig, uniform8: float) -> float:
    wm = config.weight_memory
    return wm * uniform8 if isinstance(wm, float) else float(wm)


def _user_fixed(name: str, module, config: EPTQConfig) -> bool:
    return any(o.weight_bits is not KEEP and o.matches(name, module) for o in config.overrides)


def _input_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as the (samples·positions, weight columns) matrix its weight rows multiply, in the column
    order of ``weight.reshape(out, -1)``; None for layers error feedback does not handle (grouped convs)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros" \
            and not isinstance(layer.padding, str):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


def _second_moments(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ XᵀX over the layer's input columns (float64), accumulated a few samples at a time."""
    h = 0.0
    for chunk in x.split(16):
        cols = _input_columns(layer, chunk).double()
        h = h + cols.T @ cols
    return h


@dataclass(frozen=True)
class FeedbackFactor:
    """What error-feedback rounding needs from a layer's XᵀX, the same for every width: the upper Cholesky factor
    of its (damped) inverse, and the columns whose input is always zero."""

    u: torch.Tensor
    dead: torch.Tensor

    @staticmethod
    def of(h: torch.Tensor) -> FeedbackFactor:
        h = h.clone()
        dead = torch.diag(h) == 0  # columns whose input is always zero: any value is exact
        h[dead, dead] = 1.0
        h += 0.01 * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)  # damping, as GPTQ
        return FeedbackFactor(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True),
                              dead)


FEEDBACK_BLOCK = 128  # columns rounded between two matrix updates of the columns after them (GPTQ's lazy batch)


def error_feedback_round_widths(w_rows: torch.Tensor, scales: list[torch.Tensor], widths: list[int],
                                factor: FeedbackFactor) -> list[torch.Tensor]:
    """Round ``w_rows`` (out, K) onto each grid ``scales[i]`` (out,) of ``widths[i]`` bits, one column at a time,
    adding each column's rounding error, propagated through the inverse of the layer's XᵀX (K, K; ``factor``),
    to the columns not yet rounded. This minimises ‖(W − Q)X‖² greedily, the update of optimal brain
    quantization (Frantar et al., GPTQ). Returns one Q (float64) per width.

    Every width is rounded in the same pass (their rows stacked, so the Python loop over K columns runs once),
    and the columns after a block of FEEDBACK_BLOCK are updated by one matrix product per block instead of one
    rank-one update per column: the same arithmetic, in an order the BLAS runs fast."""
    n_out, k = w_rows.shape
    u = factor.u
    w = w_rows.double().repeat(len(widths), 1)
    w[:, factor.dead] = 0.0
    s = torch.cat([sc.double().reshape(n_out) for sc in scales])
    lo = torch.cat([torch.full((n_out,), float(signed_range(b)[0]), dtype=w.dtype) for b in widths])
    hi = torch.cat([torch.full((n_out,), float(signed_range(b)[1]), dtype=w.dtype) for b in widths])
    lo, hi = lo.to(w.device), hi.to(w.device)
    q = torch.empty_like(w)
    for start in range(0, k, FEEDBACK_BLOCK):
        end = min(start + FEEDBACK_BLOCK, k)
        wb = w[:, start:end]  # a view: the in-block updates land in w
        errs = torch.empty_like(wb)
        for c in range(end - start):
            j = start + c
            q[:, j] = torch.minimum(torch.maximum(torch.round(wb[:, c] / s), lo), hi) * s
            errs[:, c] = (wb[:, c] - q[:, j]) / u[j, j]
            wb[:, c + 1:] -= errs[:, c, None] * u[j, j + 1:end][None, :]
        if end < k:
            w[:, end:] -= errs @ u[start:end, end:]
    return list(q.split(n_out))


def error_feedback_round(w_rows: torch.Tensor, scale: torch.Tensor, bits: int,
                         factor: FeedbackFactor) -> torch.Tensor:
    """``error_feedback_round_widths`` for one width."""
    return error_feedback_round_widths(w_rows, [scale], [bits], factor)[0]


def _layer_inputs(prepared: fx.GraphModule, ops: dict[str, QuantWeightOp], calib: CalibSet) -> dict[str, torch.Tensor]:
    """Each layer's float input over the calibration samples."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in ops}
    hooks = [op.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
             for name, op in ops.items()]
    try:
        with quant_disabled(prepared):
            for _, batch in calib.batches(64):
                prepared(*batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items()}


def _quantized_weights(op: QuantWeightOp, x: torch.Tensor, candidates: tuple[int, ...], n_grid: int,
                       cost: WidthCost) -> dict[int, torch.Tensor]:
    """The layer's weight at each candidate width: MSE grid, then round-to-nearest or error feedback (``cost``;
    error feedback where the layer allows it: per-output-channel scales of a linear or ungrouped conv)."""
    w = op.weight.detach()
    axis = op.weight_quant.axis
    rows = weight_as_rows(w.cpu(), axis).numpy().astype(np.float32)
    scales = {b: torch.as_tensor(kernels.search_weight_scale(rows, b, n_grid=n_grid), dtype=w.dtype)
              for b in candidates}
    feedback = cost is not WidthCost.ROUND_TO_NEAREST and axis == 0 and _input_columns(op.op, x[:1]) is not None
    if feedback:  # axis 0: the rows are the weight's leading dimension
        factor = FeedbackFactor.of(_second_moments(op.op, x))
        q_rows = error_feedback_round_widths(weight_as_rows(w, 0), [scales[b].to(w.device) for b in candidates],
                                             list(candidates), factor)
        return {b: q.to(w.dtype).reshape(w.shape) for b, q in zip(candidates, q_rows)}
    shape = [1] * w.dim()
    shape[axis] = -1
    quantized = {}
    for b in candidates:
        qmin, qmax = signed_range(b)
        s = scales[b].view(shape).to(w.device)
        quantized[b] = torch.clamp(torch.round(w / s), qmin, qmax) * s
    return quantized


@torch.no_grad()
def _output_errors(prepared: fx.GraphModule, ops: dict[str, QuantWeightOp], calib: CalibSet,
                   candidates: tuple[int, ...], n_grid: int,
                   cost: WidthCost = WidthCost.ROUND_TO_NEAREST) -> dict[str, dict[int, float]]:
    """Per layer and width: mean over samples of ‖y(Q_b(W)) − y(W)‖², each layer quantized alone."""
    inputs = _layer_inputs(prepared, ops, calib)
    errors = {}
    for name, op in ops.items():
        x = inputs.pop(name)
        ref = op.op(x)
        quantized = _quantized_weights(op, x, candidates, n_grid, cost)
        errors[name] = {b: float((functional_call(op.op, {"weight": quantized[b]}, (x,)) - ref).pow(2)
                                 .flatten(1).sum(1).mean()) for b in candidates}
    return errors


@torch.no_grad()
def _network_errors(prepared: fx.GraphModule, ops: dict[str, QuantWeightOp], calib: CalibSet,
                    candidates: tuple[int, ...], n_grid: int) -> dict[str, dict[int, float]]:
    """Per layer and width: mean over samples of ‖f(x; Q_b(W_l)) − f(x)‖² at the network output, layer l alone
    at b bits (error-feedback rounding), everything else float. To first order this is ‖J_l Δy_l‖², the
    label-free Hessian's quadratic form on the layer's actual output error; tr(JᵀJ)/D · ‖Δy‖² equals it only
    when the error is spread evenly over the output's directions, which a weight error is not (the same weight
    error repeats at every position, so pooling does not average it away)."""
    idx = torch.arange(calib.n)
    ref = float_outputs(prepared, calib, idx)
    inputs = _layer_inputs(prepared, ops, calib)
    errors = {}
    for name, op in ops.items():
        quantized = _quantized_weights(op, inputs.pop(name), candidates, n_grid, WidthCost.ERROR_FEEDBACK)
        weight = op.op.weight
        original = weight.detach().clone()
        errors[name] = {}
        try:
            with quant_disabled(prepared):
                for b in candidates:
                    weight.copy_(quantized[b])
                    errors[name][b] = output_error(prepared, calib, idx, ref)
        finally:
            weight.copy_(original)
    return errors


def choose_bit_widths(prepared: fx.GraphModule, calib: CalibSet, config: EPTQConfig,
                      progress: bool = False) -> MixedPrecisionChoice:
    """Per-layer weight widths under ``config.weight_memory`` for a prepared graph (weights still float)."""
    calib = calib.subset(MP_SAMPLES, config.seed)
    ops = weight_ops(prepared)
    nodes = {n.target: n for n in prepared.graph.nodes if n.op == "call_module" and LAYER_QUANT in n.meta}
    names = [t for t in nodes if t in ops]  # graph order: the first / last layer are those annotate kept at 8
    candidates = tuple(sorted(config.weight_candidates))
    with quant_disabled(prepared):
        hs = label_free_hessian(prepared, [nodes[n].name for n in names], calib, config.hessian,
                                seed=config.seed, progress=progress)
    mean_h = hs.scores.mean(0)
    prepared.meta[HESSIAN_MEAN] = dict(zip(hs.names, mean_h.tolist()))
    if config.width_cost is WidthCost.NETWORK_OUTPUT:
        errors = _network_errors(prepared, {n: ops[n] for n in names}, calib.subset(NETWORK_COST_SAMPLES, config.seed),
                                 candidates, config.n_grid)
    else:
        errors = _output_errors(prepared, {n: ops[n] for n in names}, calib, candidates, config.n_grid,
                                config.width_cost)
    numel = {n: ops[n].weight.numel() for n in names}
    with torch.no_grad(), quant_disabled(prepared):
        shapes = {}  # D_l: elements of one sample's output
        def record(name):
            def hook(module, args, out) -> None:  # returns None: the output is left as it is
                shapes[name] = out[0].numel()
            return hook
        hooks = [ops[n].register_forward_hook(record(n)) for n in names]
        try:
            prepared(*calib.take(torch.arange(1)))
        finally:
            for h in hooks:
                h.remove()
    uniform8 = sum(weight_bytes(numel[n], 8) for n in names)
    budget = _budget_bytes(config, uniform8)
    fixed, free = {}, []
    for i, n in enumerate(names):
        lq = nodes[n].meta[LAYER_QUANT]
        if _user_fixed(n, ops[n].op, config) or (config.first_last_8bit and i in (0, len(names) - 1)):
            fixed[n] = lq.weight_bits
        else:
            free.append(n)
    fixed_bytes = sum(weight_bytes(numel[n], b) for n, b in fixed.items())
    if config.width_cost is WidthCost.NETWORK_OUTPUT:  # already the output loss: no Hessian factor
        costs = {n: dict(errors[n]) for n in names}
    else:
        costs = {n: {b: float(mean_h[names.index(n)]) / shapes[n] * errors[n][b] for b in candidates}
                 for n in names}
    sizes = [{b: weight_bytes(numel[n], b) for b in candidates} for n in free]
    chosen = solve_knapsack(sizes, [costs[n] for n in free], budget - fixed_bytes) if free else []
    bits = {**fixed, **dict(zip(free, chosen))}
    layers = tuple(LayerChoice(n, numel[n], float(mean_h[i]),
                               {b: costs[n][b] for b in candidates}, bits[n], n in fixed)
                   for i, n in enumerate(names))
    used = sum(weight_bytes(numel[n], bits[n]) for n in names)
    logger.info("mixed precision: %d of %d bytes (8-bit: %d); widths %s", used, budget, uniform8,
                {b: sum(1 for n in names if bits[n] == b) for b in sorted(set(bits.values()))})
    return MixedPrecisionChoice(layers, int(budget), int(round(used)), int(round(uniform8)))
