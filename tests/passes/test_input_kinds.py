"""Every input kind the API takes (nn.Module, symbolic_trace GraphModule, ExportedProgram and its .module(),
a torch._dynamo.export graph) quantizes to the same integer weights as the nn.Module path, with every
foldable BatchNorm folded; aten inputs come back as aten graphs with PT2E's quantized_decomposed Q/DQ."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.errors import CalibrationDataError, ConfigError
from eptq_fx.graph.meta import STATIC_BATCH
from examples.models import example_input, make_model

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
RTN = EPTQConfig(method="rtn", weight_bits=4, act_bits=8, n_calib=64, calib_batch_size=16)
EPTQ = EPTQConfig(method="eptq", weight_bits=4, act_bits=8, n_calib=32, calib_batch_size=16,
                  hessian=HessianConfig(cache_dir=None, max_probes=4, min_probes=2, batch_size=16,
                                        weight_samples=8, weight_probes=2),
                  reconstruction=ReconstructionConfig(iters=4, batch_size=8))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3 * 16 * 16, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _model(name: str) -> nn.Module:
    if name == "mlp":
        torch.manual_seed(0)
        return MLP().eval()
    return make_model(name)


def _data(n: int = 64, seed: int = 0) -> torch.Tensor:
    return example_input("tiny_resnet", n, seed)  # all three models take (B, 3, 16, 16)


def _batch_dim() -> tuple:
    return ({0: torch.export.Dim("batch", min=1, max=1024)},)


def _as(kind: str, model: nn.Module):
    x = _data(8, seed=7)
    if kind == "nn.Module":
        return model
    if kind == "symbolic_trace":
        return fx.symbolic_trace(model)
    if kind == "ExportedProgram":
        return torch.export.export(model, (x,), dynamic_shapes=_batch_dim())
    if kind == "ExportedProgram.module()":
        return torch.export.export(model, (x,), dynamic_shapes=_batch_dim()).module()
    if kind == "dynamo":
        return torch._dynamo.export(model)(x)[0]
    raise AssertionError(kind)


def int_weights(q: fx.GraphModule) -> list[torch.Tensor]:
    """The stored integer weight of every dequantize_per_channel, in graph order."""
    out = []
    for node in q.graph.nodes:
        if node.op == "call_function" and node.target == qd.dequantize_per_channel.default:
            owner, _, attr = str(node.args[0].target).rpartition(".")
            out.append(getattr(q.get_submodule(owner) if owner else q, attr))
    return out


def batchnorm_nodes(gm: fx.GraphModule) -> list[str]:
    names = [n.name for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    return names + [n.name for n in gm.graph.nodes if n.op == "call_module"
                    and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)]


KINDS = ["symbolic_trace", "ExportedProgram", "ExportedProgram.module()", "dynamo"]
MODELS = ["tiny_resnet", "tiny_vit", "mlp"]


@pytest.fixture(scope="module")
def reference() -> dict:
    return {name: eptq_fx.quantize(_model(name), _data(), RTN, progress=False) for name in MODELS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_rtn_integer_weights_match_the_module_path(name: str, kind: str, reference: dict) -> None:
    model = _model(name)
    q = eptq_fx.quantize(_as(kind, model), _data(), RTN, progress=False)
    expected, got = int_weights(reference[name]), int_weights(q)
    assert len(got) == len(expected) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype == torch.int8 and torch.equal(a, b)
    assert batchnorm_nodes(q) == []
    x = _data(8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(q(x), reference[name](x), rtol=1e-4, atol=1e-4)


_EPTQ_REFERENCE: dict[str, list[torch.Tensor]] = {}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny_resnet", pytest.param("tiny_vit", marks=pytest.mark.slow),
                                  pytest.param("mlp", marks=pytest.mark.slow)])
def test_eptq_integer_weights_match_the_module_path(name: str, kind: str) -> None:
    model = _model(name)
    if name not in _EPTQ_REFERENCE:
        _EPTQ_REFERENCE[name] = int_weights(eptq_fx.quantize(model, _data(32), EPTQ, progress=False))
    expected = _EPTQ_REFERENCE[name]
    got = int_weights(eptq_fx.quantize(_as(kind, model), _data(32), EPTQ, progress=False))
    assert len(got) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_aten_input_gives_an_aten_graph_with_pt2e_reference_qdq() -> None:
    ep = torch.export.export(_model("tiny_resnet"), (_data(8),), dynamic_shapes=_batch_dim())
    q = eptq_fx.quantize(ep, _data(), RTN, progress=False)
    calls = [n for n in q.graph.nodes if n.op == "call_function"]
    assert all(isinstance(n.target, torch._ops.OpOverload) or n.target.__name__ == "getitem" for n in calls)
    convs = [n for n in calls if n.target == aten.conv2d.default]
    assert convs
    for conv in convs:  # convert_pt2e's pattern: dq(q(x)) and dq_per_channel(int8 get_attr) into the conv
        act, weight = conv.args[0], conv.args[1]
        assert act.target == qd.dequantize_per_tensor.default
        assert act.args[0].target == qd.quantize_per_tensor.default
        assert weight.target == qd.dequantize_per_channel.default and weight.args[0].op == "get_attr"
    # still exportable: a compiler can take the result back through torch.export
    torch.export.export(q, (_data(4),))


def test_static_batch_export_calibrates_at_its_own_size_and_says_when_it_cannot() -> None:
    model = _model("tiny_resnet")
    static = torch.export.export(model, (_data(16),))
    q = eptq_fx.quantize(static, _data(40), RTN, progress=False)  # 2 whole batches of 16, 8 samples left
    assert int_weights(q)
    with torch.no_grad():
        assert torch.isfinite(q(_data(16, seed=2))).all()
    with pytest.raises(CalibrationDataError, match="batch size 16"):
        eptq_fx.quantize(static, _data(8), RTN, progress=False)
    with pytest.raises(ConfigError, match="dynamic batch"):
        eptq_fx.quantize(static, _data(40), EPTQ, progress=False)
    assert eptq_fx.capture(static).meta[STATIC_BATCH] == 16


class FunctionalConvBN(nn.Module):
    """Functional conv + functional BN with plain-tensor weights and statistics (how dynamo graphs look)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(6, 3, 3, 3, generator=gen)  # a plain attribute, neither parameter nor buffer
        self.register_buffer("mean", torch.randn(6, generator=gen))
        self.register_buffer("var", torch.rand(6, generator=gen) + 0.5)
        self.gamma = nn.Parameter(torch.randn(6, generator=gen))
        self.beta = nn.Parameter(torch.randn(6, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, None, 1, 1)
        return F.relu(F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5))


