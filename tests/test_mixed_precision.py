"""Mixed precision under a weight-memory budget: the exact knapsack, the budget honoured end to end, the
choice following the Hessian-weighted error."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import eptq_fx
from eptq_fx import ConfigError, EPTQConfig
from eptq_fx.mixed_precision import solve_knapsack
from examples.models import example_input, make_model


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, widths = 6, (2, 4, 8)
    numel = rng.integers(10, 500, n_layers)
    sizes = [{b: n * b / 8 for b in widths} for n in numel]
    costs = [{b: float(rng.random() * 2.0 ** (-b) * n) for b in widths} for n in numel]
    budget = float(sum(numel) * rng.uniform(2.5, 6) / 8)
    best = min((c for c in itertools.product(widths, repeat=n_layers)
                if sum(s[b] for s, b in zip(sizes, c)) <= budget),
               key=lambda c: sum(k[b] for k, b in zip(costs, c)))
    got = solve_knapsack(sizes, costs, budget)
    assert sum(s[b] for s, b in zip(sizes, got)) <= budget
    assert sum(k[b] for k, b in zip(costs, got)) == pytest.approx(sum(k[b] for k, b in zip(costs, best)))


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(ConfigError, match="weight_memory"):
        solve_knapsack([{2: 10.0, 8: 40.0}], [{2: 1.0, 8: 0.0}], 5.0)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1kb"])
def test_weight_memory_is_validated(bad):
    with pytest.raises(ConfigError, match="weight_memory"):
        EPTQConfig(weight_memory=bad)


@pytest.mark.parametrize("width_cost", ["error_feedback", "network_output"])
def test_budget_is_met_and_the_report_shows_the_choice(width_cost):
    model = make_model("tiny_resnet")
    x = example_input("tiny_resnet", batch_size=64)
    config = EPTQConfig(method="rtn", weight_memory=0.45, hessian=eptq_fx.HessianConfig(max_probes=20),
                        width_cost=width_cost)
    q = eptq_fx.quantize(model, x, config, progress=False)
    rep = eptq_fx.report(q)
    mp = rep["mixed_precision"]
    layers = {r["name"]: r for r in rep["layers"] if r["weight_bits"] is not None}
    numel = {n: m.weight.numel() for n, m in model.named_modules() if n in layers}
    used = sum(numel[n] * r["weight_bits"] / 8 for n, r in layers.items())
    assert used <= mp["budget_bytes"] == int(0.45 * sum(numel.values()))
    assert mp["used_bytes"] == int(used) == rep["totals"]["quantized_weight_bytes"]
    chosen = {c["name"]: c["bits"] for c in mp["layers"]}
    assert chosen == {n: r["weight_bits"] for n, r in layers.items()}  # the quantized model has those widths
    assert len(set(chosen.values())) > 1  # 45% of the 8-bit size forces a mix
    # every free layer's cost falls with more bits, and the first/last layer stays at 8
    first, *_, last = layers
    assert chosen[first] == chosen[last] == 8
    for c in mp["layers"]:
        widths = sorted(int(b) for b in c["costs"])
        assert widths == list(EPTQConfig().weight_candidates)
        costs = [c["costs"][str(b)] for b in widths]
        assert all(a >= b for a, b in zip(costs, costs[1:]))


def test_generous_budget_gives_eight_bits_everywhere():
    model = make_model("small_cnn")
    x = torch.randn(32, 3, 8, 8)
    q = eptq_fx.quantize(model, x, EPTQConfig(method="rtn", weight_bits=4, weight_memory=1.0), progress=False)
    assert all(r["weight_bits"] == 8 for r in eptq_fx.report(q)["layers"] if r["weight_bits"])


def _obq_reference(w: np.ndarray, scale: np.ndarray, bits: int, h: np.ndarray) -> np.ndarray:
    """Optimal brain quantization written the long way: after rounding column j, move the remaining columns by
    −e·H⁻¹[j, :]/H⁻¹[j, j] and remove j from H⁻¹ (a rank-one downdate). The function under test does the same
    through one Cholesky factor of H⁻¹."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    w = w.astype(np.float64).copy()
    q = np.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = np.clip(np.round(w[:, j] / scale), qmin, qmax) * scale
        e = w[:, j] - q[:, j]
        w[:, j:] -= np.outer(e / hinv[j, j], hinv[j, j:])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


