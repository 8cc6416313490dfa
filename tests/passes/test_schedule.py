"""Tests of the block-scheduling pass: the blocks found, coverage, order, and block_subgraph chaining."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from eptq_fx.errors import ConfigError
from eptq_fx.graph.meta import BLOCK
from eptq_fx.graph.passes import block_schedule as schedule
from eptq_fx.graph.passes.block_schedule import BLOCKS, Block, block_subgraph, default_is_quant_op, schedule_blocks
from examples.models import data_dir, example_input, load_cifar_resnet, make_model

ZOO = ["resnet20", "convmixer_tiny", "tiny_resnet", "mobilenetv2_tiny", "tiny_vit", "tiny_mixer", "small_cnn",
       "tuple_output", "dict_output"]
GRANULARITIES = ["layer", "block", "network"]


def traced(name: str) -> fx.GraphModule:
    return fx.symbolic_trace(make_model(name))


def scheduled(gm: fx.GraphModule, granularity: str = "block", **kwargs) -> list[Block]:
    return schedule_blocks(gm, granularity, **kwargs).meta[BLOCKS]


def quant_ops_per_block(blocks: list[Block]) -> list[list[str]]:
    return [list(b.quant_ops) for b in blocks]


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


class Recorder(fx.Interpreter):
    """Runs the whole graph and keeps every node's value: the independent reference for chaining."""

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.values[n.name] = value
        return value

    def run(self, *args):
        self.values = {}
        return super().run(*args)


def run_blocks(gm: fx.GraphModule, *args):
    """Run the block subgraphs one after another; return (model output, {quant-op name: value})."""
    env = {n.name: a for n, a in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args)}
    quant_values = {}
    for block in gm.meta[BLOCKS]:
        results = block_subgraph(gm, block)(*[env[name] for name in block.inputs])
        assert len(results) == len(block.outputs) + len(block.quant_ops)
        env.update(zip(block.outputs, results[:len(block.outputs)]))
        quant_values.update(zip(block.quant_ops, results[len(block.outputs):]))
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    return fx.node.map_arg(output_node.args[0], lambda n: env[n.name]), quant_values


