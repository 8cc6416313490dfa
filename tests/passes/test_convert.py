"""convert: the fake-quant graph becomes reference Q/DQ ops with integer weights and computes the same thing."""
from __future__ import annotations

import pytest
import torch
from torch import fx

import eptq_fx
from eptq_fx import EPTQConfig, convert
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp
from examples.models import example_input, make_model

qd = torch.ops.quantized_decomposed
# convert does not care how ranges were chosen: min/max keeps these tests fast (the MSE search is tested elsewhere)
FAST = {"act_range": "minmax"}


def calibrated(name: str, config: EPTQConfig, n: int = 64) -> tuple[fx.GraphModule, torch.Tensor]:
    model = make_model(name)
    x = example_input(name, n, seed=1)
    prepared = eptq_fx.quantize(model, x, config, progress=False, return_prepared=True)
    return prepared, example_input(name, 16, seed=2)


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    assert node.op == "get_attr"
    return gm.get_buffer(node.target)


@pytest.fixture(scope="module")
def w4a4_resnet():
    prepared, x = calibrated("tiny_resnet", EPTQConfig(method="rtn", weight_bits=4, act_bits=4, **FAST))
    return prepared, convert(prepared), x


def test_qdq_ops_with_integer_weights_of_the_real_bit_width(w4a4_resnet):
    prepared, gm, _ = w4a4_resnet
    assert not any(isinstance(m, (QuantWeightOp, ActQuantizer)) for m in gm.modules())
    dq_w = calls(gm, qd.dequantize_per_channel.default)
    assert len(dq_w) == len([m for m in prepared.modules() if isinstance(m, QuantWeightOp)]) == 7
    ranges = set()
    for node in dq_w:
        w_node, _, _, axis, qmin, qmax, dtype = node.args
        w_int = attr(gm, w_node)
        assert w_int.dtype == torch.int8 and dtype == torch.int8 and axis == 0
        assert qmin <= int(w_int.min()) and int(w_int.max()) <= qmax
        ranges.add((qmin, qmax))
    assert ranges == {(-8, 7), (-128, 127)}  # inner layers at 4 bits, first / last at 8 bits

    q_act = calls(gm, qd.quantize_per_tensor.default)
    dq_act = calls(gm, qd.dequantize_per_tensor.default)
    assert len(q_act) == len(dq_act) == len([m for m in prepared.modules() if isinstance(m, ActQuantizer)])
    assert {(n.args[3], n.args[4], n.args[5]) for n in q_act} == {(0, 15, torch.uint8), (0, 255, torch.uint8)}
    for dq in dq_act:  # every dequantize reads a quantize with the same parameters
        q = dq.args[0]
        assert q.target == qd.quantize_per_tensor.default and q.args[1:] == dq.args[1:]


def test_integer_weights_times_scale_are_the_fake_quant_weights(w4a4_resnet):
    prepared, gm, _ = w4a4_resnet
    for node in calls(gm, qd.dequantize_per_channel.default):
        layer = node.args[0].target.removesuffix("_weight_int")
        op = next(m for name, m in prepared.named_modules()
                  if isinstance(m, QuantWeightOp) and name.replace(".", "_") == layer)
        w_int, scale = attr(gm, node.args[0]), attr(gm, node.args[1])
        expected = op.quantized_weight().detach()
        shape = (-1,) + (1,) * (w_int.dim() - 1)
        torch.testing.assert_close(w_int.float() * scale.view(shape), expected, rtol=0, atol=1e-7)


def assert_matches_fake_quant(ref: torch.Tensor, out: torch.Tensor) -> None:
    """Equal up to float rounding. The two graphs may do the same arithmetic in a different order, so a value
    sitting on a rounding boundary can land one quantization step away: allow that in a few elements, and
    bound how far it can move the output."""
    diff = (out - ref).abs()
    span = float(ref.abs().max())
    assert float((diff > 1e-5 * span).float().mean()) <= 0.01
    assert float(diff.max()) <= 0.05 * span


@pytest.mark.parametrize("name, bits", [("tiny_resnet", (4, 8)), ("tiny_vit", (8, 8)), ("mobilenetv2_tiny", (4, 4)),
                                        ("tiny_mixer", (4, 4))])
def test_converted_outputs_match_the_prepared_model(name, bits):
    prepared, x = calibrated(name, EPTQConfig(method="rtn", weight_bits=bits[0], act_bits=bits[1], **FAST))
    gm = convert(prepared)
    with torch.no_grad():
        ref, out = prepared(x), gm(x)
        floating = make_model(name)(x)
    assert_matches_fake_quant(ref, out)
    assert not torch.allclose(out, floating, rtol=0, atol=1e-4)  # quantization did happen


def test_convert_leaves_the_prepared_model_alone(w4a4_resnet):
    prepared, _, _ = w4a4_resnet
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    convert(prepared)
    assert any(isinstance(m, QuantWeightOp) for m in prepared.modules())
    for k, v in prepared.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_converted_model_runs_under_torch_compile_tracing(w4a4_resnet):
    """Dynamo + AOTAutograd trace the Q/DQ ops (aot_eager: no C++ toolchain, fast); inductor is a slow test."""
    _, gm, x = w4a4_resnet
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_converted_model_runs_under_inductor():
    """CPU inductor compiles C++ kernels: ~1 min on a cold cache, so not in the default run."""
    prepared, x = calibrated("small_cnn", EPTQConfig(method="rtn", weight_bits=4, act_bits=8, **FAST))
    gm = convert(prepared)
    compiled = torch.compile(gm, backend="inductor")
    with torch.no_grad():
        ref, out = gm(x), compiled(x)
    assert_matches_fake_quant(ref, out)


def test_16_bit_fake_quant_is_close_to_float():
    model = make_model("tiny_resnet")
    x = example_input("tiny_resnet", 64, seed=1)
    config = EPTQConfig(method="rtn", weight_bits=16, act_bits=16, act_range="minmax", weight_range="minmax")
    prepared = eptq_fx.quantize(model, x, config, progress=False, return_prepared=True)
    gm = convert(prepared)
    with torch.no_grad():
        ref, fake, real = model(x), prepared(x), gm(x)
    assert float((fake - ref).norm() / ref.norm()) < 1e-3
    assert float((real - ref).norm() / ref.norm()) < 1e-3
    dq_w = calls(gm, qd.dequantize_per_channel.default)
    assert {(n.args[4], n.args[5], n.args[6]) for n in dq_w} == {(-32768, 32767, torch.int16)}
    assert {(n.args[3], n.args[4], n.args[5]) for n in calls(gm, qd.quantize_per_tensor.default)} == \
        {(0, 65535, torch.uint16)}
