"""Label-free Hessian: Hutchinson estimates against exact Jacobians computed independently, per sample."""
from __future__ import annotations

import logging
import math
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from eptq_fx.config import HessianConfig
from eptq_fx.data import CalibSet
from eptq_fx.errors import HessianError
from eptq_fx.method.activation_hessian import label_free_hessian
from eptq_fx.method.weight_hessian import weight_hessian

NO_CACHE = HessianConfig(exact_small_outputs=False, cache_dir=None, batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: on a busy 2-core machine OpenMP threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # in-place right after a compare point must not corrupt its gradient
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.conv2(self.act(self.conv1(x)))), 1))


class Attention(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.k, self.v, self.proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)
        self.scale = 1 / math.sqrt(d)

    def forward(self, x):
        scores = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) * self.scale
        mixed = torch.matmul(torch.softmax(scores, dim=-1), self.v(x))
        return self.proj(mixed).mean(1)


Pair = namedtuple("Pair", "logits embedding")


class MultiOutput(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1, self.head_a, self.head_b = nn.Linear(6, 16), nn.Linear(16, 5), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        a, b = self.head_a(h), torch.tanh(self.head_b(h))
        if self.kind == "tuple":
            return a, (b, a.argmax(1))  # the integer leaf is not probed
        if self.kind == "dict":
            return {"a": a, "b": b}
        return Pair(a, b)


def _traced(model: nn.Module, seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    for p in model.parameters():  # re-draw so every model is reproducible whatever the init order
        nn.init.normal_(p, std=0.4)
    return torch.fx.symbolic_trace(model.eval())


# ----------------------------------------------------------------------------------------- exact reference


class _Capture(torch.fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


class _Substitute(torch.fx.Interpreter):
    """Runs the graph with one node's value replaced: f as a function of that activation."""

    def __init__(self, gm, name, value):
        super().__init__(gm)
        self.name, self.value = name, value

    def run_node(self, n):
        return self.value.clone() if n.name == self.name else super().run_node(n)


def _activations(gm, x) -> dict:
    cap = _Capture(gm)
    cap.values = {}
    with torch.no_grad():
        cap.run(x)
    return cap.values


def _jacobian(gm, x, name) -> torch.Tensor:
    """Per-sample Jacobian of all floating outputs (stacked) w.r.t. the activation: (N, outputs, elements)."""
    acts = _activations(gm, x)[name]

    def f(a, xn):  # one sample, run with a batch of one
        leaves, _ = tree_flatten(_Substitute(gm, name, a[None]).run(xn[None]))
        return torch.cat([t.reshape(-1) for t in leaves if t.is_floating_point()])

    jac = torch.func.vmap(torch.func.jacrev(f))(acts, x)
    return jac.detach().reshape(x.shape[0], -1, acts[0].numel())


@dataclass
class Exact:
    trace: torch.Tensor  # (N, L) tr(JᵀJ)
    std: torch.Tensor  # (N, L) standard deviation of one Rademacher probe's estimate vᵀ J Jᵀ v


def _hutchinson_stats(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tr(JᵀJ) and the standard deviation of one Rademacher probe's vᵀ J Jᵀ v; J is (..., O, A)."""
    m = jac @ jac.transpose(-1, -2)  # J Jᵀ in output space
    diag = m.diagonal(dim1=-2, dim2=-1)
    # Var(vᵀMv) = 2 Σ_{i≠j} M_ij² for Rademacher v (Hutchinson's classical result).
    return diag.sum(-1), (2 * (m.pow(2).sum((-1, -2)) - diag.pow(2).sum(-1))).clamp_min(0).sqrt()


def _exact(gm, x, names) -> Exact:
    stats = [_hutchinson_stats(_jacobian(gm, x, name)) for name in names]
    return Exact(torch.stack([t for t, _ in stats], 1), torch.stack([s for _, s in stats], 1))


def _exact_trace(gm, x, names) -> torch.Tensor:
    return _exact(gm, x, names).trace


def _rel_err(estimate, exact):
    return (estimate - exact).abs() / exact


# ------------------------------------------------------------------------------------------------- tests


def _z_scores(scores: torch.Tensor, exact: Exact, probes: int) -> torch.Tensor:
    """Estimate errors in units of the Hutchinson standard error; entries whose estimator has no variance
    (e.g. J = I) must be exact."""
    noisy = exact.std > 1e-6 * exact.trace
    assert torch.allclose(scores[~noisy], exact.trace[~noisy], rtol=1e-5)
    return (scores - exact.trace)[noisy] / (exact.std[noisy] / math.sqrt(probes))


# (model, input shape of one sample, compare points): an MLP, a CNN and an attention block
SCORE_CASES = [
    (MLP(), (8,), ["fc1", "fc2", "fc3"]),
    (TinyCNN(), (3, 7, 7), ["conv1", "conv2", "fc"]),
    (Attention(), (5, 8), ["q", "matmul", "matmul_1", "proj"]),
]


@pytest.mark.parametrize("model, shape, names", SCORE_CASES)
def test_per_sample_scores_match_exact_trace(model, shape, names):
    gm = _traced(model)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(1))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None)  # defaults: one batch of 40, early stop
    result = label_free_hessian(gm, names, CalibSet((x,)), config, seed=0, progress=False)
    exact = _exact(gm, x, names)
    assert result.names == names and result.scores.shape == (40, len(names))
    assert result.scores.dtype == torch.float32
    assert config.min_probes <= result.n_probes < config.max_probes
    z = _z_scores(result.scores, exact, result.n_probes)
    assert float(z.abs().max()) < 5, z  # unbiased, with the precision Hutchinson promises, for every sample
    # Averaged over samples (how layers are weighted against each other) the estimate is within a few percent.
    assert torch.allclose(result.scores.mean(0), exact.trace.mean(0), rtol=0.05)


@pytest.mark.parametrize("model, shape, names", SCORE_CASES)
def test_small_outputs_are_probed_along_their_basis_exactly(model, shape, names):
    gm = _traced(model)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(1))
    result = label_free_hessian(gm, names, CalibSet((x,)), HessianConfig(cache_dir=None), progress=False)
    exact = _exact(gm, x, names)
    out_size = gm(x[:1]).numel()
    assert result.n_probes == out_size  # one backward pass per output element of a sample
    torch.testing.assert_close(result.scores, exact.trace, rtol=1e-4, atol=1e-6)
    # an output larger than the probe budget falls back to Hutchinson probes
    small_budget = HessianConfig(cache_dir=None, min_probes=2, max_probes=out_size - 1)
    fallback = label_free_hessian(gm, names, CalibSet((x,)), small_budget, progress=False)
    assert fallback.n_probes <= out_size - 1 and not torch.allclose(fallback.scores, exact.trace, rtol=1e-4)


@pytest.mark.parametrize("exact_small_outputs", [True, False])
def test_softmax_output_metric_gives_the_kl_hessian_trace(exact_small_outputs):
    gm = _traced(MLP())
    names = ["fc1", "fc2"]
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    config = HessianConfig(cache_dir=None, output_metric="softmax", exact_small_outputs=exact_small_outputs,
                           min_probes=100, max_probes=100)
    result = label_free_hessian(gm, names, CalibSet((x,)), config, progress=False)
    p = torch.softmax(gm(x).detach(), -1)
    metric = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, K, K): Hessian of KL at the prediction
    for j, name in enumerate(names):
        jac = _jacobian(gm, x, name)  # (N, K, D)
        want = torch.einsum("nkd,nkl,nld->n", jac, metric, jac)
        rtol = 1e-4 if exact_small_outputs else 0.25  # 100 probes: a few-% error on average, more per sample
        torch.testing.assert_close(result.scores[:, j], want, rtol=rtol, atol=1e-7)
        if not exact_small_outputs:
            assert abs(float(result.scores[:, j].mean() / want.mean()) - 1) < 0.05
    # the KL metric shrinks confident samples: their scores are below the plain tr(JᵀJ)
    plain = label_free_hessian(gm, names, CalibSet((x,)), HessianConfig(cache_dir=None), progress=False)
    assert bool((result.scores < plain.scores).all())


