"""Deployment: ``torch.export`` programs (``.pt2``), exact ONNX QDQ models, Inductor compilation, and
``save`` / ``load`` of a quantized model.

``eptq_fx.export.export`` / ``load`` (ExportedProgram), ``export_onnx`` (needs the ``onnx`` extra).
"""
from eptq_fx.export.onnx_qdq import export_onnx
from eptq_fx.export.program import export, load

__all__ = ["export", "load", "export_onnx"]
