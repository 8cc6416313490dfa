"""fold_batchnorm: folded graphs compute what the unfolded eval-mode model computes, and unfoldable BNs stay put."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from eptq_fx.graph.meta import FOLDED_BN
from eptq_fx.graph.passes.bn_folding import fold_batchnorm, folded_pairs

LOGGER = "eptq_fx.graph.passes.bn_folding"


def _randomize_bn_(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> None:
    """Non-trivial statistics so that a wrong axis or a missing term shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    if bn.track_running_stats:
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.3)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))


def _prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize_bn_(m, seed + i)
    return model.eval()


def _fold(model: nn.Module) -> fx.GraphModule:
    return fold_batchnorm(fx.symbolic_trace(copy.deepcopy(model)))


def _assert_same_output(reference: nn.Module, folded: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> None:
    with torch.no_grad():
        expected, actual = reference(x), folded(x)
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _has_batchnorm(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            return True
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            return True
    return False


class OpThenBN(nn.Module):
    def __init__(self, op: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.op, self.bn = op, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.op(x)))


# (weight op, BN, input shape)
MODULE_PAIRS = {
    "conv1d": (lambda b: nn.Conv1d(3, 5, 3, bias=b), lambda: nn.BatchNorm1d(5), (2, 3, 9)),
    "conv2d": (lambda b: nn.Conv2d(3, 6, 3, padding=1, bias=b), lambda: nn.BatchNorm2d(6), (2, 3, 7, 7)),
    "conv3d": (lambda b: nn.Conv3d(2, 4, 3, bias=b), lambda: nn.BatchNorm3d(4), (2, 2, 5, 5, 5)),
    "grouped_conv2d": (lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b), lambda: nn.BatchNorm2d(6), (2, 4, 6, 6)),
    "depthwise_conv2d": (lambda b: nn.Conv2d(5, 5, 3, groups=5, bias=b), lambda: nn.BatchNorm2d(5), (2, 5, 6, 6)),
    "depthwise_mult_conv2d": (lambda b: nn.Conv2d(3, 6, 3, groups=3, bias=b), lambda: nn.BatchNorm2d(6),
                              (2, 3, 6, 6)),
    "convT1d": (lambda b: nn.ConvTranspose1d(3, 5, 3, stride=2, bias=b), lambda: nn.BatchNorm1d(5), (2, 3, 6)),
    "convT2d": (lambda b: nn.ConvTranspose2d(3, 4, 3, stride=2, bias=b), lambda: nn.BatchNorm2d(4), (2, 3, 5, 5)),
    "convT2d_groups": (lambda b: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=b), lambda: nn.BatchNorm2d(6),
                       (2, 4, 5, 5)),
    "convT2d_groups3": (lambda b: nn.ConvTranspose2d(6, 9, 2, stride=2, groups=3, bias=b),
                        lambda: nn.BatchNorm2d(9), (2, 6, 4, 4)),
    "convT2d_depthwise": (lambda b: nn.ConvTranspose2d(4, 4, 3, groups=4, bias=b), lambda: nn.BatchNorm2d(4),
                          (2, 4, 5, 5)),
    "convT3d": (lambda b: nn.ConvTranspose3d(2, 3, 2, bias=b), lambda: nn.BatchNorm3d(3), (2, 2, 3, 3, 3)),
    "linear": (lambda b: nn.Linear(7, 5, bias=b), lambda: nn.BatchNorm1d(5), (4, 7)),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("pair", sorted(MODULE_PAIRS))
def test_module_bn_folds_exactly(pair: str, bias: bool) -> None:
    make_op, make_bn, shape = MODULE_PAIRS[pair]
    torch.manual_seed(0)
    model = _prepare(OpThenBN(make_op(bias), make_bn()))
    gm = _fold(model)
    assert not _has_batchnorm(gm)
    assert not hasattr(gm, "bn"), "the unused BN submodule must be deleted"
    assert folded_pairs(gm) == [("op", "bn")]
    assert gm.op.bias is not None
    _assert_same_output(model, gm, torch.randn(*shape))


