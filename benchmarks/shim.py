"""Make torchvision importable next to a CPU-only torch build (benchmark / test code only).

The torchvision 0.28.0 wheel on PyPI is the CUDA build. Its native library (``_C.so``) does not load against
the CPU torch wheel, and ``import torchvision`` then fails while registering fake kernels for
``torchvision::nms``, because that operator was never defined. Model Compression Toolkit imports
torchvision, so without a fix MCT is unusable here. We only need torchvision's Python side (nothing in the
benchmarks runs NMS), so defining the two operator *schemas* is enough for the import to succeed; calling
them would raise "no kernel registered", which is the honest outcome.

Call :func:`ensure_torchvision_importable` before the first ``import torchvision`` or
``import model_compression_toolkit``.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Kept alive for the whole process: dropping the Library object would unregister the schemas.
_stub_library: torch.library.Library | None = None
_status: str | None = None

_STUB_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _native_library_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "_C.so"


def ensure_torchvision_importable() -> str:
    """Prepare the process so that ``import torchvision`` works; idempotent.

    Returns what was done: ``"torchvision not installed"``, ``"native ops loaded"`` or
    ``"stub schemas defined"``.
    """
    global _stub_library, _status
    if _status is not None:
        return _status
    so_path = _native_library_path()
    if so_path is None:
        _status = "torchvision not installed"
        return _status
    try:
        torch.ops.load_library(str(so_path))
        _status = "native ops loaded"
    except (OSError, RuntimeError) as err:
        log.debug("torchvision native ops unavailable (%s); defining stub schemas", err)
        # Another module may already have defined them (e.g. a second shim); only define what is missing.
        if not _schemas_exist():
            _stub_library = torch.library.Library("torchvision", "DEF")
            for schema in _STUB_SCHEMAS:
                _stub_library.define(schema)
        _status = "stub schemas defined"
    return _status


def _schemas_exist() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        torch._C._dispatch_find_schema_or_throw("torchvision::qnms", "")
        return True
    except RuntimeError:
        return False
