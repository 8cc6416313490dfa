"""How unevenly the label-free Hessian weighs the calibration samples, per scored point of a model.

For every compare point and block output the Hessian stage scores (the default config: the block target, the
Hessian in every block), each sample's weight is its trace over the mean trace, w = s / mean(s), and this prints
the effective sample share (Σw)² / (N·Σw²) (1: every sample alike; 0.5: the fit rests on about half of them), the
largest weight and the 99th percentile, before and after ``ReconstructionConfig.hessian_sample_power``, and the
rank correlation of the weights with the float model's logit margin (top-1 minus top-2: negative when the
weights lean on the images the model is least sure of).

    python -m benchmarks.sample_weights --model resnet56 --bits W4A4

Why: at power 1 the block target with these weights gained on ResNet-20 and lost on ResNet-56, whose traces
spread more (BENCHMARKS.md, "The tempered sample attention"). Only the float model and the calibration images
are used; nothing is trained.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks import shim  # noqa: F401  (torchvision on CPU torch)
from benchmarks.common import load_calibration
from benchmarks.methods import Budget, eptq_config, parse_bits
from benchmarks.zoo import get_spec


def effective_share(w: torch.Tensor) -> float:
    """(Σw)² / (N·Σw²) of non-negative weights: 1 when all are equal, 1/N when one sample holds all."""
    w = w.double()
    return float(w.sum() ** 2 / (len(w) * (w * w).sum()))


def spread(scores: torch.Tensor, power: float) -> dict:
    """Summary of one point's per-sample weights (scores over their mean) raised to ``power``."""
    from eptq_fx.method.loss_weights import tempered

    w = tempered(scores.double()[:, None], power)[:, 0]
    w = w / w.mean()
    return {"share": round(effective_share(w), 3), "max": round(float(w.max()), 2),
            "p99": round(float(w.quantile(0.99)), 2)}


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (no ties expected: continuous scores)."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def run(model_name: str, bits: str, seed: int) -> list[dict]:
    import eptq_fx
    from eptq_fx.data import materialize
    from eptq_fx.method.hessian_stage import estimate_hessian
    from eptq_fx.numerics.calibration import input_names

    spec = get_spec(model_name)
    model = spec.build().eval()
    calib = load_calibration(spec.dataset, spec.prep, 1024)
    w_bits, a_bits = parse_bits(bits)
    config = eptq_config("eptq", w_bits, a_bits, len(calib), Budget(seed=seed))
    power = config.reconstruction.hessian_sample_power
    prepared = eptq_fx.prepare(eptq_fx.capture(model), config, example_inputs=(calib[:2],))
    eptq_fx.calibrate(prepared, calib, config=config, progress=False)
    with torch.no_grad():  # the float model's confidence: top-1 minus top-2 logit
        top2 = torch.cat([model(calib[i:i + 256]) for i in range(0, len(calib), 256)]).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    est = estimate_hessian(prepared, materialize(calib, input_names(prepared), max_samples=config.n_calib),
                           config, progress=False)
    rows = []
    for table in (est.activation, est.block_outputs):
        if table is None:
            continue
        for i, name in enumerate(table.names):
            s = table.scores[:, i]
            if float(s.mean()) <= 0:
                continue
            rows.append({"model": model_name, "point": name, "power_1": spread(s, 1.0),
                         f"power_{power:g}": spread(s, power),
                         "margin_spearman": round(rank_correlation(s, margin), 2) if float(s.std()) > 0 else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.model, args.bits, args.seed)
    for row in rows:
        print(json.dumps(row))
    first = rows[0]
    lowest = min(rows, key=lambda r: r["power_1"]["share"])
    print(f"{args.model}: effective sample share at {first['point']} {first['power_1']['share']} (power 1), "
          f"lowest {lowest['power_1']['share']} at {lowest['point']}; median over {len(rows)} points "
          f"{sorted(r['power_1']['share'] for r in rows)[len(rows) // 2]}")


if __name__ == "__main__":
    main()
