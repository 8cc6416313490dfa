"""The public API end to end with round-to-nearest (RTN): one-shot ``quantize``, the staged pipeline, and the
kinds of models and calibration data it accepts. Accuracy is measured against the float model."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import eptq_fx
from eptq_fx import EPTQConfig, calibrate, capture, convert, prepare
from examples.models import example_input, make_model

W8A8 = EPTQConfig(method="rtn", weight_bits=8, act_bits=8)
W4A8 = EPTQConfig(method="rtn", weight_bits=4, act_bits=8)
# where only the plumbing is under test, min/max activation ranges keep things fast (the MSE search is slower)
FAST_W4A8 = EPTQConfig(method="rtn", weight_bits=4, act_bits=8, act_range="minmax")
FAST_W8A8 = EPTQConfig(method="rtn", act_range="minmax")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def cosine(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)


def calib_and_test(name: str, n_calib: int = 64, n_test: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return example_input(name, n_calib, seed=1), example_input(name, n_test, seed=2)


@pytest.mark.parametrize("name", ["tiny_resnet", "small_cnn"])
def test_w8a8_is_close_to_float_and_w4a8_worse_but_sane(name):
    model = make_model(name)
    calib, x = calib_and_test(name)
    with torch.no_grad():
        ref = model(x)
        err8 = rel_error(eptq_fx.quantize(model, calib, W8A8, progress=False)(x), ref)
        err4 = rel_error(eptq_fx.quantize(model, calib, W4A8, progress=False)(x), ref)
    assert err8 < 0.02
    assert err8 < err4 < 0.1


def test_result_is_a_graph_module_that_differs_from_float():
    model = make_model("tiny_resnet")
    calib, x = calib_and_test("tiny_resnet")
    q = eptq_fx.quantize(model, calib, FAST_W4A8, progress=False)
    assert isinstance(q, fx.GraphModule) and not q.training
    with torch.no_grad():
        assert not torch.allclose(q(x), model(x), atol=1e-5)


def test_quantize_accepts_a_graph_module_from_capture():
    model = make_model("tiny_resnet")
    calib, x = calib_and_test("tiny_resnet")
    gm = capture(model)
    with torch.no_grad():
        from_gm = eptq_fx.quantize(gm, calib, FAST_W4A8, progress=False)(x)
        from_model = eptq_fx.quantize(model, calib, FAST_W4A8, progress=False)(x)
    torch.testing.assert_close(from_gm, from_model, rtol=0, atol=0)
    assert any(n.op == "call_module" for n in gm.graph.nodes)  # the captured graph itself is not rewritten
    assert not any("eptq_act_quant" in name for name, _ in gm.named_modules())


def test_staged_pipeline_equals_one_shot():
    model = make_model("tiny_resnet")
    calib, x = calib_and_test("tiny_resnet")
    gm = capture(model)
    prepared = prepare(gm, FAST_W4A8, example_inputs=(calib[:2],))
    calibrate(prepared, calib, config=FAST_W4A8, progress=False)
    staged = convert(prepared)
    one_shot = eptq_fx.quantize(model, calib, FAST_W4A8, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(staged(x), one_shot(x), rtol=0, atol=0)
    assert staged.code == one_shot.code


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_mixer"])
def test_token_models_at_w8a8_agree_with_float(name):
    model = make_model(name)
    calib, x = calib_and_test(name, n_calib=64, n_test=64)
    q = eptq_fx.quantize(model, calib, W8A8, progress=False)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert float(cosine(out, ref).min()) > 0.99
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9
    n_matmul_q = sum(1 for n in q.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target))
    assert n_matmul_q > 0


def test_dataloader_of_pairs_is_calibration_data():
    model = make_model("small_cnn")
    calib, x = calib_and_test("small_cnn")
    loader = DataLoader(TensorDataset(calib, torch.randint(0, 10, (len(calib),))), batch_size=32)
    with torch.no_grad():
        from_loader = eptq_fx.quantize(model, loader, FAST_W8A8, progress=False)(x)
        from_tensor = eptq_fx.quantize(model, calib, FAST_W8A8, progress=False)(x)
    torch.testing.assert_close(from_loader, from_tensor, rtol=0, atol=0)  # the labels are ignored


def test_n_calib_limits_the_samples_used():
    model = make_model("small_cnn")
    calib, x = calib_and_test("small_cnn")
    calib = torch.cat([calib[:32], 3 * calib[32:]])  # samples past the first 32 widen every range
    first32 = EPTQConfig(method="rtn", n_calib=32, act_range="minmax")
    with torch.no_grad():
        capped = eptq_fx.quantize(model, calib, first32, progress=False)(x)
        explicit = eptq_fx.quantize(model, calib[:32], first32, progress=False)(x)
        everything = eptq_fx.quantize(model, calib, FAST_W8A8, progress=False)(x)
    torch.testing.assert_close(capped, explicit, rtol=0, atol=0)
    assert not torch.equal(capped, everything)


class TwoInputs(nn.Module):
    """Takes ``image`` and ``extra`` (by name, from a dict batch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc_extra = nn.Linear(4, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, image, extra):
        return self.head(torch.relu(self.conv(image)).mean((2, 3)) + self.fc_extra(extra))


def test_dict_input_model():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    images, extra = torch.randn(96, 3, 8, 8), torch.randn(96, 4)
    batches = [{"extra": extra[i:i + 32], "image": images[i:i + 32]} for i in range(0, 96, 32)]
    q = eptq_fx.quantize(model, batches, FAST_W8A8, progress=False)
    with torch.no_grad():
        ref, out = model(images, extra), q(images, extra)
    assert rel_error(out, ref) < 0.03
    # same as positional tuples in the model's argument order: the dict keys were matched by name
    q_tuple = eptq_fx.quantize(model, [(images, extra)], FAST_W8A8, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(q_tuple(images, extra), out, rtol=0, atol=0)


def test_model_without_quantizable_layers_is_an_error_unless_float_is_allowed(caplog):
    model = nn.Sequential(nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(8, 3, 4, 4)
    with pytest.raises(eptq_fx.ModelError, match="allow_float=True"):
        eptq_fx.quantize(model, x, W8A8, progress=False)
    q = eptq_fx.quantize(model, x, W8A8, progress=False, allow_float=True)
    torch.testing.assert_close(q(x), model(x))
    assert "no quantizable layer" in caplog.text


def test_config_is_checked_before_any_work():
    with pytest.raises(eptq_fx.ConfigError):
        eptq_fx.quantize(make_model("small_cnn"), example_input("small_cnn", 4), {"weight_bits": 4})
    with pytest.raises(eptq_fx.ConfigError):
        EPTQConfig(weight_bits=1)


@pytest.mark.parametrize("fails", [False, True])
def test_quantize_computes_in_float32_and_restores_tf32_settings(monkeypatch, fails):
    """cuDNN's TF32 default cost 1.3 points on a GPU; quantize turns TF32 off while it runs and gives the user's
    settings back afterwards, also when it fails."""
    import eptq_fx.pipeline as pipeline

    seen = []
    real_calibrate = pipeline.calibrate

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        if fails:
            raise eptq_fx.CalibrationDataError("stop here")
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "calibrate", spy)
    assert torch.backends.cudnn.allow_tf32 is True  # PyTorch's default
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
        x = torch.randn(8, 3, 6, 6)
        if fails:
            with pytest.raises(eptq_fx.CalibrationDataError):
                eptq_fx.quantize(model, x, eptq_fx.EPTQConfig(method="rtn"), progress=False)
        else:
            eptq_fx.quantize(model, x, eptq_fx.EPTQConfig(method="rtn"), progress=False)
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
