"""bfloat16 activation caches and bfloat16 training steps (``ReconstructionConfig.cache_precision`` /
``compute_precision``): what they store and compute, and that the result stays that of the float32 run."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, Precision, ReconstructionConfig
from eptq_fx.errors import ConfigError
from eptq_fx.export.saving import quant_tables
from eptq_fx.graph.meta import ActQuant
from eptq_fx.method.block_runner import fetch
from eptq_fx.numerics.quantizers import ActQuantizer
from examples.models import example_input, make_model


def test_precision_options_are_validated():
    assert ReconstructionConfig(cache_precision="bfloat16").cache_precision is Precision.BFLOAT16
    with pytest.raises(ConfigError, match="compute_precision must be one of float32, bfloat16"):
        ReconstructionConfig(compute_precision="fp8")


def test_fetch_reads_a_narrow_cache_back_in_the_block_dtype():
    x = torch.randn(4, 3)
    cached = x.to(torch.bfloat16)
    back = fetch(cached, None, torch.float32)
    assert back.dtype is torch.float32
    assert torch.equal(back, cached.float())
    ints = torch.arange(4)
    assert fetch(ints, None, torch.float32) is ints  # integer values are never converted


def test_act_quantizer_quantizes_a_bfloat16_input_on_the_float32_grid():
    aq = ActQuantizer(ActQuant(bits=8, scheme="asymmetric"))
    aq.mode = "on"
    with torch.no_grad():
        aq.scale.fill_(0.013)
    x = (torch.randn(1000) * 1.5).to(torch.bfloat16)
    out = aq(x)
    assert out.dtype is torch.float32
    # the reference: the same values in float32 (bfloat16 arithmetic would put some on the wrong level)
    assert torch.equal(out, aq(x.float()))


def _config(cache: str, compute: str) -> EPTQConfig:
    return EPTQConfig(weight_bits=4, act_bits=4, first_last_8bit=False, n_calib=128, seed=0,
                      hessian=HessianConfig(max_probes=8, min_probes=4, cache_dir=None),
                      reconstruction=ReconstructionConfig(iters=150, batch_size=16, cache_precision=cache,
                                                          compute_precision=compute))


def _codes(q) -> dict[str, torch.Tensor]:
    return {k: v["int_weight"] for k, v in quant_tables(q)[0].items()}


@pytest.mark.parametrize("cache,compute", [("bfloat16", "float32"), ("bfloat16", "bfloat16")])
def test_bfloat16_run_keeps_the_float32_result(cache, compute):
    torch.manual_seed(0)
    model = make_model("tiny_resnet")
    x = example_input("tiny_resnet", batch_size=128, seed=3)
    x_test = example_input("tiny_resnet", batch_size=64, seed=4)
    ref = eptq_fx.quantize(model, x, _config("float32", "float32"), progress=False)
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(_config("float32", "float32"), method="rtn"),
                           progress=False)
    low = eptq_fx.quantize(model, x, _config(cache, compute), progress=False)
    with torch.no_grad():
        y = model(x_test)
        e_ref, e_rtn, e_low = (float((y - q(x_test)).pow(2).mean()) for q in (ref, rtn, low))
    assert e_low < 0.8 * e_rtn, (e_rtn, e_low)
    assert e_low < 1.25 * e_ref, (e_ref, e_low)
    # nearly every rounding decision is the float32 run's
    a, b = _codes(ref), _codes(low)
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert same > 0.9, same


def test_auto_cache_precision_narrows_only_tensors_over_the_threshold():
    from eptq_fx.config import AUTO_CACHE_BYTES
    from eptq_fx.method.block_runner import store_dtype

    row = torch.zeros(1, 1024)  # 4 KiB of float32 per sample
    at = AUTO_CACHE_BYTES // (1024 * 4)  # samples that fill exactly the threshold
    assert store_dtype(row, at, Precision.AUTO) is torch.float32
    assert store_dtype(row, at + 1, Precision.AUTO) is torch.bfloat16
    assert store_dtype(row, at + 1, Precision.FLOAT32) is torch.float32
    assert store_dtype(row, 1, Precision.BFLOAT16) is torch.bfloat16
    assert store_dtype(torch.zeros(1, 1024, dtype=torch.long), at + 1, Precision.AUTO) is torch.long
    # ResNet-18 at 1024 images: the first stage's map (64 × 56 × 56) goes to bfloat16, a CIFAR ResNet's stays
    assert store_dtype(torch.zeros(1, 64, 56, 56), 1024, Precision.AUTO) is torch.bfloat16
    assert store_dtype(torch.zeros(1, 16, 32, 32), 1024, Precision.AUTO) is torch.float32