def test_softmax_output_metric_rejects_non_logit_outputs():
    gm = _traced(nn.Sequential(nn.Linear(8, 4)))  # (batch, tokens, features) output: no class axis to soften
    with pytest.raises(HessianError, match="logits"):
        label_free_hessian(gm, ["_0"], CalibSet((torch.randn(4, 5, 8),)),
                           HessianConfig(cache_dir=None, output_metric="softmax"), progress=False)


@pytest.mark.parametrize("model, shape, names", [
    (MLP(), (8,), ["fc1", "fc2"]),
    (Attention(), (5, 8), ["k", "matmul"]),
])
def test_error_shrinks_as_hutchinson_predicts_at_max_probes(model, shape, names):
    gm = _traced(model)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(2))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, min_probes=100, max_probes=100, batch_size=16)
    result = label_free_hessian(gm, names, CalibSet((x,)), config, seed=1, progress=False)
    assert result.n_probes == 100
    exact = _exact(gm, x, names)
    z = _z_scores(result.scores, exact, 100)
    assert float(z.abs().max()) < 5
    assert 0.6 < float(z.pow(2).mean().sqrt()) < 1.4  # the spread is the theoretical one, not more
    assert torch.allclose(result.scores.mean(0), exact.trace.mean(0), rtol=0.03)


