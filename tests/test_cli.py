"""The command line and the demo: ``eptq-fx quantize`` end to end, the digits demo, the CIFAR ResNet loader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eptq_fx import ConfigError
from eptq_fx.cli import main
from eptq_fx.cli_inputs import load_calibration, load_model
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


# ------------------------------------------------------------------------ user mistakes: exit 2, one line
def _fail_if_quantizing(monkeypatch):
    """Any check must come before the long stages: quantizing at all is a test failure."""
    import eptq_fx.pipeline

    monkeypatch.setattr(eptq_fx.pipeline, "quantize", lambda *a, **k: pytest.fail("quantized before checking"))


def _fail_if_calibrating(monkeypatch):
    import eptq_fx.pipeline

    monkeypatch.setattr(eptq_fx.pipeline, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking"))


def _one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("eptq-fx: error:") and "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


def _quantize_args(calib, *extra):
    return ["quantize", "--model-module", "tests.test_cli:tiny_model", "--calib", str(calib), "--method", "rtn",
            *extra]


@pytest.fixture
def workdir(tmp_path, calib_npz):
    """A folder holding only the calibration file: after a refused run it must hold nothing else."""
    calib = tmp_path / "calib.npz"
    calib.write_bytes(calib_npz.read_bytes())
    return tmp_path


def _nothing_written(workdir, *keep):
    assert sorted(p.name for p in workdir.iterdir()) == sorted(["calib.npz", *keep])


def test_missing_checkpoint_file(workdir, capsys, monkeypatch):
    _fail_if_quantizing(monkeypatch)
    code = main(_quantize_args(workdir / "calib.npz", "--checkpoint", str(workdir / "nope.pt"),
                               "--out", str(workdir / "q.pt2")))
    _one_line_error(capsys, code, "--checkpoint", "nope.pt")
    _nothing_written(workdir)


def test_checkpoint_of_another_model(workdir, capsys, monkeypatch):
    torch.save(make_model("tiny_resnet").state_dict(), workdir / "other.pt")
    _fail_if_quantizing(monkeypatch)
    code = main(_quantize_args(workdir / "calib.npz", "--checkpoint", str(workdir / "other.pt"),
                               "--out", str(workdir / "q.pt2")))
    _one_line_error(capsys, code, "does not match", "missing key")
    _nothing_written(workdir, "other.pt")


def test_whole_model_checkpoint_needs_no_pythonpath(tmp_path, monkeypatch):
    """A pickled model whose class lives in the user's project loads from that project's folder."""
    (tmp_path / "mynet.py").write_text("import torch\nclass Net(torch.nn.Module):\n"
                                       "    def __init__(self):\n        super().__init__()\n"
                                       "        self.fc = torch.nn.Linear(4, 2)\n"
                                       "    def forward(self, x):\n        return self.fc(x)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    net = importlib.import_module("mynet").Net()
    torch.save(net, tmp_path / "net.pt")
    monkeypatch.undo()  # no longer importable through sys.path: only the CLI's own cwd handling can find it
    import sys

    sys.modules.pop("mynet", None)
    monkeypatch.chdir(tmp_path)
    model = load_model(None, str(tmp_path / "net.pt"))
    x = torch.randn(3, 4)
    assert torch.equal(model(x), net(x))
    sys.modules.pop("mynet", None)


@pytest.mark.parametrize("content, words", [
    ("wrong_key", ("--calib-key", "images")),
    ("numpy", ("plain tensors",)),
])
def test_pt_calibration_mistakes(workdir, capsys, monkeypatch, content, words):
    path = workdir / "c.pt"
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    torch.save({"images": torch.from_numpy(x)} if content == "wrong_key" else x, path)
    _fail_if_quantizing(monkeypatch)
    extra = ["--calib-key", "x"] if content == "wrong_key" else []
    args = _quantize_args(path, *extra, "--out", str(workdir / "q.pt2"))
    _one_line_error(capsys, main(args), *words)
    _nothing_written(workdir, "c.pt")


def test_raw_uint8_calibration_is_refused(workdir, capsys, monkeypatch):
    np.savez(workdir / "u8.npz", x=np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8))
    _fail_if_quantizing(monkeypatch)
    code = main(_quantize_args(workdir / "u8.npz", "--out", str(workdir / "q.pt2")))
    _one_line_error(capsys, code, "uint8", "--integer-inputs")
    _nothing_written(workdir, "u8.npz")


@pytest.mark.parametrize("out, words", [
    ("q.txt", (".pt2 or .onnx",)),
    ("missing_dir/q.pt2", ("does not exist",)),
])
def test_bad_out_path(workdir, capsys, monkeypatch, out, words):
    _fail_if_quantizing(monkeypatch)
    code = main(_quantize_args(workdir / "calib.npz", "--out", str(workdir / out)))
    _one_line_error(capsys, code, *words)
    _nothing_written(workdir)


def test_unwritable_out_directory(workdir, capsys, monkeypatch):
    import os

    locked = workdir / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere, so the permission answer is simulated for this one folder
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    _fail_if_quantizing(monkeypatch)
    code = main(_quantize_args(workdir / "calib.npz", "--out", str(locked / "q.pt2")))
    _one_line_error(capsys, code, "not writable")
    assert list(locked.iterdir()) == []


def test_onnx_out_without_the_onnx_extra(workdir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    _fail_if_quantizing(monkeypatch)
    code = main(_quantize_args(workdir / "calib.npz", "--out", str(workdir / "q.onnx")))
    _one_line_error(capsys, code, "eptq_fx[onnx]")
    _nothing_written(workdir)


def test_no_out_says_nothing_will_be_saved(workdir, capsys):
    code = main(_quantize_args(workdir / "calib.npz"))
    assert code == 0
    assert "will not be saved" in capsys.readouterr().err
    _nothing_written(workdir)


@pytest.mark.parametrize("override, words", [
    ("regex=layer9.*:w=8", ("regex", "matches no quantizable layer")),
    ("type=torch.nn.LSTM:w=8", ("LSTM", "matches no quantizable layer")),
    ("name=conv9:w=8", ("conv9",)),
])
def test_override_matching_nothing(workdir, capsys, monkeypatch, override, words):
    _fail_if_calibrating(monkeypatch)
    code = main(_quantize_args(workdir / "calib.npz", "--override", override, "--out", str(workdir / "q.pt2")))
    _one_line_error(capsys, code, *words)
    _nothing_written(workdir)


_QUANTIZED: list[nn.Module] = []


def quantized_tiny_model() -> nn.Module:
    """Factory for --model-module: a model eptq_fx already quantized (built once, before any patching)."""
    import eptq_fx

    if not _QUANTIZED:
        _QUANTIZED.append(eptq_fx.quantize(tiny_model(), torch.randn(16, 3, 8, 8), eptq_fx.EPTQConfig(method="rtn"),
                                           progress=False))
    return _QUANTIZED[0]


def test_already_quantized_model(workdir, capsys, monkeypatch):
    import eptq_fx

    with pytest.raises(eptq_fx.ModelError, match="already quantized"):
        eptq_fx.quantize(quantized_tiny_model(), torch.randn(16, 3, 8, 8), eptq_fx.EPTQConfig(method="rtn"),
                         progress=False)
    _fail_if_calibrating(monkeypatch)
    code = main(["quantize", "--model-module", "tests.test_cli:quantized_tiny_model", "--calib",
                 str(workdir / "calib.npz"), "--method", "rtn", "--out", str(workdir / "q.pt2")])
    _one_line_error(capsys, code, "already quantized")
    _nothing_written(workdir)


@pytest.mark.parametrize("resume", [False, True])
def test_ctrl_c_is_one_line(workdir, capsys, monkeypatch, resume):
    import eptq_fx.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eptq_fx.pipeline, "quantize", interrupted)
    extra = ["--resume", str(workdir / "ckpt")] if resume else []
    code = main(_quantize_args(workdir / "calib.npz", "--out", str(workdir / "q.pt2"), *extra))
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "interrupted" in err
    assert ("resume from" in err) == resume and ("--resume" in err) == (not resume)
    _nothing_written(workdir)


def test_argparse_mistake_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--calib"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_verbose_shows_our_logs_only(workdir, capsys):
    import logging

    main(["-v", "inspect", str(workdir / "missing.json")])
    capsys.readouterr()
    assert logging.getLogger("eptq_fx").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("some_third_party").getEffectiveLevel() == logging.WARNING


def test_parse_override_and_leaf():
    from eptq_fx.cli_inputs import parse_leaf, parse_override, parse_weight_memory

    o = parse_override("name=layer1.0.conv1:w=8,a=none")
    assert o.name == "layer1.0.conv1" and o.weight_bits == 8 and o.act_bits is None
    assert parse_override("type=torch.nn.Linear:w=4").module_type is nn.Linear
    assert parse_override(r"regex=layer3\..*:a=8").regex == r"layer3\..*"
    with pytest.raises(ConfigError):
        parse_override("layer1:w=8")
    assert parse_leaf("torch.nn.MultiheadAttention") is nn.MultiheadAttention and parse_leaf("enc.attn") == "enc.attn"
    assert parse_weight_memory("50%") == 0.5 and parse_weight_memory("2KiB") == 2048
    assert parse_weight_memory("120000") == 120000


def test_weight_candidates_and_width_cost_options(tmp_path, calib_npz, capsys):
    from eptq_fx.cli_inputs import parse_weight_candidates

    assert parse_weight_candidates("2,3,4,8") == (2, 3, 4, 8) and parse_weight_candidates(None) is None
    base = ["quantize", "--model-module", "tests.test_cli:tiny_model", "--calib", str(calib_npz), "--method",
            "rtn", "--weight-memory", "0.8"]
    out = tmp_path / "q.pt2"
    assert main(base + ["--weight-candidates", "2,4,8", "--width-cost", "round_to_nearest", "--out", str(out),
                        "--report", str(tmp_path / "r.json")]) == 0
    import json

    chosen = {c["bits"] for c in json.loads((tmp_path / "r.json").read_text())["mixed_precision"]["layers"]}
    assert chosen <= {2, 4, 8} and chosen & {2, 4}  # the budget forces a narrower width, from the given set
    capsys.readouterr()
    bad = tmp_path / "bad.pt2"
    _one_line_error(capsys, main(base + ["--weight-candidates", "two,four", "--out", str(bad)]),
                    "--weight-candidates")
    assert not bad.exists()


def test_hessian_cache_is_off_by_default_and_in_the_user_cache_dir(monkeypatch, tmp_path):
    from eptq_fx import HessianConfig
    from eptq_fx.config import user_cache_dir

    assert HessianConfig().cache_dir is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "eptq_fx"


# --------------------------------------------------------------------------- report, inspect, eval
def test_report_inspect_and_eval(workdir, capsys):
    import json

    out, rep_path = workdir / "q.pt2", workdir / "r.json"
    code = main(_quantize_args(workdir / "calib.npz", "--bits", "W4A8", "--out", str(out),
                               "--report", str(rep_path)))
    assert code == 0
    rep = json.loads(rep_path.read_text())
    names = [r["name"] for r in rep["layers"]]
    assert names == ["conv1", "conv2", "fc"]
    assert [r["weight_bits"] for r in rep["layers"]] == [8, 4, 8]  # first/last at 8 bits
    model = tiny_model()
    n_weights = {n: m.weight.numel() for n, m in model.named_modules() if n in names}
    assert rep["totals"]["quantized_weight_bytes"] == (n_weights["conv1"] + n_weights["fc"]) + n_weights["conv2"] // 2
    assert rep["totals"]["float_bytes"] == sum(4 * t.numel() for t in model.state_dict().values()
                                               if t.is_floating_point())
    assert rep["totals"]["calibration_samples"] == 48
    # the last layer's output is the model output: its SQNR must match the saved program's against float
    x = torch.from_numpy(np.load(workdir / "calib.npz")["x"][:48])
    with torch.no_grad():
        ref, got = model(x), load(out).module()(x)
    sqnr = 10 * np.log10(float(ref.pow(2).sum()) / float((got - ref).pow(2).sum()))
    assert rep["layers"][-1]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    capsys.readouterr()
    assert main(["inspect", str(rep_path)]) == 0
    table = capsys.readouterr().out
    assert all(n in table for n in names) and "calibration samples" in table
    # eval: top-1 of the saved program on labelled data, against the same program run here
    labels = ref.argmax(1).numpy()
    np.savez(workdir / "test.npz", x=x.numpy(), y=labels)
    assert main(["eval", str(out), "--data", str(workdir / "test.npz")]) == 0
    expected = 100 * float((got.argmax(1).numpy() == labels).mean())
    assert f"top-1 {expected:.2f}%" in capsys.readouterr().out


def test_report_needs_a_quantized_model():
    import eptq_fx

    with pytest.raises(ConfigError, match="run record"):
        eptq_fx.report(tiny_model())


def test_plot_is_written(workdir):
    pytest.importorskip("matplotlib")
    code = main(_quantize_args(workdir / "calib.npz", "--plot", str(workdir / "r.png")))
    assert code == 0 and (workdir / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_leaf_module_with_convs_is_reported(caplog):
    import logging

    import eptq_fx

    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with caplog.at_level(logging.WARNING, logger="eptq_fx"):
        eptq_fx.quantize(model, torch.randn(16, 3, 8, 8), eptq_fx.EPTQConfig(method="rtn"), leaf_modules=["0"],
                         progress=False)
    assert any("leaf module 0" in r.message and "stay in float" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eptq_fx"):
        eptq_fx.quantize(model, torch.randn(16, 3, 8, 8), eptq_fx.EPTQConfig(method="rtn"), progress=False)
    assert not any("stay in float" in r.message for r in caplog.records)


def test_n_calib_warning_only_when_asked(caplog):
    import logging

    import eptq_fx

    with caplog.at_level(logging.WARNING, logger="eptq_fx"):
        eptq_fx.quantize(tiny_model(), torch.randn(16, 3, 8, 8), eptq_fx.EPTQConfig(method="rtn"), progress=False)
    assert not any("fewer than" in r.message for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="eptq_fx"):
        eptq_fx.quantize(tiny_model(), torch.randn(16, 3, 8, 8), eptq_fx.EPTQConfig(method="rtn", n_calib=500),
                         progress=False)
    assert any("fewer than config.n_calib=500" in r.message for r in caplog.records)


@pytest.mark.parametrize("tty, flags, expected", [
    (True, [], True), (True, ["-q"], False), (False, [], False), (False, ["--progress"], True),
])
def test_progress_bars_follow_the_terminal(monkeypatch, tty, flags, expected):
    import sys

    from eptq_fx.cli import _progress, build_parser

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    quiet = [f for f in flags if f == "-q"]
    rest = [f for f in flags if f != "-q"]
    args = build_parser().parse_args([*quiet, "quantize", "--calib", "c.npz", *rest])
    assert _progress(args) is expected


def test_act_placement_option_reaches_the_config():
    from eptq_fx.cli import _config_from_args, build_parser
    from eptq_fx.config import ActPlacement

    parser = build_parser()
    base = ["quantize", "--model-module", "m:f", "--calib", "c.npz"]
    assert _config_from_args(parser.parse_args(base)).act_placement is ActPlacement.AUTO
    assert _config_from_args(parser.parse_args(base + ["--act-placement", "inputs"])).act_placement \
        is ActPlacement.INPUTS
