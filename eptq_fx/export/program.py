"""``torch.export`` a converted (Q/DQ) model to an ExportedProgram (``.pt2``).

The converted graph holds ``quantized_decomposed`` quantize / dequantize ops and integer weights, so the exported
program keeps them as they are: a backend (Inductor, ExecuTorch, ONNX Runtime) sees the same Q/DQ patterns PT2E
would hand it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed
from torch import fx

from eptq_fx.atomic_io import write_atomically
from eptq_fx.errors import ModelError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, Sequence):
        raise ModelError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}.")
    return tuple(example_inputs)


def _detached_copies(args: tuple) -> tuple:
    """torch.export stores the example inputs in the program: a slice of a big tensor (e.g. the calibration set)
    would drag its whole storage into the file, so keep compact copies of the slice only."""
    return tuple(a.detach().clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a
                 for a in args)


def example_like(gm: fx.GraphModule, batch: int = 2) -> tuple:
    """Zero inputs of the shapes and dtypes ``prepare`` recorded on the placeholders (batch size ``batch``):
    an example for ``torch.export`` that carries no user data."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise ModelError(f"The graph records no shape for input {node.name!r}: pass example_inputs explicitly.")
        out.append(torch.zeros((batch, *tm.shape[1:]), dtype=tm.dtype))
    return tuple(out)


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
    args = _detached_copies(_as_tuple(example_inputs))
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
        path = write_atomically(Path(path), lambda tmp: torch.export.save(program, tmp))
        logger.info("saved the exported program to %s", path)
    return program


def load(path: PathLike) -> torch.export.ExportedProgram:
    """Load a program saved by :func:`export` (``.module()`` gives a callable module)."""
    return torch.export.load(Path(path))
