"""Deployment benchmark: latency, file size and top-1 agreement of each runtime for a quantized model.

    python -m benchmarks.deploy --models resnet20 vit_fmnist --threads 2

For each model: float eager, float ``torch.compile``, torchao PT2E X86InductorQuantizer int8 compiled (freezing
on, as PT2E's Inductor recipe asks), eptq_fx W8A8 through ``compile_for_inductor``, ONNX Runtime on the float
model, on PT2E's int8 program through torch.onnx (where that exports) and on eptq_fx W8A8 / W4A8 / W4A4 (RTN, 256
calibration images); eptq_fx W8A8 with both activation placements (``act_placement="inputs"`` and
``"fusable"``) in Inductor and ORT, W4A8 / W4A4 with the default placement. Latencies are medians over interleaved
rounds (every runtime timed once per round, in turn), so load from other processes on a shared machine hits all
of them alike: read the ratios, not the absolute times. Agreement: top-1 agreement with the reference
GraphModule (the eptq_fx GraphModule of the same bits; float eager for the float runtimes; the PT2E program run
eagerly for PT2E) on the full test set.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import eptq_fx
from benchmarks.common import REPO_ROOT, load_calibration, load_test
from benchmarks.report import replace_section
from benchmarks.zoo import WeightsMissingError, get_spec
from eptq_fx import EPTQConfig
from eptq_fx.export.inductor import compile_for_inductor

RESULTS = REPO_ROOT / "benchmarks" / "results" / "deploy.json"
TITLE = "## Deployment"
EVAL_BATCH = 64  # the latency batch, so compiled models see one more shape (batch 1) only
IDLE_S = 0.2  # pause before each timed segment (see measure)
KEEP_FROM = "Run at commit"  # --write keeps the hand-written text from this line on


def _pt2_size(module, example) -> int:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(module, (example,)), buf)
    return len(buf.getvalue())


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _predict(fn, x: torch.Tensor) -> torch.Tensor:
    """Top-1 over all of ``x`` in batches of EVAL_BATCH (the last one padded, so no new shape is compiled)."""
    preds = []
    with torch.inference_mode():
        for i in range(0, len(x), EVAL_BATCH):
            xb = x[i:i + EVAL_BATCH]
            n = len(xb)
            if n < EVAL_BATCH:
                xb = torch.cat([xb, xb.new_zeros((EVAL_BATCH - n, *xb.shape[1:]))])
            out = fn(xb)
            out = out[0] if isinstance(out, (list, tuple)) else out
            preds.append(out[:n].argmax(1))
    return torch.cat(preds)


def _pt2e_int8(model, calib):
    from benchmarks.peers.torchao_pt2e import run

    return run(model, calib, 8, 8).model


def build_runtimes(name: str, threads: int, workdir: Path) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    spec = get_spec(name)
    model = spec.build()
    calib = load_calibration(spec.dataset, spec.prep, n=256)
    x_test, y_test = load_test(spec.dataset, spec.prep)
    example = calib[:2].clone()
    rt, info = {}, {}
    rt["float eager"] = model
    info["float eager"] = {"ref": "float eager", "size": _pt2_size(model, example)}
    rt["float torch.compile"] = torch.compile(copy.deepcopy(model))
    info["float torch.compile"] = {"ref": "float eager", "size": info["float eager"]["size"]}
    # W8A8 with both activation placements (fusable: join inputs quantized, what int8 backends fuse); the
    # narrower widths with the default placement
    settings = {"W8A8 inputs": (8, 8, "inputs"), "W8A8 fusable": (8, 8, "fusable"), "W4A8": (4, 8, None),
                "W4A4": (4, 4, None)}
    quantized = {}
    for label, (w, a, placement) in settings.items():
        extra = {} if placement is None else {"act_placement": placement}
        cfg = EPTQConfig(method="rtn", weight_bits=w, act_bits=a, n_calib=256, **extra)
        quantized[label] = eptq_fx.quantize(model, calib, cfg, progress=False)
    try:
        pt2e = _pt2e_int8(model, calib)
        rt["PT2E int8 eager"] = pt2e
        info["PT2E int8 eager"] = {"ref": "PT2E int8 eager", "size": _pt2_size(pt2e, example)}
    except Exception as e:  # torchao missing or failing: the row says so
        pt2e = None
        info["PT2E int8 eager"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    if pt2e is not None:
        try:
            rt["PT2E int8 compile (freezing)"] = compile_for_inductor(pt2e, allow_saturation=True)  # same recipe
            info["PT2E int8 compile (freezing)"] = {"ref": "PT2E int8 eager",
                                                    "size": info["PT2E int8 eager"]["size"]}
        except Exception as e:
            info["PT2E int8 compile (freezing)"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    for label in ("W8A8 inputs", "W8A8 fusable"):
        q = quantized[label]
        key = f"eptq_fx {label} GraphModule"
        rt[key], info[key] = q, {"ref": key, "size": _pt2_size(q, example)}
        # on a CPU without VNNI these 8-bit weights saturate in oneDNN: measured anyway, the agreement shows it
        rt[f"eptq_fx {label} compile_for_inductor"] = compile_for_inductor(q, allow_saturation=True)
        info[f"eptq_fx {label} compile_for_inductor"] = {"ref": key, "size": info[key]["size"]}
    float_onnx = workdir / f"{name}_float.onnx"
    torch.onnx.export(model, (example,), str(float_onnx), dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    rt["ORT float"] = _ort_session(float_onnx, threads)
    info["ORT float"] = {"ref": "float eager", "size": float_onnx.stat().st_size}
    if pt2e is not None:  # PT2E's own int8 program through torch.onnx, where that exports
        try:
            pt2e_onnx = workdir / f"{name}_pt2e.onnx"
            torch.onnx.export(pt2e, (example,), str(pt2e_onnx), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
            rt["ORT PT2E int8 (torch.onnx)"] = _ort_session(pt2e_onnx, threads)
            info["ORT PT2E int8 (torch.onnx)"] = {"ref": "PT2E int8 eager", "size": pt2e_onnx.stat().st_size}
        except Exception as e:
            info["ORT PT2E int8 (torch.onnx)"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    for label, q in quantized.items():
        key = f"eptq_fx {label} GraphModule"
        if key not in rt:
            rt[key], info[key] = q, {"ref": key, "size": None}
        path = eptq_fx.export_onnx(q, (example,), workdir / f"{name}_{label.replace(' ', '_')}.onnx")
        rt[f"ORT eptq_fx {label}"] = _ort_session(path, threads)
        info[f"ORT eptq_fx {label}"] = {"ref": key, "size": path.stat().st_size}
    return rt, info, x_test, y_test


def measure(name: str, threads: int, rounds: int, reps: dict[int, int]) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        rt, info, x_test, y_test = build_runtimes(name, threads, Path(tmp))
        preds = {}
        for key, fn in rt.items():
            t0 = time.perf_counter()
            preds[key] = _predict(fn, x_test)
            info[key]["eval_s"] = time.perf_counter() - t0
        lat = {key: {b: [] for b in reps} for key in rt}
        with torch.inference_mode():
            for b in reps:
                xb = x_test[:b].clone()
                for fn in rt.values():
                    fn(xb)  # compile this shape / warm up outside the timed rounds
                for _ in range(rounds):
                    for key, fn in rt.items():
                        # an ONNX Runtime session's threads keep spinning for a while after a run and take the
                        # cores from whatever is timed next (measured: ViT ORT rows about 2x slower right after
                        # another ORT session): every runtime starts from idle cores
                        time.sleep(IDLE_S)
                        t0 = time.perf_counter()
                        for _ in range(reps[b]):
                            fn(xb)
                        lat[key][b].append((time.perf_counter() - t0) / reps[b] * 1000)
    rows = []
    for key in rt:
        ref = preds[info[key]["ref"]]
        rows.append({"runtime": key, "top1": 100 * float((preds[key] == y_test).float().mean()),
                     "agreement": 100 * float((preds[key] == ref).float().mean()), "ref": info[key]["ref"],
                     "size_bytes": info[key]["size"],
                     **{f"ms_b{b}": statistics.median(lat[key][b]) for b in reps}})
    for key, i in info.items():
        if "error" in i:
            rows.append({"runtime": key, "error": i["error"]})
    return {"model": name, "threads": threads, "rounds": rounds, "n_test": len(y_test), "rows": rows}


def markdown(results: list[dict], command: str) -> str:
    out = [TITLE, "", f"`{command}` (one run; latencies are medians of interleaved rounds on a shared 2-core "
           "machine under other load, so compare ratios within a table, not absolute times).", ""]
    for r in results:
        rows = [x for x in r["rows"] if "error" not in x]
        base64 = next(x["ms_b64"] for x in rows if x["runtime"] == "float torch.compile")
        ort64 = next(x["ms_b64"] for x in rows if x["runtime"] == "ORT float")
        out += [f"**{r['model']}**, {r['threads']} threads, full test set ({r['n_test']} images)", "",
                "| runtime | top-1 % | agreement % (vs) | ms batch 1 | ms batch 64 | × float same runtime (b64) | "
                "file KB |", "|---|---|---|---|---|---|---|"]
        for x in rows:
            base = ort64 if x["runtime"].startswith("ORT") else base64
            size = "" if x["size_bytes"] is None else f"{x['size_bytes'] / 1024:.0f}"
            out.append(f"| {x['runtime']} | {x['top1']:.2f} | {x['agreement']:.2f} ({x['ref']}) | {x['ms_b1']:.2f} "
                       f"| {x['ms_b64']:.2f} | {x['ms_b64'] / base:.2f} | {size} |")
        for x in r["rows"]:
            if "error" in x:
                out.append(f"| {x['runtime']} | failed: {' '.join(x['error'].split())} | | | | | |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vit_fmnist"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--write", action="store_true", help="replace the Deployment section of BENCHMARKS.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = []
    for name in args.models:
        try:
            results.append(measure(name, args.threads, args.rounds, {1: 20, 64: 10}))
        except WeightsMissingError as e:
            print(f"skipping {name}: {e}")
    RESULTS.write_text(json.dumps(results, indent=1))
    text = markdown(results, "python -m benchmarks.deploy --models " + " ".join(args.models) +
                    f" --threads {args.threads} --rounds {args.rounds} --write")
    print(text)
    if args.write:
        bench = REPO_ROOT / "BENCHMARKS.md"
        bench.write_text(replace_section(bench.read_text(), text, TITLE, keep_from=KEEP_FROM))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
