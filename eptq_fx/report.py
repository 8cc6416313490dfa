"""Per-layer report of a quantization run: ``eptq_fx.report(quantized)``.

``quantize`` records what it decided and measured in ``gm.meta[RUN_RECORD]`` (see ``record_layers`` and
``record_sqnr``): per layer the bit widths, weight / activation scales, the label-free Hessian score (mean over
samples), the output SQNR against float after round-to-nearest and after reconstruction, the block; per run the
calibration samples and the time of each stage. ``report`` turns that into a JSON-able dict with the model size
in bytes; ``format_table`` prints it, ``plot_report`` draws sensitivity and SQNR per layer.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.fx as fx

from eptq_fx.atomic_io import write_atomically
from eptq_fx.errors import ConfigError
from eptq_fx.graph.meta import BLOCK, LAYER_QUANT, RUN_RECORD

logger = logging.getLogger(__name__)

SQNR_SAMPLES = 128  # calibration samples the per-layer SQNR is measured on
REPORT_VERSION = 1


def _stats(t: torch.Tensor) -> dict:
    t = t.detach().float().flatten()
    return {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}


def record_layers(prepared: fx.GraphModule) -> list[dict]:
    """Static facts of every quant op of a prepared graph: name, widths, scales, block."""
    from eptq_fx.numerics.quantizers import ActQuantizer, QuantWeightOp

    modules = dict(prepared.named_modules())
    layers = []
    for node in prepared.graph.nodes:
        lq = node.meta.get(LAYER_QUANT)
        if lq is None:
            continue
        entry = {"name": lq.name, "node": node.name, "weight_bits": lq.weight_bits, "act_bits": lq.act_bits,
                 "block": node.meta.get(BLOCK), "weight_scale": None, "act_scale": None, "weight_numel": 0}
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, QuantWeightOp):
            entry["weight_numel"] = mod.weight.numel()
            if mod.weight_quant.mode != "off":
                entry["weight_scale"] = _stats(mod.weight_quant.scale)
        acts = [a for a in node.args if isinstance(a, fx.Node) and a.op == "call_module"
                and isinstance(modules.get(a.target), ActQuantizer)]
        if acts:
            entry["act_scale"] = float(modules[acts[0].target].scale.detach().flatten()[0])
        layers.append(entry)
    return layers


@torch.no_grad()
def record_sqnr(prepared: fx.GraphModule, calib) -> dict[str, float]:
    """Output SQNR (dB) of every weight op, the whole model quantized against the whole model in float."""
    from eptq_fx.graph.passes.qdq_insertion import weight_ops
    from eptq_fx.numerics.calibration import quant_disabled

    ops = weight_ops(prepared)
    inputs = calib.take(torch.arange(min(SQNR_SAMPLES, calib.n)))
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in ops}

    def grab(name):
        def hook(module, args, out) -> None:
            outs[name].append(out.detach())
        return hook

    hooks = [op.register_forward_hook(grab(n)) for n, op in ops.items()]
    try:
        with quant_disabled(prepared):
            prepared(*inputs)
        prepared(*inputs)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, (ref, q) in ((n, o) for n, o in outs.items() if len(o) == 2):
        err = float((q - ref).pow(2).sum())
        result[name] = 10 * math.log10(float(ref.pow(2).sum()) / err) if err > 0 else float("inf")
    return result


def model_bytes(float_gm: torch.nn.Module, layers: list[dict]) -> tuple[int, int]:
    """(bytes of the float model's floating-point parameters and buffers, the same with every quantized weight
    stored at its bit width; scales, biases and the rest counted as they are)."""
    float_bytes = sum(t.numel() * t.element_size() for t in float_gm.state_dict().values() if t.is_floating_point())
    saved = sum(r["weight_numel"] * (4 - r["weight_bits"] / 8) for r in layers if r["weight_bits"])
    return int(float_bytes), int(round(float_bytes - saved))


def report(quantized: torch.nn.Module) -> dict:
    """The run's report (see the module docstring); ``quantized`` is what ``eptq_fx.quantize`` returned."""
    meta = getattr(quantized, "meta", None)
    record = meta.get(RUN_RECORD) if isinstance(meta, dict) else None
    if record is None:
        raise ConfigError("This model carries no run record; pass the GraphModule eptq_fx.quantize returned.")
    hess = record.get("hessian") or {}
    before, after = record.get("sqnr_rtn") or {}, record.get("sqnr_final") or {}
    layers = []
    for entry in record["layers"]:
        row = dict(entry)
        row["hessian"] = hess.get(entry["node"])
        row["sqnr_rtn_db"] = before.get(entry["name"])
        row["sqnr_db"] = after.get(entry["name"])
        layers.append(row)
    q_weight_bytes = sum(r["weight_numel"] * r["weight_bits"] / 8 for r in layers if r["weight_bits"])
    totals = {"float_bytes": record["float_bytes"], "quantized_bytes": record["quantized_bytes"],
              "quantized_weight_bytes": int(round(q_weight_bytes)), "calibration_samples": record["n_calib"],
              "stage_seconds": record["stage_seconds"], "reconstruction": record.get("reconstruction")}
    return {"version": REPORT_VERSION, "config": record.get("config"), "layers": layers, "totals": totals,
            "mixed_precision": record.get("mixed_precision")}