@pytest.mark.parametrize("form", ["functional", "aten.batch_norm", "_native_batch_norm_legit_no_training"])
def test_batchnorm_is_folded_in_every_form(form: str) -> None:
    model = FunctionalConvBN().eval()
    x = _data(8)
    if form == "functional":
        source = model
    else:
        ep = torch.export.export(model, (x,), dynamic_shapes=_batch_dim())
        source = ep.run_decompositions() if form.startswith("_native") else ep
        targets = {str(n.target) for n in source.graph.nodes}
        assert any(form in t for t in targets)
    prepared = eptq_fx.prepare(source, RTN, example_inputs=(x,))
    assert batchnorm_nodes(prepared) == []
    from eptq_fx.numerics.calibration import quant_disabled
    with torch.no_grad(), quant_disabled(prepared):
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-4)


def test_forward_arguments_with_defaults_are_not_inputs() -> None:
    class WithMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, attn_mask=None, is_causal: bool = False):
            y = self.fc(x)
            return y if attn_mask is None else y + attn_mask

    q = eptq_fx.quantize(WithMask().eval(), torch.randn(32, 8), RTN, progress=False)
    assert [n.target for n in q.graph.nodes if n.op == "placeholder"][:1] == ["x"]
    assert int_weights(q)


def test_multihead_attention_weights_are_quantized_through_export() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().eval()
    x = torch.randn(32, 5, 16)
    for source in (model, torch._dynamo.export(model)(x[:4])[0]):
        q = eptq_fx.quantize(source, x, RTN, progress=False)
        assert len(int_weights(q)) == 3  # in_proj (packed q/k/v), out_proj, head
