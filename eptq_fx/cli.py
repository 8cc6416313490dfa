"""Command line: ``eptq-fx quantize`` (the demo lives in ``examples/demo.py``, run by ``make demo``)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eptq_fx import distributed
from eptq_fx.errors import CalibrationDataError, ConfigError, EPTQError, ModelError

logger = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------- loading
def load_model(model_module: str | None, checkpoint: str | None) -> nn.Module:
    """``pkg.mod:factory`` builds the model (a callable with no arguments, or an nn.Module attribute);
    ``checkpoint`` is a ``torch.save``'d full model, or a state_dict loaded into the built model."""
    if model_module is None and checkpoint is None:
        raise ConfigError("Give --model-module pkg.mod:factory, --checkpoint model.pt, or both.")
    model = None
    if model_module is not None:
        mod_name, sep, attr = model_module.partition(":")
        if not sep or not mod_name or not attr:
            raise ConfigError(f"--model-module looks like pkg.mod:factory, got {model_module!r}.")
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules of the current project are found
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"Cannot load {model_module!r}: {e}.") from e
        finally:
            sys.path.pop(0)
        model = obj if isinstance(obj, nn.Module) else obj()
        if not isinstance(model, nn.Module):
            raise ModelError(f"{model_module} returned a {type(model).__name__}, not an nn.Module.")
    if checkpoint is not None:
        # a full pickled model needs weights_only=False: only load checkpoints you trust
        blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if isinstance(blob, nn.Module):
            if model is not None:
                raise ConfigError(f"{checkpoint} holds a whole model; drop --model-module or save a state_dict.")
            model = blob
        elif isinstance(blob, dict):
            if model is None:
                raise ConfigError(f"{checkpoint} holds a state_dict: add --model-module to build the model first.")
            state = blob.get("state_dict", blob)
            model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        else:
            raise ModelError(f"{checkpoint} holds a {type(blob).__name__}, neither a model nor a state_dict.")
    return model.eval()


def load_calibration(path: str, key: str | None = None):
    """Model inputs, already preprocessed, samples on dim 0: a ``.npz`` array (``key``, else ``x``, else the
    only array) or a ``.pt`` file holding a tensor, a tuple of tensors (one per input) or a dict by input name."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"Calibration file {p} not found.")
    if p.suffix == ".npz":
        arrays = np.load(p)
        if key is None:
            key = "x" if "x" in arrays.files else (arrays.files[0] if len(arrays.files) == 1 else None)
        if key is None or key not in arrays.files:
            raise CalibrationDataError(f"{p} holds {arrays.files}; choose the model input with --calib-key.")
        x = torch.from_numpy(arrays[key])
        return x.float() if not x.is_floating_point() else x
    if p.suffix in (".pt", ".pth"):
        blob = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(blob, torch.Tensor):
            return blob
        if isinstance(blob, (tuple, list)):
            return [tuple(blob)]  # one batch holding every input
        if isinstance(blob, dict):
            return [blob[key]] if key is not None else [blob]
        raise CalibrationDataError(f"{p} holds a {type(blob).__name__}; save a tensor, tuple or dict of tensors.")
    raise CalibrationDataError(f"Calibration data must be a .npz or .pt file, got {p.name}.")


# ------------------------------------------------------------------------------------------ commands
def cmd_quantize(args: argparse.Namespace) -> int:
    from eptq_fx.config import EPTQConfig, parse_bits
    from eptq_fx.export import export, export_onnx
    from eptq_fx.pipeline import quantize

    w_bits, a_bits = parse_bits(args.bits)
    config = EPTQConfig(weight_bits=w_bits, act_bits=a_bits, method=args.method, n_calib=args.n_calib,
                        seed=args.seed)
    model = load_model(args.model_module, args.checkpoint)
    calib = load_calibration(args.calib, args.calib_key)
    t0 = time.perf_counter()
    quantized = quantize(model, calib, config, resume_dir=args.resume, progress=args.progress)
    seconds = time.perf_counter() - t0
    sample = _first_samples(calib, quantized)
    agreement = _agreement(model, quantized, sample)
    print(f"quantized with {args.method} at {args.bits.upper()} in {seconds:.1f} s; {agreement}")
    if args.out and distributed.is_lead():  # under torchrun every rank holds the same result: one writes
        out = Path(args.out)
        if out.suffix == ".onnx":
            export_onnx(quantized, sample, out)
        else:
            export(quantized, sample, out)
        print(f"wrote {out}")
    return 0


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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eptq-fx", description="EPTQ post-training quantization (torch.fx).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs, -vv: debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize your model and save it (torch.export .pt2 or .onnx)")
    q.add_argument("--model-module", default=None, help="pkg.mod:factory building the model")
    q.add_argument("--checkpoint", default=None, help="torch.save'd full model, or a state_dict for "
                                                      "--model-module's model")
    q.add_argument("--calib", required=True, help=".npz or .pt file of preprocessed model inputs (dim 0: samples)")
    q.add_argument("--calib-key", default=None, help="array name in the .npz (default x) or key in a .pt dict")
    q.add_argument("--bits", default="W8A8", help="e.g. W4A8")
    q.add_argument("--method", default="eptq", choices=("eptq", "rtn"))
    q.add_argument("--n-calib", type=int, default=1024)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="output: .pt2 (torch.export) or .onnx (needs the onnx extra)")
    q.add_argument("--resume", default=None, help="directory for per-block checkpoints (EPTQ resumes from it)")
    q.add_argument("--progress", action="store_true", help="show progress bars")
    q.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EPTQError as e:
        print(f"eptq-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
