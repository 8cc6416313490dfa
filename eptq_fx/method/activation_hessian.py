"""The label-free Hessian of EPTQ, estimated with Hutchinson probes.

For a compare point a_l (the output of a quantized conv / linear / matmul) the score is tr(J_lᵀ J_l) with
J_l = ∂f(x)/∂a_l and f the model output itself: no labels, no loss. For a probe v shaped like the output with
E[v vᵀ] = I (Rademacher or Gaussian), E_v ‖J_lᵀ v‖² = tr(J_l J_lᵀ) = tr(J_lᵀ J_l). One backward pass of
Σ v ⊙ f(x) yields J_lᵀ v for every compare point at once, and because the samples of a batch are independent
in eval mode, the per-sample slice of that gradient gives per-sample scores from one batched backward.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import operator
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.fx
from torch.func import functional_call
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from eptq_fx.config import HessianConfig
from eptq_fx.data import CalibSet
from eptq_fx.errors import HessianError
from eptq_fx.graph.meta import BATCH_DIM

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the stored layout or the estimator changes
_CONSECUTIVE_CONVERGED = 3  # probes in a row whose relative change must stay below tol
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


@dataclass
class HessianScores:
    names: list[str]  # compare-point node names, in the order given
    scores: torch.Tensor  # (N_samples, L) float32: per-sample, per-layer tr(JᵀJ) estimate
    n_probes: int  # probes actually used: the maximum over batches (early stop)
    per_channel: dict[str, torch.Tensor] | None = None  # (N, C_l) per-channel scores, channel = dim 1


def _grad_point(x: torch.Tensor, name: str) -> torch.Tensor:
    """Make a compare point something autograd can differentiate with respect to.

    Parameters are detached during probing, so a tensor that does not require grad has no compare point
    upstream of it: turning it into a fresh leaf loses no gradient path."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise HessianError(f"Compare point {name!r} produced a {type(x).__name__} "
                           f"{getattr(x, 'dtype', '')}; the Hessian needs a floating-point tensor there.")
    return x if x.requires_grad else x.detach().requires_grad_()


def _mutates_input(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("inplace") is True or node.target in _INPLACE_OPERATORS:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _probe_module(gm: torch.fx.GraphModule, compare_points: Sequence[str]) -> torch.fx.GraphModule:
    """A new GraphModule, sharing gm's submodules, that returns (original output, (a_1, ..., a_L))."""
    if len(set(compare_points)) != len(compare_points):
        raise HessianError("The compare points contain duplicates; pass each node name once.")
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    missing = [p for p in compare_points if p not in by_name or by_name[p].op == "output"]
    if missing:
        raise HessianError(f"Compare point(s) {missing} are not value nodes of the graph; "
                           f"pass node names such as {[n for n in by_name][:5]}.")
    modules = dict(gm.named_modules())
    exposed = []
    for name in compare_points:
        node = by_name[name]
        users = list(node.users)
        with graph.inserting_after(node):
            point = graph.call_function(_grad_point, (node, name))
        # An in-place user would overwrite the very tensor we differentiate by: feed users a copy instead.
        feed = point
        if any(_mutates_input(u, modules) for u in users):
            with graph.inserting_after(point):
                feed = graph.call_method("clone", (point,))
        for user in users:
            user.replace_input_with(node, feed)
        exposed.append(point)
    output = next(n for n in graph.nodes if n.op == "output")
    original = output.args[0]
    with graph.inserting_before(output):
        graph.output((original, tuple(exposed)))
    graph.erase_node(output)
    codegen = graph._codegen
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):  # the output no longer has the traced structure
        info = codegen.pytree_info
        graph._codegen = torch.fx.graph._PyTreeCodeGen(info._replace(out_spec=None))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name="HessianProbe")


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (independent samples, no BatchNorm statistics updates), then the user's flags back."""
    flags = [(m, m.training) for m in module.modules()]
    if any(f for m, f in flags if m is not module):  # a traced root's own flag changes nothing
        logger.info("model is in training mode; the Hessian is computed in eval mode")
    module.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _probe_batches(gm: torch.fx.GraphModule, calib: CalibSet, batch_size: int, desc: str,
                   progress: bool) -> Iterator[tuple[torch.Tensor, tuple]]:
    """(sample indices, inputs on the model's device) per batch, with ``gm`` in eval mode and grad enabled."""
    device = _model_device(gm)
    with _eval_mode(gm), torch.enable_grad():
        for idx, inputs in tqdm(calib.batches(batch_size), total=math.ceil(calib.n / batch_size), desc=desc,
                                disable=not progress, leave=False):
            yield idx, (inputs if device is None else tuple(t.to(device) for t in inputs))


