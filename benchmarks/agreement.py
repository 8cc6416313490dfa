"""Top-1 and top-1 agreement with the float model of several quantization methods, in one process on the same
calibration and test images: whether a method that ends a few test images below another is further from the
float model, or only differently wrong. Each method after the first is also compared with the first on the same
test images (McNemar's exact test): the images only one of the two gets right, and the two-sided p-value of that
split under "both are equally accurate".

    python -m benchmarks.agreement --model vit_fmnist --bits W8A8 --methods rtn,eptq --threads 1
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from benchmarks.common import REPO_ROOT, load_calibration, load_test
from benchmarks.methods import Budget, parse_bits, quantize_with
from benchmarks.zoo import get_spec

RESULTS = REPO_ROOT / "benchmarks" / "results" / "agreement.jsonl"


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split of the discordant images at least this uneven
    when each of them is equally likely to favour either method (binomial, p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


@torch.inference_mode()
def _predictions(model, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    outs = []
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        outs.append(out[0] if isinstance(out, (list, tuple)) else out)
    logits = torch.cat(outs).float()
    return logits.argmax(1), logits


def run(model_name: str, bits: str, methods: list[str], seed: int) -> list[dict]:
    spec = get_spec(model_name)
    model = spec.build().eval()
    calib = load_calibration(spec.dataset, spec.prep, 1024)
    x, y = load_test(spec.dataset, spec.prep)
    f_pred, f_logits = _predictions(model, x)
    w_bits, a_bits = parse_bits(bits)
    rows = []
    first_right = None
    for method in methods:
        q = quantize_with(method, model, calib, w_bits, a_bits, Budget(seed=seed)).model
        q_pred, q_logits = _predictions(q, x)
        right = q_pred == y
        paired = {}
        if first_right is None:
            first_right = right
        else:  # paired against the first method on the same images
            only_this, only_first = int((right & ~first_right).sum()), int((first_right & ~right).sum())
            paired = {"vs": methods[0], "only_this_right": only_this, "only_vs_right": only_first,
                      "mcnemar_p": round(mcnemar_exact_p(only_this, only_first), 4)}
        rows.append({**paired, "model": model_name, "bits": bits, "method": method, "seed": seed,
                     "top1": round(100.0 * float((q_pred == y).float().mean()), 2),
                     "float_top1": round(100.0 * float((f_pred == y).float().mean()), 2),
                     "agreement_with_float": round(100.0 * float((q_pred == f_pred).float().mean()), 2),
                     "logit_mse_to_float": float((q_logits - f_logits).pow(2).sum(1).mean())})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_fmnist")
    p.add_argument("--bits", default="W8A8")
    p.add_argument("--methods", default="rtn,eptq")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.model, args.bits, args.methods.split(","), args.seed)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r))


if __name__ == "__main__":
    main()
