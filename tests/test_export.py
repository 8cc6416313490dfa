"""export: torch.export programs (.pt2) and ONNX QDQ models compute what the converted GraphModule computes."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import eptq_fx
from eptq_fx import EPTQConfig, ModelError
from eptq_fx.export import export, export_onnx, load
from examples.models import example_input, make_model

qd = torch.ops.quantized_decomposed
CONFIG = EPTQConfig(method="rtn", weight_bits=4, act_bits=8, act_range="minmax")


@pytest.fixture(scope="module")
def quantized():
    model = make_model("tiny_resnet")
    q = eptq_fx.quantize(model, example_input("tiny_resnet", 64, seed=1), CONFIG, progress=False)
    return q, example_input("tiny_resnet", 5, seed=2)


def test_exported_program_keeps_qdq_ops_and_a_dynamic_batch(quantized, tmp_path):
    q, x = quantized
    path = tmp_path / "model.pt2"
    program = export(q, (x[:1],), path)  # a batch of one must not freeze the batch size
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert {qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default,
            qd.dequantize_per_channel.default} <= targets
    int_weights = [v for v in program.state_dict.values() if v.dtype == torch.int8]
    int_weights += [v for v in program.constants.values() if isinstance(v, torch.Tensor) and v.dtype == torch.int8]
    assert int_weights and all(int(w.min()) >= -128 for w in int_weights)
    loaded = load(path).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)
        torch.testing.assert_close(program.module()(x[:3]), q(x[:3]), rtol=0, atol=0)


def test_static_export_accepts_only_the_example_shape(quantized):
    q, x = quantized
    program = export(q, (x[:2],), dynamic_batch=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:2]), q(x[:2]), rtol=0, atol=0)
        with pytest.raises((AssertionError, RuntimeError), match="size"):  # torch.export's shape guard
            program.module()(x)


def test_onnx_qdq_model_matches_in_onnxruntime(quantized, tmp_path):
    import onnx
    import onnxruntime as ort

    q, x = quantized
    path = export_onnx(q, (x[:2],), tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = session.run(None, {name: x.numpy()})[0]  # batch 5 though exported with 2: dynamic batch
    with torch.no_grad():
        ref = q(x).numpy()
    # ONNX Runtime divides by the scale where torch multiplies by its inverse: a value on a rounding boundary
    # may land one step away, so allow a few elements to move slightly
    diff = np.abs(out - ref)
    span = float(np.abs(ref).max())
    assert float((diff > 1e-5 * span).mean()) <= 0.05
    assert float(diff.max()) <= 0.05 * span


def test_onnx_without_the_extra_says_how_to_install(monkeypatch, quantized, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    q, x = quantized
    with pytest.raises(ImportError, match=r"eptq_fx\[onnx\]"):
        export_onnx(q, (x[:2],), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def _ort_run(path, x: torch.Tensor, optimized: str | None = None, fuse: bool = True) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not fuse:  # ORT's own Q/DQ ops only: a reference of what the file says, without fused int kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def widths_data():
    model = make_model("tiny_resnet")
    return model, example_input("tiny_resnet", 64, seed=1), example_input("tiny_resnet", 128, seed=2)


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4), (8, 4), (8, 2), (9, 8), (8, 12), (16, 16)])
def test_onnx_runtime_computes_our_graph_at_every_width(widths_data, w_bits, a_bits, tmp_path):
    """Inputs 3x the calibration range drive activations past their clamps: without the exact clamp ORT ran
    wider activations (91.5 % top-1 agreement at W4A4 on ResNet-20 before). Unfused, ORT's Q/DQ ops compute our
    graph to float rounding; fused int kernels requantize with their own rounding, so there we ask for top-1
    agreement and a bounded difference."""
    model, calib, x = widths_data
    config = EPTQConfig(method="rtn", weight_bits=w_bits, act_bits=a_bits, act_range="minmax",
                        first_last_8bit=False)
    q = eptq_fx.quantize(model, calib, config, progress=False)
    path = export_onnx(q, (x[:2],), tmp_path / "m.onnx")
    wide = 3 * x
    with torch.no_grad():
        ref, ref_wide = q(x).numpy(), q(wide).numpy()
    exact = _ort_run(path, wide, fuse=False)
    # From 8 bits up a step is small enough that ORT's float conv (its own summation order, ~1e-6 apart from
    # torch's) or x / s against x · (1 / s) puts a few values on the other side of a rounding boundary: one step
    # of one activation, a bounded change downstream (ORT 1.32 at W8A8: 0.16 % of the largest logit). A missing
    # clamp, the bug this guards against, moves logits by their own size.
    tol = 1e-5 if a_bits < 8 else 2.0 ** (4 - a_bits)
    assert float(np.abs(exact - ref_wide).max()) <= tol * float(np.abs(ref_wide).max())
    assert float((exact.argmax(1) == ref_wide.argmax(1)).mean()) >= 0.99
    fused = _ort_run(path, x)
    assert float((fused.argmax(1) == ref.argmax(1)).mean()) >= 0.97
    assert float(np.abs(fused - ref).max()) <= 0.2 * float(np.abs(ref).max())


def test_onnx_weights_of_four_bits_are_stored_packed(widths_data, tmp_path):
    import onnx

    model, calib, x = widths_data
    sizes, types = {}, {}
    for w_bits in (8, 4):
        q = eptq_fx.quantize(model, calib, EPTQConfig(method="rtn", weight_bits=w_bits, act_bits=8,
                                                      act_range="minmax", first_last_8bit=False), progress=False)
        m = onnx.load(str(export_onnx(q, (x[:2],), tmp_path / f"w{w_bits}.onnx")))
        weights = [i for i in m.graph.initializer if i.name.endswith("_weight_int")]
        types[w_bits] = {i.data_type for i in weights}
        sizes[w_bits] = sum(len(i.raw_data) or len(i.int32_data) for i in weights)
    assert types == {8: {onnx.TensorProto.INT8}, 4: {onnx.TensorProto.INT4}}
    assert sizes[4] <= 0.55 * sizes[8]


def test_onnx_file_holds_no_zero_points_or_long_names_it_does_not_need(widths_data, tmp_path):
    """Symmetric INT4 weights need no zero-point tensor (absent means 0); the exporter's names for its own
    traced values become short ones unless keep_names=True; ORT computes the same either way."""
    import onnx

    model, calib, x = widths_data
    q = eptq_fx.quantize(model, calib, EPTQConfig(method="rtn", weight_bits=4, act_bits=8, act_range="minmax",
                                                  first_last_8bit=False), progress=False)
    short = export_onnx(q, (x[:2],), tmp_path / "short.onnx")
    named = export_onnx(q, (x[:2],), tmp_path / "named.onnx", keep_names=True)
    m = onnx.load(str(short))
    int4 = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    assert int4 and all(i.name.endswith("_weight_int") for i in m.graph.initializer if i.name in int4)
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in int4:
            assert len(node.input) == 2  # x, scale: no zero point
    assert all(len(n.name) <= 5 for n in m.graph.node)
    assert {i.name for i in m.graph.initializer} == {i.name for i in onnx.load(str(named)).graph.initializer}
    assert short.stat().st_size < named.stat().st_size
    np.testing.assert_array_equal(_ort_run(short, x, fuse=False), _ort_run(named, x, fuse=False))


def test_onnx_refuses_widths_it_cannot_hold_before_writing(widths_data, tmp_path):
    model, calib, x = widths_data
    q = eptq_fx.quantize(model, calib, EPTQConfig(method="rtn", weight_bits=8, act_bits=8, act_range="minmax",
                                                  first_last_8bit=False), progress=False)
    export_onnx(q, (x[:2],), tmp_path / "old.onnx", opset_version=20)  # int8 only: opset 20 holds it
    q4 = eptq_fx.quantize(model, calib, EPTQConfig(method="rtn", weight_bits=4, act_bits=8, act_range="minmax"),
                          progress=False)
    with pytest.raises(ModelError, match="opset_version=21"):
        export_onnx(q4, (x[:2],), tmp_path / "w4_opset20.onnx", opset_version=20)
    assert not (tmp_path / "w4_opset20.onnx").exists()


def test_int8_onnx_fuses_into_qlinear_kernels(widths_data, tmp_path):
    """After ORT's graph optimisation every conv / linear whose input and output are quantized runs as
    QLinearConv / QLinearMatMul."""
    import onnx

    model, calib, x = widths_data
    q = eptq_fx.quantize(model, calib, EPTQConfig(method="rtn", weight_bits=8, act_bits=8, act_range="minmax"),
                         progress=False)
    path = export_onnx(q, (x[:2],), tmp_path / "w8a8.onnx")
    _ort_run(path, x[:2], optimized=str(tmp_path / "opt.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    # tiny_resnet: 6 convs, 3 of them feed a residual add (float output in the "inputs" placement)
    assert ops.count("QLinearConv") >= 2


def test_fusable_placement_lets_every_int8_conv_and_add_fuse(widths_data, tmp_path):
    """ActPlacement.FUSABLE quantizes conv outputs that feed residual adds and lets the shortcut read the
    quantizer its value already has: ORT then runs all 6 of tiny_resnet's convs as QLinearConv and both residual
    adds as QLinearAdd (2 convs and no add with the default placement, where the shortcut carries float
    values), and the file still computes our graph."""
    import onnx

    model, calib, x = widths_data
    counts = {}
    for placement in eptq_fx.ActPlacement:
        config = EPTQConfig(method="rtn", weight_bits=8, act_bits=8, act_range="minmax", act_placement=placement)
        q = eptq_fx.quantize(model, calib, config, progress=False)
        path = export_onnx(q, (x[:2],), tmp_path / f"{placement.value}.onnx")
        exact = _ort_run(path, x, fuse=False)
        with torch.no_grad():
            ref = q(x).numpy()
        assert float(np.abs(exact - ref).max()) <= 1e-5 * float(np.abs(ref).max())
        _ort_run(path, x[:2], optimized=str(tmp_path / f"{placement.value}_opt.onnx"))
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{placement.value}_opt.onnx")).graph.node]
        counts[placement] = (ops.count("QLinearConv"), ops.count("QLinearAdd"))
    assert counts[eptq_fx.ActPlacement.FUSABLE] == counts[eptq_fx.ActPlacement.AUTO] == (6, 1)
    assert counts[eptq_fx.ActPlacement.INPUTS] == (2, 0)


def test_auto_placement_is_fusable_only_for_8_bit_activations():
    """AUTO adds the join quantizers where runtimes have int8 kernels (8-bit activations) and leaves 4-bit
    activations where INPUTS puts them; FUSABLE adds them at any width."""
    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", 2, seed=1)

    def n_quantizers(a_bits, placement):
        config = EPTQConfig(method="rtn", act_bits=a_bits, act_placement=placement)
        prepared = eptq_fx.prepare(model, config, example_inputs=(x,))
        return sum(1 for n in prepared.graph.nodes if n.op == "call_module" and "eptq_act_quant_" in n.target)

    P = eptq_fx.ActPlacement
    assert n_quantizers(8, P.AUTO) == n_quantizers(8, P.FUSABLE) > n_quantizers(8, P.INPUTS)
    assert n_quantizers(4, P.AUTO) == n_quantizers(4, P.INPUTS) < n_quantizers(4, P.FUSABLE)


def test_fusable_shortcut_shares_the_quantizer_of_the_layer_it_feeds():
    """The residual shortcut reads the same fake-quantizer node as the next block's first conv (one Q/DQ pair,
    not two), through the nn.Identity shortcut module; the default placement leaves the shortcut float."""
    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", 2, seed=1)
    for placement, shared in ((eptq_fx.ActPlacement.FUSABLE, True), (eptq_fx.ActPlacement.INPUTS, False)):
        config = EPTQConfig(method="rtn", act_range="minmax", act_placement=placement)
        prepared = eptq_fx.prepare(model, config, example_inputs=(x,))
        conv = next(n for n in prepared.graph.nodes if n.op == "call_module" and n.target == "block1.conv1")
        shortcut = next(n for n in prepared.graph.nodes
                        if n.op == "call_module" and n.target == "block1.shortcut")
        assert (shortcut.args[0] is conv.args[0]) is shared
        assert conv.args[0].target.startswith("eptq_act_quant_")


def test_biases_sit_on_the_accumulator_grid_so_ort_rewrites_change_nothing(widths_data, tmp_path):
    """ORT's WeightBiasQuantization re-quantizes a float bias to int32 at s_in · s_w; before biases were put
    on that grid it moved W4A4 ResNet-20 to 90 % top-1 agreement. Now each converted bias is an integer
    multiple of s_in · s_w and ORT with all its graph rewrites computes what it computes unfused."""
    model, calib, x = widths_data
    q = eptq_fx.quantize(model, calib, EPTQConfig(method="rtn", weight_bits=4, act_bits=4, first_last_8bit=False),
                         progress=False)
    checked = 0
    for node in q.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default, torch.nn.functional.conv2d,
                                                          torch.nn.functional.linear) and len(node.args) > 2:
            x_dq, w_dq, b = node.args[:3]
            if b is None or x_dq.target is not torch.ops.quantized_decomposed.dequantize_per_tensor.default:
                continue
            step = float(x_dq.args[1]) * getattr(q, w_dq.args[1].target).double()
            k = getattr(q, b.target).double() / step
            torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-3)
            checked += 1
    assert checked >= 3
    path = export_onnx(q, (x[:2],), tmp_path / "w4a4.onnx")
    unfused, fused = _ort_run(path, x, fuse=False), _ort_run(path, x)
    ref = q(x).numpy()
    assert float((fused.argmax(1) == unfused.argmax(1)).mean()) == 1.0
    assert float((fused.argmax(1) == ref.argmax(1)).mean()) >= 0.995
