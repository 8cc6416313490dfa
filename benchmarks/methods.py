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
# uniform ones), HMSE thresholds, per-sample-per-channel Hessian weights
ABLATIONS = ("eptq_uniform", "eptq_network", "eptq_network_uniform", "eptq_hmse", "eptq_channel", "eptq_kl",
             "eptq_block", "eptq_qdrop", "eptq_block_qdrop")
OURS = ("rtn", "eptq", "eptq_fast", *ABLATIONS)
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


def _eptq_config(method: str, w_bits: int, a_bits: int, n_calib: int, budget: Budget):
    from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig

    # cache_dir=None: every run pays for its own Hessian, so wall times compare like for like.
    # eptq_kl: the Hessian of the KL divergence to the model's own softmax instead of tr(JᵀJ) of the logits
    hessian = HessianConfig(cache_dir=None, output_metric="softmax" if method == "eptq_kl" else "identity")
    iters = budget.eptq_iters
    if budget.quick:
        hessian = dataclasses.replace(hessian, max_probes=10, min_probes=2, weight_samples=16, weight_probes=4)
        iters = iters or 20
    elif method == "eptq_fast":
        iters = iters or EPTQ_FAST_ITERS
    rc = {} if iters is None else {"iters": iters}
    if method in ("eptq_uniform", "eptq_network_uniform"):
        rc["hessian_weighting"] = False
    elif method == "eptq_channel":
        rc["hessian_per_channel"] = True
    if method in ("eptq_block", "eptq_block_qdrop"):  # BRECQ's target: the block's output
        rc["target"] = "block"
    if method in ("eptq_qdrop", "eptq_block_qdrop"):  # QDrop: each activation kept float with probability 0.5
        rc["qdrop"] = 0.5
    if method in ("eptq_network", "eptq_network_uniform"):
        rc.update(granularity="network", iters=iters or NETWORK_ITERS)
    reconstruction = ReconstructionConfig(**rc)
    return EPTQConfig(weight_bits=w_bits, act_bits=a_bits, method="rtn" if method == "rtn" else "eptq",
                      n_calib=n_calib, hessian=hessian, reconstruction=reconstruction, seed=budget.seed,
                      weight_range="hmse" if method == "eptq_hmse" else "mse")


def quantize_with(method: str, model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int,
                  budget: Budget) -> PeerRun:
    """A quantized model for ``method`` (or ``PeerRun.model = None`` with the reason a peer gives)."""
    if method == "float":
        return PeerRun(model)
    if method in OURS:
        import eptq_fx

        config = _eptq_config(method, w_bits, a_bits, len(calib), budget)
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
