"""Peer quantizers, one module each, all with the same entry point::

    run(model, calib, w_bits, a_bits, **opts) -> PeerRun

``PeerRun.model`` is a callable quantized model to evaluate, or ``None`` with ``PeerRun.skipped`` saying why
(a peer that cannot do a bit width says so; we never substitute a number). Peer libraries are imported
lazily, inside ``run``, so that this package imports without them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

import torch.nn as nn

PEER_MODULES = {
    "mct_ptq": "benchmarks.peers.mct_ptq",
    "mct_gptq": "benchmarks.peers.mct_gptq",
    "torchao_fx": "benchmarks.peers.torchao_fx",
    "torchao_pt2e": "benchmarks.peers.torchao_pt2e",
}


@dataclass
class PeerRun:
    model: nn.Module | None
    skipped: str | None = None  # reason, when the peer cannot produce this setting
    details: dict = field(default_factory=dict)  # peer-specific facts worth recording (bits used, steps, ...)

    @classmethod
    def unsupported(cls, reason: str) -> PeerRun:
        return cls(model=None, skipped=reason)


def load_peer(name: str) -> ModuleType:
    if name not in PEER_MODULES:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEER_MODULES)}")
    return importlib.import_module(PEER_MODULES[name])
