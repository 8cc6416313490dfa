"""Every bad input gets a typed eptq_fx error with a one-line message that says what to change; inputs that look
unusual but are legitimate (integer inputs, tuple / dict / namedtuple outputs, a model in training mode) work.

Decisions these tests pin down:
* ``EPTQConfig.n_calib`` is a maximum: fewer samples give a warning and the run uses all there are.
* A Hessian that is zero everywhere (argmax output, output independent of the layers) is a HessianError when
  the loss is Hessian-weighted (``ReconstructionConfig(hessian_weighting=True)``); there is no silent uniform
  fallback, and the error names ``hessian_weighting=False``. With that uniform loss the Hessian only ranks layers
  for the report, so such a model quantizes with a warning and no sensitivity scores.
* A model in training mode (or with a BatchNorm left in training mode) is quantized as an eval-mode copy, with a
  warning; the user's model keeps its flags and statistics.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eptq_fx
from eptq_fx import (
    CalibrationDataError,
    ConfigError,
    EPTQConfig,
    HessianConfig,
    HessianError,
    HessianScope,
    ModelError,
    Override,
    ReconstructionConfig,
    TraceError,
)
from examples.models import make_model

RTN = EPTQConfig(weight_bits=8, act_bits=8, method="rtn", n_calib=32)
TINY = EPTQConfig(weight_bits=4, act_bits=4, n_calib=32,
                  hessian=HessianConfig(max_probes=3, min_probes=2, cache_dir=None),
                  reconstruction=ReconstructionConfig(iters=8, batch_size=8))
WEIGHTED = dataclasses.replace(TINY, reconstruction=dataclasses.replace(TINY.reconstruction, hessian_weighting=True,
                                                                                   hessian_scope="all"))
QDQ_OPS = (torch.ops.quantized_decomposed.quantize_per_tensor.default,
           torch.ops.quantized_decomposed.dequantize_per_channel.default)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def mlp() -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP().eval()


def data(n: int = 32, features: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def quantize(model, calib, config=RTN, **kwargs):
    return eptq_fx.quantize(model, calib, config, progress=False, **kwargs)


def int_state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if k.endswith(("_weight_int", "_weight_scale", "_bias"))}


def count_act_quant(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is QDQ_OPS[0] for n in gm.graph.nodes)


def has_qdq(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in QDQ_OPS for n in gm.graph.nodes)


# ------------------------------------------------------------------------------------------- tracing
class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # control flow on a value: fx cannot trace it


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), GatedBlock())
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class WithFlag(MLP):
    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        if double:  # Python control flow on an argument: needs concrete_args
            y = 2 * y
        return y


def test_untraceable_module_is_named_and_leaf_modules_fix_it():
    with pytest.raises(TraceError) as info:
        quantize(WithGate(), data())
    msg = str(info.value)
    assert "'body.1' (GatedBlock)" in msg and "leaf_modules=[GatedBlock]" in msg and "concrete_args" in msg
    assert has_qdq(quantize(WithGate(), data(), leaf_modules=[GatedBlock]))


class LeadingFlag(MLP):
    def forward(self, double: bool, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        return 2 * y if double else y


class WithRequiredFlag(MLP):
    def forward(self, x: torch.Tensor, double: bool) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        if double:
            y = 2 * y
        return y


def test_control_flow_on_an_argument_suggests_concrete_args_which_fix_it():
    with pytest.raises(TraceError, match=r"^torch.fx could not trace the forward of WithRequiredFlag: .*control "
                                         r"flow\. Pass concrete_args=\{\.\.\.\} to fix the arguments"):
        quantize(WithRequiredFlag(), (data(), data()), capture_method="symbolic_trace")
    model = WithFlag().eval()
    x = data(4, seed=1)
    by_default = quantize(model, data(), TINY)  # an argument with a default is fixed to it, not data
    assert F.cosine_similarity(by_default(x).flatten(), model(x).flatten(), dim=0) > 0.9
    gm = quantize(model, data(), TINY, concrete_args={"double": True})
    assert has_qdq(gm)
    assert F.cosine_similarity(gm(x).flatten(), model(x, True).flatten(), dim=0) > 0.9


def test_concrete_arg_without_default_is_not_mistaken_for_a_data_input():
    """A fixed leading argument: the calibration data holds only ``x``, the quantized model takes only ``x``."""
    model = LeadingFlag().eval()
    gm = quantize(model, data(), TINY, concrete_args={"double": True})
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x = data(4, seed=1)
    assert F.cosine_similarity(gm(x).flatten(), model(True, x).flatten(), dim=0) > 0.9


class NoQuantizable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2 + 1


def test_model_without_quantizable_layers_is_an_error_unless_float_is_allowed(caplog):
    with pytest.raises(ModelError, match=r"no quantizable layer .*allow_float=True"):
        quantize(NoQuantizable(), data(), TINY)
    with caplog.at_level(logging.WARNING, logger="eptq_fx"):
        gm = quantize(NoQuantizable(), data(), TINY, allow_float=True)
    assert "no quantizable layer" in caplog.text
    assert not has_qdq(gm)
    x = data(4, seed=1)
    torch.testing.assert_close(gm(x), NoQuantizable()(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------- calibration data
def empty_generator():
    yield from ()


@pytest.mark.parametrize("calib", [torch.empty(0, 6), [], empty_generator()], ids=["tensor", "list", "generator"])
def test_empty_calibration_data(calib):
    with pytest.raises(CalibrationDataError, match=r"^Calibration data is empty: give at least one batch"):
        quantize(mlp(), calib)


def test_fewer_samples_than_n_calib_warn_and_use_all_of_them(caplog):
    """n_calib is a maximum: 5 samples with n_calib=32 is a warning, and the run (EPTQ included) completes."""
    with caplog.at_level(logging.WARNING, logger="eptq_fx.pipeline"):
        gm = quantize(mlp(), data(5), TINY)
    assert "has 5 samples, fewer than config.n_calib=32: using all 5" in caplog.text
    assert has_qdq(gm)


def test_n_calib_is_a_maximum_the_source_is_not_read_further():
    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield data(8, seed=i)

    quantize(mlp(), batches(), dataclasses.replace(RTN, n_calib=16))
    assert pulled == [0, 1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_batch_is_named(bad):
    second = data(8, seed=1)
    second[3, 2] = bad
    with pytest.raises(CalibrationDataError, match=r"^Calibration batch 1, input 0 contains NaN or Inf values; "
                                                   r"clean or drop that batch\.$"):
        quantize(mlp(), [data(8), second])


@pytest.mark.parametrize("calib,hint", [
    (data(8, features=5), r"RuntimeError: mat1 and mat2 shapes cannot be multiplied.*give inputs shaped and typed"),
    (data(8).double(), r"convert the data to the model's dtype \(x\.to\(torch\.float32\)\)"),
    (torch.ones(8, 6, dtype=torch.long), r"give inputs shaped and typed.*'int64'"),
], ids=["shape", "float64", "int64"])
def test_data_that_does_not_fit_the_model(calib, hint):
    with pytest.raises(CalibrationDataError, match=r"^The model fails on the calibration data .*" + hint):
        quantize(mlp(), calib)


def test_batches_of_different_shapes():
    with pytest.raises(CalibrationDataError, match=r"batch 1, input 0 has shape \(4, 7\).*unlike batch 0's "
                                                   r"\(4, 6\).*same sample shape"):
        quantize(mlp(), [data(4), data(4, features=7)])


@pytest.mark.parametrize("calib,message", [
    (None, "calib_data must be a tensor or an iterable of batches, got NoneType"),
    ([{"y": data(4)}], r"dict without the model input\(s\) \['x'\]; its keys are \['y'\]"),
    ([[data(4).tolist()]], "input 0 is a list, not a tensor"),
], ids=["none", "dict-keys", "not-a-tensor"])
def test_calibration_data_of_the_wrong_kind(calib, message):
    with pytest.raises(CalibrationDataError, match=message):
        quantize(mlp(), calib)


def test_staged_calibrate_names_the_failing_batch():
    prepared = eptq_fx.prepare(mlp(), RTN, example_inputs=(data(2),))
    with pytest.raises(CalibrationDataError, match=r"^The model fails on calibration batch 0 \(RuntimeError"):
        eptq_fx.calibrate(prepared, data(8, features=5), progress=False)


class DiskGone(OSError):
    pass


def failing_source(n_good: int):
    for i in range(n_good):
        yield data(8, seed=i)
    raise DiskGone("disk gone")


def test_generator_raising_midway():
    with pytest.raises(CalibrationDataError, match=r"^Reading calibration batch 2 raised DiskGone: disk gone; "
                                                   r"fix the data source") as info:
        quantize(mlp(), failing_source(2))
    assert isinstance(info.value.__cause__, DiskGone)


def test_generator_raising_midway_in_staged_calibrate_with_forward_fn():
    prepared = eptq_fx.prepare(mlp(), RTN, example_inputs=(data(2),))
    with pytest.raises(CalibrationDataError, match=r"^Reading calibration batch 1 raised DiskGone"):
        eptq_fx.calibrate(prepared, failing_source(1), forward_fn=lambda m, b: m(b), progress=False)
    # failed midway: activations left in float rather than half-observed, and a second attempt succeeds
    assert count_act_quant(eptq_fx.convert(prepared)) == 0
    eptq_fx.calibrate(prepared, data(), progress=False)
    assert count_act_quant(eptq_fx.convert(prepared)) == 2


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("value,message", [
    (1, "must be between 2 and 16, got 1"), (17, "must be between 2 and 16, got 17"),
    (4.0, "must be an integer between 2 and 16, got 4.0"), ("4", "must be an integer between 2 and 16, got '4'"),
    (True, "must be an integer between 2 and 16, got True"), (None, "must be an integer .* got None"),
])
def test_bit_widths_out_of_range_or_not_integers(field, value, message):
    with pytest.raises(ConfigError, match=f"^{field} {message}"):
        EPTQConfig(**{field: value})


def test_override_bits_are_checked_too():
    with pytest.raises(ConfigError, match=r"^Override.weight_bits must be between 2 and 16, got 1"):
        Override(name="a", weight_bits=1)


def test_power_of_two_with_asymmetric_activations_is_contradictory():
    with pytest.raises(ConfigError, match=r"power_of_two .* use act_scheme='symmetric' or 'unsigned'"):
        EPTQConfig(power_of_two=True, act_scheme="asymmetric")
    assert EPTQConfig(power_of_two=True, act_scheme="symmetric").power_of_two  # the consistent variant is fine


def test_unknown_override_name_lists_close_matches():
    config = dataclasses.replace(RTN, overrides=(Override(name="aa", weight_bits=8),))
    with pytest.raises(ConfigError, match=r"^Override name 'aa' matches no quantizable layer. Close matches: a\."):
        quantize(mlp(), data(), config)
    far = dataclasses.replace(RTN, overrides=(Override(name="encoder.fc", weight_bits=8),))
    with pytest.raises(ConfigError, match=r"matches no quantizable layer. Quantizable layers: a, b\."):
        quantize(mlp(), data(), far)


@pytest.mark.parametrize("make,message", [
    (lambda: EPTQConfig(method="eptqq"), r"method must be one of .* Did you mean 'eptq'\?"),
    (lambda: EPTQConfig(act_range="mes"), r"Did you mean 'mse'\?"),
    (lambda: HessianConfig(min_probes=20, max_probes=10), "min_probes must not exceed max_probes"),
    (lambda: HessianConfig(output_metric="softmx"), r"output_metric must be one of .* Did you mean 'softmax'\?"),
    (lambda: ReconstructionConfig(qdrop=1.0), r"qdrop must be in \[0, 1\)"),
    (lambda: EPTQConfig(n_calib=0), "n_calib must be a positive integer, got 0"),
    (lambda: EPTQConfig(seed=1.5), "seed must be an integer, got 1.5"),
    (lambda: Override(name="a", regex="a"), "exactly one of name=, regex= or module_type="),
], ids=["method", "act_range", "probes", "output_metric", "qdrop", "n_calib", "seed", "override-selector"])
def test_invalid_config_values(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_config_of_the_wrong_type():
    with pytest.raises(ConfigError, match=r"config must be an eptq_fx.EPTQConfig, got dict"):
        quantize(mlp(), data(), {"weight_bits": 4})


# -------------------------------------------------------------------------------------------- model
class ConvBNDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def conv_bn_dropout() -> ConvBNDropout:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConvBNDropout().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        model.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    return model


IMAGES = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("where", ["model", "bn"])
def test_training_mode_is_quantized_as_eval_copy_with_a_warning(where, caplog):
    """A model (or only its BatchNorm) in training mode: the run uses the eval-mode copy (running statistics,
    no dropout), logs it, and the user's flags and statistics stay as they were."""
    reference = int_state(quantize(conv_bn_dropout(), IMAGES))
    model = conv_bn_dropout()
    (model if where == "model" else model.bn).train()
    stats = (model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone())
    with caplog.at_level(logging.WARNING, logger="eptq_fx.graph.tracing"):
        gm = quantize(model, IMAGES)
    expected = "the model is in training mode" if where == "model" else "module(s) bn are in training mode"
    assert expected in caplog.text and "your model is left as it was" in caplog.text
    got = int_state(gm)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
    assert model.bn.training and model.training == (where == "model")
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.num_batches_tracked, stats[1])


