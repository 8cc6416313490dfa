"""Running a block subgraph over cached calibration activations: batching, device placement, the cache's
memory (outputs written into preallocated tensors, GPU caches moved to the host when large), and which modules
train while a block is optimised."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from eptq_fx.config import AUTO_CACHE_BYTES, Precision
from eptq_fx.data import CalibSet
from eptq_fx.errors import CalibrationDataError
from eptq_fx.graph.meta import BATCH_DIM, BATCH_LAYOUT
from eptq_fx.graph.passes.batch_layout import PROBE_SIZES, annotate_batch_dims_
from eptq_fx.graph.passes.block_schedule import Block
from eptq_fx.numerics.calibration import quant_disabled
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp


def ensure_batch_layout_(gm: fx.GraphModule, calib: CalibSet) -> None:
    """Find where each value holds its samples (``node.meta[BATCH_DIM]``), once per graph, from a float run
    on the first calibration samples; the block schedule and the per-sample caches and scores follow it.
    Raises CalibrationDataError when an output that depends on the inputs does not hold the samples on dim 0:
    EPTQ matches the float model sample by sample, so the data's dim 0 must be what the model's is."""
    if gm.meta.get(BATCH_LAYOUT):
        return
    device, dtype = module_device(gm), module_dtype(gm)
    with quant_disabled(gm):  # the first samples, where and as the model computes (a GPU model: on its GPU)
        annotate_batch_dims_(gm, tuple(fetch(t[:max(PROBE_SIZES)], device, dtype) for t in calib.tensors))
    data_dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(m in data_dependent for m in node.all_input_nodes):
            data_dependent.add(node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    bad = [n.name for n in tree_flatten(output.args[0])[0] if isinstance(n, fx.Node) and n in data_dependent
           and n.meta.get(BATCH_DIM, 0) != 0]
    if bad:
        raise CalibrationDataError(
            f"Model output {bad[0]!r} does not hold the calibration samples on dim 0 (dim 0 of every input is "
            f"read as the sample index); give inputs with the samples on dim 0 and a model whose outputs keep "
            f"them there (wrap a sequence-first model so that it takes and returns batch-first tensors), or use "
            f"method='rtn'.")


def module_device(module: torch.nn.Module) -> torch.device | None:
    return next((t.device for t in (*module.parameters(), *module.buffers())), None)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype the module computes in (its first floating parameter's; float32 without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def image_layout(t):
    """A 4-d floating tensor (an image batch or feature map) in channels-last order; anything else as it is.

    Why: oneDNN's convolutions (forward and both backward passes) run 1.15-1.35x faster on NHWC than on NCHW
    maps on our 2-core CPU (ResNet-18 shapes, batch 32; cuDNN prefers it too), the elementwise fake-quant work
    costs the same in either order, and a conv's output keeps its input's order, so once the block inputs are
    channels-last the whole cache chain stays so. Only the layout changes, not the values a layer computes
    (beyond a conv's summation order)."""
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def fetch(t, device: torch.device | None, dtype: torch.dtype):
    """A cached value as a block reads it: on its device, channels-last when it is a feature map
    (``image_layout``; a no-op for the cache, which is already), and back in the block's dtype when the cache
    holds it in a narrower floating format (``ReconstructionConfig.cache_precision``)."""
    if not isinstance(t, torch.Tensor):
        return t
    t = image_layout(on_device(t, device))
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _empty_like_rows(o: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (n, *o.shape[1:]) tensor in o's memory order (channels-last stays channels-last, so
    writing a batch into it is a plain copy and reading minibatches back needs no reorder)."""
    fmt = torch.channels_last if o.dim() == 4 and not o.is_contiguous() \
        and o.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((n, *o.shape[1:]), dtype=dtype, device=o.device, memory_format=fmt)


def _to_host_if_large(outs, device: torch.device | None, batch: int, n: int):
    """Cached block outputs stay where the block ran unless they are on a GPU that could not also hold the
    next block's training (a quarter of its free memory, estimated from the first batch): then on the host,
    and the minibatches go back to the GPU as they are drawn."""
    if device is None or device.type != "cuda":
        return outs
    leaves = [t for t in tree_flatten(outs)[0] if isinstance(t, torch.Tensor)]
    total = sum(t.numel() * t.element_size() for t in leaves) * n // max(1, batch)
    if total <= torch.cuda.mem_get_info(device)[0] // 4:
        return outs
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, outs)


def quantizers_train_(sub: fx.GraphModule, mode: bool) -> None:
    """Training mode for the quantizers only (QDrop draws its masks in training mode); everything else, such as
    BatchNorms that could not be folded and dropout, stays in eval mode as in the model being quantized."""
    sub.eval()
    for m in sub.modules():
        if mode and isinstance(m, (ActQuantizer, QuantWeightOp)):
            m.train()


def store_dtype(o: torch.Tensor, n: int, precision: Precision) -> torch.dtype:
    """The dtype n rows like ``o`` are cached in under ``ReconstructionConfig.cache_precision``."""
    if not o.is_floating_point() or precision is Precision.FLOAT32:
        return o.dtype
    if precision is Precision.AUTO and n * (o[0].numel() if o.dim() else 1) * 4 <= AUTO_CACHE_BYTES:
        return o.dtype
    return torch.bfloat16


def run_block(sub: fx.GraphModule, values: dict[str, torch.Tensor], block: Block, idx: torch.Tensor | None,
              batch_size: int = 256, keep: int | None = None,
              store: Precision = Precision.FLOAT32) -> list[torch.Tensor]:
    """Run a block subgraph over the (indexed) samples in batches; returns its outputs concatenated (only the
    first ``keep`` of them: the block outputs without the compare points' copies, which can be the largest),
    floating-point outputs stored as ``store_dtype`` says (read back with ``fetch``)."""
    n = next(iter(values[name] for name in block.inputs)).shape[0] if block.inputs else 0
    order = torch.arange(n) if idx is None else idx
    device, dtype = module_device(sub), module_dtype(sub)
    chunks: list[list] = []
    filled: list[torch.Tensor | None] = []  # tensor outputs, written in place: no second copy from torch.cat
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            outs = list(sub(*(fetch(values[name][sel], device, dtype) for name in block.inputs)))[:keep]
            outs = list(_to_host_if_large(outs, device, len(sel), len(order)))
            if i == 0:
                filled = [_empty_like_rows(o, len(order), store_dtype(o, len(order), store))
                          if isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == len(sel) else None
                          for o in outs]
            for j, o in enumerate(outs):
                if filled[j] is not None:
                    filled[j][i:i + len(sel)] = o
                    outs[j] = None
            chunks.append(outs)
    # a block output can be a tuple / namedtuple / dict (a model output): join it leaf by leaf
    join = lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0]  # noqa: E731
    return [filled[j] if filled[j] is not None else tree_map(join, *[c[j] for c in chunks])
            for j in range(len(chunks[0]))]


def on_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None or not isinstance(t, torch.Tensor) else t.to(device, non_blocking=True)
