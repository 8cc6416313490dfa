"""How a block's reconstruction loss weighs its terms: per-sample (and per-layer) weights from the label-free
Hessian, per-channel profiles, and which outputs the loss compares under ``ReconstructionConfig.target``.

Split from method/reconstruction.py, which trains the blocks; everything here is a pure function of the Hessian
scores, the block and the config."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from eptq_fx.config import ReconstructionConfig, Target
from eptq_fx.graph.passes.block_schedule import Block
from eptq_fx.method.activation_hessian import HessianScores

if TYPE_CHECKING:  # reconstruction imports this module
    from eptq_fx.method.reconstruction import BlockParts


def layer_weights(scores: torch.Tensor, parts: BlockParts, rc: ReconstructionConfig,
                  sizes: list[int]) -> torch.Tensor:
    """(N, L_block) loss weights for the per-layer squared errors.

    A layer's score is tr(JᵀJ); for an error Δ spread evenly over its D elements the output error is
    ΔᵀJᵀJΔ ≈ (tr/D)·‖Δ‖², so the weight of ‖Δ‖² is tr/D (``sizes`` = D per compare point), normalised by the
    block's largest mean so that the loss keeps the scale the rounding regulariser is balanced against."""
    s = scores[:, parts.cp_index]
    if not rc.hessian_weighting:
        return torch.ones_like(s)
    s = s / torch.tensor(sizes, dtype=s.dtype)
    if not rc.hessian_per_sample:
        s = s.mean(0, keepdim=True).expand_as(s).clone()
    else:
        s = tempered(s, rc.hessian_sample_power)
    top = s.mean(0).max()
    return s / top if top > 0 else torch.ones_like(s)


def tempered(s: torch.Tensor, power: float) -> torch.Tensor:
    """(N, L) per-sample scores with each column's ratio to its mean raised to ``power``, rescaled to keep the
    column's mean: the layers keep their relative weights, the samples' spread shrinks (power < 1)."""
    if power == 1.0:
        return s
    mean = s.mean(0, keepdim=True)
    r = torch.where(mean > 0, s / mean.clamp_min(1e-30), 1.0).clamp_min(0).pow(power)
    return r / r.mean(0, keepdim=True).clamp_min(1e-30) * mean


def channel_profiles(hs: HessianScores | None, parts: BlockParts, cps: list[str],
                     rc: ReconstructionConfig) -> list[torch.Tensor | None]:
    """Per compare point of the block: (N, C) shares of each sample's trace held by each channel (dim 1),
    mean 1 over the channels of a sample, or None for an isotropic distance.

    Why per sample and per channel: a weight that is constant over everything one parameter influences is
    undone by Adam's per-parameter step normalisation (a conv output channel depends on its own weight row
    only), so only weights that vary across the samples (and positions) a parameter sees change the solution."""
    if hs is None or hs.per_channel is None or not rc.hessian_per_channel:
        return [None] * len(parts.cp_index)
    return [channel_profile(hs.per_channel[cps[i]]) for i in parts.cp_index]


def channel_profile(c: torch.Tensor | None) -> torch.Tensor | None:
    """(N, C) per-channel scores as shares with mean 1 over a sample's channels (an all-zero row: even);
    None for a single channel, where a profile changes nothing."""
    if c is None or c.shape[1] <= 1:
        return None
    mean = c.mean(1, keepdim=True)
    return torch.where(mean > 0, c / mean.clamp_min(1e-30), 1.0)


def block_output_weights(block: Block, n: int, tables: list[HessianScores], rc: ReconstructionConfig):
    """Under Target.BLOCK: (N, K) per-sample weights of the block's K outputs, each the sample's label-free
    Hessian trace at that output over its mean (so a term keeps its scale; ones where no score exists: a tuple
    or the model output itself, where J = I), and their per-channel profiles (``hessian_per_channel``).
    ``tables``: the score tables to look the outputs up in (compare points, extra block outputs)."""
    cols, profiles = [], []
    for name in block.outputs:
        hs = next((t for t in tables if name in t.names), None)
        s = None if hs is None else hs.scores[:, hs.names.index(name)]
        mean = None if s is None else float(s.mean())
        cols.append(torch.ones(n) if not mean or mean <= 0 or not rc.hessian_per_sample
                    else tempered(s[:, None] / mean, rc.hessian_sample_power)[:, 0])
        per_channel = None if hs is None or hs.per_channel is None or not rc.hessian_per_channel else hs.per_channel
        profiles.append(channel_profile(None if per_channel is None else per_channel.get(name)))
    return torch.stack(cols, 1), profiles


def loss_terms(block: Block, parts: BlockParts, f_out: list, layer_w: torch.Tensor, profiles: list,
               rc: ReconstructionConfig, block_hs: list[HessianScores] = ()):
    """What the block's loss compares, by ``rc.target``: (pick(outputs) -> predictions, float targets,
    (N, K) per-sample weights, per-term channel profiles, rounding-regulariser weight per weight op)."""
    n_out = len(block.outputs)
    if rc.target is Target.BLOCK and all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                         for t in f_out[:n_out]):
        # the block outputs' distance stands for all of its layers
        term_w, term_profiles = block_output_weights(block, f_out[0].shape[0], list(block_hs), rc)
        return (lambda outs: outs[:n_out]), f_out[:n_out], term_w, term_profiles, torch.ones(len(parts.weight_pos))
    return (lambda outs: outs[n_out:]), f_out[n_out:], layer_w, profiles, None
