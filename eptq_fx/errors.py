"""Typed exceptions. Every message is one sentence that says what to change."""
from __future__ import annotations


class EPTQError(Exception):
    """Base class of every error raised on purpose by eptq_fx."""


class TraceError(EPTQError):
    """torch.fx could not trace the model; names the module where tracing broke."""


class ConfigError(EPTQError, ValueError):
    """The configuration is invalid or contradictory."""


class CalibrationDataError(EPTQError, ValueError):
    """The calibration data is empty, too small, non-finite or does not fit the model."""


class ModelError(EPTQError, ValueError):
    """The model itself cannot be quantized as given (NaN weights, wrong device, ...)."""


class HessianError(EPTQError):
    """The label-free Hessian cannot be estimated (e.g. the output does not depend on the activations)."""


class CheckpointError(EPTQError):
    """A resume directory does not belong to this model / config / data, or is damaged."""


class KernelInputError(EPTQError, ValueError):
    """A numba kernel was given arrays it cannot work on (NaN, wrong shape, bad bit width)."""


class ArtifactError(EPTQError, ValueError):
    """A file given to eptq_fx.load is not a complete eptq_fx quantized-model file."""
