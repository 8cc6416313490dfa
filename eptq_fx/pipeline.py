"""The public pipeline: capture → prepare → calibrate → reconstruct → convert (→ export), and ``quantize``,
which runs all of it. Shaped like PT2E's prepare/convert; every stage returns a GraphModule."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from eptq_fx import distributed
from eptq_fx.config import EPTQConfig
from eptq_fx.data import materialize
from eptq_fx.errors import CalibrationDataError, ConfigError, EPTQError, ModelError, TraceError
from eptq_fx.graph.meta import HESSIAN_MEAN, RECONSTRUCTION_OUTCOME, RUN_RECORD, SOURCE_IR, STATIC_BATCH
from eptq_fx.graph.passes.infra import prepare_pass_manager
from eptq_fx.graph.passes.qdq_insertion import act_quantizers, compare_points, weight_ops
from eptq_fx.graph.passes.qdq_lowering import convert
from eptq_fx.graph.tracing import capture, opaque_weight_calls, unwrap
from eptq_fx.numerics.calibration import CONFIG_KEY, calibrate, init_weight_scales_, input_names
from eptq_fx.report import model_bytes, record_layers, record_sqnr

logger = logging.getLogger(__name__)


def _clock() -> float:
    """Seconds for the stage times of the report. CUDA runs asynchronously: without a synchronisation a stage's
    queued kernels would be billed to whichever later stage first waits on them."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _check_weights_finite(gm: fx.GraphModule) -> None:
    # buffers too: a NaN BatchNorm statistic becomes a NaN weight once BN is folded
    tensors = [("Parameter", n, t) for n, t in gm.named_parameters()] + \
        [("Buffer", n, t) for n, t in gm.named_buffers()]
    for kind, name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{kind} {name!r} contains NaN or Inf; fix the checkpoint before quantizing.")


def _warn_float_leaves(gm: fx.GraphModule) -> None:
    """A leaf module is an opaque call: the conv / linear layers inside it stay in float. Say so."""
    from eptq_fx.numerics.quantizers import WEIGHT_OPS

    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, WEIGHT_OPS):
            continue
        inner = [n for n, m in mod.named_modules() if n and isinstance(m, WEIGHT_OPS)]
        if inner:
            logger.warning("leaf module %s holds %d conv/linear layer(s) (%s) that stay in float; trace into it "
                           "(drop it from leaf_modules) to quantize them", node.target, len(inner), inner[0])


def _check_not_quantized(gm: fx.GraphModule) -> None:
    from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp

    quantized = any(isinstance(m, (QuantWeightOp, ActQuantizer)) for m in gm.modules()) or any(
        n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in gm.graph.nodes)
    if quantized:
        raise ModelError("The model is already quantized (it has eptq_fx quantizers or Q/DQ ops); "
                         "quantize the float model instead.")


def _data_error(e: Exception, calib, float_dtype: torch.dtype | None) -> CalibrationDataError:
    """The model cannot run on the calibration data: say what the data looks like and what to change."""
    got = [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in calib.tensors]
    first_line = (str(e).strip().splitlines() or [""])[0]
    hint = "give inputs shaped and typed as the model's forward expects"
    if float_dtype is not None and any(t.is_floating_point() and t.dtype != float_dtype
                                       for t in calib.tensors):
        hint = f"convert the data to the model's dtype (x.to({float_dtype}))"
    return CalibrationDataError(f"The model fails on the calibration data ({type(e).__name__}: "
                                f"{first_line}); {hint}; got shape/dtype per input {got}.")