def test_bn_without_affine_folds() -> None:
    torch.manual_seed(1)
    model = _prepare(OpThenBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    gm = _fold(model)
    assert not _has_batchnorm(gm)
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6))


def test_folding_is_done_in_float64_and_keeps_dtype() -> None:
    torch.manual_seed(2)
    model = _prepare(OpThenBN(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).double()
    gm = _fold(model)
    assert gm.op.weight.dtype == torch.float64 and gm.op.bias.dtype == torch.float64
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6, dtype=torch.float64), rtol=1e-12)


def test_original_modules_are_not_mutated() -> None:
    torch.manual_seed(3)
    model = _prepare(OpThenBN(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    weight_before = model.op.weight.detach().clone()
    gm = fold_batchnorm(fx.symbolic_trace(model))  # no deep copy: the GraphModule shares model.op
    assert gm.op is not model.op
    assert model.op.bias is None
    torch.testing.assert_close(model.op.weight, weight_before, rtol=0, atol=0)
    assert isinstance(gm.op.weight, nn.Parameter) and gm.op.weight is not model.op.weight


def test_meta_records_absorbed_bn() -> None:
    model = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    gm = _fold(model)
    metas = {n.target: n.meta.get(FOLDED_BN) for n in gm.graph.nodes if n.op == "call_module"}
    assert metas == {"0": "1", "2": None, "3": "4"}
    assert folded_pairs(gm) == [("0", "1"), ("3", "4")]
    _assert_same_output(model, gm, torch.randn(2, 3, 8, 8))


def test_chained_bns_fold_into_one_conv() -> None:
    torch.manual_seed(4)
    model = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    gm = _fold(model)
    assert not _has_batchnorm(gm)
    assert folded_pairs(gm) == [("0", "1"), ("0", "2")]
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6))


# ---------------------------------------------------------------------------------------- functional form


class FunctionalBN(nn.Module):
    """Conv followed by F.batch_norm on stored statistics, called in one of several argument styles."""

    def __init__(self, style: str, affine: bool = True) -> None:
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=affine, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, bn = self.conv(x), self.bn
        if self.style == "positional":
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        if self.style == "keyword":
            return F.batch_norm(input=y, running_mean=bn.running_mean, running_var=bn.running_var,
                                weight=bn.weight, bias=bn.bias, training=False, momentum=0.1, eps=bn.eps)
        if self.style == "no_affine_defaults":
            return F.batch_norm(y, bn.running_mean, bn.running_var, eps=bn.eps)
        if self.style == "torch_batch_norm":
            return torch.batch_norm(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, bn.eps,
                                    False)
        if self.style == "training":
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.0, bn.eps)
        raise AssertionError(self.style)


@pytest.mark.parametrize("style", ["positional", "keyword", "no_affine_defaults", "torch_batch_norm"])
def test_functional_bn_folds_exactly(style: str) -> None:
    torch.manual_seed(5)
    model = _prepare(FunctionalBN(style))
    gm = _fold(model)
    assert not _has_batchnorm(gm)
    assert folded_pairs(gm) == [("conv", "bn")]
    assert not hasattr(gm, "bn"), "the statistics' owner is no longer referenced"
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6))


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BN subclass whose forward calls F.batch_norm and then an activation."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


def test_timm_style_bn_act_folds_and_keeps_activation() -> None:
    torch.manual_seed(6)
    model = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4)))
    gm = _fold(model)
    assert not _has_batchnorm(gm)
    assert folded_pairs(gm) == [("0", "1")]
    assert isinstance(gm.get_submodule("1.act"), nn.ReLU)
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6))


# ----------------------------------------------------------------------------------- left in place (negative)


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


