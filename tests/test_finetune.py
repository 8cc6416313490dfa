"""Network-wise fine-tuning after the blocks (ReconstructionConfig.finetune_iters, method/finetune.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import eptq_fx
from eptq_fx import ConfigError, EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.data import CalibSet
from eptq_fx.method.fallback import float_outputs, output_error
from eptq_fx.method.finetune import finetune_network_
from examples.models import example_input, make_model

BASE = EPTQConfig(weight_bits=2, act_bits=4, n_calib=256, first_last_8bit=False, seed=0,
                  hessian=HessianConfig(cache_dir=None),
                  reconstruction=ReconstructionConfig(iters=40, batch_size=16, fallback=False, low_bit_steps=False))


def _with(**rc) -> EPTQConfig:
    return dataclasses.replace(BASE, reconstruction=dataclasses.replace(BASE.reconstruction, **rc))


def _int_weights(gm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if k.endswith("_weight_int")}


@pytest.fixture(scope="module")
def model_and_data():
    return make_model("small_cnn", seed=3), example_input("small_cnn", batch_size=256, seed=2)


def test_config_is_validated():
    assert ReconstructionConfig().finetune_iters == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="finetune_iters must be an integer >= 0"):
            ReconstructionConfig(finetune_iters=bad)
    with pytest.raises(ConfigError, match="finetune_lr must be a positive number"):
        ReconstructionConfig(finetune_lr=0.0)


def test_rounding_stays_and_the_output_gets_closer_to_float(model_and_data):
    """The stage moves only biases and scales: the integer weights are those of the run without it, and the
    network output on the calibration data ends closer to the float model's."""
    model, x = model_and_data
    plain = eptq_fx.quantize(model, x, BASE, progress=False)
    tuned = eptq_fx.quantize(model, x, _with(finetune_iters=150), progress=False)
    a, b = _int_weights(plain), _int_weights(tuned)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        ref = model(x)
        err_plain = float((plain(x) - ref).pow(2).sum(1).mean())
        err_tuned = float((tuned(x) - ref).pow(2).sum(1).mean())
    assert err_tuned < 0.9 * err_plain


def test_a_stage_that_does_not_help_is_undone(model_and_data):
    """With a learning rate far too large the held-out error rises; every bias and scale is put back, so the
    result is bit-identical to the run without the stage."""
    model, x = model_and_data
    plain = eptq_fx.quantize(model, x, BASE, progress=False)
    wild = eptq_fx.quantize(model, x, _with(finetune_iters=20, finetune_lr=1e4), progress=False)
    sa, sb = plain.state_dict(), wild.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reported_errors_are_the_held_out_output_errors(model_and_data):
    """finetune_network_ returns the held-out output error before and after, measured independently here."""
    model, x = model_and_data
    cfg = _with(finetune_iters=0)
    prepared = eptq_fx.quantize(model, x, cfg, progress=False, return_prepared=True)
    calib = CalibSet((x,))
    hold = torch.arange(224, 256)
    f_hold = float_outputs(prepared, calib, hold)
    before = output_error(prepared, calib, hold, f_hold)
    rc = dataclasses.replace(cfg.reconstruction, finetune_iters=100)
    b, a = finetune_network_(prepared, calib, rc, 224, hold, f_hold, seed=0)
    assert b == pytest.approx(before) and a <= b
    assert output_error(prepared, calib, hold, f_hold) == pytest.approx(a)
