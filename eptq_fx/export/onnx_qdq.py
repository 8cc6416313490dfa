"""ONNX QDQ export that computes what the converted GraphModule computes, at every bit width ONNX can hold.

torch's exporter maps ``quantize_per_tensor(x, s, zp, qmin, qmax, uint8)`` to a ``QuantizeLinear`` that
saturates to the *container* (0..255) and drops ``qmin/qmax``; below 8 bits that silently runs wider activations.
So the export copy gets an explicit integer clamp after each narrow quantize (a ``Clip`` on the integer tensor
in ONNX: exact, and a no-op in torch where the op already clamps). Weights of 4 bits or fewer are re-stored,
after export, as opset-21 INT4 initialisers of their ``DequantizeLinear`` (half the bytes of int8); 9..16-bit
widths use opset-21 int16/uint16 Q/DQ; wider ones have no ONNX type and are refused before anything is written.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import fx

from eptq_fx.atomic_io import write_atomically
from eptq_fx.errors import ModelError
from eptq_fx.export.program import export

logger = logging.getLogger(__name__)
qd = torch.ops.quantized_decomposed
PathLike = str | os.PathLike
ONNX_OPSET = 21  # first opset with INT4/UINT4 and int16/uint16 QuantizeLinear / DequantizeLinear
_INT4 = (-8, 7)


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}: install the extra with pip install 'eptq_fx[onnx]'."
        )


def _int_range(node: fx.Node) -> tuple[int, int, torch.dtype]:
    """(quant_min, quant_max, container dtype) of a quantized_decomposed quantize / dequantize call."""
    *_, qmin, qmax, dtype = node.args
    return int(qmin), int(qmax), dtype


def quant_plan(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[str, tuple[int, int]]]:
    """The activation quantize nodes and {weight buffer name: (qmin, qmax)} of a converted graph."""
    acts, weights = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is qd.quantize_per_tensor.default:
            acts.append(node)
        elif node.target is qd.dequantize_per_channel.default and node.args[0].op == "get_attr":
            weights[str(node.args[0].target)] = _int_range(node)[:2]
    return acts, weights


def _check_widths(acts: list[fx.Node], weights: dict[str, tuple[int, int]], opset: int) -> bool:
    """Refuse what ONNX cannot represent; return whether the model needs opset-21 types."""
    needs_21 = False
    for what, (qmin, qmax) in [(f"activation {n.name}", _int_range(n)[:2]) for n in acts] + \
            [(f"weight {k}", v) for k, v in weights.items()]:
        if qmax - qmin >= 2 ** 16:
            raise ModelError(f"The {what} has more than 16 bits ([{qmin}, {qmax}]), which ONNX QuantizeLinear "
                             f"cannot hold: quantize it to 16 bits or fewer to export to ONNX.")
        if qmax - qmin >= 2 ** 8 or (what.startswith("weight") and _INT4[0] <= qmin and qmax <= _INT4[1]):
            needs_21 = True
    if needs_21 and opset < ONNX_OPSET:
        raise ModelError(f"This model has 4-bit-or-narrower weights or widths above 8 bits, which need ONNX opset "
                         f"{ONNX_OPSET} types: export with opset_version={ONNX_OPSET} (the default).")
    return needs_21


def _with_exact_clamps(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` where every quantize narrower than its container is clamped explicitly: an integer
    ``clamp(q, qmin, qmax)`` after an 8-bit-container quantize (ORT still fuses the consumer's DQ → Conv), and a
    float clamp of the input to ``[(qmin − zp)·s, (qmax − zp)·s]`` before a 16-bit one (ORT has no 16-bit
    integer Clip; rounding a clamped value gives exactly qmin / qmax)."""
    out = copy.deepcopy(gm)
    for node in list(out.graph.nodes):
        if node.op != "call_function" or node.target is not qd.quantize_per_tensor.default:
            continue
        qmin, qmax, dtype = _int_range(node)
        if (qmin, qmax) == _container_range(dtype):
            continue
        x, scale, zp = node.args[:3]
        with out.graph.inserting_before(node):
            clamped = out.graph.call_function(torch.clamp, (x, (qmin - zp) * scale, (qmax - zp) * scale))
        node.replace_input_with(x, clamped)
    out.graph.lint()
    out.recompile()
    return out


