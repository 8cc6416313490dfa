"""export: torch.export programs (.pt2) and ONNX QDQ models compute what the converted GraphModule computes."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import eptq_fx
from eptq_fx import EPTQConfig
from eptq_fx.export import export, export_onnx, load
from examples.models import example_input, make_model

qd = torch.ops.quantized_decomposed
CONFIG = EPTQConfig(method="rtn", weight_bits=4, act_bits=8, act_range="minmax")
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx / onnxscript / onnxruntime not installed (pip install 'eptq_fx[onnx]')")


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


@needs_onnx
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
