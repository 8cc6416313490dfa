"""``ReconstructionConfig.hessian_scope``: the Hessian-weighted loss only in blocks whose outputs a BatchNorm that
could not be folded rescales (ConvMixer's conv → GELU → BN), a uniform loss everywhere else. Measured (and tested)
with the per-layer target, where it was the default until stop 30."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, HessianScope, ReconstructionConfig
from eptq_fx.config import Target
from eptq_fx.errors import ConfigError
from eptq_fx.method.hessian_stage import rescaled_compare_points
from examples.models import example_input, make_model

CFG = EPTQConfig(weight_bits=4, act_bits=4, n_calib=64, first_last_8bit=False,
                 hessian=HessianConfig(max_probes=4, min_probes=2, batch_size=32, cache_dir=None),
                 reconstruction=ReconstructionConfig(iters=20, batch_size=16, hessian_weighting=False,
                                                     target="layers", hessian_sample_power=1.0))
SCOPED = dataclasses.replace(CFG, reconstruction=dataclasses.replace(
    CFG.reconstruction, hessian_weighting=True, hessian_per_channel=True, hessian_scope="rescaled"))


def _prepared(name: str, x: torch.Tensor):
    return eptq_fx.prepare(eptq_fx.capture(make_model(name)), CFG, example_inputs=(x[:2],))


def test_scope_is_validated():
    default = ReconstructionConfig()  # since stop 30: the block target, every block weighed by the Hessian
    assert default.hessian_weighting and not default.hessian_per_channel
    assert default.hessian_scope is HessianScope.ALL and default.target is Target.BLOCK
    assert default.hessian_sample_power == 0.5
    assert ReconstructionConfig(hessian_scope="rescaled").hessian_scope is HessianScope.RESCALED
    with pytest.raises(ConfigError, match="hessian_scope must be one of all, rescaled"):
        ReconstructionConfig(hessian_scope="some")


def test_rescaled_points_are_the_layers_an_unfolded_batchnorm_follows():
    x = example_input("convmixer_tiny", batch_size=4, seed=0)
    prepared = _prepared("convmixer_tiny", x)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    rescaled = rescaled_compare_points(prepared)
    convs = {n.name for n in prepared.graph.nodes if n.op == "call_module"
             and isinstance(getattr(prepared.get_submodule(n.target), "op", None), torch.nn.Conv2d)}
    assert rescaled == convs  # every conv feeds GELU → BN; the classifier feeds the output
    x = example_input("tiny_resnet", batch_size=4, seed=0)
    assert rescaled_compare_points(_prepared("tiny_resnet", x)) == set()  # every BN folded


def test_out_of_scope_model_is_exactly_the_uniform_run():
    x = example_input("tiny_resnet", batch_size=64, seed=2)
    model = make_model("tiny_resnet")
    uniform = eptq_fx.quantize(model, x, CFG, progress=False)
    scoped = eptq_fx.quantize(model, x, SCOPED, progress=False)
    everywhere = eptq_fx.quantize(model, x, dataclasses.replace(SCOPED, reconstruction=dataclasses.replace(
        SCOPED.reconstruction, hessian_scope="all")), progress=False)
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(CFG, method="rtn"), progress=False)
    t = example_input("tiny_resnet", batch_size=16, seed=7)
    with torch.no_grad():
        assert not torch.equal(uniform(t), rtn(t))  # reconstruction kept (no fallback to make them equal)
        assert torch.equal(scoped(t), uniform(t))
        assert not torch.equal(everywhere(t), uniform(t))


def test_in_scope_model_trains_with_the_hessian_weights():
    x = example_input("convmixer_tiny", batch_size=64, seed=2)
    model = make_model("convmixer_tiny")
    uniform = eptq_fx.quantize(model, x, CFG, progress=False)
    scoped = eptq_fx.quantize(model, x, SCOPED, progress=False)
    t = example_input("convmixer_tiny", batch_size=16, seed=7)
    with torch.no_grad():
        out = scoped(t)
        assert torch.isfinite(out).all() and not torch.equal(out, uniform(t))