def _model_device(gm: torch.nn.Module) -> torch.device | None:
    for t in (*gm.parameters(), *gm.buffers()):
        return t.device
    return None


def _differentiable_leaves(out) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _draw_probes(leaves: list[torch.Tensor], kind: str, gen: torch.Generator) -> list[torch.Tensor]:
    """Probes are drawn on the CPU so that a seed gives the same probes on every device."""
    probes = []
    for t in leaves:
        if kind == "rademacher":
            v = torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1
        else:
            v = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
        probes.append(v.to(t.device))
    return probes


def _no_output_dependence(what: str) -> HessianError:
    return HessianError(f"The model output has no floating-point tensor that depends on the {what} (e.g. it "
                        f"ends in argmax or is detached); return the logits/features so the Hessian is "
                        f"defined, or quantize with ReconstructionConfig(hessian_weighting=False).")


# ---------------------------------------------------------------------------------------------- cache


def _cache_key(kind: str, gm: torch.fx.GraphModule, names: Sequence[str], calib: CalibSet,
               config: HessianConfig, seed: int, extra: object) -> str:
    h = hashlib.sha256()
    h.update(repr((_CACHE_FORMAT, kind, gm.code, list(names), calib.fingerprint(), seed, extra)).encode())
    # cache_dir only says where the result lives, not what it is.
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "cache_dir"}
    h.update(repr(settings).encode())
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_load(config: HessianConfig, key: str) -> dict | None:
    if config.cache_dir is None:
        return None
    path = Path(config.cache_dir) / f"{key}.pt"
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # damaged: recompute
        logger.warning("ignoring unreadable Hessian cache entry %s (%s: %s)", path, type(e).__name__, e)
        return None
    logger.info("Hessian cache hit: %s", path)
    return payload


def _cache_store(config: HessianConfig, key: str, payload: dict) -> None:
    if config.cache_dir is None:
        return
    directory = Path(config.cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{key}.pt.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, directory / f"{key}.pt")  # atomic: a reader never sees a half-written entry


# ---------------------------------------------------------------------------------------- activations


def _converged(history: list[float], k: int, config: HessianConfig) -> bool:
    return (k >= config.min_probes and len(history) >= _CONSECUTIVE_CONVERGED
            and all(c < config.tol for c in history[-_CONSECUTIVE_CONVERGED:]))


def _relative_change(new_mean: torch.Tensor, old_mean: torch.Tensor) -> float:
    """Largest relative change over layers, so that every layer (not just the biggest) has converged."""
    live = old_mean > 0
    if not bool(live.any()):
        return 0.0
    return float(((new_mean[live] - old_mean[live]).abs() / old_mean[live]).max())


