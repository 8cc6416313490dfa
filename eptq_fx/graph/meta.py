"""The ``node.meta`` keys through which passes hand state to each other. Defined once, here.

Every key lives under the ``eptq_fx.`` namespace so that it never collides with torch's own meta keys.
"""
from __future__ import annotations

from dataclasses import dataclass

# On a weight-op node (call_module of conv/linear, or call_function matmul): the LayerQuant chosen for it.
LAYER_QUANT = "eptq_fx.layer_quant"
# On any node whose output feeds a quantized op: the ActQuant spec for that output (per-tensor).
ACT_QUANT = "eptq_fx.act_quant"
# On a weight-op output node: the name of the compare point (what reconstruction and the Hessian look at).
COMPARE_POINT = "eptq_fx.compare_point"
# On a node inserted by insert_qdq: what it is ("act_quant").
INSERTED = "eptq_fx.inserted"
# On every node that belongs to a reconstruction block: the block index (topological order).
BLOCK = "eptq_fx.block"
# On the GraphModule (gm.meta, not node.meta): the list of schedule Blocks, in topological order.
BLOCKS = "eptq_fx.blocks"
# On the GraphModule (gm.meta): {compare point: mean over samples of the label-free Hessian score}, set by
# reconstruction (and by mixed precision) for the report.
HESSIAN_MEAN = "eptq_fx.hessian_mean"
# On the GraphModule (gm.meta) returned by quantize: what the run decided and measured (eptq_fx.report reads it).
RUN_RECORD = "eptq_fx.run_record"
# On the GraphModule (gm.meta), set by reconstruction: what the network-level fallback kept, {"kept": "eptq" |
# "partial" | "rtn" | "unchecked" (fallback off), "reverted": [quantizers it put back at round-to-nearest]}.
RECONSTRUCTION_OUTCOME = "eptq_fx.reconstruction_outcome"
# On a conv/linear node that absorbed a BatchNorm: the BN's qualified name (for logs and tests).
FOLDED_BN = "eptq_fx.folded_bn"
# On the GraphModule: "aten" when captured from torch.export (convert then emits aten ops), else "torch".
SOURCE_IR = "eptq_fx.source_ir"
# On the GraphModule: the only batch size an exported graph runs at (absent: any batch size).
STATIC_BATCH = "eptq_fx.static_batch"
# On a node whose value is a tensor: the dim that holds the calibration samples, or None when they share a dim
# with something else (nn.MultiheadAttention's (L·N, E) rows) or the value has none (graph/passes/batch_layout.py).
BATCH_DIM = "eptq_fx.batch_dim"
# On the GraphModule: True once BATCH_DIM has been written from a run on calibration data.
BATCH_LAYOUT = "eptq_fx.batch_layout"


@dataclass(frozen=True)
class LayerQuant:
    """Quantization decided for one weight op. ``None`` bits mean 'leave in float'."""

    name: str  # qualified module name (or node name for functional ops)
    weight_bits: int | None
    act_bits: int | None  # bits of the activations feeding this op


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor quantization of one activation tensor."""

    bits: int
    scheme: str  # "asymmetric" | "symmetric" | "unsigned"
