"""The public pipeline: capture → prepare → calibrate → reconstruct → convert (→ export), and ``quantize``,
which runs all of it. Shaped like PT2E's prepare/convert; every stage returns a GraphModule."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from eptq_fx import distributed
from eptq_fx.config import EPTQConfig
from eptq_fx.data import materialize
from eptq_fx.errors import CalibrationDataError, ConfigError, ModelError
from eptq_fx.graph.passes.annotation import annotate, modularize_functional_ops
from eptq_fx.graph.passes.bn_folding import fold_batchnorm
from eptq_fx.graph.passes.qdq_insertion import act_quantizers, compare_points, insert_qdq, weight_ops
from eptq_fx.graph.passes.qdq_lowering import convert
from eptq_fx.graph.tracing import capture, unwrap
from eptq_fx.numerics.calibration import CONFIG_KEY, calibrate, init_weight_scales_, input_names

logger = logging.getLogger(__name__)


def _check_weights_finite(gm: fx.GraphModule) -> None:
    # buffers too: a NaN BatchNorm statistic becomes a NaN weight once BN is folded
    tensors = [("Parameter", n, t) for n, t in gm.named_parameters()] + \
        [("Buffer", n, t) for n, t in gm.named_buffers()]
    for kind, name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{kind} {name!r} contains NaN or Inf; fix the checkpoint before quantizing.")


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
    _check_weights_finite(gm)
    fold_batchnorm(gm)
    modularize_functional_ops(gm)
    if example_inputs is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)  # dtypes let annotate skip integer tensors
    annotate(gm, config)
    insert_qdq(gm, power_of_two=config.power_of_two, seed=config.seed)
    device = _model_device(gm)
    if device is not None:  # quantizers are built on the CPU; a CUDA model needs its quantizers beside it
        for q in [op.weight_quant for op in weight_ops(gm).values()] + list(act_quantizers(gm).values()):
            q.to(device)
    init_weight_scales_(gm, config)
    gm.meta[CONFIG_KEY] = config
    return gm


def quantize(model: nn.Module, calib_data, config: EPTQConfig = EPTQConfig(), example_inputs: tuple | None = None,
             *, leaf_modules: Sequence = (), concrete_args: dict | None = None,
             resume_dir: str | None = None, progress: bool = True, return_prepared: bool = False) -> fx.GraphModule:
    """Quantize ``model`` with ``config`` and return a GraphModule with Q/DQ ops and integer weights.

    ``calib_data``: a tensor of inputs (samples on dim 0), an iterable of batches (tensors, tuples, dicts; a
    DataLoader); labels after the model inputs in a tuple batch are ignored. ``model`` may also be a
    GraphModule from ``capture`` (for models needing leaf modules). ``method="rtn"`` stops after calibration;
    ``"eptq"`` runs Hessian-weighted reconstruction.
    ``resume_dir`` keeps per-block checkpoints so an interrupted run continues where it stopped.
    """
    if not isinstance(config, EPTQConfig):
        raise ConfigError(f"config must be an eptq_fx.EPTQConfig, got {type(config).__name__}.")
    t0 = time.perf_counter()
    distributed.init_from_env()  # under torchrun: join its process group; otherwise nothing changes
    gm = capture(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    names = input_names(gm)
    calib = materialize(calib_data, names, max_samples=config.n_calib)
    device = _model_device(unwrap(model))
    data_device = calib.tensors[0].device
    if device is not None and device != data_device:
        raise ModelError(f"The model is on {device} but the calibration data is on {data_device}; "
                         f"move one of them (e.g. model.to('{data_device}')).")
    example = calib.take(torch.arange(min(2, calib.n)))
    try:
        with torch.no_grad():
            gm(*example)
    except Exception as e:
        float_dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), None)
        raise _data_error(e, calib, float_dtype) from e
    prepared = prepare(gm, config, example_inputs=example)
    if not weight_ops(prepared) and not compare_points(prepared):
        logger.warning("the model has no quantizable layer (conv / linear / matmul): returning it in float")
        return gm
    if calib.n < config.n_calib:  # n_calib is a maximum: run on what there is, but say so
        logger.warning("the calibration data has %d samples, fewer than config.n_calib=%d: using all %d",
                       calib.n, config.n_calib, calib.n)
    calibrate(prepared, calib, config=config, progress=progress)
    if config.method == "eptq":
        from eptq_fx.method.reconstruction import reconstruct
        reconstruct(prepared, calib, config, resume_dir=resume_dir, progress=progress)
    logger.info("quantized (%s, W%dA%d) in %.1f s", config.method, config.weight_bits, config.act_bits,
                time.perf_counter() - t0)
    return prepared if return_prepared else convert(prepared)


def reconstruct(prepared: fx.GraphModule, calib_data, config: EPTQConfig | None = None,
                resume_dir: str | None = None, progress: bool = True) -> fx.GraphModule:
    """The EPTQ stage of the staged API: run after ``calibrate`` and before ``convert`` (in place)."""
    from eptq_fx.method.reconstruction import reconstruct as run_reconstruction

    config = config or prepared.meta.get(CONFIG_KEY) or EPTQConfig()
    calib = materialize(calib_data, input_names(prepared), max_samples=config.n_calib)
    return run_reconstruction(prepared, calib, config, resume_dir=resume_dir, progress=progress)
