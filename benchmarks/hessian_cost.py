"""Cost of the label-free Hessian stage when it only ranks layers (uniform loss weights, the default).

    python -m benchmarks.hessian_cost --model resnet20 --n-calib 1024 --threads 2

Times ``estimate_hessian`` on one calibrated prepared model three times: scoring every calibration sample with
up to 100 probes (the setting before ``HessianConfig.report_samples``), a seeded subset of 256 samples and the
defaults (``report_samples`` samples, at most ``report_probes`` probes), and compares the subsets' layer means
(all the report and the mixed-precision choice use) with the full estimate: largest relative difference,
Spearman rank correlation, and whether the three most sensitive layers agree. ``--probe-batching``: also times
K Hutchinson probes as K backward passes against one
batched call (``is_grads_batched=True``) on torchvision's ResNet-18 at 224×224 (random weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import eptq_fx
from benchmarks.common import load_calibration
from benchmarks.zoo import get_spec
from eptq_fx.data import CalibSet
from eptq_fx.method.hessian_stage import estimate_hessian


def ranking_cost(model_name: str, n_calib: int) -> None:
    spec = get_spec(model_name)
    model = spec.build()
    x = load_calibration(spec.dataset, spec.prep, n=n_calib)
    cfg = eptq_fx.EPTQConfig(weight_bits=4, act_bits=4, n_calib=n_calib)
    prepared = eptq_fx.prepare(model, cfg, example_inputs=(x[:2],))
    eptq_fx.calibrate(prepared, x, config=cfg, progress=False)
    settings = {"every sample, up to 100 probes": dataclasses.replace(cfg.hessian, report_samples=n_calib,
                                                                      report_probes=100),
                "256 samples": dataclasses.replace(cfg.hessian, report_samples=256),
                f"defaults ({cfg.hessian.report_samples} samples)": cfg.hessian}
    means = {}
    for label, hc in settings.items():
        t = time.perf_counter()
        est = estimate_hessian(prepared, CalibSet((x,)), dataclasses.replace(cfg, hessian=hc), progress=False)
        seconds = time.perf_counter() - t
        means[label] = est.activation.scores.mean(0)
        print(f"{model_name} {label}: {seconds:.1f} s, {est.activation.scores.shape[0]} samples, "
              f"{est.activation.n_probes} probes")
    full = means.pop("every sample, up to 100 probes")
    for label, sub in means.items():
        top = set(full.argsort(descending=True)[:3].tolist()) == set(sub.argsort(descending=True)[:3].tolist())
        print(f"{label} against every sample: layer means max relative difference "
              f"{float(((sub - full).abs() / full).max()):.4f}, Spearman rank correlation {spearman(sub, full):.4f}, "
              f"same 3 most sensitive layers: {top}")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two score vectors (ties broken by position; the scores are continuous)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def probe_batching(k: int = 4, batch: int = 8) -> None:
    from benchmarks.shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision

    model = torchvision.models.resnet18().eval()
    acts = {}
    model.layer1.register_forward_hook(lambda m, i, o: acts.__setitem__("layer1", o))
    model.layer3.register_forward_hook(lambda m, i, o: acts.__setitem__("layer3", o))
    out = model(torch.randn(batch, 3, 224, 224))
    inputs = list(acts.values())
    for _ in range(2):  # the second round is the figure (the first warms up)
        t = time.perf_counter()
        for _ in range(k):
            torch.autograd.grad(out, inputs, grad_outputs=torch.randint(0, 2, out.shape).float() * 2 - 1,
                                retain_graph=True)
        separate = time.perf_counter() - t
        t = time.perf_counter()
        torch.autograd.grad(out, inputs, grad_outputs=torch.randint(0, 2, (k, *out.shape)).float() * 2 - 1,
                            retain_graph=True, is_grads_batched=True)
        batched = time.perf_counter() - t
    print(f"ResNet-18, batch {batch}: {k} probes as {k} backward passes {separate:.2f} s, batched {batched:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--n-calib", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probe-batching", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ranking_cost(args.model, args.n_calib)
    if args.probe_batching:
        torch.set_num_threads(1)
        probe_batching()


if __name__ == "__main__":
    main()
