"""Time of the mixed-precision width-cost stage at ImageNet size: the error-feedback rounding of every layer at
every candidate width, and the whole ``choose_bit_widths`` (label-free Hessian + per-width output errors).

Side by side in one process, on the same layers and inputs:
- ``per width, column updates``: one pass per width, the columns after each rounded column updated by a
  rank-one product (the code before stop 25: ``error_feedback_round_widths`` with one width and
  FEEDBACK_BLOCK = 1 is the same arithmetic);
- ``all widths, block updates``: every width in one pass, columns updated per block of FEEDBACK_BLOCK.

    python -m benchmarks.mp_cost --model resnet18 --samples 64 --threads 1

``--stage MODEL --budget W3``: the whole ``choose_bit_widths`` on a benchmark zoo model (its 1024 calibration
images), once per width cost, one after the other in one process:

    python -m benchmarks.mp_cost --stage resnet56 --budget W3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import REPO_ROOT
from benchmarks.scale import build, images

RESULTS = REPO_ROOT / "benchmarks" / "results" / "mp_cost.jsonl"


def _layer_inputs(prepared, ops, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from eptq_fx.numerics.calibration import quant_disabled

    seen: dict[str, torch.Tensor] = {}
    hooks = [op.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
             for n, op in ops.items()]
    try:
        with torch.no_grad(), quant_disabled(prepared):
            prepared(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def run(model_name: str, samples: int, threads: int) -> dict:
    import eptq_fx
    import eptq_fx.mixed_precision as mp
    from eptq_fx import EPTQConfig, HessianConfig
    from eptq_fx.data import CalibSet
    from eptq_fx.graph.passes.qdq_insertion import weight_ops
    from eptq_fx.numerics import kernels
    from eptq_fx.numerics.quantizers import weight_as_rows

    torch.set_num_threads(threads)
    model = build(model_name)
    x = images(samples)
    config = EPTQConfig(weight_bits=4, act_bits=8, weight_memory=0.5, hessian=HessianConfig(cache_dir=None))
    prepared = eptq_fx.prepare(model, config)
    ops = weight_ops(prepared)
    inputs = _layer_inputs(prepared, ops, x)
    widths = list(config.weight_candidates)
    totals = {"per width, column updates": 0.0, "all widths, block updates": 0.0}
    max_diff = 0.0
    for name, op in ops.items():
        w = op.weight.detach()
        cols = mp._input_columns(op.op, inputs[name][:1])
        if op.weight_quant.axis != 0 or cols is None:
            continue
        factor = mp.FeedbackFactor.of(mp._second_moments(op.op, inputs[name]))
        rows = weight_as_rows(w, 0)
        scales = [torch.as_tensor(kernels.search_weight_scale(rows.numpy(), b, n_grid=config.n_grid))
                  for b in widths]
        block = mp.FEEDBACK_BLOCK
        t0 = time.perf_counter()
        mp.FEEDBACK_BLOCK = 1
        try:
            old = [mp.error_feedback_round_widths(rows, [s], [b], factor)[0] for s, b in zip(scales, widths)]
        finally:
            mp.FEEDBACK_BLOCK = block
        t1 = time.perf_counter()
        new = mp.error_feedback_round_widths(rows, scales, widths, factor)
        t2 = time.perf_counter()
        totals["per width, column updates"] += t1 - t0
        totals["all widths, block updates"] += t2 - t1
        max_diff = max(max_diff, max(float((a - b).abs().max() / s.max()) for a, b, s in zip(old, new, scales)))
    t0 = time.perf_counter()
    choice = mp.choose_bit_widths(prepared, CalibSet((x,)), config)
    stage = time.perf_counter() - t0
    return {"model": model_name, "samples": samples, "threads": torch.get_num_threads(), "widths": widths,
            "layers": len(ops), **{k: round(v, 2) for k, v in totals.items()},
            "max_diff_in_steps": max_diff, "choose_bit_widths_s": round(stage, 1),
            "used_bytes": choice.used_bytes}


def stage_times(model_name: str, budget_name: str, threads: int) -> dict:
    from collections import Counter

    import eptq_fx
    from benchmarks.common import load_calibration
    from benchmarks.mixed_precision import uniform_bytes
    from benchmarks.zoo import get_spec
    from eptq_fx import EPTQConfig, HessianConfig
    from eptq_fx.config import WidthCost
    from eptq_fx.data import CalibSet
    from eptq_fx.mixed_precision import choose_bit_widths

    torch.set_num_threads(threads)
    spec = get_spec(model_name)
    model = spec.build()
    calib = CalibSet((load_calibration(spec.dataset, spec.prep, 1024),))
    budget = uniform_bytes(model, int(budget_name.removeprefix("W")))
    row = {"model": model_name, "budget": budget_name, "threads": torch.get_num_threads()}
    for cost in WidthCost:
        config = EPTQConfig(weight_bits=8, act_bits=8, weight_memory=budget, width_cost=cost,
                            hessian=HessianConfig(cache_dir=None))
        prepared = eptq_fx.prepare(model, config)
        t0 = time.perf_counter()
        choice = choose_bit_widths(prepared, calib, config)
        row[f"{cost.value}_s"] = round(time.perf_counter() - t0, 1)
        row[f"{cost.value}_widths"] = dict(sorted(Counter(c.bits for c in choice.layers).items()))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--samples", type=int, default=64, help="calibration images (choose_bit_widths uses ≤ 256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stage", metavar="MODEL", help="time choose_bit_widths per width cost on a zoo model")
    p.add_argument("--budget", default="W3", help="with --stage: uniform W4 or W3 size")
    args = p.parse_args(argv)
    row = stage_times(args.stage, args.budget, args.threads) if args.stage else run(args.model, args.samples,
                                                                                     args.threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