def test_per_channel_scores_match_exact_and_sum_to_the_layer_score():
    gm = _traced(TinyCNN())
    x = torch.randn(16, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, min_probes=100, max_probes=100, batch_size=8)
    result = label_free_hessian(gm, ["conv1", "conv2"], CalibSet((x,)), config, per_channel=True,
                                progress=False)
    for i, name in enumerate(["conv1", "conv2"]):
        channels = result.per_channel[name]
        jac = _jacobian(gm, x, name)  # (N, O, C·H·W): a channel's score is vᵀ J_c J_cᵀ v
        n, outputs, c = jac.shape[0], jac.shape[1], channels.shape[1]
        trace, std = _hutchinson_stats(jac.reshape(n, outputs, c, -1).transpose(1, 2))
        assert channels.shape == trace.shape == (16, c)
        assert torch.allclose(channels.sum(1), result.scores[:, i], rtol=1e-5)
        z = (channels - trace) / (std / 10)
        assert float(z.abs().max()) < 5 and 0.6 < float(z.pow(2).mean().sqrt()) < 1.4


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple"])
def test_multi_output_matches_stacked_jacobian(kind):
    gm = _traced(MultiOutput(kind))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    names = ["fc1", "head_a", "head_b"]
    # 4 batches, each with its own early stop
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, batch_size=8)
    result = label_free_hessian(gm, names, CalibSet((x,)), config, progress=False)
    exact = _exact(gm, x, names)
    # Every batch used at least min_probes probes, so that standard error bounds each sample's error.
    assert float(_z_scores(result.scores, exact, config.min_probes).abs().max()) < 5
    assert torch.allclose(result.scores.mean(0), exact.trace.mean(0), rtol=0.05)
    # head_a's Jacobian is the identity on the 5 logits: tr = 5 exactly, whatever the probes.
    assert torch.allclose(result.scores[:, 1], torch.full((32,), 5.0))


def test_gaussian_probes_are_unbiased():
    gm = _traced(MLP())
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, probe="gaussian", min_probes=100, max_probes=100)
    result = label_free_hessian(gm, ["fc1", "fc2"], CalibSet((x,)), config, progress=False)
    exact = _exact_trace(gm, x, ["fc1", "fc2"])
    assert result.n_probes == 100
    assert torch.allclose(result.scores.mean(0), exact.mean(0), rtol=0.05)


class ScalarHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("min_probes", [4, 12])
def test_early_stop_on_zero_variance_respects_min_probes(min_probes):
    # One output per sample: v = ±1, so ‖Jᵀv‖² is exact on every probe and the running mean never moves.
    gm = _traced(ScalarHead())
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(5))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, min_probes=min_probes, max_probes=50,
                           batch_size=8)
    result = label_free_hessian(gm, ["fc1", "fc2"], CalibSet((x,)), config, progress=False)
    assert result.n_probes == max(min_probes, 4)  # 3 consecutive relative changes need 4 probes
    assert torch.allclose(result.scores, _exact_trace(gm, x, ["fc1", "fc2"]), rtol=1e-5)


def test_noisy_case_runs_to_max_probes_with_tiny_tol():
    gm = _traced(MLP())
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(6))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, min_probes=2, max_probes=15, tol=1e-9)
    assert label_free_hessian(gm, ["fc1"], CalibSet((x,)), config, progress=False).n_probes == 15
    early = label_free_hessian(gm, ["fc1"], CalibSet((x,)), HessianConfig(exact_small_outputs=False, cache_dir=None),
                               progress=False)
    assert 10 <= early.n_probes < 100


class ArgmaxHead(MLP):
    def forward(self, x):
        return super().forward(x).argmax(1)


