"""CPU cost of EPTQ at ImageNet size: time of every stage and peak RSS, per model.

    python -m benchmarks.scale --models resnet18 mobilenet_v2 deit_tiny --n-calib 1024 --iters 500

Models are torchvision / timm architectures with random-init weights (timing only, no accuracy), inputs are
CIFAR-10 (JPEG copy) training images resized to 224×224 with ImageNet normalisation. Stages: capture,
prepare (BN folding, Q/DQ insertion, weight thresholds), calibration, label-free Hessian, each reconstruction
block, convert. Peak RSS is the process's high-water mark after each stage (``ru_maxrss``), so run one model
per process (``--models`` one at a time) for per-model peaks. Results go to benchmarks/results/scale.json.

    python -m benchmarks.scale --models resnet18 --n-calib 64 --mct-gptq-steps 4

times MCT GPTQ on the same model and images instead (before its first step, per step; scale_mct.json).

    THP_MEM_ALLOC_ENABLE=1 python -m benchmarks.scale --models resnet18 --end-to-end --threads 2

times one default ``eptq_fx.quantize(model, images, EPTQConfig(weight_bits=4, act_bits=8))`` call end to end
(what a user runs: the report's SQNR passes included), its stages from ``eptq_fx.report`` (scale_e2e.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Preprocessing, load_calibration
from benchmarks.shim import ensure_torchvision_importable

IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
RESULTS = Path(__file__).parent / "results" / "scale.json"


def build(name: str) -> torch.nn.Module:
    ensure_torchvision_importable()
    torch.manual_seed(0)
    if name == "deit_tiny":
        import timm
        return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    import torchvision
    return getattr(torchvision.models, name)(weights=None).eval()


def images(n: int) -> torch.Tensor:
    x = load_calibration("cifar10", IMAGENET, n=n)
    return F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _BlockTimes(logging.Handler):
    """Collects the per-block seconds the reconstruction logs (its last argument)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("block %d (%s)"):
            self.seconds.append(float(record.args[-1]))