class AliasedWeights(nn.Module):
    """The same conv object registered under two names: still one module, used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 3, 3, padding=1)
        self.conv_b = self.conv_a
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) - self.conv_b(x).relu()


class ReluThenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(x))


def _training_bn_model() -> nn.Module:
    model = _prepare(OpThenBN(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, momentum=0.0)))
    model.bn.train()  # momentum 0 keeps the running stats fixed, so both runs see the same model
    return model


def _no_running_stats_model() -> nn.Module:
    return _prepare(OpThenBN(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)))


NEGATIVE_CASES = {
    "shared_output": (lambda: _prepare(SharedOutput()), "also used by other nodes"),
    "shared_weights": (lambda: _prepare(SharedWeights()), "used more than once"),
    "aliased_weights": (lambda: _prepare(AliasedWeights()), "used more than once"),
    "training_module": (_training_bn_model, "training mode"),
    "training_functional": (lambda: _prepare(FunctionalBN("training")), "training=True"),
    "no_running_stats": (_no_running_stats_model, "no running statistics"),
    "unsupported_producer": (lambda: _prepare(ReluThenBN()), "not a conv/linear module"),
    "unsupported_module": (lambda: _prepare(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))),
                           "not a supported weight op"),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE_CASES))
def test_unfoldable_bn_stays_and_reason_is_logged(case: str, caplog: pytest.LogCaptureFixture) -> None:
    make_model, reason = NEGATIVE_CASES[case]
    torch.manual_seed(7)
    model = make_model()
    traced = fx.symbolic_trace(copy.deepcopy(model))
    weights_before = {k: v.clone() for k, v in traced.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        gm = fold_batchnorm(traced)
    assert _has_batchnorm(gm)
    assert folded_pairs(gm) == []
    torch.testing.assert_close(gm.state_dict(), weights_before, rtol=0, atol=0)
    assert any(reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6))


def test_shared_weights_never_folded() -> None:
    gm = _fold(_prepare(SharedWeights()))
    assert folded_pairs(gm) == []
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"conv", "bn1", "bn2"}


def test_linear_on_3d_input_is_not_folded_when_shapes_are_known(caplog: pytest.LogCaptureFixture) -> None:
    # BN1d on (N, C, L) normalises axis 1, but a linear layer's features are the last axis.
    torch.manual_seed(8)
    model = _prepare(OpThenBN(nn.Linear(6, 6), nn.BatchNorm1d(6)))
    x = torch.randn(2, 6, 6)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        gm = fold_batchnorm(gm)
    assert _has_batchnorm(gm)
    assert any("rank 3" in r.getMessage() for r in caplog.records)
    _assert_same_output(model, gm, x)


def test_weight_standardised_conv_subclass_is_not_folded() -> None:
    class StdConv(nn.Conv2d):  # rescales its weight in forward, so a folded scale would be normalised away
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = StdConv(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, StdConv) or super().is_leaf_module(m, qualname)

    model = _prepare(Model())
    root = copy.deepcopy(model)
    gm = fold_batchnorm(fx.GraphModule(root, LeafTracer().trace(root)))
    assert _has_batchnorm(gm)
    _assert_same_output(model, gm, torch.randn(2, 3, 6, 6))


# ------------------------------------------------------------------------------------------ property test


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    n_layers=st.integers(1, 3),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_conv_bn_stacks_fold_exactly(data: st.DataObject, n_layers: int, transpose: bool, seed: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = data.draw(st.integers(1, 4), label="in_channels")
    for _ in range(n_layers):
        groups = data.draw(st.sampled_from([1, channels]), label="groups")
        out_channels = groups * data.draw(st.integers(1, 3), label="out_per_group")
        kernel = data.draw(st.integers(1, 3), label="kernel")
        bias = data.draw(st.booleans(), label="bias")
        conv_cls = nn.ConvTranspose2d if transpose else nn.Conv2d
        padding = 0 if transpose else kernel // 2
        layers += [conv_cls(channels, out_channels, kernel, padding=padding, groups=groups, bias=bias),
                   nn.BatchNorm2d(out_channels, affine=data.draw(st.booleans(), label="affine"),
                                  eps=data.draw(st.sampled_from([1e-5, 1e-3, 0.1]), label="eps")),
                   nn.ReLU()]
        channels = out_channels
    model = _prepare(nn.Sequential(*layers), seed)
    gm = _fold(model)
    assert not _has_batchnorm(gm)
    assert len(folded_pairs(gm)) == n_layers
    _assert_same_output(model, gm, torch.randn(2, layers[0].in_channels, 5, 5))
