"""Command line: ``eptq-fx quantize | inspect | eval`` (the demo lives in ``examples/demo.py``, run by ``make demo``).

Every user mistake ends with exit code 2 and one line on stderr that says what to change; everything that can
be checked (files, output paths, extras, options) is checked before any long stage, and nothing is written
unless the run succeeds (outputs are written to a temporary file and renamed into place).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eptq_fx import distributed
from eptq_fx.errors import CalibrationDataError, ConfigError, EPTQError, ModelError

logger = logging.getLogger(__name__)

OUT_SUFFIXES = (".pt2", ".onnx")


@contextlib.contextmanager
def _cwd_on_path():
    """Like ``python -m``: modules of the project the user runs from are importable (model classes of a
    pickled checkpoint, ``--model-module``), without PYTHONPATH=."""
    sys.path.insert(0, str(Path.cwd()))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(Path.cwd()))


def _import_attr(spec: str, what: str):
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{what} looks like pkg.mod:name, got {spec!r}.")
    with _cwd_on_path():
        try:
            return getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"Cannot load {spec!r} for {what}: {e}.") from e


# ------------------------------------------------------------------------------------------- loading
def load_model(model_module: str | None, checkpoint: str | None) -> nn.Module:
    """``pkg.mod:factory`` builds the model (a callable with no arguments, or an nn.Module attribute);
    ``checkpoint`` is a ``torch.save``'d full model, or a state_dict loaded into the built model."""
    if model_module is None and checkpoint is None:
        raise ConfigError("Give --model-module pkg.mod:factory, --checkpoint model.pt, or both.")
    model = None
    if model_module is not None:
        obj = _import_attr(model_module, "--model-module")
        model = obj if isinstance(obj, nn.Module) else obj()
        if not isinstance(model, nn.Module):
            raise ModelError(f"{model_module} returned a {type(model).__name__}, not an nn.Module.")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ConfigError(f"--checkpoint {checkpoint} does not exist; give the path of a torch.save'd file.")
        # a full pickled model needs weights_only=False: only load checkpoints you trust
        with _cwd_on_path():
            try:
                blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
            except (ModuleNotFoundError, AttributeError) as e:
                raise ModelError(f"{checkpoint} pickles a model whose class cannot be imported ({e}); run from "
                                 f"the project that defines it, or save a state_dict and pass --model-module.") from e
            except Exception as e:  # noqa: BLE001 -- torch.load raises many types for a damaged file
                raise ModelError(f"{checkpoint} cannot be read by torch.load ({type(e).__name__}); "
                                 f"give a file written by torch.save.") from e
        if isinstance(blob, nn.Module):
            if model is not None:
                raise ConfigError(f"{checkpoint} holds a whole model; drop --model-module or save a state_dict.")
            model = blob
        elif isinstance(blob, dict):
            if model is None:
                raise ConfigError(f"{checkpoint} holds a state_dict: add --model-module to build the model first.")
            state = blob.get("state_dict", blob)
            state = {k.removeprefix("module."): v for k, v in state.items()}
            _load_state(model, state, checkpoint, model_module)
        else:
            raise ModelError(f"{checkpoint} holds a {type(blob).__name__}, neither a model nor a state_dict.")
    return model.eval()


def _load_state(model: nn.Module, state: dict, checkpoint: str, model_module: str) -> None:
    try:  # torch decides what matches (old checkpoints without BatchNorm's num_batches_tracked still load)
        model.load_state_dict(state)
        return
    except RuntimeError:
        pass
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")] or missing
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) such as {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) such as {unexpected[0]!r}")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es) such as {k!r} {tuple(state[k].shape)} vs "
                         f"{tuple(own[k].shape)}")
        reason = "; ".join(parts)
    else:
        reason = "load_state_dict refused it"
    raise ModelError(f"{checkpoint} does not match the model of {model_module} ({reason}); "
                     f"pass the factory that built this checkpoint.")


def _float_inputs(x: torch.Tensor, where: str, allow_integer: bool) -> torch.Tensor:
    if x.is_floating_point():
        return x
    if x.dtype == torch.uint8 and not allow_integer:
        raise CalibrationDataError(f"{where} holds raw uint8 pixels; save the inputs preprocessed as the model "
                                   f"expects (e.g. x/255, normalised), or pass --integer-inputs to use them as "
                                   f"they are.")
    return x.float() if not allow_integer else x


