"""Seconds per reconstruction step of a torchvision model at 224×224 (all blocks, one minibatch each).

Runs the reconstruction twice on the same calibrated model, with ``--iters`` LOW and HIGH steps per block, and
reports (t_HIGH − t_LOW) / (HIGH − LOW): the optimisation step alone, without the forward passes and losses
every block pays whatever its step count. Random-init weights (timing only), CIFAR-10 images resized.

    python -m benchmarks.step_time --threads 1 --n-calib 32 --iters 2 12
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import torch

from benchmarks.scale import build, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--iters", type=int, nargs=2, default=(2, 12), metavar=("LOW", "HIGH"))
    args = parser.parse_args()
    import eptq_fx
    from eptq_fx.data import CalibSet
    from eptq_fx.method.hessian_stage import HessianEstimate
    from eptq_fx.method.reconstruction import reconstruct

    model, x = build(args.model), images(args.n_calib)
    seconds = {}
    for iters in args.iters:
        base = eptq_fx.EPTQConfig(weight_bits=4, act_bits=8, n_calib=args.n_calib)
        cfg = dataclasses.replace(base, hessian=dataclasses.replace(base.hessian, cache_dir=None),
                                  reconstruction=dataclasses.replace(base.reconstruction, iters=iters))
        torch.set_num_threads(args.threads)
        prepared = eptq_fx.prepare(eptq_fx.capture(model, (x[:2],)), cfg, example_inputs=(x[:2],))
        eptq_fx.calibrate(prepared, x, config=cfg, progress=False)
        torch.set_num_threads(args.threads)  # an older eptq_fx let numba reset it (a baseline run)
        t = time.perf_counter()
        reconstruct(prepared, CalibSet((x,)), cfg, progress=False, hessian=HessianEstimate(None, None, None, False))
        seconds[iters] = round(time.perf_counter() - t, 2)
    low, high = args.iters
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "n_calib": args.n_calib,
                      "reconstruct_s": seconds, "per_step_s": round((seconds[high] - seconds[low]) / (high - low), 2),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}))


if __name__ == "__main__":
    main()
