"""The command line and the demo: ``eptq-fx quantize`` end to end, the digits demo, the CIFAR ResNet loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from eptq_fx import ConfigError
from eptq_fx.cli import load_calibration, load_model, main
from eptq_fx.export import load
from examples import demo
from examples.demo import DemoResult, accuracy, digits_model, digits_split, format_table, parse_bits, run_demo
from examples.models import make_model


def tiny_model() -> nn.Module:
    """Factory for --model-module tests.test_cli:tiny_model."""
    return make_model("small_cnn")


@pytest.fixture(scope="module")
def calib_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32))
    return path


def test_parse_bits():
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w16a16") == (16, 16)
    with pytest.raises(ConfigError):
        parse_bits("4/8")


def test_quantize_command_writes_a_program_that_runs(tmp_path, calib_npz, capsys):
    out = tmp_path / "q.pt2"
    code = main(["quantize", "--model-module", "tests.test_cli:tiny_model", "--calib", str(calib_npz),
                 "--bits", "W4A8", "--method", "rtn", "--out", str(out)])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "W4A8" in printed and "cosine similarity" in printed
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        ref, got = tiny_model()(x), load(out).module()(x)
    assert float((got - ref).norm() / ref.norm()) < 0.1
    assert not torch.allclose(got, ref, atol=1e-5)


def test_checkpoint_forms(tmp_path):
    model = tiny_model()
    full, state = tmp_path / "full.pt", tmp_path / "state.pt"
    torch.save(model, full)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, state)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(None, str(full))(x), model(x))
        from_state = load_model("tests.test_cli:tiny_model", str(state))
        assert torch.equal(from_state(x), model(x))
    with pytest.raises(ConfigError, match="--model-module"):
        load_model(None, str(state))
    with pytest.raises(ConfigError):
        load_model("tests.test_cli", None)  # no ':factory'


def test_calibration_files(tmp_path):
    x = torch.randn(6, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    assert torch.equal(load_calibration(str(tmp_path / "x.pt")), x)
    np.savez(tmp_path / "two.npz", images=x.numpy(), labels=np.arange(6))
    with pytest.raises(Exception, match="--calib-key"):
        load_calibration(str(tmp_path / "two.npz"))
    assert torch.equal(load_calibration(str(tmp_path / "two.npz"), "images"), x)


def test_cli_reports_config_errors_without_a_traceback(calib_npz, capsys):
    code = main(["quantize", "--model-module", "tests.test_cli:tiny_model", "--calib", str(calib_npz),
                 "--bits", "W1A8", "--method", "rtn"])
    assert code == 2 and "weight_bits" in capsys.readouterr().err


def test_format_table_lists_every_row():
    rows = [DemoResult("digits", "rtn", "W8A8", 0.98, 0.975, 1.5), DemoResult("digits", "eptq", "W4A8", 0.98, 0.97, 9)]
    table = format_table(rows)
    assert "98.00%" in table and "97.50%" in table and "-0.50" in table and "eptq" in table
    assert len(table.splitlines()) == 4


def test_digits_demo_trains_caches_and_quantizes(tmp_path, monkeypatch):
    split = digits_split()
    assert len(split.x_train) + len(split.x_test) == 1797 and split.x_test.shape[1:] == (1, 8, 8)
    rows = run_demo(bits=["W8A8", "W4A8"], methods=["rtn"], n_calib=256, cache_dir=tmp_path)
    cached = list((tmp_path / "eptq_fx" / "demo").glob("*.pt"))
    assert len(cached) == 1
    w8, w4 = rows
    assert w8.float_acc > 0.95  # a few seconds of training is enough for digits
    assert w8.quant_acc >= w8.float_acc - 0.01 and w4.quant_acc >= w4.float_acc - 0.05
    # the cached weights are reused: no second training run
    monkeypatch.setattr(demo, "train_digits_model", lambda *a, **k: pytest.fail("retrained despite the cache"))
    model = digits_model(split, tmp_path)
    assert accuracy(model, split.x_test, split.y_test) == pytest.approx(w8.float_acc)


def test_cifar_demo_data_and_float_accuracy(shared_data):
    from examples.demo import cifar_model, cifar_split

    if not (shared_data / "cifar10" / "test.npz").is_file():
        pytest.skip("CIFAR-10 copy not found")
    split = cifar_split(shared_data, n_calib=64)
    assert split.x_train.shape == (64, 3, 32, 32) and len(split.x_test) == 10_000
    model = cifar_model(shared_data, "resnet20")
    acc = accuracy(model, split.x_test[::10], split.y_test[::10])  # 1000 images, 100 per class
    assert 0.75 < acc < 0.88  # README: about 81% on the JPEG copy


@pytest.mark.slow
def test_digits_demo_with_eptq_is_no_worse_than_rtn(tmp_path):
    pytest.importorskip("eptq_fx.method.reconstruction")
    rtn, eptq = run_demo(bits=["W4A4"], methods=["rtn", "eptq"], n_calib=512, cache_dir=tmp_path, iters=200)
    assert eptq.quant_acc >= rtn.quant_acc - 0.005


@pytest.mark.slow
def test_cifar_resnet20_demo_w8a8_keeps_accuracy(shared_data):
    (row,) = run_demo(model="resnet20", data_dir=shared_data, bits=["W8A8"], methods=["rtn"], n_calib=256)
    assert 0.78 < row.float_acc < 0.84
    assert row.quant_acc > row.float_acc - 0.01
