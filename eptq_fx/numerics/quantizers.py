"""Fake-quantization modules inserted by ``insert_qdq``.

``QuantWeightOp`` wraps a conv / linear module and quantizes its weight per output channel (symmetric);
``ActQuantizer`` quantizes one activation tensor per tensor. Both have a small set of modes so the same prepared
graph serves calibration (observe), the float reference (off), round-to-nearest and reconstruction (soft rounding).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from eptq_fx.graph import ops
from eptq_fx.graph.meta import ActQuant
from eptq_fx.numerics import kernels
from eptq_fx.numerics.act_fake_quant import ActFakeQuant, random_drop_mask

WEIGHT_OPS = ops.WEIGHT_MODULE_TYPES  # the op table's weight modules
# Most values an observer keeps per quantizer for the MSE range search (a seeded random subset beyond that).
MAX_OBSERVED = 1 << 18
# Up to this many elements per batch the kept values are drawn without replacement (a random permutation);
# above it, with replacement: drawing a permutation of a (32, 64, 112, 112) map took more time and memory than
# the forward pass that made it.
_PERMUTE_UP_TO = 1 << 22


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_range(bits: int, scheme: str) -> tuple[int, int]:
    return signed_range(bits) if scheme == "symmetric" else (0, (1 << bits) - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def rectified_sigmoid(v: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """AdaRound's h(V) = clip(σ(V)(ζ−γ)+γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def channel_axis(module: nn.Module) -> int:
    """Output-channel axis of the module's weight (ConvTranspose stores (in, out/groups, ...))."""
    return next(axis for base, axis in ops.WEIGHT_MODULES if isinstance(module, base))


def weight_as_rows(w: torch.Tensor, axis: int) -> torch.Tensor:
    """(C_out, K) view of a weight for per-output-channel kernels."""
    return w.transpose(0, axis).reshape(w.shape[axis], -1) if axis else w.reshape(w.shape[0], -1)


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight quantizer with round-to-nearest and AdaRound soft-rounding modes.

    Modes: ``off`` (float), ``round`` (RTN, STE), ``soft`` (s·clip(⌊w/s₀⌋ + h(V)) with V trained), ``hard``
    (the soft rounding decided: h(V) ≥ 0.5). In soft/hard modes the integer base ⌊w/s₀⌋ is frozen at the
    scale s₀ where soft rounding started, so a trained scale s only rescales the grid.
    """

    def __init__(self, bits: int, n_channels: int, axis: int, weight_ndim: int):
        super().__init__()
        self.bits, self.axis = bits, axis
        self.qmin, self.qmax = signed_range(bits)
        self.mode = "round"
        self.scale = nn.Parameter(torch.ones(n_channels), requires_grad=False)
        # trained in log space so that one optimiser step changes the step size by a relative amount, whatever
        # its magnitude (Adam's absolute steps would swamp a 1e-3 scale); folded into ``scale`` by fold_gain_
        self.log_gain = nn.Parameter(torch.zeros(n_channels), requires_grad=False)
        self.register_buffer("w_floor", torch.empty(0))
        self.alpha: nn.Parameter | None = None
        self.gamma, self.zeta = -0.1, 1.1
        shape = [1] * weight_ndim
        shape[axis] = n_channels
        self._bshape = tuple(shape)

    def _s(self) -> torch.Tensor:
        return (self.scale * torch.exp(self.log_gain)).view(self._bshape)

    def fold_gain_(self) -> None:
        with torch.no_grad():
            self.scale.mul_(torch.exp(self.log_gain))
            self.log_gain.zero_()

    def set_scale_(self, scale: np.ndarray | torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))

    def init_soft_(self, w: torch.Tensor, gamma: float, zeta: float) -> None:
        """Start soft rounding: freeze ⌊w/s⌋ and set V so that h(V) equals the fractional part."""
        self.gamma, self.zeta = gamma, zeta
        with torch.no_grad():
            ws = w / self._s()
            self.w_floor = torch.floor(ws)
            frac = (ws - self.w_floor).clamp(0.01, 0.99)  # keep the logit finite
            v = -torch.log((zeta - gamma) / (frac - gamma) - 1.0)
        self.alpha = nn.Parameter(v)
        self.mode = "soft"

    def soft_h(self) -> torch.Tensor:
        assert self.alpha is not None
        return rectified_sigmoid(self.alpha, self.gamma, self.zeta)

    def harden_(self) -> None:
        if self.mode == "soft":
            self.mode = "hard"

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32) the current mode stands for."""
        with torch.no_grad():
            if self.mode in ("soft", "hard"):
                assert self.alpha is not None
                q = self.w_floor + (self.alpha >= 0).to(w.dtype)
            else:
                q = torch.round(w / self._s())
            return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return w
        s = self._s()
        if self.mode == "round":
            return torch.clamp(round_ste(w / s), self.qmin, self.qmax) * s
        assert self.alpha is not None
        h = self.soft_h() if self.mode == "soft" else (self.alpha >= 0).to(w.dtype)
        return torch.clamp(self.w_floor + h, self.qmin, self.qmax) * s


