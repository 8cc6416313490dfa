"""The user's model is never modified: parameters, buffers, training flags, requires_grad, gradients and hooks
are the same before and after every public entry point, whether it succeeds or fails midway, and nothing the
pipeline returns shares storage with it (a later change to the quantized model cannot leak back)."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eptq_fx
from eptq_fx import CalibrationDataError, EPTQConfig, HessianConfig, HessianError, ReconstructionConfig

RTN = EPTQConfig(weight_bits=4, act_bits=4, method="rtn", n_calib=16)
TINY = EPTQConfig(weight_bits=4, act_bits=4, n_calib=16, weight_range="hmse",
                  hessian=HessianConfig(max_probes=3, min_probes=2, weight_samples=8, weight_probes=2,
                                        cache_dir=None),
                  reconstruction=ReconstructionConfig(iters=6, batch_size=8, qdrop=0.5))
IMAGES = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """conv-BN-ReLU, a residual conv-BN, dropout and a linear head (BN buffers and dropout make training mode
    matter); the head's bias is frozen (requires_grad=False) to check that flags survive too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.fc(self.drop(h.mean((2, 3))))


class ArgmaxNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).argmax(1)


def user_model(training: bool, cls: type[Net] = Net) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.3, 0.3, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
    model.fc.bias.requires_grad_(False)
    model.fc.register_forward_hook(lambda m, i, o: None)
    model.conv1.register_forward_pre_hook(lambda m, i: None)
    return model.train(training)


def snapshot(model: nn.Module) -> dict:
    """Everything a quantization pipeline could plausibly change on the user's model."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return {
        "state": h.hexdigest(),
        "tensors": [(n, id(t), t.data_ptr(), t.requires_grad, t.grad is None)
                    for n, t in [*model.named_parameters(), *model.named_buffers()]],
        "modules": [(n, type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                     len(m._backward_hooks)) for n, m in model.named_modules()],
    }


def storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def calibrated(model: nn.Module, config: EPTQConfig = RTN) -> torch.fx.GraphModule:
    prepared = eptq_fx.prepare(model, config, example_inputs=(IMAGES[:2],))
    return eptq_fx.calibrate(prepared, IMAGES, progress=False)


def failing_source():
    yield IMAGES[:8]
    raise OSError("disk gone")


def run_export(model: nn.Module) -> object:
    return eptq_fx.export.export(eptq_fx.quantize(model, IMAGES, RTN, progress=False), (IMAGES[:2],))


ENTRY_POINTS = {
    "capture": lambda m: eptq_fx.capture(m, (IMAGES[:2],)),
    "prepare": lambda m: eptq_fx.prepare(m, RTN, example_inputs=(IMAGES[:2],)),
    "calibrate": calibrated,
    "reconstruct": lambda m: eptq_fx.reconstruct(calibrated(m, TINY), IMAGES, TINY, progress=False),
    "convert": lambda m: eptq_fx.convert(calibrated(m)),
    "quantize-rtn": lambda m: eptq_fx.quantize(m, IMAGES, RTN, progress=False),
    "quantize-eptq": lambda m: eptq_fx.quantize(m, IMAGES, TINY, progress=False, return_prepared=True),
    "export": run_export,
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_leaves_the_user_model_alone(entry, training):
    model = user_model(training)
    before = snapshot(model)
    result = ENTRY_POINTS[entry](model)
    assert snapshot(model) == before
    if isinstance(result, nn.Module):
        assert not storages(result) & storages(model), "the result shares storage with the user's model"


def test_changing_the_prepared_model_does_not_reach_the_user_model():
    model = user_model(False)
    before = snapshot(model)
    prepared = calibrated(model)
    with torch.no_grad():
        for p in prepared.parameters():
            p.add_(1.0)
    prepared.train()
    assert snapshot(model) == before


@pytest.mark.parametrize("failure", ["source-raises", "staged-calibrate-raises", "hessian-error"])
def test_failing_midway_leaves_the_user_model_alone(failure):
    """A run that fails after capture (data source raising, or a HessianError after calibration) changes
    nothing on the user's model."""
    cls = ArgmaxNet if failure == "hessian-error" else Net
    model = user_model(True, cls)
    before = snapshot(model)
    if failure == "source-raises":
        with pytest.raises(CalibrationDataError, match="disk gone"):
            eptq_fx.quantize(model, failing_source(), TINY, progress=False)
    elif failure == "staged-calibrate-raises":
        prepared = eptq_fx.prepare(model, TINY, example_inputs=(IMAGES[:2],))
        with pytest.raises(CalibrationDataError, match="disk gone"):
            eptq_fx.calibrate(prepared, failing_source(), forward_fn=lambda m, b: m(b), progress=False)
    else:
        config = dataclasses.replace(TINY, weight_range="mse", reconstruction=dataclasses.replace(
            TINY.reconstruction, hessian_weighting=True, hessian_scope="all"))
        # a Hessian-weighted loss needs the Hessian: it fails
        with pytest.raises(HessianError):
            eptq_fx.quantize(model, IMAGES, config, progress=False)
    assert snapshot(model) == before


MUTATIONS = {
    "weight value": lambda m: m.conv1.weight.data.mul_(1.0001),
    "BN statistic": lambda m: m.bn1.num_batches_tracked.add_(1),
    "training flag": lambda m: m.bn2.train(not m.bn2.training),
    "requires_grad": lambda m: m.fc.bias.requires_grad_(True),
    "gradient": lambda m: setattr(m.fc.weight, "grad", torch.zeros_like(m.fc.weight)),
    "hook": lambda m: m.bn1.register_forward_hook(lambda *a: None),
    "replaced parameter": lambda m: setattr(m.fc, "weight", nn.Parameter(m.fc.weight.detach().clone())),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_snapshot_notices_each_kind_of_change(mutation):
    """The checks above can fail: each kind of change a pipeline could make shows up in the snapshot."""
    model = user_model(False)
    before = snapshot(model)
    MUTATIONS[mutation](model)
    assert snapshot(model) != before