@pytest.mark.parametrize("bits", [2, 4])
def test_error_feedback_rounding_matches_the_long_form(bits):
    from eptq_fx.mixed_precision import FeedbackFactor, error_feedback_round

    rng = np.random.default_rng(bits)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))  # correlated inputs
    w = rng.normal(size=(5, 12))
    scale = np.abs(w).max(1) / (2 ** (bits - 1) - 1)
    h = x.T @ x
    got = error_feedback_round(torch.from_numpy(w), torch.from_numpy(scale), bits,
                               FeedbackFactor.of(torch.from_numpy(h))).numpy()
    np.testing.assert_allclose(got, _obq_reference(w, scale, bits, h), atol=1e-9)
    rtn = np.clip(np.round(w / scale[:, None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale[:, None]
    assert np.sum(((w - got) @ x.T) ** 2) < np.sum(((w - rtn) @ x.T) ** 2)  # the point of it: a smaller output error


def test_error_feedback_rounding_of_several_widths_in_blocks_matches_the_long_form(monkeypatch):
    """All widths in one pass, with the columns after each block of 5 updated by one matrix product (12 columns:
    two full blocks and a partial one): each width equals its own long-form rounding."""
    import eptq_fx.mixed_precision as mp

    monkeypatch.setattr(mp, "FEEDBACK_BLOCK", 5)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    w = rng.normal(size=(6, 12))
    h = x.T @ x
    widths = [2, 3, 4]
    scales = [np.abs(w).max(1) / (2 ** (b - 1) - 1) for b in widths]
    got = mp.error_feedback_round_widths(torch.from_numpy(w), [torch.from_numpy(s) for s in scales], widths,
                                         mp.FeedbackFactor.of(torch.from_numpy(h)))
    for q, s, b in zip(got, scales, widths):
        np.testing.assert_allclose(q.numpy(), _obq_reference(w, s, b, h), atol=1e-9)


def test_error_feedback_cost_is_below_round_to_nearest():
    """On a real graph the error-feedback estimate of every conv/linear layer's output error is at most the
    round-to-nearest one (it starts from the same grid and only compensates), and clearly below it at 2 bits."""
    from eptq_fx.config import WidthCost
    from eptq_fx.data import CalibSet
    from eptq_fx.graph.passes.qdq_insertion import weight_ops
    from eptq_fx.mixed_precision import _output_errors

    model = make_model("tiny_resnet")
    x = example_input("tiny_resnet", batch_size=64)
    prepared = eptq_fx.prepare(model, EPTQConfig())
    ops = weight_ops(prepared)
    calib = CalibSet((x,))
    rtn = _output_errors(prepared, ops, calib, (2, 4), 50, WidthCost.ROUND_TO_NEAREST)
    fb = _output_errors(prepared, ops, calib, (2, 4), 50, WidthCost.ERROR_FEEDBACK)
    for name in ops:
        for b in (2, 4):
            assert fb[name][b] <= rtn[name][b] * 1.05
    assert sum(fb[n][2] for n in ops) < 0.9 * sum(rtn[n][2] for n in ops)


def test_width_cost_is_validated_and_accepts_its_value():
    from eptq_fx import WidthCost

    assert EPTQConfig(width_cost="round_to_nearest").width_cost is WidthCost.ROUND_TO_NEAREST
    assert EPTQConfig().width_cost is WidthCost.ERROR_FEEDBACK
    with pytest.raises(ConfigError, match="width_cost"):
        EPTQConfig(width_cost="gptq")


def test_network_output_cost_is_the_output_change_of_the_float_model_with_one_layer_rounded():
    """WidthCost.NETWORK_OUTPUT: each layer's cost at a width is ‖f(x; W_l → Q_b) − f(x)‖², checked against the
    user's float nn.Module with that one weight replaced by its error-feedback rounding (error_feedback_round is
    checked against the long form above); the prepared graph's weights are left as they were."""
    import copy

    from eptq_fx.config import WidthCost
    from eptq_fx.data import CalibSet
    from eptq_fx.graph.passes.qdq_insertion import weight_ops
    from eptq_fx.mixed_precision import FeedbackFactor, _input_columns, _network_errors, error_feedback_round
    from eptq_fx.numerics import kernels
    from eptq_fx.numerics.calibration import quant_disabled
    from eptq_fx.numerics.quantizers import weight_as_rows

    torch.manual_seed(0)
    # no BatchNorm: the prepared weights are the model's own, so they can be swapped into the nn.Module
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(48, 3, 8, 8)
    prepared = eptq_fx.prepare(model, EPTQConfig())
    ops = weight_ops(prepared)
    before = {n: op.weight.detach().clone() for n, op in ops.items()}
    got = _network_errors(prepared, ops, CalibSet((x,)), (2, 4), 50)
    assert all(torch.equal(op.weight, before[n]) for n, op in ops.items())
    with torch.no_grad():
        f = model(x)
        for name, op in ops.items():
            inputs = []
            h = op.register_forward_pre_hook(lambda m, a, seen=inputs: seen.append(a[0].detach()))
            with quant_disabled(prepared):
                prepared(x)
            h.remove()
            xin = inputs[0]
            w = op.weight.detach()
            for b in (2, 4):
                scale = torch.as_tensor(kernels.search_weight_scale(weight_as_rows(w, 0).numpy(), b, n_grid=50))
                cols = _input_columns(op.op, xin).double()
                wq = error_feedback_round(weight_as_rows(w, 0), scale, b,
                                          FeedbackFactor.of(cols.T @ cols)).float().reshape(w.shape)
                m = copy.deepcopy(model)
                m.get_submodule(name).weight.copy_(wq)
                want = float((m(x) - f).pow(2).flatten(1).sum(1).mean())
                assert got[name][b] == pytest.approx(want, rel=1e-4, abs=1e-9)
            assert got[name][2] > got[name][4]
    assert WidthCost("network_output") is WidthCost.NETWORK_OUTPUT
