"""The activation fake-quantizer of the reconstruction steps as one autograd function, and its QDrop masks.

During reconstruction every activation quantizer runs, per step and per element, ``x·(1/s)``, a straight-through
round, the zero point, a clamp, the dequantization, the float phase-in blend and the QDrop choice, and autograd
keeps a tensor per op for the backward pass. At ImageNet size that chain was half of a training step on CPU
(BENCHMARKS.md, "Scale"): eager PyTorch runs each op as its own pass over a 6 M-element map, and ``torch.where``
on a boolean mask is ~4× slower there than a multiplication by it. ``ActFakeQuant`` computes the same values
in place, keeps only the input and two boolean masks, and writes the gradients of the input and of the scale
(LSQ's) directly; a test checks both against the composite chain's autograd.
"""
from __future__ import annotations

import math

import torch

_BYTE_LEVELS = 256


def drop_threshold(p: float) -> int:
    """QDrop masks are drawn as random bytes: an element stays float when its byte is below this, so the drop
    rate is p rounded to a multiple of 1/256 (0.5 exactly)."""
    return int(round(p * _BYTE_LEVELS))


def random_drop_mask(shape: tuple[int, ...], p: float, gen: torch.Generator,
                     channels_last: bool = False) -> torch.Tensor:
    """Boolean mask, True with probability ``drop_threshold(p)/256``, from ``gen``. Eight mask bytes come from
    each 64-bit draw: ``torch.rand`` spends one generator call and a float conversion on every element, ~4× the
    time (31 vs 7 ms for a 32×64×56×56 map on one core). ``channels_last`` (4-d shapes): the bytes are laid out
    in NHWC order, so the mask has the memory order of a channels-last map it is blended with."""
    n = math.prod(shape)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=gen)
    mask = words.view(torch.uint8)[:n] < drop_threshold(p)
    if channels_last and len(shape) == 4:
        b, c, h, w = shape
        return mask.view(b, h, w, c).permute(0, 3, 1, 2)
    return mask.view(shape)


class ActFakeQuant(torch.autograd.Function):
    """``where(drop, x, mix·x + (1−mix)·(clamp(round(x/s) + zp, qmin, qmax) − zp)·s)`` with straight-through
    rounding; ``drop`` may be None (no QDrop). Gradients: the input's (1 where the value passes unclamped or stays
    float, ``mix`` where it is clamped) and the scale's (LSQ: (q − zp) − x/s inside the range, q − zp outside)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, mix: float,
                drop: torch.Tensor | None) -> torch.Tensor:
        # the same arithmetic, in the same order, as ActQuantizer.fake_quant (x·(1/s), then round, then + zp)
        t = torch.mul(x, 1.0 / s).round_().add_(zp)
        q = t.clamp(qmin, qmax)
        inside = q == t
        del t
        out = q.sub_(zp).mul_(s)
        if mix > 0.0:
            out.mul_(1.0 - mix).add_(x, alpha=mix)
        if drop is not None:
            out.add_(torch.sub(x, out).mul_(drop))  # an arithmetic blend: torch.where is slow on CPU
        ctx.save_for_backward(x, s, zp, inside, drop)
        ctx.consts = (qmin, qmax, mix)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, s, zp, inside, drop = ctx.saved_tensors
        qmin, qmax, mix = ctx.consts
        gx = gs = None
        if ctx.needs_input_grad[0]:
            passes = inside if drop is None else inside | drop
            gx = torch.mul(g, passes)
            if mix > 0.0:
                gx.mul_(1.0 - mix).add_(g, alpha=mix)
        if ctx.needs_input_grad[1]:
            t = torch.mul(x, 1.0 / s)
            dq = torch.round(t).add_(zp).clamp_(qmin, qmax).sub_(zp)  # q − zp
            dq.sub_(t.mul_(inside))
            if drop is not None:
                dq.mul_(~drop)
            gs = torch.mul(g, dq).sum().mul_(1.0 - mix).reshape(s.shape)
        return gx, gs, None, None, None, None, None