def test_nan_weight_is_named():
    model = mlp()
    with torch.no_grad():
        model.a.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"^Parameter 'a.weight' contains NaN or Inf; fix the checkpoint"):
        quantize(model, data())


def test_nan_batchnorm_statistic_is_named():
    model = conv_bn_dropout()
    model.bn.running_var[1] = float("inf")
    with pytest.raises(ModelError, match=r"^Buffer 'bn.running_var' contains NaN or Inf; fix the checkpoint"):
        quantize(model, IMAGES)


def test_model_and_data_on_different_devices():
    """No second device on a CPU machine: the meta device stands in for it, on both sides of the check."""
    with pytest.raises(ModelError, match=r"^The model is on meta but the calibration data is on cpu; move one "
                                         r"of them \(e.g. model.to\('cpu'\)\)"):
        quantize(mlp().to("meta"), data())
    with pytest.raises(CalibrationDataError, match=r"input 0 is on the meta device and holds no values"):
        quantize(mlp(), data().to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda_data_on_cpu():
    with pytest.raises(ModelError, match=r"^The model is on cuda:0 but the calibration data is on cpu"):
        quantize(mlp().cuda(), data())
    with pytest.raises(CalibrationDataError, match=r"batch 1, input 0 is on cuda:0 but batch 0 is on cpu"):
        quantize(mlp(), [data(4), data(4).cuda()])


# ------------------------------------------------------------------------------ legitimate unusual models
class TokenModel(nn.Module):
    """Integer token ids and a boolean mask as inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * mask.unsqueeze(-1)
        return self.out(F.relu(self.fc(h))).mean(1)


def tokens(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 20, (n, 5), generator=g), torch.rand(n, 5, generator=g) > 0.3


@pytest.mark.parametrize("config", [RTN, TINY], ids=["rtn", "eptq"])
def test_integer_and_boolean_inputs_work_and_stay_unquantized(config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TokenModel().eval()
    ids, mask = tokens()
    as_dicts = [{"ids": ids[i:i + 8], "mask": mask[i:i + 8]} for i in range(0, 32, 8)]
    gm = quantize(model, as_dicts if config is TINY else (ids, mask), config)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [p.target for p in placeholders] == ["ids", "mask"]
    for p in placeholders:  # integer inputs are consumed as they are, never fake-quantized
        assert all(u.target not in QDQ_OPS for u in p.users)
    assert has_qdq(gm)
    out, ref = gm(ids, mask), model(ids, mask)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if config is RTN:  # 8 bits: close to float
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_wrong_number_of_inputs():
    ids, _ = tokens()
    with pytest.raises(CalibrationDataError, match=r"^Calibration batch 0 has 1 input\(s\) but the model takes 2"):
        quantize(TokenModel(), [ids])


Pair = collections.namedtuple("Pair", "logits features")


class NamedTupleOutput(MLP):
    def forward(self, x: torch.Tensor) -> Pair:  # type: ignore[override]
        h = F.relu(self.a(x))
        return Pair(self.b(h), h)


def assert_structure_close(out, ref, cos: float) -> None:
    assert type(out) is type(ref)
    pairs = zip(out.values(), ref.values()) if isinstance(ref, dict) else zip(out, ref)
    for o, r in pairs:
        assert F.cosine_similarity(o.flatten(), r.flatten(), dim=0) > cos


@pytest.mark.parametrize("name", ["tuple_output", "dict_output"])
@pytest.mark.parametrize("config", [RTN, TINY], ids=["rtn", "eptq"])
def test_tuple_and_dict_outputs_are_supported(name, config):
    model, x = make_model(name), torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = quantize(model, x, config)
    assert has_qdq(gm)
    assert_structure_close(gm(x), model(x), 0.9 if config is TINY else 0.99)


def test_namedtuple_output_with_rtn():
    model = NamedTupleOutput()
    gm = quantize(model, data())
    assert_structure_close(gm(data()), model(data()), 0.99)


def test_namedtuple_output_with_eptq():
    model = NamedTupleOutput()
    gm = quantize(model, data(), TINY)
    assert_structure_close(gm(data()), model(data()), 0.9)


# ------------------------------------------------------------------------------------------ Hessian
class ArgmaxOutput(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).argmax(1)


class ZeroOutput(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.0


def test_argmax_output_has_no_hessian():
    with pytest.raises(HessianError, match=r"no floating-point tensor that depends on the compare points \(e.g. "
                                           r"it ends in argmax or is detached\); return the logits"):
        quantize(ArgmaxOutput(), data(), WEIGHTED)


def test_output_independent_of_the_layers_has_an_all_zero_hessian():
    with pytest.raises(HessianError, match=r"^Every Hessian score is zero: the model output does not depend"):
        quantize(ZeroOutput(), data(), WEIGHTED)


def test_argmax_output_works_without_hessian_where_none_is_needed(caplog):
    """RTN needs no Hessian, nor does EPTQ with a uniform loss: the scores the report would show are missing, with
    a warning that says why. The default loss weighs by the Hessian, and its error says how to do without it."""
    assert has_qdq(quantize(ArgmaxOutput(), data(), dataclasses.replace(TINY, method="rtn")))
    assert TINY.reconstruction.hessian_weighting and TINY.reconstruction.hessian_scope is HessianScope.ALL
    with pytest.raises(HessianError, match=r"or quantize with ReconstructionConfig\(hessian_weighting=False\)\.$"):
        quantize(ArgmaxOutput(), data(), TINY)
    uniform = dataclasses.replace(TINY, reconstruction=dataclasses.replace(TINY.reconstruction,
                                                                           hessian_weighting=False))
    with caplog.at_level("WARNING", logger="eptq_fx"):
        gm = quantize(ArgmaxOutput(), data(), uniform)
    assert gm(data()).dtype == torch.int64
    assert any("no Hessian scores for the report" in r.getMessage() for r in caplog.records)
