"""The demo behind ``eptq-fx demo``: quantize a model at a few bit widths and compare accuracy with float.

Built-in default (no downloads): a small residual CNN with BatchNorm trained for a few seconds on scikit-learn's
bundled digits (8x8 grayscale, 1797 images, fixed seeded split); the trained weights are cached under
``.cache/``. With ``data_dir`` it quantizes the pretrained CIFAR-10 ResNet-20/56 from the shared data folder
instead (calibration on a seeded sample of ``train_10k.npz``, accuracy on all of ``test.npz``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eptq_fx.config import EPTQConfig, ReconstructionConfig, parse_bits
from eptq_fx.errors import CalibrationDataError, ConfigError, EPTQError
from eptq_fx.pipeline import quantize
from examples.models import CIFAR_MEAN as RESNET_MEAN
from examples.models import CIFAR_STD as RESNET_STD
from examples.models import load_cifar_resnet

DEPTHS = (20, 56)

logger = logging.getLogger(__name__)

DIGITS_VERSION = "digits_cnn_v1"  # bump when the model or its training changes: invalidates the cache
DEMO_MODELS = ("digits", "resnet20", "resnet56")


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class DemoResult:
    model: str
    method: str
    bits: str  # "W4A8"
    float_acc: float
    quant_acc: float
    seconds: float  # time spent in quantize()


def eptq_available() -> bool:
    """Whether the EPTQ reconstruction stage is importable (RTN always is)."""
    try:
        import eptq_fx.method.reconstruction  # noqa: F401
    except ImportError:
        return False
    return True


def default_methods() -> list[str]:
    return ["rtn", "eptq"] if eptq_available() else ["rtn"]


def format_table(results: Sequence[DemoResult]) -> str:
    header = f"{'model':<10} {'method':<6} {'bits':<6} {'float acc':>9} {'quant acc':>9} {'delta':>7} {'time':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.model:<10} {r.method:<6} {r.bits:<6} {100 * r.float_acc:>8.2f}% {100 * r.quant_acc:>8.2f}% "
                     f"{100 * (r.quant_acc - r.float_acc):>+6.2f}  {r.seconds:>7.1f}s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)


# ----------------------------------------------------------------------------------------- digits CNN
class DigitsNet(nn.Module):
    """conv-BN-ReLU stem, one residual block (conv-BN-ReLU-conv-BN + identity, ReLU), a strided conv-BN-ReLU,
    global average pooling and a linear classifier. Input: (B, 1, 8, 8)."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x))))))
        return self.fc(self.down(x).mean((2, 3)))


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_split(n_test: int = 500, seed: int = 0) -> Split:
    """scikit-learn's digits as (B, 1, 8, 8) float tensors, standardised with training-set statistics."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Split(x[train], y[train], x[test], y[test])


def train_digits_model(split: Split, epochs: int = 15, seed: int = 0) -> DigitsNet:
    """Adam with a one-cycle schedule and one-pixel shift augmentation; a few seconds on one CPU core."""
    threads = torch.get_num_threads()
    # the tensors are tiny: extra OpenMP threads only add synchronisation (30x slower on a busy 2-core box)
    torch.set_num_threads(1)
    try:
        return _train(split, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(split: Split, epochs: int, seed: int) -> DigitsNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        steps_per_epoch = -(-len(split.x_train) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * steps_per_epoch)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(split.x_train))
            for i in range(0, len(order), 64):
                idx = order[i:i + 64]
                xb = split.x_train[idx]
                shift = tuple(int(s) for s in torch.randint(-1, 2, (2,)))
                xb = torch.roll(xb, shifts=shift, dims=(2, 3))  # one-pixel shifts: cheap augmentation
                loss = F.cross_entropy(model(xb), split.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            logger.debug("digits epoch %d: loss %.3f", epoch, float(loss.detach()))
    return model.eval()


def digits_model(split: Split, cache_dir: Path, seed: int = 0, epochs: int = 15) -> DigitsNet:
    """The trained digits CNN, from ``cache_dir`` when it was trained before with the same settings."""
    path = Path(cache_dir) / "eptq_fx" / "demo" / f"{DIGITS_VERSION}_seed{seed}_ep{epochs}.pt"
    if path.is_file():
        try:
            model = DigitsNet()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            logger.info("loaded the trained digits CNN from %s", path)
            return model.eval()
        except (RuntimeError, OSError, EOFError) as e:  # a damaged or stale cache file: retrain
            logger.warning("ignoring the cached digits CNN at %s (%s); retraining", path, e)
    t0 = time.perf_counter()
    model = train_digits_model(split, epochs=epochs, seed=seed)
    logger.info("trained the digits CNN in %.1f s", time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent or interrupted run never sees half a file
    return model


# ----------------------------------------------------------------------------------------- CIFAR-10
def _cifar_preprocess(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(RESNET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(RESNET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def cifar_split(data_dir: Path, n_calib: int, seed: int = 0) -> Split:
    """Calibration: a seeded sample of ``n_calib`` images of train_10k.npz; test: all of test.npz."""
    folder = Path(data_dir) / "cifar10"
    for name in ("train_10k.npz", "test.npz"):
        if not (folder / name).is_file():
            raise CalibrationDataError(f"{folder / name} not found: --data must point at the shared data folder "
                                       f"(the one holding cifar10/ and weights/).")
    train, test = np.load(folder / "train_10k.npz"), np.load(folder / "test.npz")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train["x"]), size=min(n_calib, len(train["x"])), replace=False))
    return Split(_cifar_preprocess(train["x"][idx]), torch.from_numpy(train["y"][idx]).long(),
                 _cifar_preprocess(test["x"]), torch.from_numpy(test["y"]).long())


def cifar_model(data_dir: Path, name: str) -> nn.Module:
    depth = int(name.removeprefix("resnet"))
    files = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}
    return load_cifar_resnet(depth, Path(data_dir) / "weights" / files[depth])


# ---------------------------------------------------------------------------------------------- demo
def demo_config(weight_bits: int, act_bits: int, method: str, n_calib: int, seed: int = 0,
                iters: int | None = None) -> EPTQConfig:
    """The library defaults; ``iters`` shortens EPTQ's per-block optimisation."""
    recon = ReconstructionConfig() if iters is None else ReconstructionConfig(iters=iters)
    return EPTQConfig(weight_bits=weight_bits, act_bits=act_bits, method=method, n_calib=n_calib, seed=seed,
                      reconstruction=recon)


