"""Wall time of EPTQ's stages for 1 against N processes (torch.distributed, gloo, 1 thread each).

    python -m benchmarks.processes --nproc 1 2 --n-calib 512 --iters 200

Each count runs the same quantize call (ResNet-20 with its CIFAR-10 checkpoint, W4A4, a fixed seeded
calibration sample) under ``torchrun --standalone --nproc_per_node N``; rank 0 records the pipeline's own stage
times (``eptq_fx.report``'s ``stage_seconds``) and the top-1 on the CIFAR-10 test images, so the table shows what
a second process buys and that the result stays the same. Results: benchmarks/results/processes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, load_calibration, load_test
from benchmarks.zoo import get_spec

RESULTS = REPO_ROOT / "benchmarks" / "results" / "processes.json"
MODEL = "resnet20"


def _worker(out: str, n_calib: int, iters: int) -> None:
    """One rank's run (launched by torchrun)."""
    import eptq_fx
    from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig, distributed

    torch.set_num_threads(1)
    spec = get_spec(MODEL)
    model, calib = spec.build(), load_calibration(spec.dataset, spec.prep, n=n_calib)
    config = EPTQConfig(weight_bits=4, act_bits=4, n_calib=n_calib, hessian=HessianConfig(cache_dir=None),
                        reconstruction=ReconstructionConfig(iters=iters))
    t = time.perf_counter()
    q = eptq_fx.quantize(model, calib, config, progress=False)
    wall = time.perf_counter() - t
    if distributed.is_lead():
        x, y = load_test(spec.dataset, spec.prep)
        with torch.no_grad():
            top1 = sum(int((q(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
        stages = eptq_fx.report(q)["totals"]["stage_seconds"]
        Path(out).write_text(json.dumps({"quantize_s": wall, "stages_s": stages,
                                         "top1": 100 * top1 / len(y)}))


def measure(nproc: int, n_calib: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "benchmarks.processes", "--worker", str(out), "--n-calib", str(n_calib), "--iters", str(iters)]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True)
        total = time.perf_counter() - t
        return {"nproc": nproc, "n_calib": n_calib, "iters": iters, "process_s": total,
                "load_avg_1min": os.getloadavg()[0], **json.loads(out.read_text())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.n_calib, args.iters)
        return 0
    rows = [measure(n, args.n_calib, args.iters) for n in args.nproc]
    RESULTS.write_text(json.dumps(rows, indent=1))
    keys = ["calibrate", "hessian", "reconstruct"]
    print("| processes | " + " | ".join(f"{k} s" for k in keys) + " | quantize s | top-1 |")
    print("|---|" + "---|" * (len(keys) + 2))
    for r in rows:
        print(f"| {r['nproc']} | " + " | ".join(f"{r['stages_s'].get(k, 0):.1f}" for k in keys) +
              f" | {r['quantize_s']:.1f} | {r['top1']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