def assert_same_output(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_output(a[key], b[key])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_output(x, y)


# ------------------------------------------------------------------------------------ blocks found
def test_tiny_resnet_blocks_are_stem_residual_blocks_and_head():
    blocks = scheduled(traced("tiny_resnet"))
    assert quant_ops_per_block(blocks) == [
        ["stem_0"],
        ["block1_conv1", "block1_conv2"],
        ["block2_conv1", "block2_conv2", "block2_shortcut_0"],  # projection shortcut stays in its block
        ["fc"],
    ]
    assert [b.inputs for b in blocks] == [("x",), ("stem_2",), ("block1_relu_1",), ("add_1",)]


def test_resnet20_has_one_block_per_basic_block():
    blocks = scheduled(traced("resnet20"))
    expected = [["conv1"]]
    expected += [[f"layer{s}_{i}_conv1", f"layer{s}_{i}_conv2"] for s in (1, 2, 3) for i in range(3)]
    expected += [["linear"]]
    assert quant_ops_per_block(blocks) == expected
    # The option-A shortcut (slice + pad) belongs to its block: every block is single-entry, single-exit.
    assert all(len(b.inputs) == 1 and len(b.outputs) == 1 for b in blocks)
    assert "pad" in blocks[4].nodes and blocks[4].inputs == blocks[3].outputs


def test_mobilenetv2_blocks_are_inverted_residuals():
    blocks = scheduled(traced("mobilenetv2_tiny"))
    ir = [[f"blocks_{i}_expand_0", f"blocks_{i}_depthwise_0", f"blocks_{i}_project_0"] for i in range(3)]
    # The middle block has no skip: its three convs form a chain between two skip blocks and stay together.
    # The last 1x1 conv is a chain step right before the classifier, so it shares the head block.
    assert quant_ops_per_block(blocks) == [["stem_0"], *ir, ["last_0", "classifier"]]
    assert "add" in blocks[1].nodes and "add_1" in blocks[3].nodes


def test_vit_gives_attention_and_mlp_blocks():
    gm = traced("tiny_vit")
    blocks = scheduled(gm)
    expected = [["patch_embed_proj"]]
    for i, (mm1, mm2) in enumerate([("matmul", "matmul_1"), ("matmul_2", "matmul_3")]):
        attn = f"blocks_{i}_attn_"
        expected.append([attn + "q", attn + "k", attn + "v", mm1, mm2, attn + "proj"])
        expected.append([f"blocks_{i}_mlp_0", f"blocks_{i}_mlp_2"])
    expected.append(["head"])
    assert quant_ops_per_block(blocks) == expected
    by_name = {n.name: n for n in gm.graph.nodes}
    assert by_name["matmul"].target is torch.matmul  # the activation-activation matmuls are compare points
    # Each sub-block owns its LayerNorm and its residual add.
    assert {"blocks_0_norm1", "add"} <= set(blocks[1].nodes)
    assert {"blocks_0_norm2", "add_1"} <= set(blocks[2].nodes)
    assert ["norm", "mean", "head"] == list(blocks[-1].nodes)


def test_mixer_gives_token_and_channel_mixing_blocks():
    blocks = scheduled(traced("tiny_mixer"))
    expected = [["patch_embed_proj"]]
    for i in range(2):
        expected.append([f"blocks_{i}_token_mlp_0", f"blocks_{i}_token_mlp_2"])
        expected.append([f"blocks_{i}_channel_mlp_0", f"blocks_{i}_channel_mlp_2"])
    expected.append(["head"])
    assert quant_ops_per_block(blocks) == expected
    assert all(len(b.inputs) == 1 and len(b.outputs) == 1 for b in blocks)


def test_convmixer_blocks_split_residual_and_pointwise_parts():
    blocks = scheduled(traced("convmixer_tiny"))
    assert quant_ops_per_block(blocks) == [["_0"], ["_3_0_fn_0"], ["_3_1"], ["_4_0_fn_0"], ["_4_1", "_7"]]


def test_multi_output_heads_share_the_last_block():
    for name in ("tuple_output", "dict_output"):
        blocks = scheduled(traced(name))
        assert quant_ops_per_block(blocks) == [["trunk_0"], ["head", "aux"]]
        assert blocks[-1].outputs == ("head", "aux")


class FeaturesAndLogits(nn.Module):
    """TinyResNet that also returns its stem features: an early exit that is still used later."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model("tiny_resnet")

    def forward(self, x: torch.Tensor):
        stem = self.net.stem(x)
        logits = self.net.fc(torch.flatten(F.adaptive_avg_pool2d(self.net.block2(self.net.block1(stem)), 1), 1))
        return x, stem, logits


def test_returned_intermediate_values_do_not_merge_blocks():
    gm = fx.symbolic_trace(FeaturesAndLogits())
    blocks = scheduled(gm)
    unprefixed = [[q.removeprefix("net_") for q in ops] for ops in quant_ops_per_block(blocks)]
    assert unprefixed == quant_ops_per_block(scheduled(traced("tiny_resnet")))
    assert blocks[0].outputs == ("net_stem_2",)  # used by block 1 and by the output
    x = example_input("tiny_resnet")
    with torch.no_grad():
        assert_same_output(run_blocks(gm, x)[0], gm(x))


# --------------------------------------------------------------- independence from names and BN
class ActQuantStub(nn.Module):
    """Stands in for an inserted activation quantizer: a call_module that is not a compare point."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 16) / 16


def insert_act_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Put a quantizer stub (with a misleading name) on every input of every compare point."""
    for i, node in enumerate([n for n in gm.graph.nodes if default_is_quant_op(n)]):
        for j, arg in enumerate(node.all_input_nodes):
            name = f"conv_linear_{i}_{j}"  # names must not matter
            gm.add_submodule(name, ActQuantStub())
            with gm.graph.inserting_before(node):
                stub = gm.graph.call_module(name, (arg,))
            node.replace_input_with(arg, stub)
    gm.recompile()
    return gm


@pytest.mark.parametrize("name", ["tiny_resnet", "mobilenetv2_tiny", "tiny_vit", "tiny_mixer"])
def test_blocks_unchanged_by_bn_folding_and_inserted_quantizers(name):
    reference = quant_ops_per_block(scheduled(traced(name)))
    folded = fuse(make_model(name))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    modified = insert_act_quantizers(folded)
    blocks = scheduled(modified)
    assert quant_ops_per_block(blocks) == reference
    stubs = [n.name for n in modified.graph.nodes if n.op == "call_module" and "conv_linear_" in n.target]
    assert stubs and all(BLOCK in n.meta for n in modified.graph.nodes if n.name in stubs)
    x = example_input(name)
    assert_same_output(run_blocks(modified, x)[0], modified(x))


def test_custom_predicate_decides_the_compare_points():
    gm = traced("tiny_resnet")
    only_linear = scheduled(gm, is_quant_op=lambda n: n.op == "call_module" and n.target == "fc")
    assert quant_ops_per_block(only_linear) == [["fc"]]  # quant-free regions all merge into it
    only_second_convs = scheduled(gm, "layer", is_quant_op=lambda n: n.name.endswith("conv2"))
    assert quant_ops_per_block(only_second_convs) == [["block1_conv2"], ["block2_conv2"]]


# ------------------------------------------------------------------------ granularities
def test_layer_granularity_on_small_cnn_is_exact():
    blocks = scheduled(traced("small_cnn"), "layer")
    assert [list(b.nodes) for b in blocks] == [
        ["conv1", "bn1", "relu"],
        ["conv2", "bn2", "relu_1", "add", "adaptive_avg_pool2d", "flatten"],
        ["fc"],
    ]
    assert [b.inputs for b in blocks] == [("x",), ("relu",), ("flatten",)]
    assert [b.outputs for b in blocks] == [("relu",), ("flatten",), ("fc",)]


@pytest.mark.parametrize("name", ZOO)
def test_layer_granularity_has_one_quant_op_per_block(name):
    gm = traced(name)
    blocks = scheduled(gm, "layer")
    quant = [n.name for n in gm.graph.nodes if default_is_quant_op(n)]
    assert quant_ops_per_block(blocks) == [[q] for q in quant]
    assert all(b.nodes[0] == b.quant_ops[0] for b in blocks[1:])


@pytest.mark.parametrize("name", ZOO)
def test_network_granularity_is_one_block(name):
    gm = traced(name)
    blocks = scheduled(gm, "network")
    assert len(blocks) == 1
    assert list(blocks[0].nodes) == [n.name for n in compute_nodes(gm)]
    assert blocks[0].inputs == ("x",) or blocks[0].inputs == ("input_1",)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    assert set(blocks[0].outputs) == {n.name for n in output_node.all_input_nodes}


def test_unknown_granularity_is_a_config_error():
    with pytest.raises(ConfigError, match="granularity"):
        schedule_blocks(traced("small_cnn"), "stage")


def test_rescheduling_replaces_block_indices():
    gm = traced("tiny_resnet")
    schedule_blocks(gm, "layer")
    schedule_blocks(gm, "network")
    assert {n.meta[BLOCK] for n in compute_nodes(gm)} == {0}


# ---------------------------------------------------- coverage, order, inputs/outputs, chaining
def reference_inputs_outputs(gm: fx.GraphModule, block_of: dict[str, int], index: int):
    """Brute force: which values cross the boundary of block ``index``."""
    inputs, outputs = set(), set()
    for node in compute_nodes(gm):
        for arg in node.all_input_nodes:
            crosses = arg.op == "placeholder" or (arg.op != "get_attr" and block_of[arg.name] != index)
            if block_of[node.name] == index and crosses:
                inputs.add(arg.name)
            if arg.name in block_of and block_of[arg.name] == index != block_of[node.name]:
                outputs.add(arg.name)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs |= {n.name for n in output_node.all_input_nodes if block_of.get(n.name) == index}
    return inputs, outputs


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", ZOO)
def test_coverage_order_and_boundaries(name, granularity):
    gm = traced(name)
    blocks = scheduled(gm, granularity)
    assert [b.index for b in blocks] == list(range(len(blocks)))
    names = [n for b in blocks for n in b.nodes]
    assert sorted(names) == sorted(n.name for n in compute_nodes(gm))  # every compute node exactly once
    block_of = {n.name: n.meta[BLOCK] for n in compute_nodes(gm)}
    assert all(block_of[n] == b.index for b in blocks for n in b.nodes)
    assert all(BLOCK not in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "output"))
    for node in compute_nodes(gm):  # topological: nothing depends on a later block
        assert all(block_of.get(a.name, -1) <= block_of[node.name] for a in node.all_input_nodes)
    for block in blocks:
        inputs, outputs = reference_inputs_outputs(gm, block_of, block.index)
        assert set(block.inputs) == inputs and set(block.outputs) == outputs
        assert all(default_is_quant_op(node_by_name(gm, q)) for q in block.quant_ops)


def node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", ZOO)
def test_chained_block_subgraphs_reproduce_the_model(name, granularity):
    gm = traced(name)
    schedule_blocks(gm, granularity)
    x = example_input(name)
    with torch.no_grad():
        chained, quant_values = run_blocks(gm, x)
        recorder = Recorder(gm)
        expected = recorder.run(x)
    assert_same_output(chained, expected)
    assert quant_values.keys() == {n.name for n in gm.graph.nodes if default_is_quant_op(n)}
    for name_, value in quant_values.items():
        assert torch.equal(value, recorder.values[name_])


def test_block_subgraph_shares_parameters_and_signature():
    gm = traced("tiny_resnet")
    block = scheduled(gm)[2]
    sub = block_subgraph(gm, block)
    assert sub.get_submodule("block2.conv1") is gm.get_submodule("block2.conv1")
    assert sub.get_submodule("block2.conv1").weight is gm.get_submodule("block2.conv1").weight
    placeholders = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
    assert placeholders == list(block.inputs)
    out = sub(torch.randn(2, 8, 16, 16))
    assert isinstance(out, tuple) and len(out) == 1 + 3
    assert out[0].shape == (2, 16, 8, 8)


# ------------------------------------------------------------ constants, dead code, many inputs
class Awkward(nn.Module):
    """Two inputs, a parameter read through get_attr, a node built from constants only, and dead code."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.linspace(-1, 1, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        unused = x.sum()  # noqa: F841 - dead code that fx keeps
        z = x + y
        z = z + z.relu()  # a skip without a compare point, before the first one
        h = torch.relu(self.fc1(z)) + self.offset
        h = h + self.fc2(h)  # a skip around a compare point
        return h * (self.offset.abs() + 1)  # computed from a parameter only: a constant node


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_constants_dead_nodes_and_two_inputs(granularity):
    gm = fx.symbolic_trace(Awkward())
    assert [n.name for n in gm.graph.nodes if n.op == "get_attr"] == ["offset"]
    blocks = scheduled(gm, granularity)
    assert sorted(n for b in blocks for n in b.nodes) == sorted(n.name for n in compute_nodes(gm))
    if granularity != "network":
        # The quant-free skip at the start joins the first block, dead code its input's block, the
        # constants their user's block; the parameter is re-read inside the block, not passed in.
        assert [list(b.nodes) for b in blocks] == [
            ["sum_1", "add", "relu", "add_1", "fc1", "relu_1", "add_2"],
            ["fc2", "add_3", "abs_1", "add_4", "mul"],
        ]
        assert [b.inputs for b in blocks] == [("x", "y"), ("add_2",)]
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        assert_same_output(run_blocks(gm, x, y)[0], gm(x, y))


# -------------------------------------------------------------------------------- cut points
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit"])
def test_cut_points_match_brute_force(name):
    """A cut point is a node whose removal disconnects source from sink; check against dominators."""
    gm = traced(name)
    constant, live = schedule._constant_and_live_nodes(gm)
    flow = {n for n in compute_nodes(gm) if n in live and n not in constant}
    graph = schedule._flow_graph(gm, flow)
    brute = set()
    for node in flow:
        without = graph.copy()
        without.remove_node(node)
        if not nx.has_path(without, schedule._SOURCE, schedule._SINK):
            brute.add(node)
    assert schedule._cut_points(graph) == brute
    assert len(brute) > 5


# --------------------------------------------------------------------------- real checkpoint
@pytest.mark.skipif(not (data_dir() / "weights" / "resnet20-12fca82f.th").exists(), reason="no shared data")
def test_pretrained_resnet20_blocks_chain_exactly():
    model = load_cifar_resnet(20)
    gm = fx.symbolic_trace(model)
    assert len(scheduled(gm)) == 11
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(run_blocks(gm, x)[0], model(x))
