"""Calibration: weight thresholds from the weights (max, MSE or Hessian-weighted MSE), activation ranges from
observed data (min/max or MSE)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from eptq_fx import distributed
from eptq_fx.config import EPTQConfig
from eptq_fx.data import CalibSet, materialize
from eptq_fx.errors import CalibrationDataError
from eptq_fx.graph.meta import STATIC_BATCH
from eptq_fx.graph.passes.qdq_insertion import act_quantizers, weight_ops
from eptq_fx.numerics import kernels
from eptq_fx.numerics.quantizers import weight_as_rows

logger = logging.getLogger(__name__)

CONFIG_KEY = "eptq_fx.config"  # gm.meta: the EPTQConfig the graph was prepared with


def input_names(gm: fx.GraphModule) -> list[str]:
    """The inputs calibration data must provide: every placeholder except unused ones that have a default
    (e.g. an argument fixed by ``concrete_args``)."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder" and (n.users or not n.args)]


def init_weight_scales_(gm: fx.GraphModule, config: EPTQConfig,
                        weight_hessian: dict[str, torch.Tensor] | None = None) -> None:
    """Choose each weight op's per-channel threshold. ``weight_hessian`` (per-element, same shape as the weight)
    turns the MSE search into the Hessian-weighted (HMSE) one."""
    for name, op in weight_ops(gm).items():
        wq = op.weight_quant
        rows = weight_as_rows(op.weight.detach().cpu(), wq.axis).numpy().astype(np.float32)
        if config.weight_range == "minmax":
            scale = kernels.minmax_weight_scale(rows, wq.bits)
            if config.power_of_two:  # the smallest power-of-two step that still covers max|w|
                scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
        else:
            h = None
            if weight_hessian is not None and name in weight_hessian:
                h = weight_as_rows(weight_hessian[name].detach().cpu(), wq.axis).numpy().astype(np.float32)
                h = h / max(float(h.max()), 1e-30)  # scale-free: only the relative weighting matters
            scale = kernels.search_weight_scale(rows, wq.bits, weights=h, n_grid=config.n_grid)
            if config.power_of_two:
                scale = _best_power_of_two(rows, scale, wq.qmin, wq.qmax, h)
        wq.set_scale_(scale)


def _best_power_of_two(rows: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
                       h: np.ndarray | None) -> np.ndarray:
    """Power-of-two *steps* (what shift-based integer hardware needs): per channel, the better of the two
    powers of two around the searched step, by the same (weighted) squared error."""
    lo = np.exp2(np.floor(np.log2(scale))).astype(np.float32)
    candidates = [lo, (2 * lo).astype(np.float32)]
    errors = []
    for c in candidates:
        err = (rows - kernels.fake_quant_per_channel(rows, c, qmin, qmax)) ** 2
        errors.append((err if h is None else err * h).sum(1))
    return np.where(errors[0] <= errors[1], candidates[0], candidates[1]).astype(np.float32)


def set_weight_mode_(gm: fx.GraphModule, mode: str) -> None:
    for op in weight_ops(gm).values():
        if op.weight_quant.mode in ("soft", "hard") and mode == "round":
            continue  # a decided rounding is not undone by switching quantization back on
        op.weight_quant.mode = mode


def set_act_mode_(gm: fx.GraphModule, mode: str) -> None:
    for q in act_quantizers(gm).values():
        q.mode = mode


class quant_disabled:
    """Context manager: run a prepared graph in float (the reference the method matches)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __enter__(self):
        self.saved = [(op.weight_quant, op.weight_quant.mode) for op in weight_ops(self.gm).values()]
        self.saved += [(q, q.mode) for q in act_quantizers(self.gm).values()]
        for q, _ in self.saved:
            q.mode = "off"
        return self.gm

    def __exit__(self, *exc):
        for q, mode in self.saved:
            q.mode = mode
        return False


def _numbered(batches) -> Iterator:
    """Iterate a user's data source; one that fails midway is reported with the batch it failed on."""
    it = iter(batches)
    batch_no = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise CalibrationDataError(f"Reading calibration batch {batch_no} raised {type(e).__name__}: {e}; "
                                       f"fix the data source (nothing was calibrated).") from e
        yield batch
        batch_no += 1


@torch.no_grad()
def calibrate(prepared: fx.GraphModule, calib_data, forward_fn: Callable | None = None,
              config: EPTQConfig | None = None, progress: bool = True) -> fx.GraphModule:
    """Observe activations on ``calib_data`` and set every activation range (in place; returns the graph).

    ``calib_data``: a tensor, an iterable of batches (tensors, tuples or dicts; a DataLoader works) or a
    ``CalibSet``. ``forward_fn(model, batch)`` replaces the default call for batches of another shape (e.g.
    ``(images, labels)`` pairs). Observation runs the float model so every range sees unclipped data.
    """
    config = config or prepared.meta.get(CONFIG_KEY) or EPTQConfig()
    aqs = act_quantizers(prepared)
    set_act_mode_(prepared, "observe")
    saved = {name: op.weight_quant.mode for name, op in weight_ops(prepared).items()}
    set_weight_mode_(prepared, "off")
    seen = 0
    try:
        if forward_fn is not None:
            for batch in tqdm(_numbered(calib_data), desc="calibrate", disable=not progress, leave=False):
                forward_fn(prepared, batch)
                seen += 1
        else:
            calib = calib_data if isinstance(calib_data, CalibSet) else \
                materialize(calib_data, input_names(prepared), max_samples=config.n_calib)
            calib, _ = distributed.shard(calib)  # under torchrun each rank observes its own samples
            batch_size, n_used = config.calib_batch_size, calib.n
            static = prepared.meta.get(STATIC_BATCH)
            if static is not None:  # an export fixed the batch size: whole batches of exactly that size
                if calib.n < static:
                    raise CalibrationDataError(f"The exported graph only runs at batch size {static} but there "
                                               f"are {calib.n} calibration samples; give at least {static}.")
                batch_size, n_used = static, calib.n - calib.n % static
                if n_used < calib.n:
                    logger.info("calibrating on %d of %d samples: whole batches of the exported size %d",
                                n_used, calib.n, static)
            n_batches = -(-n_used // batch_size)
            for _, args in tqdm(calib.batches(batch_size, torch.arange(n_used)), total=n_batches,
                                desc="calibrate", disable=not progress, leave=False):
                try:
                    prepared(*args)
                except Exception as e:
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    raise CalibrationDataError(
                        f"The model fails on calibration batch {seen} ({type(e).__name__}: {first_line}); give "
                        f"inputs shaped and typed as the model's forward expects; got "
                        f"{[(tuple(a.shape), str(a.dtype)) for a in args]}.") from e
                seen += 1
        if seen == 0:
            raise CalibrationDataError("Calibration data is empty: give at least one batch of model inputs.")
        unseen = [name for name, q in aqs.items() if not q.observed()]
        if unseen:
            raise CalibrationDataError(f"Calibration never reached the activation quantizer(s) {unseen}; "
                                       f"forward_fn must run the model on each batch.")
        distributed.merge_observations_(aqs.values())  # every rank sets ranges from all ranks' data
        for q in aqs.values():
            q.finalize_(config.act_range, config.n_grid)
    finally:
        for name, op in weight_ops(prepared).items():
            op.weight_quant.mode = saved[name] if saved[name] != "off" else "round"
        for q in aqs.values():
            if q.mode == "observe":  # failed midway: leave the graph in float rather than half-observed
                q.mode = "off"
    logger.info("calibrated %d activation quantizers on %d batches (%s ranges)", len(aqs), seen,
                config.act_range)
    return prepared