def _container_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _strip_debug_info_(model) -> None:
    """Drop what only a debugger reads: per-node metadata (torch's stack traces and module paths, about a third
    of a small model's file) and the intermediate value_info shapes, which runtimes infer again."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]


def _compact_names_(model) -> None:
    """Short names for what the exporter named after its own traced values (node names and intermediate
    tensors, ~60 bytes per node); graph inputs, outputs and initialisers (the model's parameter names) keep
    theirs. About 2 % of a ResNet-20 int8 file, 3.5 % of its int4 one. A graph with control-flow subgraphs
    keeps its names (their bodies may refer to outer values by name)."""
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in model.graph.node
           for a in node.attribute):
        return
    keep = {v.name for v in (*model.graph.input, *model.graph.output)} | {i.name for i in model.graph.initializer}
    rename: dict[str, str] = {}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in keep:
                rename[out] = f"t{len(rename)}"
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
        for seq in (node.input, node.output):
            for j, name in enumerate(seq):
                seq[j] = rename.get(name, name)


def _pack_int4_weights_(model, weights: dict[str, tuple[int, int]]) -> int:
    """Re-store the int8 initialisers of ≤ 4-bit weights (and their zero points) as INT4; returns how many."""
    import ml_dtypes  # a dependency of onnx: numpy's int4, which numpy_helper stores as packed raw bytes
    from onnx import numpy_helper

    narrow = {k for k, (qmin, qmax) in weights.items() if _INT4[0] <= qmin and qmax <= _INT4[1]}
    inits = {i.name: i for i in model.graph.initializer}
    packed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in narrow or node.input[0] not in inits:
            continue
        w_init = inits[node.input[0]]
        w = numpy_helper.to_array(w_init)
        if w.dtype != np.int8 or w.min() < _INT4[0] or w.max() > _INT4[1]:
            continue  # not the int8 buffer we expect: leave it as it is rather than guess
        # from_array packs two values per byte; helper.make_tensor would store one value per int32 varint
        w_init.CopyFrom(numpy_helper.from_array(w.astype(ml_dtypes.int4), w_init.name))
        if len(node.input) > 2 and node.input[2]:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if not zp.any():  # symmetric weights: an absent zero point is 0 and takes no bytes
                del node.input[2]
            else:  # zero points are shared between nodes: give this one its own
                name = f"{w_init.name}_zero_point_int4"
                model.graph.initializer.append(numpy_helper.from_array(zp.astype(ml_dtypes.int4), name))
                node.input[2] = name
        packed += 1
    used = {i for n in model.graph.node for i in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]  # int8 zero points now replaced
    for init in unused:
        model.graph.initializer.remove(init)
    return packed


def export_onnx(quantized_gm: fx.GraphModule, example_inputs, path: PathLike, dynamic_batch: bool = True,
                opset_version: int | None = None, keep_names: bool = False) -> Path:
    """Write the converted model as an ONNX QDQ model (QuantizeLinear / DequantizeLinear around float ops).

    Activations below 8 bits are clamped to their range exactly as in torch, weights of ≤ 4 bits are stored as
    INT4, 9..16-bit widths as int16 (all opset 21, the default). ``keep_names=True`` keeps the exporter's node
    and intermediate tensor names (named after the traced torch values, for debugging) instead of short ones.
    Returns the written path; the file is written
    atomically, and nothing is written when the model cannot be represented."""
    _require_onnx()
    import onnx

    opset = ONNX_OPSET if opset_version is None else int(opset_version)
    acts, weights = quant_plan(quantized_gm)
    _check_widths(acts, weights, opset)
    program = export(_with_exact_clamps(quantized_gm), example_inputs, dynamic_batch=dynamic_batch)
    onnx_program = torch.onnx.export(program, f=None, dynamo=True, external_data=False, verbose=False,
                                     opset_version=opset)
    model = onnx_program.model_proto
    n_packed = _pack_int4_weights_(model, weights)
    _strip_debug_info_(model)
    if not keep_names:
        _compact_names_(model)
    onnx.checker.check_model(model)
    path = write_atomically(Path(path), lambda tmp: onnx.save_model(model, tmp))
    logger.info("saved the ONNX model to %s (opset %d, %d INT4 weight tensors)", path, opset, n_packed)
    return path