def _model_device(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def prepare(model: nn.Module, config: EPTQConfig = EPTQConfig(), example_inputs: tuple | None = None,
            **capture_kwargs) -> fx.GraphModule:
    """Capture (if needed), fold BatchNorm, annotate and insert fake-quantizers; weight thresholds are set from
    the weights. The result observes activations until ``calibrate`` runs."""
    if not isinstance(config, EPTQConfig):
        raise ConfigError(f"config must be an eptq_fx.EPTQConfig, got {type(config).__name__}.")
    gm = capture(model, example_inputs, **capture_kwargs)
    _check_not_quantized(gm)
    _check_weights_finite(gm)
    try:
        gm = prepare_pass_manager(config, example_inputs)(gm).graph_module
    except Exception as e:  # PassManager wraps every failure in a bare Exception: give back our typed one
        if isinstance(e.__cause__, EPTQError):
            raise e.__cause__ from None
        raise
    device = _model_device(gm)
    if device is not None:  # quantizers are built on the CPU; a CUDA model needs its quantizers beside it
        for q in [op.weight_quant for op in weight_ops(gm).values()] + list(act_quantizers(gm).values()):
            q.to(device)
    init_weight_scales_(gm, config)
    gm.meta[CONFIG_KEY] = config
    return gm


def _signature_inputs(model: nn.Module) -> list[str]:
    """Required forward arguments (used when symbolic_trace cannot tell us the graph's inputs)."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _capture_for_data(model, calib_data, config: EPTQConfig, example_inputs, capture_kwargs: dict):
    """Capture ``model`` and materialise the data for it. torch.export needs real inputs, so an nn.Module
    whose weights symbolic_trace cannot see (or that it cannot trace) is captured again from the data."""
    method = capture_kwargs.pop("method", "auto")
    first, trace_error = None, None
    if method != "export" or not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        try:
            first = capture(model, None, method="symbolic_trace" if method == "auto" else method,
                            **capture_kwargs)
        except TraceError as e:
            if method != "auto" or isinstance(model, fx.GraphModule):
                raise
            trace_error = e
    names = input_names(first) if first is not None else _signature_inputs(unwrap(model))
    calib = materialize(calib_data, names, max_samples=config.n_calib)
    is_module = isinstance(model, nn.Module)
    if is_module and (first is None or (method == "auto" and not capture_kwargs.get("leaf_modules")
                                        and first.meta.get(SOURCE_IR) != "aten" and opaque_weight_calls(first))):
        probe = example_inputs or calib.take(torch.arange(min(4, calib.n)))
        try:
            return capture(model, probe, method="export" if first is None else "auto", **capture_kwargs), calib
        except TraceError:
            if trace_error is not None:
                raise trace_error from None
            raise
    return first, calib


def quantize(model, calib_data, config: EPTQConfig = EPTQConfig(), example_inputs: tuple | None = None,
             *, leaf_modules: Sequence = (), concrete_args: dict | None = None, capture_method: str = "auto",
             allow_float: bool = False, resume_dir: str | None = None, progress: bool = True,
             return_prepared: bool = False) -> fx.GraphModule:
    """Quantize ``model`` with ``config`` and return a GraphModule with Q/DQ ops and integer weights.

    ``model``: an nn.Module, a GraphModule (``capture``, symbolic_trace, ``torch._dynamo.export``,
    ``ExportedProgram.module()``) or a ``torch.export.ExportedProgram``; an aten input gives an aten output.
    ``calib_data``: a tensor of inputs (samples on dim 0), an iterable of batches (tensors, tuples, dicts; a
    DataLoader); labels after the model inputs in a tuple batch are ignored. ``capture_method``: see
    ``capture``. A model without any conv / linear / matmul raises ``ModelError`` unless ``allow_float``.
    ``method="rtn"`` stops after calibration; ``"eptq"`` runs Hessian-weighted reconstruction.
    ``resume_dir`` keeps per-block checkpoints so an interrupted run continues where it stopped.
    """
    with full_float32():
        return _quantize(model, calib_data, config, example_inputs, leaf_modules=leaf_modules,
                         concrete_args=concrete_args, capture_method=capture_method, allow_float=allow_float,
                         resume_dir=resume_dir, progress=progress, return_prepared=return_prepared)


@contextlib.contextmanager
def full_float32():
    """Convolutions and matmuls in float32 while quantizing, the user's TF32 settings restored afterwards. Why:
    PyTorch lets cuDNN run float32 convolutions in TF32 (a 10-bit mantissa) by default, and the float targets,
    Hessian scores and training steps then differ from float32: ConvMixer W4A4 reached 84.66 with TF32 against
    85.98 in float32 on the same GPU (BENCHMARKS.md "A second GPU run")."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul.allow_tf32
    # cudnn.flags() rather than assigning cudnn.allow_tf32: after torch.backends.disable_global_flags() (which
    # torch's own test utilities call) only the context manager may change cuDNN's flags
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, benchmark_limit=cudnn.benchmark_limit,
                     deterministic=cudnn.deterministic, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul


def _quantize(model, calib_data, config, example_inputs, *, leaf_modules, concrete_args, capture_method,
              allow_float, resume_dir, progress, return_prepared) -> fx.GraphModule:
    if not isinstance(config, EPTQConfig):
        raise ConfigError(f"config must be an eptq_fx.EPTQConfig, got {type(config).__name__}.")
    t0 = _clock()
    distributed.init_from_env()  # under torchrun: join its process group; otherwise nothing changes
    gm, calib = _capture_for_data(model, calib_data, config, example_inputs,
                                  dict(leaf_modules=leaf_modules, concrete_args=concrete_args,
                                       method=capture_method))
    device = _model_device(gm)
    _check_not_quantized(gm)
    _warn_float_leaves(gm)
    data_device = calib.tensors[0].device
    if device is not None and device != data_device:
        raise ModelError(f"The model is on {device} but the calibration data is on {data_device}; "
                         f"move one of them (e.g. model.to('{data_device}')).")
    static = gm.meta.get(STATIC_BATCH)
    if static is not None:
        if calib.n < static:
            raise CalibrationDataError(
                f"The exported graph only runs at batch size {static} but there are {calib.n} calibration "
                f"samples; give at least {static}, or export with a dynamic batch dimension "
                f"(dynamic_shapes={{'x': {{0: torch.export.Dim.AUTO}}}}).")
        if config.method == "eptq":
            raise ConfigError(f"EPTQ runs blocks at batch sizes other than the exported graph's fixed {static}; "
                              f"export with a dynamic batch dimension (dynamic_shapes={{'x': {{0: "
                              f"torch.export.Dim.AUTO}}}}) or use method='rtn'.")
    example = calib.take(torch.arange(static or min(2, calib.n)))
    try:
        with torch.no_grad():
            gm(*example)
    except Exception as e:
        float_dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), None)
        raise _data_error(e, calib, float_dtype) from e
    prepared = prepare(gm, config, example_inputs=example)
    if not weight_ops(prepared) and not compare_points(prepared):
        if not allow_float:
            raise ModelError("The model has no quantizable layer (conv / linear / matmul) eptq_fx recognises; "
                             "pass allow_float=True to get it back in float.")
        logger.warning("the model has no quantizable layer (conv / linear / matmul): returning it in float")
        return gm
    mp_choice, stages = None, {}
    if config.weight_memory is not None:  # choose per-layer widths, then quantize at them (user overrides win)
        from eptq_fx.mixed_precision import choose_bit_widths
        t = _clock()
        mp_choice = choose_bit_widths(prepared, calib, config, progress=progress)
        stages["mixed_precision"] = _clock() - t
        mp_hessian = prepared.meta.get(HESSIAN_MEAN)
        config = dataclasses.replace(config, overrides=mp_choice.overrides() + config.overrides)
        prepared = prepare(gm, config, example_inputs=example)
        prepared.meta[HESSIAN_MEAN] = mp_hessian
    if calib.n < config.n_calib:  # n_calib is a maximum: run on what there is, but say so if it was asked for
        asked = config.n_calib != EPTQConfig.__dataclass_fields__["n_calib"].default
        logger.log(logging.WARNING if asked else logging.INFO, "the calibration data has %d samples, fewer than "
                   "config.n_calib=%d: using all %d", calib.n, config.n_calib, calib.n)
    stages = {"capture_prepare": _clock() - t0 - stages.get("mixed_precision", 0.0), **stages}
    t = _clock()
    calibrate(prepared, calib, config=config, progress=progress)
    stages["calibrate"] = _clock() - t
    sqnr_rtn = record_sqnr(prepared, calib)
    if config.method == "eptq":
        from eptq_fx.method.hessian_stage import estimate_hessian
        from eptq_fx.method.reconstruction import reconstruct
        t = _clock()
        hessian = estimate_hessian(prepared, calib, config, progress=progress)
        stages["hessian"] = _clock() - t
        t = _clock()
        reconstruct(prepared, calib, config, resume_dir=resume_dir, progress=progress, hessian=hessian)
        stages["reconstruct"] = _clock() - t
    _record_run(prepared, gm, calib, config, stages, sqnr_rtn, mp_choice)
    logger.info("quantized (%s, W%dA%d) in %.1f s", config.method, config.weight_bits, config.act_bits,
                _clock() - t0)
    return prepared if return_prepared else convert(prepared)


