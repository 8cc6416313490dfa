"""EPTQ reconstruction: the soft-rounding quantizer, the schedules, and that it beats round-to-nearest."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import eptq_fx
from eptq_fx import ConfigError, EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.graph.meta import ActQuant
from eptq_fx.method.reconstruction import BlockParts, _Trainer, block_config, block_steps
from eptq_fx.numerics.quantizers import QuantWeightOp, WeightQuantizer, rectified_sigmoid
from examples.models import example_input, make_model


def _quantizer(w: torch.Tensor, bits: int = 4) -> WeightQuantizer:
    wq = WeightQuantizer(bits, w.shape[0], 0, w.dim())
    wq.set_scale_(w.abs().flatten(1).max(1).values / wq.qmax)
    return wq


def test_soft_rounding_starts_at_the_float_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3)
    wq = _quantizer(w)
    wq.init_soft_(w, -0.1, 1.1)
    # h(V) equals the fractional part (up to the 0.01 clamp that keeps the logit finite)
    frac = w / wq.scale.view(-1, 1, 1, 1) - torch.floor(w / wq.scale.view(-1, 1, 1, 1))
    inside = (frac > 0.01) & (frac < 0.99)
    assert torch.allclose(wq.soft_h()[inside], frac[inside], atol=1e-5)
    assert torch.allclose(wq(w)[inside], w[inside], atol=1e-5)


def test_hardened_codes_are_floor_plus_decision_and_match_forward():
    torch.manual_seed(1)
    w = torch.randn(4, 10)
    wq = _quantizer(w, bits=3)
    wq.init_soft_(w, -0.1, 1.1)
    with torch.no_grad():
        wq.alpha.normal_()
    wq.harden_()
    codes = wq.int_weight(w)
    expect = (wq.w_floor + (wq.alpha >= 0).float()).clamp(wq.qmin, wq.qmax)
    assert torch.equal(codes.float(), expect)
    assert torch.allclose(wq(w), codes.float() * wq.scale.view(-1, 1))
    # h >= 0.5 exactly when alpha >= 0: hardening rounds the soft value, it does not flip it
    h = rectified_sigmoid(wq.alpha, -0.1, 1.1)
    assert torch.equal(h >= 0.5, wq.alpha >= 0)


def test_beta_schedule_holds_then_anneals():
    rc = ReconstructionConfig(iters=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    trainer = _Trainer(BlockParts({}, {}, [], []), rc)
    assert trainer.beta(0) is None and trainer.beta(19) is None
    assert trainer.beta(20) == pytest.approx(20.0)
    assert trainer.beta(99) == pytest.approx(2.0 + 18.0 / 80, rel=1e-6)
    betas = [trainer.beta(s) for s in range(20, 100)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))


def _tiny_config(granularity: str = "block", **rc) -> EPTQConfig:
    return EPTQConfig(
        weight_bits=4, act_bits=4, first_last_8bit=False, n_calib=128, seed=0,
        hessian=HessianConfig(max_probes=8, min_probes=4, cache_dir=None),
        reconstruction=ReconstructionConfig(granularity=granularity, iters=rc.pop("iters", 150),
                                            batch_size=16, **rc),
    )


def _output_mse(model, q, x):
    with torch.no_grad():
        return float((model(x) - q(x)).pow(2).mean())


@pytest.mark.parametrize("granularity", ["block", "network"])
def test_eptq_beats_round_to_nearest(granularity):
    torch.manual_seed(0)
    model = make_model("tiny_resnet")
    x = example_input("tiny_resnet", batch_size=128, seed=3)
    x_test = example_input("tiny_resnet", batch_size=64, seed=4)
    # network mode spreads one step budget over the whole graph: give it the total the block mode uses
    cfg = _tiny_config(granularity, iters=150 if granularity == "block" else 600)
    rtn = eptq_fx.quantize(model, x, EPTQConfig(**{**cfg.__dict__, "method": "rtn"}), progress=False)
    eptq = eptq_fx.quantize(model, x, cfg, progress=False)
    e_rtn, e_eptq = _output_mse(model, rtn, x_test), _output_mse(model, eptq, x_test)
    assert math.isfinite(e_eptq)
    # a clear gain, not a fine one: over config seeds 0-3 the block-mode ratio spreads 0.70-0.82 (the QDrop masks)
    assert e_eptq < 0.85 * e_rtn, (e_rtn, e_eptq)


def test_uniform_weighting_and_hmse_run_and_change_the_result():
    model = make_model("small_cnn")
    x = example_input("small_cnn", batch_size=64, seed=5)
    base = _tiny_config(iters=40)
    variants = {
        "hessian": EPTQConfig(**{**base.__dict__, "reconstruction": ReconstructionConfig(
            iters=40, batch_size=16, hessian_weighting=True, hessian_per_channel=False, hessian_scope="all")}),
        "uniform": EPTQConfig(**{**base.__dict__, "reconstruction": ReconstructionConfig(
            iters=40, batch_size=16, hessian_weighting=False)}),
        "hmse": EPTQConfig(**{**base.__dict__, "weight_range": "hmse"}),
    }
    outs = {k: eptq_fx.quantize(model, x, c, progress=False)(x) for k, c in variants.items()}
    assert not torch.equal(outs["hessian"], outs["uniform"])
    assert not torch.equal(outs["hessian"], outs["hmse"])


def test_channel_profile_weights_each_channel_by_its_share_of_the_sample_trace():
    from eptq_fx.method.activation_hessian import HessianScores
    from eptq_fx.method.loss_weights import channel_profiles as _channel_profiles
    from eptq_fx.method.reconstruction import _distance

    # two samples, three channels; each sample's row is normalised to mean 1 over its channels
    per_channel = {"conv": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])}
    hs = HessianScores(["conv"], torch.ones(2, 1), 4, per_channel)
    parts = BlockParts({}, {}, [0], [])
    profile = _channel_profiles(hs, parts, ["conv"], ReconstructionConfig(hessian_per_channel=True))[0]
    torch.testing.assert_close(profile, torch.tensor([[0.5, 1.0, 1.5], [1.0, 1.0, 1.0]]))  # all-zero row: even
    assert _channel_profiles(hs, parts, ["conv"], ReconstructionConfig(hessian_per_channel=False))[0] is None
    # the distance weights the squared error of each sample's channel (dim 1) by the profile, summed per sample
    pred, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    target[1] *= 2.0
    torch.testing.assert_close(_distance(pred, target), torch.tensor([12.0, 48.0]))
    torch.testing.assert_close(_distance(pred, target, profile), torch.tensor([12.0, 48.0]))
    target[:, 2] = 0.0
    torch.testing.assert_close(_distance(pred, target, profile), torch.tensor([6.0, 32.0]))


def test_layer_weights_are_trace_per_element_normalised_by_the_block_maximum():
    from eptq_fx.method.loss_weights import layer_weights as _layer_weights

    # columns: three compare points of the graph; the block holds the 3rd and 1st (in that order)
    scores = torch.tensor([[4.0, 9.0, 8.0], [12.0, 9.0, 24.0]])
    parts = BlockParts({}, {}, [2, 0], [])
    w = _layer_weights(scores, parts, ReconstructionConfig(hessian_weighting=True, hessian_sample_power=1.0),
                       sizes=[8, 2])
    # tr/D: layer 3 -> [1, 3], layer 1 -> [2, 6]; largest mean over samples (layer 1: 4) -> 1
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.5], [0.75, 1.5]]))
    uniform = _layer_weights(scores, parts, ReconstructionConfig(hessian_weighting=False), sizes=[8, 2])
    torch.testing.assert_close(uniform, torch.ones(2, 2))
    # without sample attention every sample gets its layer's mean: layer 3 -> 2, layer 1 -> 4, over 4
    pooled = _layer_weights(scores, parts, ReconstructionConfig(hessian_weighting=True, hessian_per_sample=False),
                            sizes=[8, 2])
    torch.testing.assert_close(pooled, torch.tensor([[0.5, 1.0], [0.5, 1.0]]))


def test_tempered_sample_weights_match_numpy_and_keep_each_layers_mean():
    import numpy as np

    from eptq_fx.method.loss_weights import layer_weights as _layer_weights
    from eptq_fx.method.loss_weights import tempered

    rng = np.random.default_rng(0)
    s = rng.gamma(0.8, 2.0, size=(64, 3))
    for power in (0.0, 0.5, 1.0):
        r = (s / s.mean(0)) ** power
        expected = r / r.mean(0) * s.mean(0)
        np.testing.assert_allclose(tempered(torch.tensor(s), power).numpy(), expected, rtol=1e-12)
    # the spread over the samples shrinks with the power; the per-layer weights (means) stay
    half = tempered(torch.tensor(s), 0.5).numpy()
    assert ((half / half.mean(0)).std(0) < (s / s.mean(0)).std(0)).all()
    parts = BlockParts({}, {}, [0, 1], [])
    scores = torch.tensor(s, dtype=torch.float32)
    full = _layer_weights(scores, parts, ReconstructionConfig(hessian_weighting=True, hessian_sample_power=1.0),
                          sizes=[1, 1])
    flat = _layer_weights(scores, parts, ReconstructionConfig(hessian_weighting=True, hessian_sample_power=0.0),
                          sizes=[1, 1])
    torch.testing.assert_close(flat, full.mean(0, keepdim=True).expand_as(full))


@pytest.mark.parametrize("power", [-0.1, 1.5, float("nan")])
def test_hessian_sample_power_is_validated(power):
    with pytest.raises(ConfigError, match="hessian_sample_power"):
        ReconstructionConfig(hessian_sample_power=power)


def test_per_channel_hessian_weighting_runs_and_changes_the_result():
    model = make_model("small_cnn")
    x = example_input("small_cnn", batch_size=64, seed=5)
    base = _tiny_config(iters=40)
    channel = EPTQConfig(**{**base.__dict__, "reconstruction": ReconstructionConfig(
        iters=40, batch_size=16, hessian_weighting=True, hessian_per_channel=True, hessian_scope="all")})
    a = eptq_fx.quantize(model, x, base, progress=False)(x)
    b = eptq_fx.quantize(model, x, channel, progress=False)(x)
    assert torch.isfinite(b).all() and not torch.equal(a, b)


def test_staged_eptq_equals_one_shot():
    model = make_model("small_cnn")
    x = example_input("small_cnn", batch_size=64, seed=6)
    cfg = _tiny_config(iters=30)
    one_shot = eptq_fx.quantize(model, x, cfg, progress=False)
    prepared = eptq_fx.prepare(eptq_fx.capture(model), cfg, example_inputs=(x[:2],))
    eptq_fx.calibrate(prepared, x, config=cfg, progress=False)
    eptq_fx.reconstruct(prepared, x, cfg, progress=False)
    staged = eptq_fx.convert(prepared)
    assert torch.equal(one_shot(x), staged(x))


def test_qdrop_masks_of_a_shard_are_the_rows_of_the_whole_minibatch_mask():
    """A rank that holds rows 1 and 3 of a 4-sample minibatch keeps exactly the elements float that one process
    keeps float in those rows (same seed): the sharded run trains on the same masks."""
    from eptq_fx.numerics.quantizers import ActQuantizer

    aq = ActQuantizer(ActQuant(bits=4, scheme="asymmetric"))
    aq.drop_prob = 0.5
    x = torch.randn(4, 3, 5)
    aq.drop_draw = (1234, 4, None)
    whole = aq._drop_mask(x)
    aq.drop_draw = (1234, 4, torch.tensor([1, 3]))
    torch.testing.assert_close(aq._drop_mask(x[[1, 3]]), whole[[1, 3]])
    assert 0.3 < float(whole.float().mean()) < 0.7
    aq.drop_draw = (1235, 4, None)
    assert not torch.equal(aq._drop_mask(x), whole)  # a new step, new masks


def test_low_bit_blocks_get_more_steps():
    """block_steps: 2^(2(4-b)-1)·iters (8x at 2 bits, 2x at 3) for a block whose narrowest weights have b < 4 bits,
    iters otherwise."""
    two, four, three = (QuantWeightOp(torch.nn.Conv2d(3, 4, 3), 2), QuantWeightOp(torch.nn.Conv2d(4, 4, 3), 4),
                        QuantWeightOp(torch.nn.Linear(4, 4), 3))
    rc = ReconstructionConfig(iters=100, low_bit_steps=True)
    assert block_steps(BlockParts({"a": two, "b": four}, {}, [0, 1], [0, 1]), rc) == 800
    assert block_steps(BlockParts({"c": three}, {}, [0], [0]), rc) == 200
    assert block_steps(BlockParts({"b": four}, {}, [0], [0]), rc) == 100
    assert block_steps(BlockParts({}, {}, [0], []), rc) == 100  # activation quantizers only
    assert block_steps(BlockParts({"a": two}, {}, [0], [0]), ReconstructionConfig(iters=100, low_bit_steps=False)) \
        == 100
    assert ReconstructionConfig().low_bit_steps


def test_low_bit_steps_equal_a_run_with_that_many_steps():
    """With every layer at 2 bits, low_bit_steps and iters=10 is the same run as iters=80: the β schedule, the
    activation phase-in and the minibatches all follow the block's own step count."""
    model = make_model("small_cnn", seed=3)
    x = example_input("small_cnn", batch_size=64, seed=5)
    base = dataclasses.replace(_tiny_config(iters=10, low_bit_steps=False), weight_bits=2, first_last_8bit=False)
    scaled = dataclasses.replace(base, reconstruction=dataclasses.replace(base.reconstruction, low_bit_steps=True))
    plain = dataclasses.replace(base, reconstruction=dataclasses.replace(base.reconstruction, iters=80))
    a = eptq_fx.quantize(model, x, scaled, progress=False).state_dict()
    b = eptq_fx.quantize(model, x, plain, progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = eptq_fx.quantize(model, x, base, progress=False).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


class _Homogeneous(torch.nn.Module):
    """Bias-free linear / ReLU layers: scaling the input by k scales every value in the network by k."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32, bias=False)
        self.b = torch.nn.Linear(32, 32, bias=False)
        self.o = torch.nn.Linear(32, 4, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.b(torch.relu(self.a(x)))))


def _int_weights(model, x, **reconstruction) -> torch.Tensor:
    config = EPTQConfig(method="eptq" if reconstruction else "rtn", weight_bits=4, act_bits=8, n_calib=256,
                        first_last_8bit=False, hessian=HessianConfig(cache_dir=None),
                        reconstruction=ReconstructionConfig(**reconstruction))
    q = eptq_fx.quantize(model, x, config, progress=False)
    return torch.cat([b.flatten() for n, b in sorted(q.named_buffers()) if n.endswith("_weight_int")])


def test_relative_regulariser_rounds_alike_whatever_the_scale_of_the_values():
    """With ``reg_relative`` the regulariser follows the block's round-to-nearest loss, so scaling every value
    of a homogeneous network by 10 or 100 leaves the learned rounding nearly as it was (Adam is invariant to
    the loss scale; what is left is float rounding in the range searches), and it is not round-to-nearest."""
    torch.manual_seed(0)
    model = _Homogeneous().eval()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    rtn = _int_weights(model, x)
    base = _int_weights(model, x, reg_relative=1000.0, reg_relative_max_bits=4)
    assert float((base != rtn).float().mean()) > 0.05
    for scale in (10.0, 100.0):
        scaled = _int_weights(model, x * scale, reg_relative=1000.0, reg_relative_max_bits=4)
        assert float((scaled != base).float().mean()) < 0.05


def test_relative_regulariser_only_where_weights_are_narrow():
    """Default: blocks whose narrowest weights have at most 3 bits train under the relative regulariser (and
    8× / 2× the steps at 2 / 3 bits); 4- and 8-bit blocks keep AdaRound's absolute weight and the base steps."""
    def parts(*bits):
        ops = {f"l{i}": QuantWeightOp(torch.nn.Linear(4, 4), b) for i, b in enumerate(bits)}
        return BlockParts(ops, {}, list(range(len(bits))), list(range(len(bits))))

    rc = ReconstructionConfig()
    assert rc.reg_relative > 0 and rc.reg_relative_max_bits == 3
    for bits, rel, iters in (((2, 8), rc.reg_relative, 8 * rc.iters), ((3,), rc.reg_relative, 2 * rc.iters),
                             ((4, 8), 0.0, rc.iters), ((8,), 0.0, rc.iters)):
        got = block_config(parts(*bits), rc)
        assert (got.reg_relative, got.iters) == (rel, iters)
    assert block_config(parts(2), dataclasses.replace(rc, reg_relative=0.0)).reg_relative == 0.0
