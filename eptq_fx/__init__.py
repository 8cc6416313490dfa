"""eptq_fx: EPTQ post-training quantization of PyTorch models as torch.fx passes.

One call: ``eptq_fx.quantize(model, calib_data, eptq_fx.EPTQConfig(weight_bits=4, act_bits=8))``.
Staged: ``capture → prepare → calibrate → reconstruct → convert → export``.
"""
from . import errors
from . import reconstruct as _reconstruct_module  # noqa: F401  (load the module before the function shadows it)
from .api import prepare, quantize, reconstruct
from .calibrate import calibrate
from .capture import capture
from .config import KEEP, EPTQConfig, HessianConfig, Override, ReconstructionConfig
from .errors import CalibrationDataError, CheckpointError, ConfigError, EPTQError, HessianError, ModelError, TraceError
from .export import export, export_onnx
from .passes.convert import convert

__all__ = [
    "quantize", "capture", "prepare", "calibrate", "reconstruct", "convert", "export", "export_onnx",
    "EPTQConfig", "HessianConfig",
    "ReconstructionConfig", "Override", "KEEP", "errors", "EPTQError", "TraceError", "ConfigError",
    "CalibrationDataError", "ModelError", "HessianError", "CheckpointError",
]
__version__ = "0.1.0"
