"""What Sony's Model Compression Toolkit (MCT 2.6.x) PTQ and GPTQ runs share: the bit-width configuration, the
target platform, the calibration generator and a summary of the bit widths MCT really used.

Bit widths (the way MCT expresses them):
- W8A8: MCT's default target platform (IMX500 TPC v1: symmetric per-channel 8-bit kernels, power-of-two 8-bit
  activations, float bias), nothing overridden.
- W<8: the default TPC already offers 8/4/2-bit kernels for conv / depthwise / fully-connected ops (its mixed-
  precision list), so ``BitWidthConfig.set_manual_weights_bit_width`` picks the w-bit kernel for every Conv2d and
  Linear, then puts the first and the last weight layer back to 8 bits (like eptq_fx's ``first_last_8bit``).
- A<8: the IMX500 v1 TPC only offers 8-bit activations, so we build one with the same op sets and fusing where
  every quantized op offers activations at {a, 8} with a as the base choice. The model input, the activation
  feeding the last linear and the logits are then set back to 8 bits with ``set_manual_activation_bit_width``.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from benchmarks.shim import ensure_torchvision_importable

log = logging.getLogger(__name__)

# fx nodes that only move data around; walking back from the last linear skips them to find the op whose
# (quantized) output actually feeds it.
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                    operator.getitem}
_SHAPE_METHODS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "permute", "transpose", "contiguous"}
_SHAPE_MODULES = (nn.Flatten, nn.Dropout, nn.Identity)


def import_mct():
    """Import MCT (after the torchvision shim) with its logger quietened to warnings."""
    ensure_torchvision_importable()
    import model_compression_toolkit as mct

    logging.getLogger("Model Compression Toolkit").setLevel(logging.WARNING)
    return mct


def representative_data(calib: torch.Tensor, batch_size: int) -> Callable[[], Iterator[list[np.ndarray]]]:
    """MCT's calibration interface: a factory of generators of [batch] lists; one pass = every image once."""
    array = calib.detach().cpu().numpy().astype(np.float32)

    def generator() -> Iterator[list[np.ndarray]]:
        for i in range(0, len(array), batch_size):
            yield [array[i:i + batch_size]]

    return generator


def _names_matcher(names: set[str]):
    """An MCT node filter matching graph nodes by fx node name; MCT renames a conv it folded a BatchNorm into
    to ``<name>_bn``, so that spelling matches too."""
    from model_compression_toolkit.core.common.matchers.node_matcher import BaseNodeMatcher

    class NodeNamesMatcher(BaseNodeMatcher):
        def apply(self, node) -> bool:
            name = node.name
            return name in names or (name.endswith("_bn") and name[:-3] in names)

        def __repr__(self) -> str:
            return f"NodeNamesMatcher({sorted(names)})"

    return NodeNamesMatcher()


def _is_shape_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_module":
        return isinstance(modules[node.target], _SHAPE_MODULES)
    return False


def eight_bit_anchors(model: nn.Module) -> dict[str, object]:
    """fx names of: the first and last Conv2d/Linear, the model inputs, and the nodes from the last linear's
    input back to the first op that is not a pure reshape (the activation that feeds the classifier)."""
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    weight_nodes = [n for n in gm.graph.nodes
                    if n.op == "call_module" and isinstance(modules[n.target], (nn.Conv2d, nn.Linear))]
    if not weight_nodes:
        raise ValueError("model has no Conv2d / Linear layer to quantize")
    first, last = weight_nodes[0], weight_nodes[-1]
    feeding = []
    node = last.args[0]
    while isinstance(node, fx.Node):
        feeding.append(node.name)
        if not _is_shape_node(node, modules):
            break
        node = node.args[0]
    return {"first": first.name, "last": last.name, "inputs": [n.name for n in gm.graph.nodes if n.op == "placeholder"],
            "feeding_last": feeding,
            "weight_types": sorted({type(modules[n.target]) for n in weight_nodes}, key=lambda t: t.__name__)}


