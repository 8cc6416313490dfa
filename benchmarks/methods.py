"""The quantization methods compare.py knows, behind one call: ``quantize_with(method, model, calib, w, a, budget)``.

Ours ("rtn", "eptq", "eptq_fast") go through ``eptq_fx.quantize``; the peers through benchmarks/peers. Every method
gets the same float model and the same calibration tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from benchmarks.peers import PEER_MODULES, PeerRun, load_peer

# the ablations of the EPTQ issue (same seed, same data): uniform weights, network-wise (with Hessian weights or
# uniform ones), HMSE thresholds, per-sample-per-channel Hessian weights, ... Any "eptq+opt1+opt2" combines the
# options of VARIANTS on top of today's defaults; the underscore names are the ones earlier rows were recorded
# under (with the defaults of their day: Hessian-weighted, no QDrop).
_HESSIAN_EVERYWHERE = {"hessian_weighting": True, "hessian_scope": "all"}
VARIANTS = {
    # the loss weighted by the label-free Hessian in every block (default until issue 11)
    "hessian": {**_HESSIAN_EVERYWHERE, "hessian_per_channel": False},
    "uniform": {"hessian_weighting": False},  # every sample and layer weighs 1 (the default from issue 11 to stop 22)
    "channel": {**_HESSIAN_EVERYWHERE, "hessian_per_channel": True},  # per-sample, per-channel weights, every block
    "pooled": {"hessian_per_sample": False},  # Hessian layer weights averaged over samples (no sample attention)
    # the per-sample, per-channel Hessian only in blocks whose outputs an unfolded BatchNorm rescales (default)
    "rescaled": {"hessian_weighting": True, "hessian_per_channel": True, "hessian_scope": "rescaled"},
    "block": {"target": "block"},  # BRECQ's target: the block's outputs
    "qdrop": {"qdrop": 0.5},  # QDrop: each activation kept float with probability 0.5 while training (default)
    "noqdrop": {"qdrop": 0.0},  # every activation quantized while training (the default until issue 11)
    "network": {"granularity": "network", **_HESSIAN_EVERYWHERE, "hessian_per_channel": False},  # one block
    "hmse": {},  # Hessian-weighted MSE weight thresholds (an EPTQConfig option, below)
    # + the Hessian of the KL to the model's own softmax (HessianConfig)
    "kl": {**_HESSIAN_EVERYWHERE, "hessian_per_channel": False},
    "ft500": {"finetune_iters": 500},  # + network-wise fine-tuning of biases and scales (method/finetune.py)
    "ft2000": {"finetune_iters": 2000},
    "ftlr10": {"finetune_lr": 10.0},
    "lowbit": {"low_bit_steps": True},  # 2^(4-b)x the steps in blocks with b < 4-bit weights (default since stop 23)
    "fixedsteps": {"low_bit_steps": False},  # every block the same number of steps (the default until stop 23)
    "fast": {},  # EPTQ_FAST_ITERS steps per block
    "fusable": {},  # act_placement="fusable": join inputs quantized as int8 runtimes fuse them (an EPTQConfig option)
    "inputs": {},  # act_placement="inputs": only the inputs of quantized layers
    "bf16cache": {"cache_precision": "bfloat16"},  # activation caches between blocks stored in bfloat16
    "bf16": {"cache_precision": "bfloat16", "compute_precision": "bfloat16"},  # + training steps under autocast
    "hold0": {"fallback_holdout": 0.0},  # train on every calibration image; fallback tests on training samples
    "hold16": {"fallback_holdout": 0.0625},  # 1/16 held out for the fallback tests (default 1/8)
    "nophase": {"act_phase_in": False},  # activations quantized from the first step (no fade-in)
    "lrscale3": {"lr_scale": 3e-3},  # 3x the learning rate of weight and activation scales
    # the rounding regulariser relative to the block's round-to-nearest loss, per weight, in every block (the
    # default since stop 26: 1000 in blocks of at most 3-bit weights); "absreg": AdaRound's absolute
    # reg_factor = 0.01 everywhere (the default until then)
    "absreg": {"reg_relative": 0.0},
    # a block reverts to round-to-nearest on any rise of its held-out loss (the rule until stop 28; now only on a
    # rise of more than 2 standard errors of the paired per-sample difference)
    "blockfb0": {"block_fallback_z": 0.0},
    "noblockfb": {"block_fallback_z": 1e9},  # no block reverts (the network-output fallback still applies)
    # each sample's Hessian weight (relative to the mean) to the power 1/2: the sample attention tempered
    # (default since stop 30, with the block target and the Hessian in every block)
    "temper": {"hessian_sample_power": 0.5},
    "hmin4": {"hessian_min_bits": 4},  # blocks under 4 bits train with uniform sample weights (stop 31)
    "untempered": {"hessian_sample_power": 1.0},  # the sample attention as the scores are (stop 29's block+hessian)
    # the default of stops 23-29: per-layer targets, the per-sample, per-channel Hessian only where BatchNorms stay
    "layers": {"target": "layers", "hessian_scope": "rescaled", "hessian_per_channel": True,
               "hessian_sample_power": 1.0},
    "rel10": {"reg_relative": 10.0, "reg_relative_max_bits": 16},
    "rel100": {"reg_relative": 100.0, "reg_relative_max_bits": 16},
    "rel1000": {"reg_relative": 1000.0, "reg_relative_max_bits": 16},
    "rel10000": {"reg_relative": 10000.0, "reg_relative_max_bits": 16},
}
PLACEMENTS = ("fusable", "inputs")
ABLATIONS = ("eptq_uniform", "eptq_network", "eptq_network_uniform", "eptq_hmse", "eptq_channel", "eptq_kl",
             "eptq_block", "eptq_qdrop", "eptq_block_qdrop")
OURS = ("rtn", "eptq", "eptq_fast", *ABLATIONS)


def eptq_options(method: str) -> set[str] | None:
    """The VARIANTS options of an EPTQ method name ("eptq", "eptq_uniform", "eptq+uniform+qdrop"), or None
    when ``method`` is not one of ours."""
    if method in OURS and method != "rtn":
        return set(method.split("_")[1:])
    if method.startswith("eptq+"):
        opts = set(method.split("+")[1:])
        return opts if opts <= VARIANTS.keys() else None
    return None


NETWORK_ITERS = 2000  # network-wise steps (each one a full forward/backward of the model)
METHODS = ("float", *OURS, *PEER_MODULES)

EPTQ_FAST_ITERS = 200  # reconstruction steps per block of the fast preset (the default is 1000)


@dataclass(frozen=True)
class Budget:
    """Optimisation budgets. ``quick`` shrinks everything to smoke-test size."""

    quick: bool = False
    eptq_iters: int | None = None  # None: eptq_fx's default (eptq) / EPTQ_FAST_ITERS (eptq_fast)
    gptq_epochs: int = 150  # MCT GPTQ epochs; one epoch = ceil(n_calib / 32) steps
    gptq_steps: int | None = None  # if set, overrides gptq_epochs (smallest epoch count reaching it)
    seed: int = 0  # eptq_fx's seed (Hessian probes, reconstruction batches); the calibration set stays fixed


def eptq_config(method: str, w_bits: int, a_bits: int, n_calib: int, budget: Budget):
    from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig

    # cache_dir=None: every run pays for its own Hessian, so wall times compare like for like.
    # eptq_kl: the Hessian of the KL divergence to the model's own softmax instead of tr(JᵀJ) of the logits
    hessian = HessianConfig(cache_dir=None)
    iters = budget.eptq_iters
    opts = eptq_options(method) or set()
    if "kl" in opts:
        hessian = dataclasses.replace(hessian, output_metric="softmax")
    if budget.quick:
        hessian = dataclasses.replace(hessian, max_probes=10, min_probes=2, weight_samples=16, weight_probes=4)
        iters = iters or 20
    elif "fast" in opts:
        iters = iters or EPTQ_FAST_ITERS
    rc = {} if iters is None else {"iters": iters}
    chosen = [p for p in PLACEMENTS if p in opts]
    placement = {"act_placement": chosen[-1]} if chosen else {}
    for opt in sorted(opts, key=lambda o: o == "uniform"):  # "network_uniform": uniform wins over network's
        rc.update(VARIANTS[opt])
    if "network" in opts:
        rc["iters"] = iters or NETWORK_ITERS
    reconstruction = ReconstructionConfig(**rc)
    return EPTQConfig(weight_bits=w_bits, act_bits=a_bits, method="rtn" if method == "rtn" else "eptq",
                      n_calib=n_calib, hessian=hessian, reconstruction=reconstruction, seed=budget.seed,
                      weight_range="hmse" if "hmse" in opts else "mse", **placement)


def quantize_with(method: str, model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int,
                  budget: Budget) -> PeerRun:
    """A quantized model for ``method`` (or ``PeerRun.model = None`` with the reason a peer gives)."""
    if method == "float":
        return PeerRun(model)
    if method == "rtn" or eptq_options(method) is not None:
        import eptq_fx

        config = eptq_config(method, w_bits, a_bits, len(calib), budget)
        qmodel = eptq_fx.quantize(model, calib, config=config)
        details = {"iters": config.reconstruction.iters if method != "rtn" else 0,
                   "hessian_max_probes": config.hessian.max_probes}
        return PeerRun(qmodel, details=details)
    if method in PEER_MODULES:
        opts = {}
        if method == "mct_gptq":
            opts = {"n_epochs": None if budget.gptq_steps else (1 if budget.quick else budget.gptq_epochs),
                    "steps": budget.gptq_steps}
        return load_peer(method).run(model, calib, w_bits, a_bits, **opts)
    raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8)."""
    t = text.strip().upper()
    if not (t.startswith("W") and "A" in t):
        raise ValueError(f"bit setting must look like W4A8, got {text!r}")
    w, a = t[1:].split("A", 1)
    return int(w), int(a)