def run_demo(model: str = "digits", data_dir: str | Path | None = None, bits: Sequence[str] = ("W4A4", "W2A4"),
             methods: Sequence[str] | None = None, n_calib: int = 1024, seed: int = 0,
             cache_dir: str | Path = ".cache", progress: bool = False, iters: int | None = None,
             on_result: Callable[[DemoResult], None] | None = None) -> list[DemoResult]:
    """Quantize ``model`` at every (method, bits) pair and measure accuracy against float.

    ``model="digits"`` trains (or loads from ``cache_dir``) the built-in digits CNN; ``"resnet20"`` /
    ``"resnet56"`` need ``data_dir`` (the shared data folder). ``methods`` defaults to RTN plus EPTQ when the
    reconstruction stage is available; ``iters`` overrides EPTQ's optimisation steps per block.
    ``on_result`` is called with each row as soon as it is measured."""
    if model not in DEMO_MODELS:
        raise ConfigError(f"demo model must be one of {DEMO_MODELS}, got {model!r}.")
    methods = list(methods) if methods is not None else default_methods()
    pairs = [parse_bits(b) for b in bits]
    if "eptq" in methods and not eptq_available():
        raise ConfigError("method 'eptq' needs eptq_fx.method.reconstruction, which is not importable in this install.")
    for method in methods:  # validate every setting before spending minutes on the first one
        for w, a in pairs:
            demo_config(w, a, method, n_calib, seed, iters)
    if model == "digits":
        split = digits_split(seed=seed)
        net = digits_model(split, Path(cache_dir), seed=seed)
    else:
        if data_dir is None:
            raise ConfigError(f"the {model} demo needs data_dir (the shared data folder with cifar10/ and weights/).")
        if int(model.removeprefix("resnet")) not in DEPTHS:
            raise ConfigError(f"unknown CIFAR ResNet {model!r}.")
        split = cifar_split(Path(data_dir), n_calib, seed)
        net = cifar_model(Path(data_dir), model)
    calib = split.x_train[torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))[:n_calib]]
    float_acc = accuracy(net, split.x_test, split.y_test)
    logger.info("%s float accuracy %.2f%% (%d test samples)", model, 100 * float_acc, len(split.x_test))
    results = []
    for method in methods:
        for (w, a), label in zip(pairs, bits):
            t0 = time.perf_counter()
            quantized = quantize(net, calib, demo_config(w, a, method, n_calib, seed, iters),
                                 progress=progress)
            seconds = time.perf_counter() - t0
            row = DemoResult(model, method, label.upper(), float_acc,
                             accuracy(quantized, split.x_test, split.y_test), seconds)
            results.append(row)
            if on_result is not None:
                on_result(row)
    return results


