"""``eptq_fx.save`` / ``eptq_fx.load``: one file with the integer weights, scales, zero points and config of a
converted model plus its graph, readable with ``torch.load(weights_only=True)`` (no pickled code).

The graph travels as a ``torch.export`` program serialised to bytes (torch's own non-pickle format), so loading
needs neither the model's class nor its source. The integer weights are in the tables *and* inside the program
(the program needs them to run; the tables are what other tools read): the file is about twice the integer
weight bytes. A checksum over the program bytes and the tables refuses damaged files.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import logging
import os
from pathlib import Path

import torch
from torch import fx

from eptq_fx.atomic_io import write_atomically
from eptq_fx.errors import ArtifactError
from eptq_fx.export.program import example_like, export

logger = logging.getLogger(__name__)
qd = torch.ops.quantized_decomposed
PathLike = str | os.PathLike
FORMAT = "eptq_fx.quantized_model"
VERSION = 1
_CONFIG_KEY = "eptq_fx.config"  # gm.meta key set by prepare (eptq_fx.numerics.calibration.CONFIG_KEY)


def _plain(value):
    """A config value as data torch.load(weights_only=True) accepts (classes and sentinels by name)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", repr(value))


def quant_tables(gm: fx.GraphModule) -> tuple[dict, dict]:
    """({weight buffer: int weight, scale, zero point, axis, qmin, qmax}, {activation: scale, zero point,
    qmin, qmax, dtype}) read from a converted graph."""
    weights, acts = {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is qd.dequantize_per_channel.default and node.args[0].op == "get_attr":
            w, s, z, axis, qmin, qmax, _ = node.args
            weights[str(w.target)] = {
                "int_weight": gm.get_buffer(w.target).detach().clone(),
                "scale": gm.get_buffer(s.target).detach().clone(),
                "zero_point": gm.get_buffer(z.target).detach().clone(),
                "axis": int(axis), "qmin": int(qmin), "qmax": int(qmax)}
        elif node.target is qd.quantize_per_tensor.default:
            _, scale, zp, qmin, qmax, dtype = node.args
            acts[node.name] = {"scale": float(scale), "zero_point": int(zp), "qmin": int(qmin), "qmax": int(qmax),
                               "dtype": str(dtype).removeprefix("torch.")}
    return weights, acts


def _digest(program: bytes, weights: dict, acts: dict, config) -> str:
    h = hashlib.sha256(program)
    for name in sorted(weights):
        for key in sorted(weights[name]):
            v = weights[name][key]
            h.update(f"{name}.{key}".encode())
            h.update(v.contiguous().numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode())
    h.update(repr(sorted(acts.items())).encode())
    h.update(repr(config).encode())
    return h.hexdigest()


def save(model: fx.GraphModule, path: PathLike, example_inputs=None) -> Path:
    """Write a converted model (from ``quantize`` / ``convert``) to ``path`` atomically.

    ``example_inputs`` only fix the input shapes for ``torch.export`` (batch size stays symbolic); by default
    zero tensors of the recorded input shapes are used, so no user data goes into the file."""
    if not isinstance(model, fx.GraphModule):
        raise ArtifactError(f"eptq_fx.save needs the converted GraphModule from eptq_fx.quantize, got "
                            f"{type(model).__name__}.")
    example = example_like(model) if example_inputs is None else example_inputs
    weights, acts = quant_tables(model)
    buf = io.BytesIO()
    torch.export.save(export(model, example), buf)
    program = buf.getvalue()
    config = _plain(model.meta.get(_CONFIG_KEY))
    payload = {"format": FORMAT, "version": VERSION, "torch": torch.__version__.split("+")[0], "config": config,
               "weights": weights, "activations": acts, "program": program,
               "sha256": _digest(program, weights, acts, config)}
    path = write_atomically(Path(path), lambda tmp: torch.save(payload, tmp))
    logger.info("saved the quantized model (%d weight tables, %d activation quantizers) to %s",
                len(weights), len(acts), path)
    return path


def load_artifact(path: PathLike) -> dict:
    """The checked contents of a file written by :func:`save` (tables, config, program bytes)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: pass the path eptq_fx.save wrote.")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable eptq_fx model file ({type(e).__name__}); save it again "
                            f"with eptq_fx.save.") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path} was not written by eptq_fx.save: load it with torch.load, or save the "
                            f"quantized model with eptq_fx.save.")
    if payload.get("version") != VERSION:
        raise ArtifactError(f"{path} has format version {payload.get('version')}; this eptq_fx reads version "
                            f"{VERSION}: save it again with this version.")
    try:
        digest = _digest(payload["program"], payload["weights"], payload["activations"], payload["config"])
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path} is incomplete ({e}): save the model again with eptq_fx.save.") from e
    if digest != payload.get("sha256"):
        raise ArtifactError(f"{path} is damaged (checksum mismatch): save the model again with eptq_fx.save.")
    return payload


def load(path: PathLike) -> torch.nn.Module:
    """Load a model written by :func:`save`: a callable module computing what the saved model computed.

    The tables are on ``module.meta["eptq_fx.artifact"]`` ({"weights", "activations", "config"})."""
    payload = load_artifact(path)
    program = torch.export.load(io.BytesIO(payload["program"]))
    module = program.module()
    module.meta["eptq_fx.artifact"] = {k: payload[k] for k in ("weights", "activations", "config")}
    return module
