"""Does the knapsack's additive width cost hold jointly? For the mixed-precision choice at a budget and for uniform
widths of the same size: the summed per-layer cost the knapsack minimises, and the network output error with
every layer at its width at once (error-feedback rounding, no reconstruction) on 256 calibration images.

    python -m benchmarks.mp_joint --model resnet20 --budget W4
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import load_calibration
from benchmarks.mixed_precision import uniform_bytes
from benchmarks.zoo import get_spec

JOINT_SAMPLES = 256


def run(model_name: str, budget_name: str) -> dict:
    import eptq_fx
    from eptq_fx import EPTQConfig, HessianConfig
    from eptq_fx.config import WidthCost
    from eptq_fx.data import CalibSet
    from eptq_fx.graph.passes.qdq_insertion import weight_ops
    from eptq_fx.method.fallback import float_outputs, output_error
    from eptq_fx.mixed_precision import _layer_inputs, _quantized_weights, choose_bit_widths
    from eptq_fx.numerics.calibration import quant_disabled

    spec = get_spec(model_name)
    model = spec.build()
    calib = CalibSet((load_calibration(spec.dataset, spec.prep, 1024),))
    bits = int(budget_name.removeprefix("W"))
    config = EPTQConfig(weight_bits=8, act_bits=8, weight_memory=uniform_bytes(model, bits),
                        hessian=HessianConfig(cache_dir=None))
    prepared = eptq_fx.prepare(model, config)
    choice = choose_bit_widths(prepared, calib, config)
    free = [c for c in choice.layers if not c.fixed]
    ops = weight_ops(prepared)
    sub = calib.subset(JOINT_SAMPLES, config.seed + 1)
    inputs = _layer_inputs(prepared, ops, sub)
    candidates = tuple(sorted(config.weight_candidates))
    rounded = {n: _quantized_weights(op, inputs[n], candidates, config.n_grid, WidthCost.ERROR_FEEDBACK)
               for n, op in ops.items()}
    idx = torch.arange(sub.n)
    ref = float_outputs(prepared, sub, idx)

    @torch.no_grad()
    def joint_error(widths: dict[str, int]) -> float:
        original = {n: op.op.weight.detach().clone() for n, op in ops.items()}
        try:
            with quant_disabled(prepared):
                for n, op in ops.items():
                    op.op.weight.copy_(rounded[n][widths[n]])
                return output_error(prepared, sub, idx, ref)
        finally:
            for n, op in ops.items():
                op.op.weight.copy_(original[n])

    mix = {c.name: c.bits for c in choice.layers}
    uniform = {c.name: c.bits if c.fixed else bits for c in choice.layers}
    return {"model": model_name, "budget": budget_name,
            "additive_cost_mix": sum(c.costs[c.bits] for c in free),
            "additive_cost_uniform": sum(c.costs[bits] for c in free),
            "joint_error_mix": joint_error(mix), "joint_error_uniform": joint_error(uniform),
            "widths_mix": {b: sum(1 for c in choice.layers if c.bits == b) for b in candidates}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--budget", default="W4")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args.model, args.budget)))


if __name__ == "__main__":
    main()
