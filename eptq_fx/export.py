"""Export a converted (Q/DQ) model: ``torch.export`` ExportedProgram (``.pt2``) and ONNX QDQ.

The converted graph holds ``quantized_decomposed`` quantize / dequantize ops and integer weights, so the exported
program keeps them as they are: a backend (Inductor, ExecuTorch, ONNX Runtime) sees the same Q/DQ patterns PT2E
would hand it. ONNX needs the optional ``onnx`` extra (``pip install 'eptq_fx[onnx]'``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed
from torch import fx

from eptq_fx.errors import ModelError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, Sequence):
        raise ModelError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}.")
    return tuple(example_inputs)


def _widen_batch(args: tuple) -> tuple:
    """torch.export specialises a dimension of size 1 to the constant 1; trace with two samples instead so
    the batch dimension stays symbolic."""
    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
                 for a in args)


def _batch_dims(args: tuple) -> tuple:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def export(quantized_gm: fx.GraphModule, example_inputs, path: PathLike | None = None,
           dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` the converted model; save it to ``path`` (``.pt2``) when given.

    ``dynamic_batch``: dim 0 of every tensor input is exported as a symbolic batch size (otherwise the program
    accepts only the example's shapes). Load a saved program with :func:`load`."""
    args = _as_tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        args = _widen_batch(args)
        dynamic_shapes = _batch_dims(args)
    was_training = quantized_gm.training
    quantized_gm.eval()
    try:
        program = torch.export.export(quantized_gm, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise ModelError(
            f"torch.export failed on the quantized model ({type(e).__name__}: {e}); export with "
            f"dynamic_batch=False if the model fixes its batch size."
        ) from e
    finally:
        quantized_gm.train(was_training)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, path)
        logger.info("saved the exported program to %s", path)
    return program


def load(path: PathLike) -> torch.export.ExportedProgram:
    """Load a program saved by :func:`export` (``.module()`` gives a callable module)."""
    return torch.export.load(Path(path))


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}: install the extra with pip install 'eptq_fx[onnx]'."
        )


def export_onnx(quantized_gm: fx.GraphModule, example_inputs, path: PathLike, dynamic_batch: bool = True,
                opset_version: int | None = None) -> Path:
    """Write the converted model as an ONNX QDQ model (QuantizeLinear / DequantizeLinear around float ops).

    Goes through :func:`export` and torch's dynamo-based ONNX exporter; returns the written path."""
    _require_onnx()
    program = export(quantized_gm, example_inputs, dynamic_batch=dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # external_data=False: tiny-to-medium models fit the 2 GB protobuf limit, and one file is easier to ship
    onnx_program = torch.onnx.export(program, f=None, dynamo=True, external_data=False, verbose=False,
                                     opset_version=opset_version)
    onnx_program.save(str(path), external_data=False)
    logger.info("saved the ONNX model to %s", path)
    return path
