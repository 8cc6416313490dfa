"""PyTorch's own quantization test models (torch.testing._internal.common_quantization): every model with
example inputs quantizes at W8A8, with Q/DQ ops in the result and ≥ 20 dB output SQNR against float.

These include the functional models whose conv / linear weights are plain tensor attributes
(``FunctionalConv2d``, ``FunctionalLinear``, ...), which come back in float without the op table."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import eptq_fx
from benchmarks.shim import ensure_torchvision_importable
from eptq_fx import EPTQConfig

ensure_torchvision_importable()  # common_quantization imports torchvision-dependent helpers
cq = pytest.importorskip("torch.testing._internal.common_quantization")

W8A8 = EPTQConfig(method="rtn", weight_bits=8, act_bits=8, n_calib=64, calib_batch_size=32)
QENGINE_MODELS = {"AnnotatedConvModel", "AnnotatedConvTransposeModel"}  # take the engine name


def _model_names() -> list[str]:
    return sorted(name for name, obj in vars(cq).items()
                  if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == cq.__name__
                  and hasattr(obj, "get_example_inputs"))


def _build(name: str) -> nn.Module:
    cls = getattr(cq, name)
    return (cls("qnnpack") if name in QENGINE_MODELS else cls()).eval()


def _like(t: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` fresh samples shaped and distributed (standard normal) like the example input."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *t.shape[1:], generator=gen, dtype=t.dtype)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (reference - actual).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp_min(1e-20)))


def test_the_model_list_is_the_one_the_issue_counts():
    assert len(_model_names()) >= 33


@pytest.mark.parametrize("name", _model_names())
def test_pytorch_quantization_model_quantizes_at_w8a8(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name)
    examples = model.get_example_inputs()
    calib = tuple(_like(t, 64, 1 + i) for i, t in enumerate(examples))
    test = tuple(_like(t, 16, 10 + i) for i, t in enumerate(examples))
    q = eptq_fx.quantize(model, calib if len(calib) > 1 else calib[0], W8A8, progress=False)
    targets = {n.target for n in q.graph.nodes if n.op == "call_function"}
    qd = torch.ops.quantized_decomposed
    assert qd.dequantize_per_channel.default in targets, "no integer weight in the result"
    assert qd.quantize_per_tensor.default in targets, "no quantized activation in the result"
    with torch.no_grad():
        assert sqnr_db(model(*test), q(*test)) >= 20.0
