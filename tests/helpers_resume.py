"""A reconstruction run that a test can kill: ``python -m tests.helpers_resume RESUME_DIR [--hold ...]``.

The model, data and config are built here from fixed seeds, so the test process and this script quantize the
very same thing. ``--hold`` freezes the run at a chosen moment and writes ``<RESUME_DIR>/holding`` so the
test knows when to send SIGKILL:

* ``after:K``  - right after ``block_K.pt`` is written (K+1 blocks finished, the next not started);
* ``inside:K`` - in the middle of training block K (its 5th backward pass; blocks < K finished);
* ``save:K``   - while ``block_K.pt`` is half written (only its ``.tmp`` file exists).

Holding only sleeps: what is on disk at the kill is exactly what an unlucky real kill would leave.
Without ``--hold`` the run finishes and ``--out`` receives the converted model's integer weights.
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig

HOLD_SECONDS = 600.0
CONFIG = EPTQConfig(
    weight_bits=4, act_bits=4, n_calib=48, seed=7, weight_range="mse",
    hessian=HessianConfig(max_probes=3, min_probes=2, cache_dir=None),
    reconstruction=ReconstructionConfig(iters=24, batch_size=16, qdrop=0.5),
)


class ResidualMLP(nn.Module):
    """fc_in, three residual MLP blocks, fc_out: five reconstruction blocks at "block" granularity."""

    def __init__(self, dim: int = 12, hidden: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.fc_in = nn.Linear(10, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
                                    for _ in range(depth))
        self.fc_out = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_in(x))
        for block in self.blocks:
            h = h + block(h)
        return self.fc_out(h)


def build_model(seed: int = 0) -> ResidualMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResidualMLP().eval()


def calibration_data(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(123))


def integer_state(quantized: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a deployed model is made of: integer weights, their scales, biases and activation Q/DQ params."""
    quantize_op = torch.ops.quantized_decomposed.quantize_per_tensor.default
    state = {k: v.clone() for k, v in quantized.state_dict().items()}
    for node in quantized.graph.nodes:  # activation scales / zero points are constants in the Q/DQ calls
        if node.op == "call_function" and node.target is quantize_op:
            state[f"{node.name}.qparams"] = torch.tensor([float(node.args[1]), float(node.args[2])],
                                                         dtype=torch.float64)
    return state


def run(resume_dir: str | None) -> torch.nn.Module:
    return eptq_fx.quantize(build_model(), calibration_data(), CONFIG, resume_dir=resume_dir, progress=False)


def _hold(marker: Path) -> None:
    marker.write_text("holding")
    time.sleep(HOLD_SECONDS)


def _install_hold(spec: str, resume_dir: Path) -> None:
    kind, _, index = spec.partition(":")
    k, marker = int(index), resume_dir / "holding"
    real_save, real_replace, real_backward = torch.save, os.replace, torch.Tensor.backward
    steps = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if kind == "save" and Path(getattr(f, "name", "")).name == f"block_{k}.pt.tmp":
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            _hold(marker)
        real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if kind == "after" and Path(dst).name == f"block_{k}.pt":
            _hold(marker)

    def backward(self, *args, **kwargs):  # one call per optimisation step, whatever the optimiser
        if kind == "inside":
            done = {int(p.stem.split("_")[1]) for p in resume_dir.glob("block_*.pt")}
            if done >= set(range(k)) and k not in done:
                steps["n"] += 1
                if steps["n"] == 5:
                    _hold(marker)
        return real_backward(self, *args, **kwargs)

    torch.save, os.replace, torch.Tensor.backward = save, replace, backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("resume_dir")
    parser.add_argument("--hold", default=None, help="after:K | inside:K | save:K")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.hold:
        _install_hold(args.hold, Path(args.resume_dir))
    quantized = run(args.resume_dir)
    if args.out:
        torch.save(integer_state(quantized), args.out)


if __name__ == "__main__":
    main()
