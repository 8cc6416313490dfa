"""annotate + insert_qdq: which tensors get quantized, at which bit widths, and on which edges."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from eptq_fx import ConfigError, EPTQConfig, Override, prepare
from eptq_fx.graph.meta import LAYER_QUANT
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp
from examples.models import example_input, make_model

W4A4 = EPTQConfig(method="rtn", weight_bits=4, act_bits=4)
MATMULS = (torch.matmul, torch.bmm, operator.matmul)


def prepared(name: str, config: EPTQConfig = W4A4) -> fx.GraphModule:
    return prepare(make_model(name), config, example_inputs=(example_input(name, 2),))


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_act_quant(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and isinstance(module_of(gm, node), ActQuantizer)


def weight_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if isinstance(module_of(gm, n), QuantWeightOp)}


def bits_by_layer(gm: fx.GraphModule) -> dict[str, tuple]:
    """{layer: (weight bits of its quantizer or None, bits of the quantizer on its input or None)}."""
    out = {}
    for node in gm.graph.nodes:
        if LAYER_QUANT not in node.meta:
            continue
        mod = module_of(gm, node)
        w = mod.weight_quant.bits if isinstance(mod, QuantWeightOp) else None
        src = node.args[0]
        a = gm.get_submodule(src.target).bits if is_act_quant(gm, src) else None
        out[node.meta[LAYER_QUANT].name] = (w, a)
    return out


# ------------------------------------------------------------------------------------- what is quantized
def test_vit_quantizes_weight_op_inputs_and_both_matmul_operands():
    gm = prepared("tiny_vit")
    names = set(weight_nodes(gm))
    expected = {"patch_embed.proj", "head"} | {f"blocks.{b}.{layer}" for b in range(2) for layer in
                                                ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.0", "mlp.2")}
    assert names == expected
    for node in weight_nodes(gm).values():
        assert is_act_quant(gm, node.args[0]), node.name
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MATMULS]
    assert len(matmuls) == 4  # q·kᵀ and attn·v in each of the two blocks
    for node in matmuls:
        assert all(is_act_quant(gm, a) for a in node.args[:2]), node.name
        assert node.meta[LAYER_QUANT].weight_bits is None
    # nothing else reads a quantized tensor: LayerNorm, softmax, GELU and the residual adds see float
    quant_consumers = {u for n in gm.graph.nodes if is_act_quant(gm, n) for u in n.users}
    assert quant_consumers == set(weight_nodes(gm).values()) | set(matmuls)
    # 14 weight ops + 4 matmuls; q, k and v share their (identical) input quantizer: 14 - 2*2 + 2*4 = 18
    assert sum(is_act_quant(gm, n) for n in gm.graph.nodes) == 18


def test_weights_are_wrapped_with_per_channel_quantizers_of_the_layer_bits():
    gm = prepared("tiny_resnet")
    op = gm.get_submodule("block1.conv1")
    assert isinstance(op, QuantWeightOp) and op.weight_quant.bits == 4
    assert op.weight_quant.scale.shape == (op.weight.shape[0],)
    assert (op.weight_quant.qmin, op.weight_quant.qmax) == (-8, 7)


def test_integer_inputs_are_not_quantized():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)

        def forward(self, idx, x):
            return self.fc(self.emb(idx) + x)

    gm = prepare(Embed().eval(), W4A4, example_inputs=(torch.tensor([[1, 2]]), torch.randn(1, 2, 8)))
    emb = next(n for n in gm.graph.nodes if n.target == "emb")
    assert not is_act_quant(gm, emb.args[0])  # the index placeholder stays an integer tensor
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    assert is_act_quant(gm, fc.args[0])


# -------------------------------------------------------------------------------------- first / last
def test_first_and_last_layers_default_to_8_bits():
    bits = bits_by_layer(prepared("tiny_resnet"))
    assert bits["stem.0"] == (8, 8) and bits["fc"] == (8, 8)
    inner = {k: v for k, v in bits.items() if k not in ("stem.0", "fc")}
    assert inner and all(v == (4, 4) for v in inner.values())


def test_first_last_8bit_can_be_switched_off():
    bits = bits_by_layer(prepared("tiny_resnet", EPTQConfig(method="rtn", weight_bits=4, act_bits=4,
                                                            first_last_8bit=False)))
    assert set(bits.values()) == {(4, 4)}


def test_first_last_never_lowers_a_wider_setting():
    bits = bits_by_layer(prepared("small_cnn", EPTQConfig(method="rtn", weight_bits=12, act_bits=16)))
    assert set(bits.values()) == {(12, 16)}


# ------------------------------------------------------------------------------------------- overrides
def test_override_by_name_regex_and_type():
    config = EPTQConfig(method="rtn", weight_bits=4, act_bits=4, overrides=(
        Override(name="block1.conv1", weight_bits=2),
        Override(regex=r"block2\..*", act_bits=6),
        Override(module_type=nn.Linear, weight_bits=6, act_bits=None),
    ))
    gm = prepared("tiny_resnet", config)
    bits = bits_by_layer(gm)
    assert bits["block1.conv1"] == (2, 4)  # act_bits kept (KEEP)
    assert bits["block1.conv2"] == (4, 4)
    assert bits["block2.conv1"] == bits["block2.conv2"] == bits["block2.shortcut.0"] == (4, 6)
    assert bits["fc"] == (6, None)  # the override beats first/last 8-bit; its input stays float
    assert bits["stem.0"] == (8, 8)


def test_override_none_leaves_the_layer_in_float_and_later_overrides_win():
    config = EPTQConfig(method="rtn", weight_bits=4, act_bits=4, overrides=(
        Override(regex=r"block1\.conv.", weight_bits=None, act_bits=None),
        Override(name="block1.conv2", weight_bits=3),
    ))
    gm = prepared("tiny_resnet", config)
    conv1 = gm.get_submodule("block1.conv1")
    assert type(conv1) is nn.Conv2d  # not wrapped at all
    conv1_node = next(n for n in gm.graph.nodes if n.target == "block1.conv1")
    assert not is_act_quant(gm, conv1_node.args[0])
    assert bits_by_layer(gm)["block1.conv2"] == (3, None)


def test_override_of_a_matmul_by_node_name():
    config = EPTQConfig(method="rtn", overrides=(Override(name="matmul_1", act_bits=None),))
    gm = prepared("tiny_vit", config)
    mm = next(n for n in gm.graph.nodes if n.name == "matmul_1")
    assert not any(is_act_quant(gm, a) for a in mm.args[:2])
    other = next(n for n in gm.graph.nodes if n.name == "matmul")
    assert all(is_act_quant(gm, a) for a in other.args[:2])


def test_unknown_override_name_lists_close_matches():
    config = EPTQConfig(method="rtn", overrides=(Override(name="block1.conv3", weight_bits=4),))
    with pytest.raises(ConfigError) as info:
        prepared("tiny_resnet", config)
    assert "block1.conv3" in str(info.value) and "block1.conv1" in str(info.value)


# ------------------------------------------------------------------------------------------ per edge
def test_residual_branch_stays_float():
    gm = prepared("small_cnn")
    relu = next(n for n in gm.graph.nodes if n.name == "relu")  # conv1's activation: feeds conv2 and the add
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add))
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    assert relu in add.args  # the skip reads the float tensor
    assert is_act_quant(gm, conv2.args[0]) and conv2.args[0].args[0] is relu
    assert sum(is_act_quant(gm, u) for u in relu.users) == 1


def test_different_specs_on_one_producer_get_separate_quantizers():
    config = EPTQConfig(method="rtn", weight_bits=4, act_bits=4,
                        overrides=(Override(name="blocks.0.attn.k", act_bits=6),))
    gm = prepared("tiny_vit", config)
    norm1 = next(n for n in gm.graph.nodes if n.target == "blocks.0.norm1")
    quantizers = {u.target: gm.get_submodule(u.target).bits for u in norm1.users if is_act_quant(gm, u)}
    assert sorted(quantizers.values()) == [4, 6]
    by_layer = bits_by_layer(gm)
    assert by_layer["blocks.0.attn.k"] == (4, 6)
    assert by_layer["blocks.0.attn.q"] == by_layer["blocks.0.attn.v"] == (4, 4)