def load_calibration(path: str, key: str | None = None, allow_integer: bool = False):
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
        return _float_inputs(torch.from_numpy(arrays[key]), f"{p} ({key})", allow_integer)
    if p.suffix in (".pt", ".pth"):
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- a pickled numpy array or object is refused by weights_only
            raise CalibrationDataError(f"{p} does not hold plain tensors ({type(e).__name__}); save a tensor, a "
                                       f"tuple or a dict of tensors with torch.save (torch.from_numpy(a) for "
                                       f"a numpy array).") from e
        if isinstance(blob, torch.Tensor):
            return _float_inputs(blob, str(p), allow_integer)
        if isinstance(blob, (tuple, list)) and blob and all(isinstance(t, torch.Tensor) for t in blob):
            return [tuple(_float_inputs(t, str(p), allow_integer) for t in blob)]  # one batch with every input
        if isinstance(blob, dict) and blob and all(isinstance(t, torch.Tensor) for t in blob.values()):
            if key is not None:
                if key not in blob:
                    raise CalibrationDataError(f"{p} has no key {key!r}; its keys are {sorted(blob)}: fix "
                                               f"--calib-key.")
                return _float_inputs(blob[key], f"{p} ({key})", allow_integer)
            return [{k: _float_inputs(v, str(p), allow_integer) for k, v in blob.items()}]
        raise CalibrationDataError(f"{p} holds a {type(blob).__name__}; save a tensor, tuple or dict of tensors.")
    raise CalibrationDataError(f"Calibration data must be a .npz or .pt file, got {p.name}.")


