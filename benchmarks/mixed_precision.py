"""Mixed precision under a weight-memory budget: eptq_fx's Hessian-guided choice (RTN or EPTQ at the chosen
widths) against uniform widths of the same size and MCT's mixed precision at the same budget.

    python -m benchmarks.mixed_precision --model resnet20 --budget W4 --method mp_rtn [--iters N]

The budget ``W<b>`` is the measured weight memory of uniform b-bit weights with the first and last layer at 8 bits
(eptq_fx's default), in bytes of quantized weights (numel · bits / 8, the count MCT's ``weights_memory`` uses).
Methods: ``uniform_rtn`` / ``uniform_eptq`` (uniform b-bit weights), ``mp_rtn`` / ``mp_eptq`` (eptq_fx mixed
precision over ``--candidates``, default eptq_fx's), ``mct_mp`` (MCT 2.6 PTQ with
``ResourceUtilization(weights_memory=budget)``; its target platform offers 2/4/8-bit kernels). Activations are
8-bit throughout. One JSON line per run is appended to benchmarks/results/mixed_precision.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from benchmarks.common import REPO_ROOT, evaluate_top1, load_calibration, load_test
from benchmarks.zoo import get_spec

RESULTS = REPO_ROOT / "benchmarks" / "results" / "mixed_precision.jsonl"


def uniform_bytes(model: nn.Module, w_bits: int) -> int:
    """Bytes of quantized weights at uniform ``w_bits`` (first/last weight layer at 8), as eptq_fx lays them out."""
    import eptq_fx
    from eptq_fx.graph.passes.qdq_insertion import weight_ops

    prepared = eptq_fx.prepare(model, eptq_fx.EPTQConfig(weight_bits=w_bits))
    return int(sum(op.weight.numel() * op.weight_quant.bits / 8 for op in weight_ops(prepared).values()))


def _mct_mp(model: nn.Module, calib: torch.Tensor, budget: int) -> tuple[nn.Module, dict]:
    from benchmarks.peers._mct import bits_used, import_mct, representative_data

    mct = import_mct()
    torch.manual_seed(0)
    core = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(num_of_images=64))
    qmodel, _ = mct.ptq.pytorch_post_training_quantization(
        model, representative_data(calib, 32), core_config=core,
        target_resource_utilization=mct.core.ResourceUtilization(weights_memory=budget))
    qmodel.eval()
    used = bits_used(qmodel)
    # bytes MCT's choice takes, counted like ours: weight elements (kernels) · bits / 8
    kernels = {n: m for n, m in qmodel.named_modules() if isinstance(getattr(m, "layer", None), (nn.Conv2d, nn.Linear))}
    nbytes = 0.0
    for key, bits in used["per_layer_weights"].items():
        name = key.rsplit(".", 1)[0]
        if name in kernels:
            nbytes += kernels[name].layer.weight.numel() * bits / 8
    return qmodel, {"per_layer_bits": used["per_layer_weights"], "used_bytes": int(nbytes)}


def run(model_name: str, budget_name: str, method: str, iters: int | None, n_calib: int,
        candidates: tuple[int, ...] | None = None, device: str = "cpu", width_cost: str | None = None,
        seed: int = 0) -> dict:
    import eptq_fx
    from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig

    candidates = candidates or EPTQConfig().weight_candidates
    width_cost = width_cost or EPTQConfig().width_cost.value

    spec = get_spec(model_name)
    model = spec.build().to(device)
    calib = load_calibration(spec.dataset, spec.prep, n_calib).to(device)
    b = int(budget_name.removeprefix("W"))
    budget = uniform_bytes(model, b)
    row = {"model": model_name, "budget": budget_name, "budget_bytes": budget, "method": method,
           "iters": iters, "n_calib": n_calib, "threads": torch.get_num_threads(), **({"seed": seed} if seed else {}),
           **({"candidates": list(candidates), "width_cost": width_cost} if method.startswith("mp_") else {})}
    t0 = time.perf_counter()
    if method == "mct_mp":
        qmodel, details = _mct_mp(model, calib, budget)
        row.update(details)
    else:
        algo = "eptq" if method.endswith("eptq") else "rtn"
        rc = ReconstructionConfig(iters=iters) if iters else ReconstructionConfig()
        kw = ({"weight_memory": budget, "weight_candidates": candidates, "width_cost": width_cost}
              if method.startswith("mp_") else {})
        config = EPTQConfig(weight_bits=b if method.startswith("uniform") else 8, act_bits=8, method=algo,
                            n_calib=n_calib, seed=seed, hessian=HessianConfig(cache_dir=None), reconstruction=rc, **kw)
        from eptq_fx.graph.passes.qdq_insertion import weight_ops

        prepared = eptq_fx.quantize(model, calib, config, progress=False, return_prepared=True)
        ops = weight_ops(prepared)
        row["per_layer_bits"] = {n: op.weight_quant.bits for n, op in ops.items()}
        row["used_bytes"] = int(sum(op.weight.numel() * op.weight_quant.bits / 8 for op in ops.values()))
        qmodel = eptq_fx.convert(prepared)
    row["quantize_s"] = round(time.perf_counter() - t0, 1)
    x, y = load_test(spec.dataset, spec.prep)
    row["top1"] = evaluate_top1(qmodel, x.to(device), y.to(device))
    row["device"] = device
    return row


def table(path=RESULTS) -> str:
    """The results as a markdown table (the latest run of each setting)."""
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        # rows written before these fields were recorded ran at that time's defaults: 2/4/8, round-to-nearest cost
        mp = r["method"].startswith("mp_")
        label = r["method"] + (f" {r.get('candidates', [2, 4, 8])} {r.get('width_cost', 'round_to_nearest')}"
                               if mp else "")
        label += f" seed {r['seed']}" if r.get("seed") else ""
        rows[(r["model"], r["budget"], label,
              r.get("iters"))] = r
    out = ["| model | budget (bytes) | method | top-1 | weights used (bytes) | widths used | quantize s |",
           "|---|---|---|---|---|---|---|"]
    for (model, budget, method, iters), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        counts = {}
        for b in r.get("per_layer_bits", {}).values():
            counts[b] = counts.get(b, 0) + 1
        widths = ", ".join(f"{n}×{b}" for b, n in sorted(counts.items()))
        label = method + (f" ({iters} steps/block)" if iters else "")
        out.append(f"| {model} | {budget} ({r['budget_bytes']:,}) | {label} | {r['top1']:.2f} | "
                   f"{r['used_bytes']:,} | {widths} | {r['quantize_s']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--budget", default="W4", help="W4 or W3: the size of uniform 4- or 3-bit weights")
    p.add_argument("--table", action="store_true", help="print the results so far as a markdown table")
    p.add_argument("--method", choices=("uniform_rtn", "uniform_eptq", "mp_rtn", "mp_eptq", "mct_mp"))
    p.add_argument("--iters", type=int, default=None, help="EPTQ steps per block (default: eptq_fx's)")
    p.add_argument("--n-calib", type=int, default=1024)
    p.add_argument("--candidates", default=None, help="mixed-precision weight widths (mp_* methods; default: "
                   "eptq_fx's)")
    p.add_argument("--width-cost", choices=("round_to_nearest", "error_feedback", "network_output"), default=None,
                   help="mixed precision's per-width error estimate (default: eptq_fx's)")
    p.add_argument("--seed", type=int, default=0, help="eptq_fx's seed (Hessian probes, reconstruction batches)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.table:
        print(table())
        return
    if args.method is None:
        p.error("--method is required")
    torch.set_num_threads(args.threads)
    row = run(args.model, args.budget, args.method, args.iters, args.n_calib,
              tuple(int(b) for b in args.candidates.split(",")) if args.candidates else None,
              width_cost=args.width_cost, seed=args.seed)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "per_layer_bits"}))


if __name__ == "__main__":
    main()
