"""eptq_fx: EPTQ post-training quantization of PyTorch models as torch.fx passes.

One call: ``eptq_fx.quantize(model, calib_data, eptq_fx.EPTQConfig(weight_bits=4, act_bits=8))``.
Staged: ``capture → prepare → calibrate → reconstruct → convert → export``.
"""
from eptq_fx import (
    errors,
    export,  # the module: eptq_fx.export.export / export_onnx / load
)
from eptq_fx.config import (
    KEEP,
    ActPlacement,
    EPTQConfig,
    HessianConfig,
    HessianScope,
    Override,
    Precision,
    ReconstructionConfig,
    Target,
    WidthCost,
)
from eptq_fx.errors import (
    ArtifactError,
    CalibrationDataError,
    CheckpointError,
    ConfigError,
    EPTQError,
    HessianError,
    ModelError,
    TraceError,
)
from eptq_fx.export import export_onnx
from eptq_fx.export.saving import load, save
from eptq_fx.graph.passes.qdq_lowering import convert
from eptq_fx.graph.tracing import capture
from eptq_fx.numerics.calibration import calibrate
from eptq_fx.pipeline import prepare, quantize, reconstruct
from eptq_fx.report import report

__all__ = [
    "quantize", "report", "save", "load", "capture", "prepare", "calibrate", "reconstruct", "convert",
    "export", "export_onnx",
    "EPTQConfig", "ActPlacement", "HessianConfig", "HessianScope", "Precision", "Target", "WidthCost",
    "ReconstructionConfig", "Override", "KEEP", "errors", "EPTQError", "TraceError", "ConfigError",
    "CalibrationDataError", "ModelError", "ArtifactError", "HessianError", "CheckpointError",
]
__version__ = "0.1.0"