def write_report(rep: dict, path: str | Path) -> None:
    """Write ``rep`` as JSON atomically (a temporary file renamed into place)."""
    write_atomically(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(rep, indent=1, default=str)))


def read_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; write one with eptq-fx quantize --report {path}.")
    try:
        rep = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON report ({e.__class__.__name__}); give a file from --report.") from e
    if not isinstance(rep, dict) or "layers" not in rep or "totals" not in rep:
        raise ConfigError(f"{path} is JSON but not an eptq-fx report; give a file written by --report.")
    return rep


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# what the network-level fallback kept (method/fallback.py), as format_table says it
_OUTCOME = {"eptq": "kept (closer to float than round-to-nearest on the held-out calibration samples)",
            "partial": "kept, with the {} quantizers of the blocks whose held-out loss had risen back at "
                       "round-to-nearest (the whole result was further from float than round-to-nearest)",
            "rtn": "discarded: round-to-nearest kept in all {} quantizers (EPTQ was further from float on the "
                   "held-out calibration samples)",
            "unchecked": "kept without the network-level test (fallback=False)"}


def format_table(rep: dict) -> str:
    """The report as a fixed-width table, one line per layer, then the totals."""
    head = f"{'layer':<28} {'blk':>3} {'W':>3} {'A':>3} {'w scale med':>11} {'a scale':>9} {'hessian':>10} " \
           f"{'SQNR rtn':>8} {'SQNR':>7}"
    lines = [head, "-" * len(head)]
    for r in rep["layers"]:
        ws = (r.get("weight_scale") or {}).get("median")
        lines.append(f"{r['name'][:28]:<28} {_fmt(r.get('block'), 'd'):>3} {_fmt(r['weight_bits'], 'd'):>3} "
                     f"{_fmt(r['act_bits'], 'd'):>3} {_fmt(ws, '.3g'):>11} {_fmt(r.get('act_scale'), '.3g'):>9} "
                     f"{_fmt(r.get('hessian'), '.3g'):>10} {_fmt(r.get('sqnr_rtn_db'), '.1f'):>8} "
                     f"{_fmt(r.get('sqnr_db'), '.1f'):>7}")
    t = rep["totals"]
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in t["stage_seconds"].items())
    lines.append("")
    lines.append(f"model size: {t['float_bytes']:,} B float -> {t['quantized_bytes']:,} B quantized "
                 f"({t['quantized_weight_bytes']:,} B of quantized weights); {t['calibration_samples']} "
                 f"calibration samples; {stages}")
    outcome = t.get("reconstruction")
    if outcome:
        lines.append("reconstruction: " + _OUTCOME[outcome["kept"]].format(len(outcome["reverted"])))
    mp = rep.get("mixed_precision")
    if mp:
        lines.append(f"mixed precision: {mp['used_bytes']:,} of {mp['budget_bytes']:,} B budget "
                     f"(8-bit: {mp['uniform8_bytes']:,} B)")
    return "\n".join(lines)


def plot_report(rep: dict, path: str | Path) -> None:
    """Per layer: Hessian sensitivity (log bars) and output SQNR after RTN and after reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r for r in rep["layers"] if r["weight_bits"] is not None]
    names = [f"{r['name']} (W{r['weight_bits']})" for r in layers]
    x = range(len(layers))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(layers) + 2), 6.5), sharex=True)
    ax1.bar(x, [r.get("hessian") or 0 for r in layers], color="tab:purple")
    ax1.set_yscale("log")
    ax1.set_ylabel("label-free Hessian\n(mean tr(J^T J))")
    ax1.set_title("Per-layer sensitivity and output SQNR vs float")
    for key, label, style in (("sqnr_rtn_db", "round-to-nearest", "o--"), ("sqnr_db", "final", "s-")):
        vals = [r.get(key) for r in layers]
        if any(v is not None for v in vals):
            ax2.plot(list(x), [math.nan if v is None else v for v in vals], style, label=label)
    ax2.set_ylabel("output SQNR (dB)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


@torch.no_grad()
def evaluate_top1(model_path: str | Path, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                  progress: bool = False) -> float:
    """Top-1 (fraction) of a saved ``.pt2`` (torch.export) or ``.onnx`` model on ``x`` / ``y``."""
    from tqdm.auto import tqdm

    path = Path(model_path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        run = lambda xb: torch.from_numpy(sess.run(None, {name: xb.numpy()})[0])  # noqa: E731
    else:
        from eptq_fx.export import load

        module = load(path).module()
        run = lambda xb: module(xb)  # noqa: E731
    correct = 0
    for i in tqdm(range(0, len(x), batch_size), desc="eval", disable=not progress):
        out = run(x[i:i + batch_size])
        out = out[0] if isinstance(out, (tuple, list)) else out
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)