class QuantWeightOp(nn.Module):
    """A conv / linear module whose weight goes through a ``WeightQuantizer`` (bias stays float)."""

    def __init__(self, module: nn.Module, bits: int):
        super().__init__()
        if not isinstance(module, WEIGHT_OPS):
            raise TypeError(f"QuantWeightOp cannot wrap {type(module).__name__}")
        self.op = module
        axis = channel_axis(module)
        w = module.weight
        self.weight_quant = WeightQuantizer(bits, w.shape[axis], axis, w.dim())
        if module.bias is None:  # reconstruction may train a bias; an all-zero one changes nothing
            module.bias = nn.Parameter(torch.zeros(w.shape[axis], dtype=w.dtype, device=w.device))
        # the quantizer of this op's input (a plain attribute, not a submodule: it is the graph's own)
        self.__dict__["input_quant"] = None

    def link_input_(self, aq: ActQuantizer | None) -> None:
        self.__dict__["input_quant"] = aq

    def effective_bias(self) -> torch.Tensor | None:
        """The bias an integer kernel adds: rounded to its accumulator step s_in · s_w (per output channel),
        as int8 backends store it (int32 in QLinearConv / oneDNN, and ONNX Runtime re-quantizes float biases
        that way), so the fake-quant graph, the converted one and every runtime add the same bias. Float
        when the input or the weight is not quantized. The rounding passes gradients straight through."""
        b, aq = self.op.bias, self.__dict__.get("input_quant")
        if b is None or aq is None or aq.mode != "on" or self.weight_quant.mode == "off":
            return b
        step = aq.effective_scale() * self.weight_quant._s().reshape(-1)
        if step.numel() != b.numel():
            return b
        return b + (torch.round(b / step) * step - b).detach()

    @property
    def weight(self) -> torch.Tensor:
        return self.op.weight

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.op.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op, w, b = self.op, self.quantized_weight(), self.effective_bias()
        fn, kind = ops.functional_for(op, aten_ir=False)
        if kind == "linear":
            return fn(x, w, b)
        if kind == "conv_transpose":
            return fn(x, w, b, op.stride, op.padding, op.output_padding, op.groups, op.dilation)
        return op._conv_forward(x, w, b)


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer.

    Modes: ``observe`` (pass-through, records min/max and a seeded subset of values), ``off`` and ``on``.
    When on, ``float_mix`` p blends float back in (p·x + (1−p)·Q(x), used to phase quantization in), and
    ``drop_prob`` keeps each element in float with that probability during training (QDrop).
    """

    def __init__(self, spec: ActQuant, power_of_two: bool = False, seed: int = 0):
        super().__init__()
        self.bits, self.scheme, self.power_of_two = spec.bits, spec.scheme, power_of_two
        self.qmin, self.qmax = act_range(spec.bits, spec.scheme)
        self.mode = "observe"
        self.float_mix = 0.0
        self.drop_prob = 0.0
        self.drop_draw: tuple[int, int, torch.Tensor | None] | None = None  # see _drop_mask
        self.train_scale = False
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.log_gain = nn.Parameter(torch.tensor(0.0), requires_grad=False)  # see WeightQuantizer.log_gain
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("obs_min", torch.tensor(math.inf))
        self.register_buffer("obs_max", torch.tensor(-math.inf))
        self._samples: list[torch.Tensor] = []
        self._n_seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    # -- calibration ---------------------------------------------------------------------------------------
    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.obs_min = torch.minimum(self.obs_min, x.min().cpu())
        self.obs_max = torch.maximum(self.obs_max, x.max().cpu())
        # keep a fixed share of every batch so the kept sample is spread over the whole calibration set
        keep = min(x.numel(), max(1, MAX_OBSERVED // 64))
        if keep < x.numel():
            if x.numel() <= _PERMUTE_UP_TO:
                idx = torch.randperm(x.numel(), generator=self._gen)[:keep]
            else:  # a permutation of every element would cost more than the batch itself (224×224 maps)
                idx = torch.randint(0, x.numel(), (keep,), generator=self._gen)
            x = x.cpu()[idx]
        self._samples.append(x.cpu())
        self._n_seen += x.numel()
        if self._n_seen > 2 * MAX_OBSERVED:  # thin out: keep every other value
            flat = torch.cat(self._samples)[::2]
            self._samples, self._n_seen = [flat], flat.numel()

    def observed(self) -> bool:
        return bool(torch.isfinite(self.obs_min))

    def finalize_(self, method: str, n_grid: int) -> None:
        """Set scale / zero point from what was observed (``minmax`` or ``mse``), then switch on."""
        if not self.observed():
            raise RuntimeError("ActQuantizer.finalize_ called before any calibration batch was observed")
        if method == "minmax":
            scale, zp = kernels.minmax_act_range(float(self.obs_min), float(self.obs_max), self.bits, self.scheme)
        else:
            x = torch.cat(self._samples).numpy().astype(np.float32)
            scale, zp = kernels.search_act_range(x, self.bits, self.scheme, n_grid=n_grid)
        if self.power_of_two:
            scale = 2.0 ** math.ceil(math.log2(scale))
        with torch.no_grad():
            self.scale.fill_(float(scale))
            self.zero_point.fill_(float(zp))
        self._samples, self._n_seen = [], 0
        self.mode = "on"

    # -- forward -------------------------------------------------------------------------------------------
    def fold_gain_(self) -> None:
        with torch.no_grad():
            self.scale.mul_(torch.exp(self.log_gain))
            self.log_gain.zero_()

    def effective_scale(self) -> torch.Tensor:
        return self.scale * torch.exp(self.log_gain) if self.train_scale else self.scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        s = self.effective_scale()
        # x·(1/s), not x/s: the same arithmetic as quantized_decomposed.quantize_per_tensor, so convert matches
        q = torch.clamp(round_ste(x * (1.0 / s)) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self._observe(x)
            return x
        if self.mode == "off":
            return x
        if x.dtype in (torch.bfloat16, torch.float16):
            # under autocast a conv hands over its output in bfloat16, whose 8 significant bits would move
            # values across rounding boundaries of the integer grid: quantize in float32
            x = x.float()
        drop = self._drop_mask(x) if self.drop_prob > 0.0 and self.training else None
        s = self.effective_scale()
        if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
            # a reconstruction step: one autograd function instead of the op-by-op chain (act_fake_quant)
            return ActFakeQuant.apply(x, s, self.zero_point, self.qmin, self.qmax, float(self.float_mix), drop)
        xq = self.fake_quant(x)
        if self.float_mix > 0.0:
            xq = self.float_mix * x + (1.0 - self.float_mix) * xq
        if drop is not None:
            xq = torch.where(drop, x, xq)
        return xq

    def _drop_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Which elements stay float this step. With ``drop_draw = (seed, n, rows)`` (set by the trainer each
        step) the mask is drawn for the whole minibatch of n samples from that seed and this rank's ``rows``
        taken, so a sharded run (torch.distributed) masks every sample exactly as one process would."""
        nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if self.drop_draw is None:
            return random_drop_mask(tuple(x.shape), self.drop_prob, self._gen, nhwc).to(x.device)
        seed, n, rows = self.drop_draw
        gen = torch.Generator().manual_seed(seed)
        if rows is None or x.dim() == 0 or x.shape[0] != len(rows):
            return random_drop_mask(tuple(x.shape), self.drop_prob, gen, nhwc).to(x.device)
        full = random_drop_mask((n, *x.shape[1:]), self.drop_prob, gen, nhwc)
        return full[rows].to(x.device)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}, mode={self.mode}, scale={float(self.scale):.4g}, " \
               f"zero_point={int(self.zero_point)}"
