"""The per-element weight Hessian E_n E_v (∂ vᵀf(x_n)/∂W)², label-free, for Hessian-weighted MSE thresholds.

E_v (∂ vᵀf(x_n)/∂W)² must be averaged per sample. A batched backward gives (Σ_n g_n)², which has the right
mean (the cross terms vanish in expectation) but keeps them as noise: the batch then counts as one draw, not
as N. For Linear / Conv1d-3d the per-sample weight gradient follows cheaply from the layer's input and the
gradient at its output, so those get exact per-sample terms from one batched backward; other
module types (and convs with string padding or non-zero padding modes) fall back to the batched estimate.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.fx
from torch.func import functional_call

from eptq_fx.config import HessianConfig
from eptq_fx.data import CalibSet
from eptq_fx.errors import HessianError
from eptq_fx.method.activation_hessian import (
    _cache_key,
    _cache_load,
    _cache_store,
    _differentiable_leaves,
    _draw_probes,
    _no_output_dependence,
    _probe_batches,
    _probe_module,
)

logger = logging.getLogger(__name__)

_CONV_WEIGHT_GRAD = {torch.nn.Conv1d: torch.nn.grad.conv1d_weight,
                     torch.nn.Conv2d: torch.nn.grad.conv2d_weight,
                     torch.nn.Conv3d: torch.nn.grad.conv3d_weight}


def _call_sites(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]


def _has_per_sample_rule(module: torch.nn.Module, sites: list[torch.fx.Node]) -> bool:
    # Exact types only: a subclass may have its own forward.
    kind = type(module)
    if not sites or (kind is not torch.nn.Linear and kind not in _CONV_WEIGHT_GRAD):
        return False
    if kind in _CONV_WEIGHT_GRAD and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        return False  # 'same' may pad asymmetrically, other modes pad with data: no plain weight-grad call
    return all(len(s.args) == 1 and not s.kwargs and isinstance(s.args[0], torch.fx.Node) for s in sites)


def _per_sample_weight_grad(module: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B, *weight.shape): each sample's gradient of the weight, from the layer input and output gradient."""
    b = x.shape[0]
    if type(module) is torch.nn.Linear:
        x, delta = x.reshape(b, -1, x.shape[-1]), delta.reshape(b, -1, delta.shape[-1])  # (B, tokens, feat)
        return torch.bmm(delta.transpose(1, 2), x)
    # Folding the batch into the channel groups turns B convolutions into one grouped one, whose weight
    # gradient is the stack of the per-sample gradients.
    weight = module.weight
    grad = _CONV_WEIGHT_GRAD[type(module)](
        x.reshape(1, -1, *x.shape[2:]), (b * weight.shape[0], *weight.shape[1:]),
        delta.reshape(1, -1, *delta.shape[2:]), stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=b * module.groups)
    return grad.reshape(b, *weight.shape)


def _accumulate_per_sample(probe_gm, params, inputs, modules, sites, points, sums, config, gen) -> None:
    out, acts = functional_call(probe_gm, params, inputs)
    value = dict(zip(points, acts))
    leaves = _differentiable_leaves(out)
    if not leaves:
        raise _no_output_dependence("weights")
    outputs = list(dict.fromkeys(s.name for site_list in sites.values() for s in site_list))
    for k in range(config.weight_probes):
        grads = torch.autograd.grad(leaves, [value[o] for o in outputs],
                                    grad_outputs=_draw_probes(leaves, config.probe, gen),
                                    retain_graph=k < config.weight_probes - 1, allow_unused=True)
        delta = dict(zip(outputs, grads))
        for name, site_list in sites.items():
            # A module called several times has one weight: its gradient is the sum over the calls.
            parts = [_per_sample_weight_grad(modules[name], value[s.args[0].name].detach().float(),
                                             delta[s.name].float())
                     for s in site_list if delta[s.name] is not None]
            if parts:
                sums[name] += sum(parts).pow(2).sum(0)


def _accumulate_batched(gm, params, inputs, names, sums, config, gen) -> None:
    weights = {name: params[f"{name}.weight"].detach().requires_grad_() for name in names}
    leaves = _differentiable_leaves(functional_call(
        gm, {**params, **{f"{n}.weight": w for n, w in weights.items()}}, inputs))
    if not leaves:
        raise _no_output_dependence("weights")
    for k in range(config.weight_probes):
        grads = torch.autograd.grad(leaves, list(weights.values()),
                                    grad_outputs=_draw_probes(leaves, config.probe, gen),
                                    retain_graph=k < config.weight_probes - 1, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                sums[name] += g.detach().float().pow(2)


def weight_hessian(gm: torch.fx.GraphModule, module_names: Sequence[str], calib: CalibSet,
                   config: HessianConfig, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-element E_n E_v (∂ vᵀf(x_n) / ∂W)² for each named module's ``.weight`` (same shape as the weight).

    Uses the first ``weight_samples`` samples and ``weight_probes`` probes per sample. Works on detached
    copies of the parameters in eval mode, so the user's parameters, requires_grad flags and training flags
    are untouched. Linear / Conv1d-3d get exact per-sample terms; other modules a batched estimate."""
    names = list(module_names)
    modules = dict(gm.named_modules())
    params = {n: p.detach() for n, p in gm.named_parameters()}
    for name in names:
        if f"{name}.weight" not in params:
            raise HessianError(f"Module {name!r} has no weight parameter; pass conv/linear module names.")
    subset = CalibSet(calib.take(torch.arange(min(config.weight_samples, calib.n))))
    key = None
    if config.cache_dir is not None:
        key = _cache_key("weight", gm, names, subset, config, seed, None)
        hit = _cache_load(config, key)
        if hit is not None:
            return hit
    start = time.perf_counter()
    sites = {name: _call_sites(gm, name) for name in names}
    exact = {name: sites[name] for name in names if _has_per_sample_rule(modules[name], sites[name])}
    batched = [name for name in names if name not in exact]
    if batched:
        logger.info("weight Hessian of %s uses batched probes (noisier): no per-sample rule for them",
                    batched)
    # The probing graph exposes each call's input (for the outer product) and output (for the gradient).
    calls = [s for site_list in exact.values() for s in site_list]
    points = list(dict.fromkeys(n for s in calls for n in (s.args[0].name, s.name)))
    probe_gm = _probe_module(gm, points) if exact else None
    sums = {name: torch.zeros_like(params[f"{name}.weight"], dtype=torch.float32) for name in names}
    gen = torch.Generator().manual_seed(seed)
    for _, inputs in _probe_batches(gm, subset, config.batch_size, "weight Hessian", progress):
        if exact:
            _accumulate_per_sample(probe_gm, params, inputs, modules, exact, points, sums, config, gen)
        if batched:
            _accumulate_batched(gm, params, inputs, batched, sums, config, gen)
    result = {name: (sums[name] / (subset.n * config.weight_probes)).cpu() for name in names}
    zero = [n for n, h in result.items() if not bool((h != 0).any())]
    if len(zero) == len(names):
        raise HessianError("Every weight Hessian entry is zero: the model output does not depend on these "
                           "weights.")
    if zero:
        logger.warning("weight Hessian is zero for %s: these modules do not influence the output.", zero)
    logger.info("weight Hessian: %d modules, %d samples, %d probes, %.1f s", len(names), subset.n,
                config.weight_probes, time.perf_counter() - start)
    if key is not None:
        _cache_store(config, key, result)
    return result
