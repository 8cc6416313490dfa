"""capture: the user's model is never touched, wrappers are stripped, and untraceable code gets a useful error."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import fx, nn

import eptq_fx
from eptq_fx import EPTQConfig, TraceError, capture
from examples.models import example_input, make_model

RTN = EPTQConfig(method="rtn")


def fingerprint(model: nn.Module) -> tuple:
    """Everything quantization could plausibly change on the user's model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    modes = tuple((name, m.training) for name, m in model.named_modules())
    hooks = tuple((name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for name, m in model.named_modules())
    types = tuple((name, type(m).__name__) for name, m in model.named_modules())
    return h.hexdigest(), modes, hooks, types


class GatedBlock(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.ReLU(), GatedBlock())
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


@pytest.mark.parametrize("training", [False, True])
def test_quantize_never_mutates_the_user_model(training):
    model = make_model("tiny_resnet").train(training)
    model.fc.register_forward_hook(lambda m, i, o: None)
    before = fingerprint(model)
    x = example_input("tiny_resnet", 16)
    quantized = eptq_fx.quantize(model, x, RTN, progress=False)
    assert fingerprint(model) == before
    assert not any(isinstance(m, fx.GraphModule) for m in model.modules())
    # and the quantized model does not share storage with it: changing it leaves the user's weights alone
    with torch.no_grad():
        for p in quantized.parameters():
            p.add_(1.0)
    assert fingerprint(model) == before


def test_capture_traces_a_copy_in_eval_mode():
    model = make_model("small_cnn").train()
    before = fingerprint(model)
    gm = capture(model)
    assert fingerprint(model) == before and model.training
    assert not gm.training
    x = example_input("small_cnn", 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.eval()(x))
    assert gm.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()


def test_data_parallel_is_unwrapped():
    model = make_model("small_cnn")
    gm = capture(nn.DataParallel(model))
    names = {name for name, _ in gm.named_parameters()}
    assert "conv1.weight" in names and not any(n.startswith("module.") for n in names)
    x = example_input("small_cnn", 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_torch_compiled_model_quantizes_as_the_model_itself():
    """torch.compile's wrapper hides the inputs behind forward(*args, **kwargs); it quantized nothing and
    reported a calibration batch with too many inputs before."""
    model, x = make_model("small_cnn"), example_input("small_cnn", 64, seed=1)
    config = EPTQConfig(method="rtn", weight_bits=4, n_calib=64)
    compiled = eptq_fx.quantize(torch.compile(model), x, config, progress=False)
    plain = eptq_fx.quantize(model, x, config, progress=False)
    with torch.no_grad():
        assert torch.equal(compiled(x), plain(x))


def test_untraceable_submodule_is_named_with_a_fix():
    with pytest.raises(TraceError) as info:
        capture(WithGate())
    message = str(info.value)
    assert "'body.1'" in message and "GatedBlock" in message
    assert "leaf_modules" in message and "concrete_args" in message


@pytest.mark.parametrize("leaf", [GatedBlock, "body.1"])
def test_leaf_modules_make_it_traceable_and_quantizable(leaf):
    torch.manual_seed(0)
    model = WithGate().eval()
    gm = capture(model, leaf_modules=[leaf])
    leaf_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "body.1"]
    assert len(leaf_calls) == 1  # kept as one opaque call
    x = torch.randn(64, 8)
    neg = -x.abs()  # the other branch of the gate is taken at run time, not frozen at trace time
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        torch.testing.assert_close(gm(neg), model(neg))
    q = eptq_fx.quantize(model, x, RTN, leaf_modules=[leaf], progress=False)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert ((out - ref).norm() / ref.norm()) < 0.05


def test_example_inputs_that_break_the_graph_raise_trace_error():
    gm_model = make_model("small_cnn")
    with pytest.raises(TraceError):
        capture(gm_model, example_inputs=(torch.randn(2, 5, 8, 8),))  # wrong channel count