class Disconnected(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.side, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        side = self.side(x)  # computed, but the output ignores it
        return self.fc2(self.fc1(x)), side.detach()


def test_argmax_output_raises():
    gm = _traced(ArgmaxHead())
    with pytest.raises(HessianError, match="argmax"):
        label_free_hessian(gm, ["fc1"], CalibSet((torch.randn(4, 8),)), NO_CACHE, progress=False)


class FloorHead(MLP):
    def forward(self, x):
        return torch.floor(super().forward(x))  # differentiable op whose gradient is zero everywhere


def test_output_that_ignores_the_compare_points_raises(caplog):
    gm = _traced(Disconnected())
    calib = CalibSet((torch.randn(6, 4),))
    with pytest.raises(HessianError, match="depends on the compare points"):
        label_free_hessian(gm, ["side"], calib, NO_CACHE, progress=False)
    with pytest.raises(HessianError, match="Every Hessian score is zero"):
        label_free_hessian(_traced(FloorHead()), ["fc1"], CalibSet((torch.randn(6, 8),)), NO_CACHE,
                           progress=False)
    with caplog.at_level(logging.WARNING, logger="eptq_fx.method.activation_hessian"):
        result = label_free_hessian(gm, ["fc1", "side"], calib, NO_CACHE, progress=False)
    assert (result.scores[:, 1] == 0).all() and (result.scores[:, 0] > 0).all()
    assert "side" in caplog.text


def test_unknown_or_duplicate_compare_point_raises():
    gm = _traced(MLP())
    calib = CalibSet((torch.randn(4, 8),))
    with pytest.raises(HessianError, match="fc9"):
        label_free_hessian(gm, ["fc9"], calib, NO_CACHE, progress=False)
    with pytest.raises(HessianError, match="duplicates"):
        label_free_hessian(gm, ["fc1", "fc1"], calib, NO_CACHE, progress=False)


def test_model_is_left_untouched():
    model = TinyCNN()
    gm = _traced(model)
    gm.conv1.weight.requires_grad_(False)  # a mix of flags, all of which must survive
    gm.train()
    before = {n: (p.clone(), p.requires_grad) for n, p in gm.named_parameters()}
    code, n_nodes = gm.code, len(gm.graph.nodes)
    x = torch.randn(4, 3, 7, 7)
    label_free_hessian(gm, ["conv1", "fc"], CalibSet((x,)), NO_CACHE, progress=False)
    weight_hessian(gm, ["conv1", "fc"], CalibSet((x,)), NO_CACHE, progress=False)
    assert gm.code == code and len(gm.graph.nodes) == n_nodes
    assert all(m.training for m in gm.modules())
    for n, p in gm.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None


def test_seed_determinism_and_cache_hit(tmp_path, caplog):
    gm = _traced(MLP())
    calib = CalibSet((torch.randn(12, 8, generator=torch.Generator().manual_seed(7)),))
    config = HessianConfig(exact_small_outputs=False, cache_dir=str(tmp_path / "cache"), max_probes=20)
    first = label_free_hessian(gm, ["fc1", "fc2"], calib, config, seed=3, per_channel=True, progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    with caplog.at_level(logging.INFO, logger="eptq_fx.method.activation_hessian"):
        second = label_free_hessian(gm, ["fc1", "fc2"], calib, config, seed=3, per_channel=True,
                                    progress=False)
    assert "cache hit" in caplog.text
    assert torch.equal(first.scores, second.scores) and first.n_probes == second.n_probes
    assert torch.equal(first.per_channel["fc2"], second.per_channel["fc2"])
    fresh = label_free_hessian(gm, ["fc1", "fc2"], calib,
                               HessianConfig(exact_small_outputs=False, cache_dir=None, max_probes=20),
                               seed=3, per_channel=True, progress=False)
    assert torch.equal(first.scores, fresh.scores)  # the cache returns what a recomputation gives
    other_seed = label_free_hessian(gm, ["fc1", "fc2"], calib, config, seed=4, progress=False)
    assert not torch.equal(first.scores, other_seed.scores)
    with torch.no_grad():
        gm.fc2.weight.mul_(2)  # new weights: a new cache entry, not a stale hit
    changed = label_free_hessian(gm, ["fc1", "fc2"], calib, config, seed=3, progress=False)
    assert not torch.allclose(changed.scores, first.scores)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    wh_first = weight_hessian(gm, ["fc1", "fc2"], calib, config, seed=3, progress=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eptq_fx.method.activation_hessian"):
        wh_second = weight_hessian(gm, ["fc1", "fc2"], calib, config, seed=3, progress=False)
    assert "cache hit" in caplog.text
    assert all(torch.equal(wh_first[n], wh_second[n]) for n in ["fc1", "fc2"])
    assert not list((tmp_path / "cache").glob("*.tmp*"))  # atomic writes leave no temporaries behind


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvZoo(nn.Module):
    """Grouped conv, a conv called twice (one weight, two gradients), Conv1d, and a 'same'-padded conv that
    has no per-sample rule (batched fallback)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.shared = nn.Conv2d(4, 4, 1)
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.line = nn.Conv1d(4, 3, 3, dilation=2)
        self.head = nn.Linear(3 * 12, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.grouped(torch.tanh(self.stem(x)))))))
        h = torch.tanh(self.same(h)).flatten(2)  # (B, 4, 16)
        return self.head(torch.tanh(self.line(h)).flatten(1))


def _exact_weight_stats(gm, x, name, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: mean_n Σ_o (∂f_{n,o}/∂W)², and the std of one probe's estimate (Σ_{n,o} v_{n,o} J_{n,o})²
    for every group of ``batch_size`` samples (1: per-sample terms)."""
    params = {n: p.detach() for n, p in gm.named_parameters()}

    def f(w, xn):
        leaves, _ = tree_flatten(torch.func.functional_call(gm, {**params, f"{name}.weight": w}, (xn[None],)))
        return torch.cat([t.reshape(-1) for t in leaves])

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params[f"{name}.weight"], x).detach()
    sq = jac.pow(2)  # (N, O, *W)
    grouped = sq.reshape(-1, batch_size * sq.shape[1], *sq.shape[2:])  # a batch's (sample, output) pairs
    # (Σ_i v_i J_i)² has variance 2 Σ_{i≠j} J_i² J_j² per element.
    var = 2 * (grouped.sum(1).pow(2) - grouped.pow(2).sum(1))
    return sq.sum(1).mean(0), var.clamp_min(0).sqrt()


def _weight_z(estimate, exact, std, n_samples, probes):
    se = std.pow(2).sum(0).sqrt() / (n_samples * math.sqrt(probes))
    noisy = se > 1e-6 * exact
    assert torch.allclose(estimate[~noisy], exact[~noisy], rtol=1e-4)  # no variance: must be exact
    return (estimate - exact)[noisy] / se[noisy]


def test_weight_hessian_matches_exact_diagonal():
    gm = _traced(TwoLayer())
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(8))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, batch_size=32)  # defaults: 64 samples, 16 probes
    result = weight_hessian(gm, ["fc1", "fc2"], CalibSet((x,)), config, progress=False)
    for name in ["fc1", "fc2"]:
        exact, std = _exact_weight_stats(gm, x[:64], name)
        assert result[name].shape == gm.get_submodule(name).weight.shape
        z = _weight_z(result[name], exact, std, 64, 16)
        # fc2 feeds the output directly: one output per weight row, so every probe is exact.
        assert z.numel() == (exact.numel() if name == "fc1" else 0)
        if z.numel():
            assert float(z.abs().max()) < 5
            assert float(((result[name] - exact).abs() / exact).median()) < 0.05


