"""The benchmark harness: calibration sample, preprocessing (against the known float accuracy), result lines,
the BENCHMARKS.md section rewrite and the MCT bit-width setup. Skips cleanly without the data or MCT."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.common import (
    IMAGENET_MEAN_STD,
    REPO_ROOT,
    Preprocessing,
    calibration_indices,
    data_available,
    data_dir,
    evaluate_top1,
    load_calibration,
    load_test,
)
from benchmarks.compare import RESULT_KEYS, parse_result_line, run_one
from benchmarks.methods import Budget, parse_bits
from benchmarks.report import replace_section

needs_cifar = pytest.mark.skipif(not data_available("cifar10"), reason="shared CIFAR-10 data not found")
needs_mct = pytest.mark.skipif(importlib.util.find_spec("model_compression_toolkit") is None,
                               reason="model-compression-toolkit not installed")


def test_calibration_indices_are_fixed_sorted_and_distinct():
    a, b = calibration_indices(10_000, 1024), calibration_indices(10_000, 1024)
    assert np.array_equal(a, b)
    assert len(np.unique(a)) == 1024 and np.all(np.diff(a) > 0) and a.max() < 10_000
    assert not np.array_equal(a, calibration_indices(10_000, 1024, seed=1))


@needs_cifar
def test_calibration_sample_is_identical_across_calls_and_preprocessed():
    prep = Preprocessing(*IMAGENET_MEAN_STD)
    first, second = load_calibration("cifar10", prep, 64), load_calibration("cifar10", prep, 64)
    assert first.shape == (64, 3, 32, 32) and torch.equal(first, second)
    # independent check of one pixel of the first sampled image against the raw file
    raw = np.load(data_dir() / "cifar10" / "train_10k.npz")["x"]
    idx = calibration_indices(len(raw), 64)[0]
    expected = (raw[idx, 5, 7, 1] / 255.0 - IMAGENET_MEAN_STD[0][1]) / IMAGENET_MEAN_STD[1][1]
    assert first[0, 1, 5, 7].item() == pytest.approx(expected, abs=1e-5)


def test_grayscale_is_repeated_to_the_normalisation_channels():
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    x = Preprocessing((0.5,) * 3, (0.25,) * 3)(pixels)
    assert x.shape == (2, 3, 4, 4)
    assert torch.equal(x[:, 0], x[:, 2])
    assert x[1, 1, 3, 3].item() == pytest.approx((31 / 255 - 0.5) / 0.25, abs=1e-6)


@needs_cifar
def test_float_resnet20_matches_the_known_accuracy_on_the_full_test_set():
    from benchmarks.zoo import KNOWN_FLOAT_TOP1, get_spec

    spec = get_spec("resnet20")
    x, y = load_test(spec.dataset, spec.prep)
    assert len(x) == 10_000
    assert evaluate_top1(spec.build(), x, y) == pytest.approx(KNOWN_FLOAT_TOP1["resnet20"], abs=0.005)


def test_test_subset_is_balanced_enough_to_contain_every_class():
    # the CIFAR test file is stored class by class: a prefix would hold two classes, a seeded sample all ten
    if not data_available("cifar10"):
        pytest.skip("shared CIFAR-10 data not found")
    _, y = load_test("cifar10", Preprocessing(*IMAGENET_MEAN_STD), limit=2000)
    assert len(y) == 2000 and set(y.tolist()) == set(range(10))


@needs_cifar
def test_result_line_of_a_child_process_has_every_field():
    cmd = [sys.executable, "-m", "benchmarks.compare", "--one", "--models", "resnet20", "--methods", "float",
           "--bits", "FP32", "--n-calib", "32", "--n-test", "500"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = parse_result_line("some library chatter\n" + proc.stdout)
    assert row is not None and set(RESULT_KEYS) <= set(row)
    assert row["status"] == "ok" and row["n_test"] == 500 and 0.0 <= row["top1"] <= 100.0
    assert row["peak_rss_mib"] > 100  # torch alone takes more than that
    assert json.loads(json.dumps(row)) == row


@needs_cifar
def test_a_peer_that_cannot_do_a_bit_width_reports_it_instead_of_a_number():
    row = run_one("resnet20", "torchao_fx", "W4A8", 32, 100, Budget(quick=True))
    assert row["status"] == "unsupported" and row["top1"] is None and "W8A8" in row["reason"]


def test_parse_result_line_ignores_other_json_and_garbage():
    assert parse_result_line('{"not": "ours"}\nnot json {\n') is None
    row = {k: None for k in RESULT_KEYS}
    assert parse_result_line(json.dumps(row) + "\ntrailing log line\n") == row


def test_bits_parsing():
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w8a4") == (8, 4)
    with pytest.raises(ValueError):
        parse_bits("4/8")


def test_only_the_comparison_section_is_replaced():
    text = "# Benchmarks\n\n## Kernels\nk1\n\n## Comparison\nold table\n\n## Later\nkeep me\n"
    out = replace_section(text, "## Comparison\n\nnew table\n")
    assert "old table" not in out and "new table" in out
    assert out.index("## Kernels") < out.index("new table") < out.index("## Later")
    assert "k1" in out and "keep me" in out
    appended = replace_section("# Benchmarks\n\n## Kernels\nk1\n", "## Comparison\nt\n")
    assert appended.endswith("## Comparison\nt\n") and "k1" in appended



def test_a_hand_written_reading_below_the_tables_survives_a_rewrite():
    text = "## Deployment\nold table\n\nReading: why\nmore\n\n## Later\nx\n"
    out = replace_section(text, "## Deployment\nnew table\n", "## Deployment", keep_from="Reading")
    assert out == "## Deployment\nnew table\n\nReading: why\nmore\n\n## Later\nx\n"
    # nothing to keep: the section is replaced whole
    assert replace_section("## Deployment\nold\n", "## Deployment\nnew\n", "## Deployment",
                           keep_from="Reading") == "## Deployment\nnew\n"

@needs_mct
def test_mct_eight_bit_anchors_and_activation_choice_tpc():
    from benchmarks.peers._mct import activation_choice_tpc, eight_bit_anchors, import_mct
    from examples.models import resnet20

    anchors = eight_bit_anchors(resnet20())
    assert anchors["first"] == "conv1" and anchors["last"] == "linear" and anchors["inputs"] == ["x"]
    assert anchors["feeding_last"] == ["flatten", "adaptive_avg_pool2d"]
    import_mct()
    tpc = activation_choice_tpc(4)
    quantized = [c for op in tpc.operator_set if op.qc_options is not None
                 for c in op.qc_options.quantization_configurations if c.enable_activation_quantization]
    assert quantized and {c.activation_n_bits for c in quantized} == {4, 8}
    assert tpc.default_qco.base_config.activation_n_bits == 4


def _row(method: str, bits: str, top1: float | None, status: str = "ok", reason: str | None = None) -> dict:
    return {k: None for k in RESULT_KEYS} | {"model": "resnet20", "dataset": "cifar10", "method": method,
                                             "bits": bits, "top1": top1, "status": status, "reason": reason,
                                             "quantize_s": 12.5, "peak_rss_mib": 700.0, "n_test": 10_000,
                                             "n_calib": 1024, "quick": False, "details": {}}


def test_report_writes_json_table_and_plot(tmp_path):
    from benchmarks.report import write_json, write_report

    rows = [_row("float", "FP32", 80.0), _row("mct_ptq", "W4A8", 75.5),
            _row("torchao_fx", "W4A8", None, "unsupported", "int8 only")]
    stem = tmp_path / "cmp"
    write_json(rows, "python -m benchmarks.compare --x", stem)
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n## Kernels\nkeep\n")
    write_report(stem, str(md))
    text = md.read_text()
    assert "keep" in text and "## Comparison" in text and "python -m benchmarks.compare --x" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| W4A8 | mct_ptq"))
    assert "| 75.50 | +4.50 |" in line
    assert "unsupported: int8 only" in next(ln for ln in text.splitlines() if "torchao_fx" in ln and ln.startswith("|"))
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cmp.json").read_text())["results"] == rows


def test_merge_keeps_other_settings_and_replaces_redone_ones(tmp_path):
    from benchmarks.report import earlier_results, write_json

    stem = tmp_path / "cmp"
    write_json([_row("float", "FP32", 80.0), _row("mct_ptq", "W4A8", 70.0)], "first", stem)
    write_json([_row("mct_ptq", "W4A8", 75.5)], "second", stem, earlier_results(stem, "second"))
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["commands"] == ["first", "second"]
    assert [(r["method"], r["top1"]) for r in data["results"]] == [("float", 80.0), ("mct_ptq", 75.5)]


def test_zoo_architectures_trace_and_classify_their_input_shape():
    import torch.fx as fx

    from benchmarks.zoo import SPECS

    shapes = {"cifar10": (3, 32, 32), "fashion_mnist": (3, 28, 28)}
    for spec in SPECS.values():
        if spec.name in ("resnet56", "convmixer"):  # same code paths as resnet20, only bigger
            continue
        model = spec.architecture()
        x = torch.randn(2, *shapes[spec.dataset])
        assert fx.symbolic_trace(model)(x).shape == (2, 10), spec.name


def test_a_model_trained_here_refuses_stale_or_missing_weights(tmp_path, monkeypatch):
    from benchmarks import zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    spec = zoo.get_spec("mixer_fmnist")
    with pytest.raises(zoo.WeightsMissingError):
        spec.build()
    model = spec.architecture()
    torch.save(model.state_dict(), spec.cached_weights)
    spec.cached_weights.with_suffix(".json").write_text(json.dumps({"recipe": "something else"}))
    with pytest.raises(zoo.WeightsMissingError):
        spec.build()
    spec.cached_weights.with_suffix(".json").write_text(json.dumps({"recipe": spec.recipe_fingerprint()}))
    rebuilt = spec.build()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_combine_merges_runs_filters_methods_and_later_runs_win(tmp_path):
    from benchmarks.report import combine, write_json

    write_json([_row("float", "FP32", 80.0), _row("rtn", "W4A8", 70.0), _row("eptq_uniform", "W4A4", 60.0)],
               "run a", tmp_path / "a")
    write_json([_row("rtn", "W4A8", 71.0), _row("mct_ptq", "W4A8", 75.5)], "run b", tmp_path / "b")
    md = tmp_path / "B.md"
    combine(["a", "b"], "all", str(md), methods=("rtn", "mct_ptq"), results_dir=tmp_path)
    data = json.loads((tmp_path / "all.json").read_text())
    assert data["commands"] == ["run a", "run b"]
    assert [(r["method"], r["top1"]) for r in data["results"]] == [("float", 80.0), ("rtn", 71.0),
                                                                     ("mct_ptq", 75.5)]
    text = md.read_text()
    assert "| W4A8 | rtn | 71.00 | +9.00 |" in text and "eptq_uniform" not in text
    assert (tmp_path / "all.png").is_file()


def test_method_variants_reach_the_config():
    """``eptq+a+b`` names combine VARIANTS; the placement options set EPTQConfig.act_placement."""
    from benchmarks.methods import eptq_config
    from eptq_fx.config import ActPlacement

    budget = Budget()
    assert eptq_config("eptq", 4, 8, 64, budget).act_placement is ActPlacement.AUTO
    assert eptq_config("eptq+fusable", 4, 8, 64, budget).act_placement is ActPlacement.FUSABLE
    cfg = eptq_config("eptq+inputs+hessian", 4, 4, 64, budget)
    assert cfg.act_placement is ActPlacement.INPUTS and cfg.reconstruction.hessian_weighting
