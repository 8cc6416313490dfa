"""The pipeline on a CUDA GPU: accuracy of the CIFAR-10 models and the end-to-end time of ImageNet-size models.

    python -m benchmarks.gpu --out benchmarks/results/gpu.jsonl \\
        --accuracy resnet20:eptq:W4A4 convmixer:eptq:W4A4 --end-to-end resnet18 deit_tiny

Every job puts the model and its data on the GPU, as a user with one would, and calls ``eptq_fx.quantize`` with
the settings of ``benchmarks.compare`` (accuracy jobs: 1024 calibration images, top-1 on the whole test split)
or of ``benchmarks.scale --end-to-end`` (1024 CIFAR-10 images resized to 224×224, default EPTQ W4A8). Each job
appends one JSON line to ``--out`` as soon as it ends (a failure is a row too), so a run stopped at a time limit
keeps what it finished. Run it where CUDA exists; the shared data folder must be reachable (``EPTQ_DATA``).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def accuracy_job(model_name: str, method: str, bits: str, seed: int, n_calib: int) -> dict:
    """One ``benchmarks.compare`` setting, on the GPU: quantize time, top-1 and the GPU's peak memory."""
    import eptq_fx
    from benchmarks.common import evaluate_top1, load_calibration, load_test
    from benchmarks.methods import Budget, eptq_config, parse_bits
    from benchmarks.zoo import get_spec

    spec = get_spec(model_name)
    w_bits, a_bits = parse_bits(bits)
    model = spec.build().cuda()
    calib = load_calibration(spec.dataset, spec.prep, n_calib).cuda()
    config = eptq_config(method, w_bits, a_bits, n_calib, Budget(seed=seed))
    torch.cuda.reset_peak_memory_stats()
    _sync()
    t = time.perf_counter()
    quantized = eptq_fx.quantize(model, calib, config, progress=False)
    _sync()
    seconds = time.perf_counter() - t
    x, y = load_test(spec.dataset, spec.prep)
    return {"job": "accuracy", "model": model_name, "method": method, "bits": bits.upper(), "seed": seed,
            "n_calib": n_calib, "quantize_s": round(seconds, 1),
            "top1": round(evaluate_top1(quantized, x.cuda(), y.cuda()), 2),
            "float_top1": round(evaluate_top1(model, x.cuda(), y.cuda()), 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def mixed_precision_job(model_name: str, budget: str, method: str, iters: int | None, n_calib: int) -> dict:
    """One ``benchmarks.mixed_precision`` setting (eptq_fx methods only: MCT is not installed on the GPU machine)."""
    from benchmarks.mixed_precision import run

    return {"job": "mixed_precision", **run(model_name, budget, method, iters, n_calib, device="cuda")}


def end_to_end_job(model_name: str, n_calib: int) -> dict:
    from benchmarks.scale import run_end_to_end

    return {"job": "end_to_end", **run_end_to_end(model_name, n_calib, None, device="cuda")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file the rows are appended to")
    parser.add_argument("--accuracy", nargs="*", default=[], metavar="MODEL:METHOD:BITS[:SEED]")
    parser.add_argument("--end-to-end", nargs="*", default=[], metavar="MODEL")
    parser.add_argument("--mixed-precision", nargs="*", default=[], metavar="MODEL:BUDGET:METHOD[:ITERS]")
    parser.add_argument("--n-calib", type=int, default=1024)
    parser.add_argument("--no-tf32", action="store_true",
                        help="full float32 convolutions and matmuls (PyTorch lets cuDNN use TF32 by default)")
    parser.add_argument("--workers", type=int, default=1,
                        help="jobs run at once, each in its own process (small models leave the GPU mostly idle)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark runs the pipeline on a GPU")
    jobs = ([("end_to_end", m) for m in args.end_to_end] + [("accuracy", spec) for spec in args.accuracy]
            + [("mixed_precision", spec) for spec in args.mixed_precision])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.workers > 1:
        _run_in_processes(jobs, args)
        return
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    for kind, spec in jobs:
        t = time.perf_counter()
        try:
            if kind == "accuracy":
                model, method, bits, *seed = spec.split(":")
                row = accuracy_job(model, method, bits, int(seed[0]) if seed else 0, args.n_calib)
            elif kind == "mixed_precision":
                model, budget, method, *iters = spec.split(":")
                row = mixed_precision_job(model, budget, method, int(iters[0]) if iters else None, args.n_calib)
            else:
                row = end_to_end_job(spec, args.n_calib)
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- a failed job is a result row, the next job still runs
            row = {"job": kind, "spec": spec, "status": "error", "reason": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=12)}
        row.update(job_s=round(time.perf_counter() - t, 1), device=torch.cuda.get_device_name(),
                   torch=torch.__version__, tf32=torch.backends.cudnn.allow_tf32)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        if row["status"] == "error":
            print(row["traceback"], flush=True)


def _run_in_processes(jobs: list[tuple[str, str]], args: argparse.Namespace) -> None:
    """Each job in a child process of this script, ``args.workers`` at a time, in the order given."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    flag = {"end_to_end": "--end-to-end", "accuracy": "--accuracy", "mixed_precision": "--mixed-precision"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}

    def one(job: tuple[str, str]) -> int:
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--out", str(args.out), "--n-calib", str(args.n_calib),
               flag[job[0]], job[1], *(["--no-tf32"] if args.no_tf32 else [])]
        return subprocess.run(cmd, env=env, check=False).returncode

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, jobs))


if __name__ == "__main__":
    main()
