"""Compare eptq_fx with its peers: top-1, drop versus float, wall time and peak memory per (model, method, bits).

    python -m benchmarks.compare --models resnet20 --bits W8A8,W4A8,W4A4 \\
        --methods rtn,eptq,eptq_fast,mct_ptq,mct_gptq,torchao_fx,torchao_pt2e --n-calib 1024 [--quick]

Every (model, method, bits) runs in a fresh subprocess (``--one``), because peak RSS is per process and never
goes down; the child prints one JSON line (see ``RESULT_KEYS``) and the parent collects them into
benchmarks/results/<out>.json (rewritten after every setting), a "## Comparison" section of BENCHMARKS.md and
benchmarks/results/<out>.png; each child's log goes to runs/compare/<out>/ (not committed).
``--quick``: 256 calibration images, 2000 test images, tiny optimisation budgets (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import (
    REPO_ROOT,
    Timer,
    current_rss_mib,
    evaluate_top1,
    load_calibration,
    load_test,
    peak_rss_mib,
)
from benchmarks.methods import METHODS, Budget, eptq_options, parse_bits, quantize_with

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RESULT_KEYS = ("model", "dataset", "method", "bits", "status", "reason", "top1", "n_calib", "n_test", "quick",
               "quantize_s", "eval_s", "peak_rss_mib", "rss_before_mib", "threads", "details")
QUICK_N_CALIB, QUICK_N_TEST = 256, 2000
FLOAT_BITS = "FP32"  # the "bits" label of the float reference row


def run_one(model_name: str, method: str, bits: str, n_calib: int, n_test: int | None, budget: Budget) -> dict:
    """Quantize and evaluate one setting in this process; always returns a result dict (status ok /
    unsupported / error)."""
    from benchmarks.zoo import get_spec

    spec = get_spec(model_name)
    w_bits, a_bits = (32, 32) if method == "float" else parse_bits(bits)
    row = {"model": model_name, "dataset": spec.dataset, "method": method, "bits": bits.upper(), "status": "ok",
           "reason": None, "top1": None, "n_calib": n_calib, "n_test": None, "quick": budget.quick,
           "quantize_s": None, "eval_s": None, "peak_rss_mib": None, "rss_before_mib": None,
           "threads": torch.get_num_threads(), "details": {}, "seed": budget.seed}
    try:
        model = spec.build()
        calib = load_calibration(spec.dataset, spec.prep, n_calib)
        row["rss_before_mib"] = current_rss_mib()
        load_before = os.getloadavg()[0]
        with Timer() as quantize_timer:
            outcome = quantize_with(method, model, calib, w_bits, a_bits, budget)
        row["quantize_s"] = 0.0 if method == "float" else quantize_timer.seconds
        row["quantize_cpu_s"] = 0.0 if method == "float" else quantize_timer.cpu_seconds
        row["load_avg_1min"] = [load_before, os.getloadavg()[0]]  # other processes' load skews wall time
        row["details"] = outcome.details
        if outcome.model is None:
            row.update(status="unsupported", reason=outcome.skipped)
        else:
            x_test, y_test = load_test(spec.dataset, spec.prep, n_test)
            with Timer() as eval_timer:
                row["top1"] = evaluate_top1(outcome.model, x_test, y_test)
            row["eval_s"], row["n_test"] = eval_timer.seconds, len(x_test)
    except Exception as err:  # noqa: BLE001 -- report any failure of a method as data, never hide it
        row.update(status="error", reason=f"{type(err).__name__}: {err}")
        row["details"]["traceback"] = traceback.format_exc(limit=8)
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def _child_command(args: argparse.Namespace, model: str, method: str, bits: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.compare", "--one", "--models", model, "--methods", method,
           "--bits", bits, "--n-calib", str(args.n_calib), "--threads", str(args.threads),
           "--gptq-epochs", str(args.gptq_epochs)]
    for flag, value in (("--gptq-steps", args.gptq_steps), ("--eptq-iters", args.eptq_iters),
                        ("--n-test", args.n_test), ("--seed", args.seed or None)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + (["--quick"] if args.quick else [])


def parse_result_line(stdout: str) -> dict | None:
    """The child's result: the last stdout line that is a JSON object with every RESULT_KEYS key."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and all(k in obj for k in RESULT_KEYS):
                return obj
    return None


