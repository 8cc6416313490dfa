"""Command line: ``eptq-fx quantize | inspect | eval`` (the demo lives in ``examples/demo.py``, run by ``make demo``).

Every user mistake ends with exit code 2 and one line on stderr that says what to change; everything that can
be checked (files, output paths, extras, options) is checked before any long stage, and nothing is written
unless the run succeeds (outputs are written to a temporary file and renamed into place).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eptq_fx import distributed
from eptq_fx.atomic_io import write_atomically
from eptq_fx.cli_inputs import (
    OUT_SUFFIXES,
    check_extra,
    check_output_path,
    float_inputs,
    load_calibration,
    load_model,
    parse_leaf,
    parse_override,
    parse_weight_candidates,
    parse_weight_memory,
)
from eptq_fx.config import WidthCost
from eptq_fx.errors import CalibrationDataError, ConfigError, EPTQError

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ commands
def _config_from_args(args: argparse.Namespace):
    from eptq_fx.config import EPTQConfig, HessianConfig, ReconstructionConfig, parse_bits, user_cache_dir

    w_bits, a_bits = parse_bits(args.bits)
    overrides = tuple(parse_override(o) for o in args.override)
    hessian = HessianConfig(cache_dir=str(user_cache_dir() / "hessian") if args.hessian_cache else None)
    rc = ReconstructionConfig() if args.iters is None else ReconstructionConfig(iters=args.iters)
    kw = {} if args.n_calib is None else {"n_calib": args.n_calib}
    candidates = parse_weight_candidates(args.weight_candidates)
    if candidates is not None:
        kw["weight_candidates"] = candidates
    if args.width_cost is not None:
        kw["width_cost"] = args.width_cost
    return EPTQConfig(weight_bits=w_bits, act_bits=a_bits, method=args.method, seed=args.seed,
                      first_last_8bit=args.first_last_8bit, overrides=overrides, hessian=hessian,
                      reconstruction=rc, weight_memory=parse_weight_memory(args.weight_memory),
                      act_placement=args.act_placement, **kw)


def cmd_quantize(args: argparse.Namespace) -> int:
    from eptq_fx.export import export, export_onnx
    from eptq_fx.export.program import example_like
    from eptq_fx.pipeline import quantize

    # every check first: options, output paths, extras, model and data; the long stages come after
    config = _config_from_args(args)
    out = check_output_path(args.out, OUT_SUFFIXES, "--out")
    report_path = check_output_path(args.report, (".json",), "--report")
    plot_path = check_output_path(args.plot, (".png", ".pdf", ".svg"), "--plot")
    if out is not None and out.suffix == ".onnx":
        for module in ("onnx", "onnxscript"):
            check_extra(module, "onnx", "--out .onnx")
    if plot_path is not None:
        check_extra("matplotlib", "plot", "--plot")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    leaves = [parse_leaf(t) for t in args.leaf_module]
    model = load_model(args.model_module, args.checkpoint)
    calib = load_calibration(args.calib, args.calib_key, allow_integer=args.integer_inputs)
    if out is None:
        print("eptq-fx: note: no --out given, the quantized model will not be saved", file=sys.stderr)
    t0 = time.perf_counter()
    quantized = quantize(model, calib, config, leaf_modules=leaves, resume_dir=args.resume,
                         progress=_progress(args))
    seconds = time.perf_counter() - t0
    sample = _first_samples(calib, quantized)
    agreement = _agreement(model, quantized, sample)
    print(f"quantized with {args.method} at {args.bits.upper()} in {seconds:.1f} s; {agreement}")
    if out is not None and distributed.is_lead():  # under torchrun every rank holds the same result: one writes
        example = example_like(quantized)  # zeros of the input shape: no calibration image goes into the file
        if out.suffix == ".onnx":  # both write atomically (a temporary file renamed into place)
            export_onnx(quantized, example, out, opset_version=args.opset)
        else:
            export(quantized, example, out)
        print(f"wrote {out}")
    if report_path is not None or plot_path is not None:
        from eptq_fx.report import plot_report, report, write_report

        rep = report(quantized)
        if report_path is not None:
            write_report(rep, report_path)
            print(f"wrote {report_path}")
        if plot_path is not None:
            write_atomically(plot_path, lambda p: plot_report(rep, p))
            print(f"wrote {plot_path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from eptq_fx.report import format_table, read_report

    print(format_table(read_report(args.report)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from eptq_fx.report import evaluate_top1

    path = Path(args.model)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a .pt2 or .onnx file written by eptq-fx quantize.")
    if path.suffix not in OUT_SUFFIXES:
        raise ConfigError(f"{path} must be a .pt2 or .onnx file written by eptq-fx quantize.")
    if path.suffix == ".onnx":
        check_extra("onnxruntime", "onnx", "eval of an .onnx model")
    data = Path(args.data)
    if not data.is_file() or data.suffix != ".npz":
        raise ConfigError(f"--data {data} must be an existing .npz file with inputs (--x-key) and labels (--y-key).")
    arrays = np.load(data)
    for k in (args.x_key, args.y_key):
        if k not in arrays.files:
            raise CalibrationDataError(f"{data} holds {arrays.files}, no {k!r}; choose with --x-key / --y-key.")
    x = float_inputs(torch.from_numpy(arrays[args.x_key]), f"{data} ({args.x_key})", args.integer_inputs)
    y = torch.from_numpy(arrays[args.y_key]).long()
    if len(x) != len(y):
        raise CalibrationDataError(f"{data}: {len(x)} inputs but {len(y)} labels; give one label per input.")
    top1 = evaluate_top1(path, x, y, batch_size=args.batch_size, progress=_progress(args))
    print(f"top-1 {100 * top1:.2f}% on {len(y)} samples of {data}")
    return 0


def _progress(args: argparse.Namespace) -> bool:
    if args.quiet:
        return False
    return bool(getattr(args, "progress", False)) or sys.stderr.isatty()


def _first_samples(calib, gm) -> tuple:
    from eptq_fx.data import materialize
    from eptq_fx.numerics.calibration import input_names

    first = materialize(calib, input_names(gm), max_samples=8)
    return first.take(torch.arange(first.n))


@torch.no_grad()
def _agreement(model: nn.Module, quantized: nn.Module, sample: tuple) -> str:
    """How close the quantized outputs are to float on a few calibration samples (a sanity line, not a metric)."""
    ref, out = model(*sample), quantized(*sample)
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)):
        return "outputs are not single tensors: no agreement check"
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1).float(), out.flatten(1).float(), dim=1)
    return f"output cosine similarity to float on {len(cos)} calibration samples: mean {float(cos.mean()):.4f}"


# -------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line too, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eptq-fx", description="EPTQ post-training quantization (torch.fx).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: eptq_fx info logs, -vv: debug")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize your model and save it (torch.export .pt2 or .onnx)")
    q.add_argument("--model-module", default=None, help="pkg.mod:factory building the model")
    q.add_argument("--checkpoint", default=None, help="torch.save'd full model, or a state_dict for "
                                                      "--model-module's model")
    q.add_argument("--calib", required=True, help=".npz or .pt file of preprocessed model inputs (dim 0: samples)")
    q.add_argument("--calib-key", default=None, help="array name in the .npz (default x) or key in a .pt dict")
    q.add_argument("--integer-inputs", action="store_true", help="the model takes integer (e.g. uint8) inputs "
                                                                 "as they are; otherwise uint8 data is refused")
    q.add_argument("--bits", default="W8A8", help="e.g. W4A8")
    q.add_argument("--method", default="eptq", choices=("eptq", "rtn"))
    q.add_argument("--n-calib", type=int, default=None, help="at most this many calibration samples (default 1024)")
    q.add_argument("--iters", type=int, default=None, help="EPTQ steps per block (default 500)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--first-last-8bit", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the first and last weight layer at 8 bits (default on)")
    q.add_argument("--act-placement", default="auto", choices=("auto", "fusable", "inputs"),
                   help="activation quantizers: inputs of quantized layers only (inputs), also the inputs of adds "
                        "and concatenations that int8 runtimes fuse (fusable), or fusable at 8-bit activations "
                        "and inputs below (auto, the default)")
    q.add_argument("--override", action="append", default=[], metavar="SEL:w=B,a=B",
                   help="per-layer widths: name=LAYER:w=8,a=8, regex=RE:w=8, type=torch.nn.Linear:w=none "
                        "(repeatable; later ones win)")
    q.add_argument("--leaf-module", action="append", default=[], metavar="NAME|CLASS",
                   help="keep a module as an opaque call when tracing: a qualified name or pkg.mod.Class")
    q.add_argument("--weight-memory", default=None, help="mixed precision: weight memory budget in bytes "
                                                         "(120000, 120KiB) or a fraction of the 8-bit size (0.5)")
    q.add_argument("--weight-candidates", default=None, metavar="B,B,...",
                   help="mixed precision: the weight widths to choose from (default 2,3,4,5,6,8)")
    q.add_argument("--width-cost", default=None, choices=tuple(c.value for c in WidthCost),
                   help="mixed precision: how a layer's error at a width is estimated (default error_feedback)")
    q.add_argument("--hessian-cache", action="store_true", help="cache the label-free Hessian in the user cache "
                                                                "directory ($XDG_CACHE_HOME/eptq_fx)")
    q.add_argument("--out", default=None, help="output: .pt2 (torch.export) or .onnx (needs the onnx extra)")
    q.add_argument("--opset", type=int, default=None, help="ONNX opset for --out .onnx")
    q.add_argument("--report", default=None, help="write the per-layer report (.json)")
    q.add_argument("--plot", default=None, help="plot per-layer sensitivity and SQNR (.png; needs matplotlib)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.add_argument("--resume", default=None, help="directory for per-block checkpoints (EPTQ resumes from it)")
    q.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="print a report written by quantize --report as a table")
    i.add_argument("report", help="REPORT.json")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="top-1 of a saved quantized model (.pt2 or .onnx) on labelled data")
    e.add_argument("model", help=".pt2 or .onnx written by eptq-fx quantize")
    e.add_argument("--data", required=True, help=".npz with preprocessed inputs and integer labels")
    e.add_argument("--x-key", default="x")
    e.add_argument("--y-key", default="y")
    e.add_argument("--integer-inputs", action="store_true", help="feed integer inputs as they are")
    e.add_argument("--batch-size", type=int, default=256)
    e.set_defaults(func=cmd_eval)
    return parser


def _configure_logging(verbose: int) -> None:
    """``-v`` turns on eptq_fx's own logs; third-party loggers stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("eptq_fx").setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.func(args)
    except EPTQError as e:
        print(f"eptq-fx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = getattr(args, "resume", None)
        hint = f"; run the same command again to resume from {resume}" if resume else \
            " (pass --resume DIR to make a long run resumable)"
        print(f"eptq-fx: interrupted, nothing was written{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