def activation_choice_tpc(act_bits: int):
    """IMX500 v1 op sets and fusing, with every activation-quantized op offering {act_bits, 8} (base act_bits)
    and accepting either width as its input."""
    from model_compression_toolkit.target_platform_capabilities.schema import mct_current_schema as schema
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc as imx500

    widths = (act_bits, 8)

    def offer_both_widths(options):
        configs = options.quantization_configurations
        if not any(c.enable_activation_quantization for c in configs):
            return options.clone_and_edit(supported_input_activation_n_bits=widths)
        offered = []
        for config in configs:
            for bits in widths:
                candidate = config.clone_and_edit(activation_n_bits=bits, supported_input_activation_n_bits=widths)
                if candidate not in offered:
                    offered.append(candidate)
        base = options.base_config.clone_and_edit(activation_n_bits=act_bits, supported_input_activation_n_bits=widths)
        return schema.QuantizationConfigOptions(quantization_configurations=tuple(offered), base_config=base)

    linear8, mixed_precision_list, default8 = imx500.get_op_quantization_configs()
    stock = imx500.generate_tpc(default_config=default8, base_config=linear8,
                                mixed_precision_cfg_list=mixed_precision_list, name=f"imx500_v1_act{act_bits}")
    # Op sets without options (ReLU, Add, ...) use the default options, so those change too.
    op_sets = tuple(op if op.qc_options is None
                    else op.model_copy(update={"qc_options": offer_both_widths(op.qc_options)})
                    for op in stock.operator_set)
    return stock.model_copy(update={"operator_set": op_sets, "default_qco": offer_both_widths(stock.default_qco)})


def quantization_setup(mct, model: nn.Module, w_bits: int, a_bits: int) -> tuple[object, dict]:
    """CoreConfig plus the keyword arguments (target platform) for an MCT facade call at (w_bits, a_bits)."""
    anchors = eight_bit_anchors(model)
    bit_widths = mct.core.BitWidthConfig()
    if w_bits != 8:
        from model_compression_toolkit.core.common.network_editors.node_filters import NodeTypeFilter

        bit_widths.set_manual_weights_bit_width([NodeTypeFilter(t) for t in anchors["weight_types"]], w_bits, "weight")
        bit_widths.set_manual_weights_bit_width(_names_matcher({anchors["first"], anchors["last"]}), 8, "weight")
    extra = {}
    if a_bits != 8:
        extra["target_platform_capabilities"] = activation_choice_tpc(a_bits)
        keep8 = set(anchors["inputs"]) | set(anchors["feeding_last"]) | {anchors["last"]}
        bit_widths.set_manual_activation_bit_width(_names_matcher(keep8), 8)
    return mct.core.CoreConfig(bit_width_config=bit_widths), extra


def bits_used(qmodel: nn.Module) -> dict:
    """The bit widths found on MCT's quantizers: {"weights": sorted widths, "activations": sorted widths,
    "per_layer_weights": {layer: bits}} so a run can be checked against what was asked for."""
    per_layer, acts = {}, []
    for name, module in qmodel.named_modules():
        quantizers = getattr(module, "weights_quantizers", None)
        if isinstance(quantizers, dict):
            for attr, q in quantizers.items():
                if getattr(q, "num_bits", None) is not None:
                    per_layer[f"{name}.{attr}"] = int(q.num_bits)
        holder = getattr(module, "activation_holder_quantizer", None)
        if holder is not None and getattr(holder, "num_bits", None) is not None:
            acts.append(int(holder.num_bits))
    return {"weights": sorted(set(per_layer.values())), "activations": sorted(set(acts)),
            "per_layer_weights": per_layer}


def check_supported(w_bits: int, a_bits: int) -> str | None:
    """MCT's IMX500 kernels come at 8/4/2 bits; activations are whatever the TPC offers (we build 2..8)."""
    if w_bits not in (2, 4, 8):
        return f"MCT's IMX500 target platform offers 8/4/2-bit kernels only, not {w_bits}"
    if not 2 <= a_bits <= 8:
        return f"activation width {a_bits} is outside what this harness configures for MCT (2..8)"
    return None