def _batch_scores(probe_gm: torch.fx.GraphModule, params: dict, inputs: tuple, names: Sequence[str],
                  dims: Sequence[int | None], config: HessianConfig, gen: torch.Generator, per_channel: bool):
    """Per-sample (and per-channel) scores of one batch, and how many probes it took. ``dims``: the sample dim
    of each compare point (None: merged with another dim, so each sample gets the batch's mean score)."""
    out, acts = functional_call(probe_gm, params, inputs)
    leaves = _differentiable_leaves(out)
    if not leaves:
        raise _no_output_dependence("compare points")
    n = inputs[0].shape[0]
    for name, a, d in zip(names, acts, dims):
        if d is not None and (a.dim() <= d or a.shape[d] != n):
            raise HessianError(f"Compare point {name!r} has shape {tuple(a.shape)}, whose dim {d} is not the "
                               f"batch of {n}; per-sample scores need the samples on a dim of their own.")
    sums = [torch.zeros(n, device=a.device) for a in acts]
    channel_sums = [torch.zeros(n, a.shape[1] if a.dim() > 1 and d == 0 else 1, device=a.device)
                    for a, d in zip(acts, dims)]

    metric = _softmax_metric_root(leaves) if config.output_metric == "softmax" else None

    def accumulate(probes: list[torch.Tensor], keep_graph: bool) -> None:
        if metric is not None:
            probes = [metric(probes[0])]
        grads = torch.autograd.grad(leaves, acts, grad_outputs=probes, retain_graph=keep_graph, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None:  # this compare point does not reach the output: its score stays 0
                continue
            g = g.detach().float()
            if dims[i] is None:  # samples merged into another dim: every sample gets the batch mean
                sq = g.pow(2).sum().div(n).expand(n, 1)
            else:  # per channel only where dim 1 of a batch-first value is one
                g = g.movedim(dims[i], 0)
                sq = g.pow(2).reshape(n, g.shape[1] if g.dim() > 1 and dims[i] == 0 else 1, -1).sum(2)
            channel_sums[i] += sq
            sums[i] += sq.sum(1)

    size = _output_size(leaves, n) if config.exact_small_outputs else None
    if size is not None and size <= config.max_probes:
        # Σ_k ‖Jᵀe_k‖² over the K output directions is tr(JJᵀ) = tr(JᵀJ) exactly, in K backward passes: cheaper
        # and noise-free when each sample's output is small (10 logits), where random probes would need ~100
        # passes for per-sample scores as good
        for k, probes in enumerate(_output_basis(leaves, n), 1):
            accumulate(probes, keep_graph=k < size)
        k, denominator = size, 1
    else:
        history: list[float] = []
        old_mean = None
        k = 0
        for k in range(1, config.max_probes + 1):
            accumulate(_draw_probes(leaves, config.probe, gen), keep_graph=k < config.max_probes)
            new_mean = torch.stack([s.sum() for s in sums]) / k
            if old_mean is not None:
                history.append(_relative_change(new_mean, old_mean))
            old_mean = new_mean
            if _converged(history, k, config):
                break
        denominator = k
    scores = torch.stack(sums, dim=1) / denominator
    channels = [c / denominator for c in channel_sums] if per_channel else None
    return scores, channels, k


def _softmax_metric_root(leaves: list[torch.Tensor]):
    """u ↦ B u with B Bᵀ = diag(p) − ppᵀ, p = softmax of the logits: probing with B u turns E‖Jᵀv‖² into
    tr(Jᵀ (diag(p) − ppᵀ) J), the Hessian of the KL divergence to the model's own prediction (still label-free).
    B = diag(√p) − p √pᵀ: B Bᵀ = diag(p) − 2ppᵀ + p (Σp) pᵀ = diag(p) − ppᵀ."""
    if len(leaves) != 1 or leaves[0].dim() != 2:
        raise HessianError("output_metric='softmax' needs a single (batch, classes) logits output; got "
                           f"{[tuple(t.shape) for t in leaves]}.")
    p = torch.softmax(leaves[0].detach().float(), dim=-1)
    root = p.sqrt()

    def apply(u: torch.Tensor) -> torch.Tensor:
        su = root * u.float()
        return (su - p * su.sum(-1, keepdim=True)).to(u.dtype)

    return apply


def _output_size(leaves: list[torch.Tensor], n: int) -> int | None:
    """Elements of one sample's output, or None when an output leaf is not batch-first."""
    if any(t.dim() == 0 or t.shape[0] != n for t in leaves):
        return None
    return sum(t[0].numel() for t in leaves)


def _output_basis(leaves: list[torch.Tensor], n: int) -> Iterator[list[torch.Tensor]]:
    """The unit directions of one sample's output, each set in every sample of the batch at once (samples are
    independent in eval mode): one probe list per direction."""
    for j, t in enumerate(leaves):
        for e in range(t[0].numel()):
            probes = [torch.zeros(u.shape, dtype=u.dtype, device=u.device) for u in leaves]
            probes[j].view(n, -1)[:, e] = 1.0
            yield probes


def label_free_hessian(gm: torch.fx.GraphModule, compare_points: Sequence[str], calib: CalibSet,
                       config: HessianConfig, seed: int = 0, per_channel: bool = False,
                       progress: bool = True) -> HessianScores:
    """Per-sample, per-compare-point tr(JᵀJ) of the model output w.r.t. each compare point.

    ``gm`` is not modified: probing runs on a new GraphModule sharing its submodules, with detached copies of
    its parameters, in eval mode (training flags restored afterwards). Early stop per batch: after
    ``min_probes``, stop once the largest relative change over layers of the running mean of the batch's
    per-layer score stays below ``tol`` for 3 probes in a row. Raises HessianError when every score is
    zero."""
    names = list(compare_points)
    if not names:
        raise HessianError("No compare points given; pass the node names of the quantized layers' outputs.")
    probe_gm = _probe_module(gm, names)
    by_name = {n.name: n for n in gm.graph.nodes}
    dims = [by_name[name].meta.get(BATCH_DIM, 0) for name in names]  # graph/passes/batch_layout.py
    key = None
    if config.cache_dir is not None:
        key = _cache_key("activation", gm, names, calib, config, seed, per_channel)
        hit = _cache_load(config, key)
        if hit is not None:
            return HessianScores(hit["names"], hit["scores"], hit["n_probes"], hit["per_channel"])
    start = time.perf_counter()
    params = {n: p.detach() for n, p in gm.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    scores = torch.zeros(calib.n, len(names))
    channels: list[list[torch.Tensor]] = []
    probe_counts = []
    for idx, inputs in _probe_batches(gm, calib, config.batch_size, "label-free Hessian", progress):
        batch, batch_channels, k = _batch_scores(probe_gm, params, inputs, names, dims, config, gen,
                                                 per_channel)
        scores[idx] = batch.cpu()
        if batch_channels is not None:
            channels.append([c.cpu() for c in batch_channels])
        probe_counts.append(k)
    logger.debug("Hessian probes per batch: %s", probe_counts)
    _check_scores(scores, names)
    per_channel_scores = ({name: torch.cat([c[i] for c in channels]) for i, name in enumerate(names)}
                          if per_channel else None)
    result = HessianScores(names, scores, max(probe_counts), per_channel_scores)
    logger.info("label-free Hessian: %d layers, %d samples, %d probes (max over batches), %.1f s",
                len(names), calib.n, result.n_probes, time.perf_counter() - start)
    if key is not None:
        _cache_store(config, key, {"names": names, "scores": scores, "n_probes": result.n_probes,
                                   "per_channel": per_channel_scores})
    return result


def _check_scores(scores: torch.Tensor, names: Sequence[str]) -> None:
    if not bool(torch.isfinite(scores).all()):
        bad = [n for n, ok in zip(names, torch.isfinite(scores).all(0).tolist()) if not ok]
        raise HessianError(f"The Hessian scores of {bad} are NaN or Inf; check that the model output is "
                           f"finite on the calibration data.")
    if not bool((scores != 0).any()):
        raise HessianError("Every Hessian score is zero: the model output does not depend on any compare "
                           "point; return the logits/features (not argmax) and check that the compare "
                           "points reach it.")
    zero = [n for n, nz in zip(names, (scores != 0).any(0).tolist()) if not nz]
    if zero:
        logger.warning("Hessian scores are zero for %s: these compare points do not influence the output.",
                       zero)