def run_in_subprocess(args: argparse.Namespace, model: str, method: str, bits: str, log_dir: Path) -> dict:
    """Run one setting in a fresh interpreter; its stdout and stderr go to a log file (tail it to follow
    progress), from which the result line is read back."""
    cmd = _child_command(args, model, method, bits)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{model}_{method}_{bits}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        log_file.write(" ".join(cmd) + "\n")
        log_file.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                  timeout=args.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            failure = f"child exited {proc.returncode} without a result line"
        except subprocess.TimeoutExpired:
            failure = f"timed out after {args.timeout} s"
    output = log_path.read_text(errors="replace")
    row = parse_result_line(output)
    if row is None:
        row = {k: None for k in RESULT_KEYS} | {"model": model, "method": method, "bits": bits.upper(),
                                                "status": "error", "details": {},
                                                "reason": f"{failure}; end of log: {output[-800:]}"}
    row["process_s"] = time.perf_counter() - start
    row["log"] = str(log_path)
    return row


def _settings(args: argparse.Namespace) -> None:
    if args.quick:
        args.n_calib = min(args.n_calib, QUICK_N_CALIB) if args.n_calib_given else QUICK_N_CALIB
        args.n_test = args.n_test or QUICK_N_TEST


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20")
    parser.add_argument("--bits", default="W8A8,W4A8,W4A4")
    parser.add_argument("--methods", default="rtn,eptq,eptq_fast,mct_ptq,mct_gptq,torchao_fx,torchao_pt2e")
    parser.add_argument("--n-calib", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None, help="seeded test subset (default: full test split)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gptq-epochs", type=int, default=150)
    parser.add_argument("--gptq-steps", type=int, default=None)
    parser.add_argument("--eptq-iters", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="eptq_fx seed (the calibration images stay the same)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per subprocess")
    parser.add_argument("--out", default=None, help="results name under benchmarks/results (default: compare, "
                                                    "compare_quick with --quick)")
    parser.add_argument("--markdown", default=None, help="file whose '## Comparison' section is rewritten "
                                                         "(default: BENCHMARKS.md; none with --quick); 'none'")
    parser.add_argument("--merge", action="store_true", help="keep rows of other settings from an earlier run")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.n_calib_given = args.n_calib is not None
    args.n_calib = args.n_calib or 1024
    _settings(args)
    torch.set_num_threads(args.threads)
    budget = Budget(quick=args.quick, eptq_iters=args.eptq_iters, gptq_epochs=args.gptq_epochs,
                    gptq_steps=args.gptq_steps, seed=args.seed)
    if args.one:
        # the per-block loss / SQNR lines of eptq_fx go to the run's log file (stderr), for diagnosis
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        logging.getLogger("eptq_fx").setLevel(logging.INFO)
        row = run_one(args.models, args.methods, args.bits, args.n_calib, args.n_test, budget)
        print(json.dumps(row, default=str), flush=True)
        return
    run_all(args, argv if argv is not None else sys.argv[1:])


def run_all(args: argparse.Namespace, argv: list[str]) -> None:
    from benchmarks.report import earlier_results, write_json, write_report
    from benchmarks.train_models import ensure_trained

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "float"]
    bit_settings = [b.strip().upper() for b in args.bits.split(",") if b.strip()]
    for m in methods:
        if m not in METHODS and eptq_options(m) is None:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    for b in bit_settings:
        parse_bits(b)
    ensure_trained(models)
    command = "python -m benchmarks.compare " + " ".join(argv)
    out = args.out or ("compare_quick" if args.quick else "compare")
    stem, log_dir = RESULTS_DIR / out, REPO_ROOT / "runs" / "compare" / out
    markdown = args.markdown or ("none" if args.quick else str(REPO_ROOT / "BENCHMARKS.md"))
    plan = [(m, "float", FLOAT_BITS) for m in models] + [(m, meth, b) for m in models for meth in methods
                                                         for b in bit_settings]
    earlier = earlier_results(stem, command) if args.merge else ([], [])
    rows: list[dict] = []
    for i, (model, method, bits) in enumerate(plan, 1):
        row = run_in_subprocess(args, model, method, bits, log_dir)
        rows.append(row)
        # written after every setting, so an interrupted run keeps what it measured
        write_json(rows, command, stem, earlier)
        shown = f"{row['top1']:.2f}%" if row.get("top1") is not None else row.get("reason")
        print(f"[{i}/{len(plan)}] {model} {method} {bits}: {row['status']} {shown} "
              f"(quantize {row.get('quantize_s') or 0:.1f} s, peak RSS {row.get('peak_rss_mib') or 0:.0f} MiB)",
              flush=True)
    for p in write_report(stem, None if markdown == "none" else markdown):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
