"""One quantize run, for 1 process or under torchrun: ``python -m tests.helpers_distributed OUT [--bad-rank R]``.

Model, data and config come from fixed seeds, so every rank (and a plain 1-process run) quantizes the very same
thing. Rank 0 (or the only process) saves the converted model's integer weights, scales and activation ranges
to OUT. ``--bad-rank R`` gives rank R calibration data of the wrong shape, so that rank fails inside
``quantize`` while the others wait for it in a collective.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig, distributed
from examples.models import make_model

CONFIG = EPTQConfig(
    weight_bits=4, act_bits=4, n_calib=64, seed=3, act_range="minmax",
    hessian=HessianConfig(cache_dir=None),
    reconstruction=ReconstructionConfig(iters=40, batch_size=16),
)


def calibration_data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(11))


def quantized_state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gm.state_dict().items()
            if k.endswith(("_weight_int", "_weight_scale", "_scale", "_zero_point", "bias"))}


def run(act_range: str = "minmax", bad_rank: int | None = None) -> torch.nn.Module:
    rank = int(os.environ.get("RANK", "0"))
    data = calibration_data()
    if bad_rank == rank:
        data = data[:, :2]  # two channels where the model wants three
    config = dataclasses.replace(CONFIG, act_range=act_range)
    return eptq_fx.quantize(make_model("small_cnn", seed=5), data, config, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--bad-rank", type=int, default=None)
    parser.add_argument("--act-range", default="minmax", choices=("minmax", "mse"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    quantized = run(args.act_range, args.bad_rank)
    if distributed.is_lead():
        torch.save(quantized_state(quantized), args.out)


if __name__ == "__main__":
    main()
