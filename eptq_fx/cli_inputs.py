"""What the command line reads from the user: model and calibration files, output paths, overrides, leaf
modules and memory budgets, each checked with a one-line typed error before any long stage runs."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eptq_fx.errors import CalibrationDataError, ConfigError, ModelError

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


def float_inputs(x: torch.Tensor, where: str, allow_integer: bool) -> torch.Tensor:
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
        return float_inputs(torch.from_numpy(arrays[key]), f"{p} ({key})", allow_integer)
    if p.suffix in (".pt", ".pth"):
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- a pickled numpy array or object is refused by weights_only
            raise CalibrationDataError(f"{p} does not hold plain tensors ({type(e).__name__}); save a tensor, a "
                                       f"tuple or a dict of tensors with torch.save (torch.from_numpy(a) for "
                                       f"a numpy array).") from e
        if isinstance(blob, torch.Tensor):
            return float_inputs(blob, str(p), allow_integer)
        if isinstance(blob, (tuple, list)) and blob and all(isinstance(t, torch.Tensor) for t in blob):
            return [tuple(float_inputs(t, str(p), allow_integer) for t in blob)]  # one batch with every input
        if isinstance(blob, dict) and blob and all(isinstance(t, torch.Tensor) for t in blob.values()):
            if key is not None:
                if key not in blob:
                    raise CalibrationDataError(f"{p} has no key {key!r}; its keys are {sorted(blob)}: fix "
                                               f"--calib-key.")
                return float_inputs(blob[key], f"{p} ({key})", allow_integer)
            return [{k: float_inputs(v, str(p), allow_integer) for k, v in blob.items()}]
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


def check_extra(module: str, extra: str, what: str) -> None:
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


def parse_weight_candidates(text: str | None) -> tuple[int, ...] | None:
    """``"2,3,4,8"`` → (2, 3, 4, 8); the widths themselves are validated by EPTQConfig."""
    if text is None:
        return None
    try:
        widths = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--weight-candidates is a comma-separated list of bit widths (2,3,4,8), "
                          f"got {text!r}.") from None
    return widths


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
