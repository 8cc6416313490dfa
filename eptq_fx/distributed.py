"""torch.distributed support: the same ``quantize`` call (or CLI command) run under ``torchrun``.

Every rank is given the whole calibration set (the same command runs everywhere) and works on a contiguous,
deterministic shard of it: rank r of W takes samples [r·n/W, (r+1)·n/W). What crosses ranks:

* calibration: activation min/max are all-reduced and the kept samples the MSE range search uses are
  all-gathered, so every rank finalises the same ranges;
* label-free Hessian: per-sample scores are computed on the shard and all-gathered in rank order, so every rank
  holds the scores of all n samples, in the same order as a 1-process run;
* reconstruction: every rank draws the same global minibatch indices (same generator), computes the loss on the
  indices that fall in its shard (normalised by the *global* batch size) and the gradients of the trainable
  quantization parameters are summed over ranks before each optimiser step: the gradient of the 1-process
  minibatch loss, so parameters stay identical on all ranks (DDP semantics, without DDP's module wrapper,
  because the trainable set changes block by block);
* writes (checkpoints, outputs) happen on rank 0 only.

One process, or torch.distributed not initialised, is exactly the single-process path: every helper here is
then the identity. An error on one rank ends that process; ``torchrun`` then stops the others and reports the
failing rank's error (the CLI's entry point is wrapped with torch's ``record`` for that).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eptq_fx.data import CalibSet
from eptq_fx.errors import CalibrationDataError

logger = logging.getLogger(__name__)


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_lead() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) unless one exists; True when
    distributed. Gloo carries CPU tensors and NCCL CUDA ones, so one group serves either device."""
    if dist.is_available() and dist.is_initialized():
        return is_active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return is_active()


@dataclass(frozen=True)
class Shard:
    """This rank's contiguous slice [start, stop) of the n_global calibration samples."""

    start: int
    stop: int
    n_global: int

    def split(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global indices among ``idx`` that this rank holds, their positions in the shard)."""
        if self.start == 0 and self.stop == self.n_global:
            return idx, idx
        mine = idx[(idx >= self.start) & (idx < self.stop)]
        return mine, mine - self.start


def bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return r * n // w, (r + 1) * n // w


def shard(calib: CalibSet) -> tuple[CalibSet, Shard]:
    """This rank's part of ``calib`` (all of it in one process)."""
    n = calib.n
    if not is_active():
        return calib, Shard(0, n, n)
    if n < world_size():
        raise CalibrationDataError(f"{n} calibration samples cannot be shared by {world_size()} processes; "
                                   f"give at least one sample per process or run fewer processes.")
    start, stop = bounds(n)
    return CalibSet(tuple(t[start:stop] for t in calib.tensors)), Shard(start, stop, n)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (rows = its samples) in rank order; ``t`` itself in one process."""
    if not is_active():
        return t
    w = world_size()
    sizes = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(w)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    top = max(counts)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_mean(local_sum: torch.Tensor, count: int) -> torch.Tensor:
    """Σ over ranks of ``local_sum`` / ``count`` (the global number of terms)."""
    if not is_active():
        return local_sum / count
    total = local_sum.detach().clone().reshape(1).float()
    return all_sum_(total)[0] / count


def all_reduce_grads_(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks in one flat buffer (a missing grad counts as zero)."""
    if not is_active():
        return
    params = list(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_sum_(flat)
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset:offset + k].view_as(p).clone()
        offset += k


def merge_observations_(act_quantizers: Iterable) -> None:
    """Make every rank's activation observers hold what all ranks observed: min/max reduced, kept samples
    gathered (rank order) and thinned like a single observer thins them."""
    if not is_active():
        return
    from eptq_fx.numerics.quantizers import MAX_OBSERVED

    for q in act_quantizers:
        lo, hi = q.obs_min.clone(), q.obs_max.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        q.obs_min, q.obs_max = lo, hi
        local = torch.cat(q._samples) if q._samples else torch.zeros(0)
        merged = gather_rows(local)
        while merged.numel() > 2 * MAX_OBSERVED:
            merged = merged[::2]
        q._samples, q._n_seen = [merged], merged.numel()


def lead_first(fn: Callable):
    """Run ``fn`` on rank 0, then on the other ranks (e.g. rank 0 creates a directory the others then read)."""
    if not is_active():
        return fn()
    result = fn() if is_lead() else None
    dist.barrier()
    if not is_lead():
        result = fn()
    return result
