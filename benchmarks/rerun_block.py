"""Re-run chosen reconstruction blocks under variants, every other block restored from one base run.

A diagnostic: what does one block's optimisation (or its fallback decision) do to the network, with everything
upstream and downstream held fixed? The base run quantizes with ``--base`` and keeps per-block checkpoints
(``quantize(..., resume_dir=...)``); each variant copies them, deletes the ``--blocks`` files and quantizes again
under its own config, so only those blocks are optimised anew. Each result: top-1 on the test split, the squared
logit distance to the float model on the test split and on the held-out calibration images (the ones the
fallback tests use), and per-image paired differences against the first variant (mean ± standard error, share of
images where the variant is closer to float).

    python -m benchmarks.rerun_block --model convmixer --bits W3A3 --blocks 16 \\
        --variants eptq+blockfb0,eptq,eptq+hold0,eptq+uniform,eptq+block --threads 1

Results are appended to benchmarks/results/rerun_block.jsonl; run directories go to runs/rerun_block/.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from benchmarks import shim  # noqa: F401  (torchvision on CPU torch)
from benchmarks.common import load_calibration, load_test
from benchmarks.methods import Budget, eptq_config, parse_bits
from benchmarks.zoo import get_spec

RESULTS = Path(__file__).resolve().parent / "results" / "rerun_block.jsonl"


def _allow_config_change() -> None:
    """The checkpoint directory refuses a run under another config, by design; here the restored blocks are
    meant to keep the base config's result while the re-run blocks use the variant's. Only the config part of
    the fingerprint is neutralised (model and data are still checked)."""
    import eptq_fx.method.checkpoint as ckpt

    original = ckpt.run_fingerprint

    def fingerprint(*args, **kwargs):
        return {**original(*args, **kwargs), "config": "rerun_block"}

    ckpt.run_fingerprint = fingerprint


def _logits(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def _paired(err: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (err - ref).double()
    return {"mean_diff": round(float(d.mean()), 3), "se": round(float(d.std() / len(d) ** 0.5), 3),
            "closer_share": round(float((d < 0).double().mean()), 3)}


def run(model_name: str, bits: str, blocks: list[int], variants: list[str], base: str, seed: int,
        out_dir: Path) -> list[dict]:
    import eptq_fx

    _allow_config_change()
    spec = get_spec(model_name)
    model = spec.build().eval()
    calib = load_calibration(spec.dataset, spec.prep, 1024)
    x, y = load_test(spec.dataset, spec.prep)
    w_bits, a_bits = parse_bits(bits)
    n_hold = int(len(calib) * 0.125)  # ReconstructionConfig.fallback_holdout's default: the last eighth
    held = calib[len(calib) - n_hold:]
    f_test, f_held = _logits(model, x), _logits(model, held)
    root = out_dir / f"{model_name}_{bits}_s{seed}"
    log = logging.getLogger("eptq_fx")
    log.setLevel(logging.INFO)

    def quantize(method: str, run_dir: Path, log_name: str):
        handler = logging.FileHandler(root / f"{log_name}.log", mode="w")
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        try:
            config = eptq_config(method, w_bits, a_bits, len(calib), Budget(seed=seed))
            t0 = time.perf_counter()
            q = eptq_fx.quantize(model, calib, config=config, resume_dir=str(run_dir), progress=False)
            return q, time.perf_counter() - t0
        finally:
            log.removeHandler(handler)
            handler.close()

    root.mkdir(parents=True, exist_ok=True)
    quantize(base, root / "base", "base")  # finishes (or resumes) the base run
    rows, first = [], None
    for method in variants:
        run_dir = root / method
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(root / "base", run_dir)
        for b in blocks:
            (run_dir / f"block_{b}.pt").unlink(missing_ok=True)
        q, seconds = quantize(method, run_dir, method)
        q_test, q_held = _logits(q, x), _logits(q, held)
        err_test, err_held = (q_test - f_test).pow(2).sum(1), (q_held - f_held).pow(2).sum(1)
        row = {"model": model_name, "bits": bits, "seed": seed, "base": base, "blocks": blocks, "method": method,
               "top1": round(100.0 * float((q_test.argmax(1) == y).double().mean()), 2),
               "test_logit_distance": round(float(err_test.mean()), 3),
               "heldout_logit_distance": round(float(err_held.mean()), 3), "quantize_s": round(seconds, 1)}
        if first is None:
            first = (err_test, err_held)
        else:
            row["vs"] = variants[0]
            row["test_paired"] = _paired(err_test, first[0])
            row["heldout_paired"] = _paired(err_held, first[1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--bits", required=True, help="e.g. W3A3")
    p.add_argument("--blocks", required=True, help="comma-separated block indices to re-run")
    p.add_argument("--variants", required=True, help="comma-separated EPTQ methods (benchmarks.methods)")
    p.add_argument("--base", default="eptq", help="the method of the base run (default: eptq)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=Path("runs/rerun_block"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.model, args.bits, [int(b) for b in args.blocks.split(",")], args.variants.split(","), args.base,
        args.seed, args.out_dir)


if __name__ == "__main__":
    main()