# ------------------------------------------------------------------------------------------- checking
def check_output_path(path: str | None, suffixes: tuple[str, ...], option: str) -> Path | None:
    """A path we can write at the end of the run: right suffix, existing writable directory."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix not in suffixes:
        raise ConfigError(f"{option} {p} must end in {' or '.join(suffixes)}.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{option}: directory {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: directory {parent} is not writable; choose another location.")
    if p.is_dir():
        raise ConfigError(f"{option} {p} is a directory; give a file name.")
    return p


def _check_extra(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the {module} package: pip install 'eptq_fx[{extra}]'.")


def parse_override(text: str):
    """``name=layer1.0.conv1:w=8,a=8`` / ``regex=layer3\\..*:w=8`` / ``type=torch.nn.Linear:w=none``."""
    from eptq_fx.config import KEEP, Override

    selector, sep, widths = text.partition(":") if not text.startswith("type=") else _split_type(text)
    kind, eq, value = selector.partition("=")
    if kind not in ("name", "regex", "type") or not eq or not value or not sep:
        raise ConfigError(f"--override looks like name=LAYER:w=8,a=8 (or regex=... / type=pkg.mod.Class), "
                          f"got {text!r}.")
    bits = {"weight_bits": KEEP, "act_bits": KEEP}
    for item in widths.split(","):
        k, _, v = item.strip().partition("=")
        field = {"w": "weight_bits", "a": "act_bits"}.get(k)
        if field is None or not v:
            raise ConfigError(f"--override widths look like w=4,a=8 (none = float), got {widths!r}.")
        try:
            bits[field] = None if v.lower() in ("none", "float") else int(v)
        except ValueError as e:
            raise ConfigError(f"--override width {v!r} is not an integer or none.") from e
    if kind == "type":
        cls = _import_class(value)
        return Override(module_type=cls, **bits)
    return Override(**{kind: value}, **bits)


def _split_type(text: str) -> tuple[str, str, str]:
    # a class path has no ':' itself, but allow pkg.mod:Class too: the widths start after the last ':'
    head, sep, tail = text.rpartition(":")
    return head, sep, tail


def _import_class(path: str) -> type:
    if ":" in path:
        obj = _import_attr(path, "--override type")
    else:
        mod, _, attr = path.rpartition(".")
        if not mod:
            raise ConfigError(f"--override type= needs a full class path such as torch.nn.Linear, got {path!r}.")
        obj = _import_attr(f"{mod}:{attr}", "--override type")
    if not isinstance(obj, type):
        raise ConfigError(f"--override type {path!r} is not a class.")
    return obj


def parse_leaf(text: str):
    """A qualified module name (``encoder.attn``) or a class path (``pkg.mod.Class`` / ``pkg.mod:Class``)."""
    if ":" in text:
        return _import_class(text)
    mod, _, attr = text.rpartition(".")
    if mod and attr[:1].isupper():
        return _import_class(text)
    return text


def parse_weight_memory(text: str | None) -> int | float | None:
    if text is None:
        return None
    t = text.strip().lower()
    units = {"kib": 1024, "mib": 1024 ** 2, "kb": 1000, "mb": 1000 ** 2, "b": 1}
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100.0
        for unit, factor in units.items():
            if t.endswith(unit):
                return int(float(t[:-len(unit)]) * factor)
        value = float(t)
    except ValueError as e:
        raise ConfigError(f"--weight-memory is bytes (120000, 120KiB) or a fraction of the 8-bit size (0.5 or "
                          f"50%), got {text!r}.") from e
    return value if value <= 1.0 else int(value)


# ------------------------------------------------------------------------------------------ commands
def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: an interrupted run never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _config_from_args(args: argparse.Namespace):
    from eptq_fx.config import EPTQConfig, HessianConfig, ReconstructionConfig, parse_bits, user_cache_dir

    w_bits, a_bits = parse_bits(args.bits)
    overrides = tuple(parse_override(o) for o in args.override)
    hessian = HessianConfig(cache_dir=str(user_cache_dir() / "hessian") if args.hessian_cache else None)
    rc = ReconstructionConfig() if args.iters is None else ReconstructionConfig(iters=args.iters)
    kw = {} if args.n_calib is None else {"n_calib": args.n_calib}
    return EPTQConfig(weight_bits=w_bits, act_bits=a_bits, method=args.method, seed=args.seed,
                      first_last_8bit=args.first_last_8bit, overrides=overrides, hessian=hessian,
                      reconstruction=rc, weight_memory=parse_weight_memory(args.weight_memory), **kw)


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
            _check_extra(module, "onnx", "--out .onnx")
    if plot_path is not None:
        _check_extra("matplotlib", "plot", "--plot")
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
        if out.suffix == ".onnx":
            _atomic_write(out, lambda p: export_onnx(quantized, example, p, opset_version=args.opset))
        else:
            _atomic_write(out, lambda p: export(quantized, example, p))
        print(f"wrote {out}")
    if report_path is not None or plot_path is not None:
        from eptq_fx.report import plot_report, report, write_report

        rep = report(quantized)
        if report_path is not None:
            write_report(rep, report_path)
            print(f"wrote {report_path}")
        if plot_path is not None:
            _atomic_write(plot_path, lambda p: plot_report(rep, p))
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
        _check_extra("onnxruntime", "onnx", "eval of an .onnx model")
    data = Path(args.data)
    if not data.is_file() or data.suffix != ".npz":
        raise ConfigError(f"--data {data} must be an existing .npz file with inputs (--x-key) and labels (--y-key).")
    arrays = np.load(data)
    for k in (args.x_key, args.y_key):
        if k not in arrays.files:
            raise CalibrationDataError(f"{data} holds {arrays.files}, no {k!r}; choose with --x-key / --y-key.")
    x = _float_inputs(torch.from_numpy(arrays[args.x_key]), f"{data} ({args.x_key})", args.integer_inputs)
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
    q.add_argument("--override", action="append", default=[], metavar="SEL:w=B,a=B",
                   help="per-layer widths: name=LAYER:w=8,a=8, regex=RE:w=8, type=torch.nn.Linear:w=none "
                        "(repeatable; later ones win)")
    q.add_argument("--leaf-module", action="append", default=[], metavar="NAME|CLASS",
                   help="keep a module as an opaque call when tracing: a qualified name or pkg.mod.Class")
    q.add_argument("--weight-memory", default=None, help="mixed precision: weight memory budget in bytes "
                                                         "(120000, 120KiB) or a fraction of the 8-bit size (0.5)")
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