def run(name: str, n_calib: int, iters: int, hessian_batch: int, threads: int | None,
        report: tuple[int, int] | None = None, precision: tuple[str, str] = ("float32", "float32"),
        skip_hessian: bool = False) -> dict:
    import eptq_fx
    from eptq_fx.method.hessian_stage import HessianEstimate, estimate_hessian
    from eptq_fx.method.reconstruction import reconstruct

    stages: dict[str, float] = {}
    model, x = build(name), images(n_calib)
    if threads:  # after the torchvision / timm imports, which can reset the thread count
        torch.set_num_threads(threads)
    cache = tempfile.mkdtemp(prefix="eptq_scale_")
    base = eptq_fx.EPTQConfig(weight_bits=4, act_bits=8, n_calib=n_calib)
    config = dataclasses.replace(
        base, hessian=dataclasses.replace(base.hessian, cache_dir=cache, batch_size=hessian_batch,
                                          **({} if report is None else
                                             {"report_samples": report[0], "report_probes": report[1]})),
        reconstruction=dataclasses.replace(base.reconstruction, iters=iters, cache_precision=precision[0],
                                           compute_precision=precision[1]))
    t = time.perf_counter()
    gm = eptq_fx.capture(model, (x[:2],))
    stages["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    prepared = eptq_fx.prepare(gm, config, example_inputs=(x[:2],))
    stages["prepare"] = time.perf_counter() - t
    t = time.perf_counter()
    eptq_fx.calibrate(prepared, x, config=config, progress=False)
    stages["calibrate"] = time.perf_counter() - t
    rss = {"after calibrate": peak_rss_gb()}
    from eptq_fx.data import CalibSet
    t = time.perf_counter()
    calib = CalibSet((x,))
    # its own stage, timed alone; skipped: the report's sensitivity column stays empty, nothing else changes
    hessian = HessianEstimate(None, None, None, False) if skip_hessian else \
        estimate_hessian(prepared, calib, config, progress=False)
    stages["hessian"] = time.perf_counter() - t
    rss["after hessian"] = peak_rss_gb()
    handler = _BlockTimes()
    logging.getLogger("eptq_fx.method.reconstruction").addHandler(handler)
    logging.getLogger("eptq_fx.method.reconstruction").setLevel(logging.INFO)
    t = time.perf_counter()
    reconstruct(prepared, calib, config, progress=False, hessian=hessian)
    stages["reconstruct"] = time.perf_counter() - t
    rss["after reconstruct"] = peak_rss_gb()
    t = time.perf_counter()
    eptq_fx.convert(prepared)
    stages["convert"] = time.perf_counter() - t
    return {"model": name, "n_calib": n_calib, "iters": iters, "threads": torch.get_num_threads(),
            "report_samples": config.hessian.report_samples, "report_probes": config.hessian.report_probes,
            "cache_precision": precision[0], "compute_precision": precision[1], "hessian_skipped": skip_hessian,
            "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "blocks_s": [round(s, 2) for s in handler.seconds], "peak_rss_gb": {k: round(v, 2) for k, v in rss.items()}}


def run_mct_gptq(name: str, n_calib: int, steps: int, threads: int | None) -> dict:
    """MCT 2.6.1 GPTQ (its EPTQ) on the same model and images, W4A8, ``steps`` network-wise optimisation steps:
    the time before its first step (statistics, PTQ, Hessian scores) and per step, from MCT's per-step log
    callback (benchmarks/peers/mct_gptq.py)."""
    from benchmarks.peers import mct_gptq

    model, x = build(name), images(n_calib)
    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    out = mct_gptq.run(model, x, 4, 8, steps=steps)
    wall = time.perf_counter() - t
    d = out.details
    return {"model": name, "method": "mct_gptq", "n_calib": n_calib, "steps": d.get("steps_run"),
            "threads": torch.get_num_threads(), "wall_s": round(wall, 2),
            "before_first_step_s": round(d.get("before_first_step_s", float("nan")), 2),
            "s_per_step": round(d.get("s_per_step", float("nan")), 3), "peak_rss_gb": round(peak_rss_gb(), 2),
            "weight_bits_used": d.get("weight_bits_used")}


def run_end_to_end(name: str, n_calib: int, threads: int | None, device: str = "cpu") -> dict:
    """One default quantize call, wall time and the stages its report records; only the Hessian's disk cache is
    off (a second run would otherwise read the scores instead of computing them). ``device="cuda"`` puts the
    model and the images on the GPU first, as a user with one would; the row then adds the GPU's peak memory."""
    import eptq_fx

    model, x = build(name).to(device), images(n_calib).to(device)
    if threads:
        torch.set_num_threads(threads)
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = eptq_fx.EPTQConfig(weight_bits=4, act_bits=8, n_calib=n_calib)
    config = dataclasses.replace(base, hessian=dataclasses.replace(base.hessian, cache_dir=None))
    handler = _BlockTimes()
    logging.getLogger("eptq_fx.method.reconstruction").addHandler(handler)
    logging.getLogger("eptq_fx.method.reconstruction").setLevel(logging.INFO)
    t = time.perf_counter()
    q = eptq_fx.quantize(model, x, config, progress=False)
    if on_gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    rec = eptq_fx.report(q)
    row = {"model": name, "n_calib": n_calib, "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
           "stages_s": {k: round(v, 1) for k, v in rec["totals"]["stage_seconds"].items()},
           "blocks_s": [round(s, 1) for s in handler.seconds], "peak_rss_gb": round(peak_rss_gb(), 2)}
    if on_gpu:
        row.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   weights_on_device=all(t.device.type == "cuda" for t in q.state_dict().values()))
    return row


def _write(path: Path, rows: list[dict], key) -> None:
    """Add ``rows`` to the JSON list at ``path``, replacing earlier rows of the same ``key``; atomic."""
    old = json.loads(path.read_text()) if path.exists() else []
    keep = [r for r in old if key(r) not in {key(r) for r in rows}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keep + rows, indent=1))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "deit_tiny"])
    parser.add_argument("--n-calib", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--hessian-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report", type=int, nargs=2, metavar=("SAMPLES", "PROBES"), default=None,
                        help="HessianConfig.report_samples / report_probes (default: the library's); "
                             "'--report 1024 100' scores every image with up to 100 probes, as before issue 13")
    parser.add_argument("--precision", nargs=2, metavar=("CACHE", "COMPUTE"), default=("float32", "float32"),
                        help="ReconstructionConfig.cache_precision / compute_precision (float32 or bfloat16)")
    parser.add_argument("--skip-hessian", action="store_true",
                        help="time reconstruction without the report-only Hessian stage")
    parser.add_argument("--mct-gptq-steps", type=int, default=None, metavar="STEPS",
                        help="time MCT GPTQ instead (STEPS network-wise steps; results in scale_mct.json)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time one default eptq_fx.quantize call instead (results in scale_e2e.json)")
    parser.add_argument("--device", default="cpu",
                        help="with --end-to-end: where the model and images are (cpu or cuda; rows on a GPU go "
                             "to scale_gpu.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.end_to_end:
        rows = [run_end_to_end(m, args.n_calib, args.threads, args.device) for m in args.models]
        out = "scale_gpu.json" if torch.device(args.device).type == "cuda" else "scale_e2e.json"
        _write(RESULTS.with_name(out), rows, lambda r: (r["model"], r["n_calib"], r["threads"]))
        for r in rows:
            print(r)
        return
    if args.mct_gptq_steps:
        rows = [run_mct_gptq(m, args.n_calib, args.mct_gptq_steps, args.threads) for m in args.models]
        _write(RESULTS.with_name("scale_mct.json"), rows, lambda r: (r["model"], r["n_calib"], r["steps"]))
        for r in rows:
            print(r)
        return
    rows = [run(m, args.n_calib, args.iters, args.hessian_batch, args.threads, args.report, tuple(args.precision),
                args.skip_hessian) for m in args.models]
    _write(RESULTS, rows, lambda r: (r["model"], r["n_calib"], r["iters"], r.get("report_samples"),
                                     r.get("report_probes"), r.get("cache_precision", "float32"),
                                     r.get("compute_precision", "float32")))
    for r in rows:
        b = r["blocks_s"]
        print(f"{r['model']}: n={r['n_calib']} iters={r['iters']} stages {r['stages_s']} | {len(b)} blocks, "
              f"{sum(b):.1f} s total, max {max(b, default=0):.1f} s | peak RSS {r['peak_rss_gb']} GB")


if __name__ == "__main__":
    main()
