"""``ReconstructionConfig.hessian_min_bits``: blocks whose narrowest weights have fewer bits train with uniform
sample weights, the others with the default tempered Hessian sample weights (block target)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.errors import ConfigError
from examples.models import example_input, make_model

CFG = EPTQConfig(weight_bits=2, act_bits=4, n_calib=64, first_last_8bit=False,
                 hessian=HessianConfig(max_probes=4, min_probes=2, batch_size=32, cache_dir=None),
                 reconstruction=ReconstructionConfig(iters=20, batch_size=16, low_bit_steps=False,
                                                     fallback=False))


def _with(**changes) -> EPTQConfig:
    return dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, **changes))


def test_min_bits_is_validated():
    assert ReconstructionConfig().hessian_min_bits == 1  # every block Hessian-weighted
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ConfigError, match="hessian_min_bits"):
            ReconstructionConfig(hessian_min_bits=bad)


def test_blocks_below_min_bits_train_exactly_as_the_uniform_run():
    x = example_input("tiny_resnet", batch_size=64, seed=2)
    model = make_model("tiny_resnet")
    t = example_input("tiny_resnet", batch_size=16, seed=7)
    uniform = eptq_fx.quantize(model, x, _with(hessian_weighting=False), progress=False)
    below = eptq_fx.quantize(model, x, _with(hessian_min_bits=3), progress=False)  # every block is 2-bit
    at = eptq_fx.quantize(model, x, _with(hessian_min_bits=2), progress=False)
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(CFG, method="rtn"), progress=False)
    with torch.no_grad():
        assert not torch.equal(uniform(t), rtn(t))  # reconstruction kept (fallback off)
        assert torch.equal(below(t), uniform(t))
        assert not torch.equal(at(t), uniform(t))  # 2 >= 2: the Hessian weighs these blocks


def test_no_block_at_min_bits_means_no_weighting_hessian():
    """When every block is narrower than hessian_min_bits nothing uses the full label-free Hessian: the stage
    only scores the layers for the report (report_samples samples, report_probes probes), as for uniform weights."""
    from eptq_fx.data import CalibSet
    from eptq_fx.method.hessian_stage import estimate_hessian
    from eptq_fx.numerics.calibration import calibrate

    x = example_input("tiny_resnet", batch_size=64, seed=2)
    hc = HessianConfig(max_probes=6, min_probes=6, batch_size=32, cache_dir=None, report_samples=16,
                       report_probes=2)

    def estimate(**changes):
        cfg = dataclasses.replace(_with(**changes), hessian=hc)
        prepared = eptq_fx.prepare(make_model("tiny_resnet"), cfg, example_inputs=(x[:2],))
        calibrate(prepared, CalibSet((x,)), config=cfg, progress=False)
        return estimate_hessian(prepared, CalibSet((x,)), cfg, progress=False)

    below, at = estimate(hessian_min_bits=3), estimate(hessian_min_bits=2)
    assert not below.weighs and below.activation.scores.shape[0] == 16 and below.activation.n_probes <= 2
    assert at.weighs and at.activation.scores.shape[0] == 64