def test_weight_hessian_conv_kinds_and_batched_fallback(caplog):
    gm = _traced(ConvZoo())
    x = torch.randn(24, 2, 8, 8, generator=torch.Generator().manual_seed(9))
    names = ["stem", "grouped", "shared", "same", "line", "head"]
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, batch_size=4, weight_samples=24, weight_probes=64)
    with caplog.at_level(logging.INFO, logger="eptq_fx.method.weight_hessian"):
        result = weight_hessian(gm, names, CalibSet((x,)), config, progress=False)
    assert "['same']" in caplog.text  # the one module without a per-sample rule, and said so
    for name in names:
        batch = config.batch_size if name == "same" else 1  # batched fallback: a batch is one draw
        exact, std = _exact_weight_stats(gm, x, name, batch)
        z = _weight_z(result[name], exact, std, 24, 64)
        assert name == "head" or float(z.abs().max()) < 5, name  # head: one output per row, checked exact


class Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), nn.Linear(3 * 4 * 2 * 4, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_weight_hessian_conv3d_per_sample():
    gm = _traced(Volume())
    x = torch.randn(12, 2, 3, 3, 3, generator=torch.Generator().manual_seed(10))
    config = HessianConfig(exact_small_outputs=False, cache_dir=None, batch_size=5, weight_samples=12, weight_probes=32)
    result = weight_hessian(gm, ["conv"], CalibSet((x,)), config, progress=False)
    exact, std = _exact_weight_stats(gm, x, "conv")
    assert float(_weight_z(result["conv"], exact, std, 12, 32).abs().max()) < 5


def test_weight_hessian_rejects_module_without_weight():
    gm = _traced(TwoLayer())
    with pytest.raises(HessianError, match="nope"):
        weight_hessian(gm, ["nope"], CalibSet((torch.randn(4, 6),)), NO_CACHE, progress=False)
