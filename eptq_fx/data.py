"""Calibration data: whatever the user passes (a tensor, an iterable of tensors / tuples / dicts, a DataLoader)
is validated once and materialised as a ``CalibSet``: one tensor per model input, samples along dim 0.

Materialising keeps every later stage (Hessian, reconstruction, resume) simple and bit-reproducible: a sample has
one index for the whole run, so per-sample Hessian scores line up with the samples the optimiser draws.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from eptq_fx.errors import CalibrationDataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibSet:
    """``tensors[i]`` is the i-th positional input of the model with all samples stacked on dim 0."""

    tensors: tuple[torch.Tensor, ...]

    @property
    def n(self) -> int:
        return int(self.tensors[0].shape[0])

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def batches(self, batch_size: int, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, tuple]]:
        """Yield ``(sample_indices, inputs)`` in ``order`` (default: 0..n-1)."""
        order = torch.arange(self.n) if order is None else order
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield idx, self.take(idx)

    def subset(self, n: int, seed: int) -> CalibSet:
        """A fixed, seeded sample of ``n`` samples (sorted indices, so order follows the source)."""
        if n >= self.n:
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.n, generator=g)[:n].sort().values
        return CalibSet(self.take(idx))

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for t in self.tensors:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _as_args(batch, input_names: Sequence[str], batch_no: int) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise CalibrationDataError(
                f"Calibration batch {batch_no} is a dict without the model input(s) {missing}; "
                f"its keys are {sorted(batch)}."
            )
        return tuple(batch[n] for n in input_names)
    if isinstance(batch, (tuple, list)):
        # (inputs, labels) pairs from a DataLoader: the model inputs come first, the rest is not ours to use
        return tuple(batch[:len(input_names)]) if len(batch) > len(input_names) else tuple(batch)
    raise CalibrationDataError(
        f"Calibration batch {batch_no} is a {type(batch).__name__}; give tensors, tuples of tensors or dicts."
    )


def _check_batch(args: tuple, n_inputs: int, batch_no: int, reference: tuple | None) -> None:
    if len(args) != n_inputs:
        raise CalibrationDataError(
            f"Calibration batch {batch_no} has {len(args)} input(s) but the model takes {n_inputs}."
        )
    for j, t in enumerate(args):
        if not isinstance(t, torch.Tensor):
            raise CalibrationDataError(
                f"Calibration batch {batch_no}, input {j} is a {type(t).__name__}, not a tensor.")
        if t.dim() == 0:
            raise CalibrationDataError(f"Calibration batch {batch_no}, input {j} is a scalar; it needs a batch dim.")
        if t.device.type == "meta":  # shapes without values: nothing to calibrate on (and no finiteness check)
            raise CalibrationDataError(f"Calibration batch {batch_no}, input {j} is on the meta device and holds "
                                       f"no values; load the real data.")
        if reference is not None and t.device != reference[j].device:
            raise CalibrationDataError(f"Calibration batch {batch_no}, input {j} is on {t.device} but batch 0 is "
                                       f"on {reference[j].device}; put every batch on one device.")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationDataError(f"Calibration batch {batch_no}, input {j} contains NaN or Inf values; "
                                       f"clean or drop that batch.")
        if reference is not None:
            r = reference[j]
            if t.shape[1:] != r.shape[1:] or t.dtype != r.dtype:
                raise CalibrationDataError(
                    f"Calibration batch {batch_no}, input {j} has shape {tuple(t.shape)} / {t.dtype}, "
                    f"unlike batch 0's {tuple(r.shape)} / {r.dtype}; give every batch the same sample shape "
                    f"and dtype."
                )


def materialize(calib_data, input_names: Sequence[str], max_samples: int | None = None,
                device: torch.device | None = None) -> CalibSet:
    """Validate and stack calibration data. ``calib_data``: a tensor (samples on dim 0), a tuple of such tensors
    (one per model input), or an iterable of batches (tensor / tuple / dict). Stops once ``max_samples`` are in."""
    if isinstance(calib_data, CalibSet):
        return calib_data
    if isinstance(calib_data, torch.Tensor):
        batches: Iterable = [calib_data]
    elif isinstance(calib_data, tuple) and calib_data and all(isinstance(t, torch.Tensor) for t in calib_data) \
            and len(input_names) == len(calib_data) and len(input_names) > 1:
        batches = [calib_data]
    else:
        batches = calib_data
    if not isinstance(batches, Iterable):
        raise CalibrationDataError(
            f"calib_data must be a tensor or an iterable of batches, got {type(calib_data).__name__}."
        )
    parts: list[tuple] = []
    count = 0
    it = iter(batches)
    batch_no = 0
    while max_samples is None or count < max_samples:
        try:
            batch = next(it)
        except StopIteration:
            break
        except Exception as e:  # a generator that fails midway: say where, keep the cause
            raise CalibrationDataError(
                f"Reading calibration batch {batch_no} raised {type(e).__name__}: {e}; fix the data source "
                f"(nothing was quantized)."
            ) from e
        args = _as_args(batch, input_names, batch_no)
        _check_batch(args, len(input_names), batch_no, parts[0] if parts else None)
        args = tuple(t.detach().to(device) if device is not None else t.detach() for t in args)
        parts.append(args)
        count += int(args[0].shape[0])
        batch_no += 1
    if count == 0:
        raise CalibrationDataError("Calibration data is empty: give at least one batch of model inputs.")
    tensors = tuple(torch.cat([p[j] for p in parts]) for j in range(len(input_names)))
    if max_samples is not None:
        tensors = tuple(t[:max_samples] for t in tensors)
    logger.info("calibration set: %d samples, input shapes %s", tensors[0].shape[0],
                [tuple(t.shape[1:]) for t in tensors])
    return CalibSet(tensors)
