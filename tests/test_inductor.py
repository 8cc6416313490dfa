"""compile_for_inductor: the converted graph reaches Inductor's oneDNN int8 kernels (pattern-matcher counts)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import eptq_fx
from eptq_fx import EPTQConfig
from eptq_fx.export.inductor import compile_for_inductor, cpu_has_vnni
from examples.models import example_input, make_model

# without VNNI oneDNN saturates 8-bit weights; 7-bit weights are exact there (see eptq_fx/export/inductor.py)
W_BITS = 8 if cpu_has_vnni() else 7
CONFIG = EPTQConfig(method="rtn", weight_bits=W_BITS, act_bits=8, act_range="minmax", first_last_8bit=False)


def _compiled_counts(name: str, config: EPTQConfig = CONFIG) -> tuple[dict, torch.Tensor, torch.Tensor]:
    model = make_model(name)
    q = eptq_fx.quantize(model, example_input(name, 64, seed=1), config, progress=False)
    x = example_input(name, 16, seed=2)
    torch._dynamo.reset()
    counters.clear()
    out = compile_for_inductor(q)(x)
    with torch.no_grad():
        ref = q(x)
    return dict(counters["inductor"]), out, ref


def test_convs_and_linears_lower_to_int8_kernels_and_freezing_stays_scoped():
    import torch._inductor.config as inductor_config

    counts, out, ref = _compiled_counts("tiny_resnet")
    assert inductor_config.freezing is False  # set around the calls only
    # tiny_resnet: 6 convs and 1 linear, every one with prepacked int8 weights and lowered to a oneDNN kernel
    assert counts.get("qconv_weight_prepack_matcher_count", 0) == 6
    assert counts.get("qlinear_weight_prepack_matcher_count", 0) == 1
    assert counts.get("qconv_unary_lower_count", 0) == 6 and counts.get("qlinear_unary_lower_count", 0) == 1
    # int8 kernels requantize with their own rounding: a value on a rounding boundary may move one step
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_fusable_placement_gives_every_conv_an_int8_output():
    """With the join inputs quantized (FUSABLE), Inductor fuses each conv with the quantization of its output
    (6 of 6 convs, against the 3 that feed no residual add with INPUTS)."""
    counts = {p: _compiled_counts("tiny_resnet", dataclasses.replace(CONFIG, act_placement=p))[0]
              for p in (eptq_fx.ActPlacement.INPUTS, eptq_fx.ActPlacement.FUSABLE)}
    assert counts[eptq_fx.ActPlacement.FUSABLE].get("qconv_unary_matcher_count", 0) == 6
    assert counts[eptq_fx.ActPlacement.INPUTS].get("qconv_unary_matcher_count", 0) == 3


@pytest.mark.slow
def test_vit_linears_lower_to_int8_kernels():
    counts, out, ref = _compiled_counts("tiny_vit")
    assert counts.get("qlinear_weight_prepack_matcher_count", 0) >= 4
    # a randomly initialised ViT has near-tied logits, so compare values rather than predictions
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())


@pytest.mark.skipif(cpu_has_vnni(), reason="the saturation guard applies to CPUs without VNNI")
def test_eight_bit_weights_are_refused_where_onednn_saturates_them():
    model = make_model("tiny_resnet")
    q = eptq_fx.quantize(model, example_input("tiny_resnet", 64, seed=1),
                         EPTQConfig(method="rtn", weight_bits=8, act_bits=8, act_range="minmax"), progress=False)
    with pytest.raises(eptq_fx.ModelError, match="weight_bits=7"):
        compile_for_inductor(q)
    compile_for_inductor(q, allow_saturation=True)  # accepted when asked for


def test_compile_refuses_what_is_not_a_module():
    with pytest.raises(eptq_fx.ModelError, match="converted model"):
        compile_for_inductor(lambda x: x)


def test_an_exported_module_compiles_too():
    """PT2E's convert_pt2e output is a torch.export module, whose train()/eval() raise: compiling it (as the
    deployment benchmark does for the PT2E baseline) must not call them."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    x = torch.randn(3, 8)
    exported = torch.export.export(model, (x,)).module()
    with pytest.raises(NotImplementedError):
        exported.eval()
    fast = compile_for_inductor(exported)
    torch.testing.assert_close(fast(x), model(x))