# ------------------------------------------------------------------------------------------ command
def cmd_demo(args: argparse.Namespace) -> int:
    model = args.model or ("resnet20" if args.data else "digits")
    # digits tensors are tiny: a second OpenMP thread only adds synchronisation, which costs a lot on a busy
    # machine (training measured 8 s with 1 thread vs 220 s with 2 on a loaded 2-core box)
    threads = args.threads or (1 if model == "digits" else None)
    if threads:
        torch.set_num_threads(threads)
    methods = _csv(args.method) if args.method else default_methods()
    bits = _csv(args.bits)
    where = f"CIFAR-10 (JPEG copy) from {args.data}" if args.data else "scikit-learn digits"
    print(f"eptq-fx demo: {model} on {where}; methods {', '.join(methods)}; bits {', '.join(bits)}", flush=True)
    rows = run_demo(model=model, data_dir=args.data, bits=bits, methods=methods, n_calib=args.n_calib,
                    seed=args.seed, cache_dir=args.cache_dir, progress=args.progress, iters=args.iters,
                    on_result=lambda r: print(f"  done: {r.method} {r.bits} in {r.seconds:.1f} s: top-1 "
                                              f"{100 * r.quant_acc:.2f}% (float {100 * r.float_acc:.2f}%)", flush=True))
    print()
    print(format_table(rows))
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    demo = argparse.ArgumentParser(prog="python -m examples.demo",
                                   description="quantize a small model and compare accuracy with float")
    demo.add_argument("--data", default=None, help="shared data folder (cifar10/, weights/); default: built-in "
                                                    "digits demo")
    demo.add_argument("--model", default=None, choices=("digits", "resnet20", "resnet56"),
                      help="default: digits, or resnet20 with --data")
    demo.add_argument("--bits", default="W4A4,W2A4", help="comma-separated, e.g. W8A8,W4A8,W4A4 (default W4A4,W2A4: "
                                                         "where rounding alone loses accuracy)")
    demo.add_argument("--method", default=None, help="comma-separated rtn,eptq (default: rtn, plus eptq when "
                                                     "available)")
    demo.add_argument("--n-calib", type=int, default=1024, help="calibration samples (default 1024)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cache-dir", default=".cache", help="where the trained digits CNN is cached")
    demo.add_argument("--iters", type=int, default=None, help="EPTQ optimisation steps per block (default: "
                                                               "the library's, ReconstructionConfig.iters = 500)")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for digits, "
                                                                  "torch's default otherwise)")
    demo.add_argument("--progress", action="store_true", help="show progress bars")

    demo.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs")
    return demo


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_demo(args)
    except EPTQError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