def _record_run(prepared, float_gm, calib, config, stages, sqnr_rtn, mp_choice) -> None:
    """What eptq_fx.report shows, kept on the GraphModule (convert carries gm.meta over)."""
    layers = record_layers(prepared)
    float_bytes, quantized_bytes = model_bytes(float_gm, layers)
    t = _clock()
    sqnr_final = record_sqnr(prepared, calib) if config.method == "eptq" else sqnr_rtn
    stages["report_sqnr"] = _clock() - t
    prepared.meta[RUN_RECORD] = {
        "layers": layers, "n_calib": calib.n, "stage_seconds": stages, "config": config.fingerprint_dict(),
        "hessian": prepared.meta.get(HESSIAN_MEAN), "sqnr_rtn": sqnr_rtn, "sqnr_final": sqnr_final,
        "float_bytes": float_bytes, "quantized_bytes": quantized_bytes,
        "mixed_precision": None if mp_choice is None else mp_choice.as_dict(),
        "reconstruction": prepared.meta.get(RECONSTRUCTION_OUTCOME)}


@full_float32()
def reconstruct(prepared: fx.GraphModule, calib_data, config: EPTQConfig | None = None,
                resume_dir: str | None = None, progress: bool = True) -> fx.GraphModule:
    """The EPTQ stage of the staged API: run after ``calibrate`` and before ``convert`` (in place)."""
    from eptq_fx.method.hessian_stage import estimate_hessian
    from eptq_fx.method.reconstruction import reconstruct as run_reconstruction

    config = config or prepared.meta.get(CONFIG_KEY) or EPTQConfig()
    calib = materialize(calib_data, input_names(prepared), max_samples=config.n_calib)
    hessian = estimate_hessian(prepared, calib, config, progress=progress)
    return run_reconstruction(prepared, calib, config, resume_dir=resume_dir, progress=progress, hessian=hessian)
