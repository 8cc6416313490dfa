"""Running a block subgraph over cached calibration activations: batching, device placement, the cache's
memory (outputs written into preallocated tensors, GPU caches moved to the host when large), and which modules
train while a block is optimised."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from eptq_fx.graph.passes.block_schedule import Block
from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp


def module_device(module: torch.nn.Module) -> torch.device | None:
    return next((t.device for t in (*module.parameters(), *module.buffers())), None)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype the module computes in (its first floating parameter's; float32 without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def fetch(t, device: torch.device | None, dtype: torch.dtype):
    """A cached value as a block reads it: on its device, and back in the block's dtype when the cache holds
    it in a narrower floating format (``ReconstructionConfig.cache_precision``)."""
    if not isinstance(t, torch.Tensor):
        return t
    t = on_device(t, device)
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


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


def run_block(sub: fx.GraphModule, values: dict[str, torch.Tensor], block: Block, idx: torch.Tensor | None,
              batch_size: int = 256, keep: int | None = None, store: torch.dtype | None = None) -> list[torch.Tensor]:
    """Run a block subgraph over the (indexed) samples in batches; returns its outputs concatenated (only the
    first ``keep`` of them: the block outputs without the compare points' copies, which can be the largest),
    floating-point outputs stored as ``store`` when given (read back with ``fetch``)."""
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
                filled = [o.new_empty((len(order), *o.shape[1:]),
                                      dtype=store if store is not None and o.is_floating_point() else o.dtype)
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
