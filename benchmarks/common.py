"""Shared benchmark plumbing: where the data lives, how each dataset is preprocessed, the fixed calibration
sample, top-1 evaluation, timing and peak memory.

Every method of a comparison sees exactly the same calibration images (a seeded sample with sorted indices)
and is scored on exactly the same test images, so differences come from the method alone.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parents[1]
CALIB_SEED = 0
TEST_SUBSET_SEED = 1

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Fashion-MNIST training-set statistics (pixel mean / std after scaling to [0, 1]), given for three channels:
# the grayscale images are repeated to RGB so the zoo's 3-channel models (tests/models.py) take them as they are.
FASHION_MNIST_MEAN_STD = ((0.2860,) * 3, (0.3530,) * 3)

# dataset -> (file of the calibration split, file of the test split), relative to the data folder
_SPLITS = {
    "cifar10": ("cifar10/train_10k.npz", "cifar10/test.npz"),
    "fashion_mnist": ("fashion_mnist/train.npz", "fashion_mnist/test.npz"),
}


class DataUnavailableError(FileNotFoundError):
    """The shared evaluation data (or a checkpoint in it) is not where the benchmark looks for it."""


def data_dir() -> Path:
    """``$EPTQ_DATA`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("EPTQ_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def data_file(relative: str) -> Path:
    path = data_dir() / relative
    if not path.is_file():
        raise DataUnavailableError(
            f"{path} not found: put the shared data folder at {REPO_ROOT.parent / 'shared' / 'data'} "
            "or point EPTQ_DATA at it.")
    return path


def data_available(dataset: str = "cifar10") -> bool:
    return all((data_dir() / f).is_file() for f in _SPLITS[dataset])


@dataclass(frozen=True)
class Preprocessing:
    """Scale uint8 pixels to [0, 1], then normalise per channel. Grayscale images (N, H, W) are repeated over
    as many channels as ``mean`` has."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
        channels = len(self.mean)
        x = x.unsqueeze(1).expand(-1, channels, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # -> NCHW
        mean = torch.tensor(self.mean).view(1, channels, 1, 1)
        std = torch.tensor(self.std).view(1, channels, 1, 1)
        return ((x - mean) / std).contiguous()


def _load_npz(relative: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data_file(relative)) as d:
        return d["x"], d["y"]


def calibration_indices(n_total: int, n: int, seed: int = CALIB_SEED) -> np.ndarray:
    """A fixed seeded sample of ``n`` indices out of ``n_total``, sorted (identical for every method)."""
    if not 0 < n <= n_total:
        raise ValueError(f"n must be in 1..{n_total}, got {n}")
    idx = np.random.default_rng(seed).choice(n_total, size=n, replace=False)
    idx.sort()
    return idx


def load_calibration(dataset: str, prep: Preprocessing, n: int = 1024, seed: int = CALIB_SEED) -> torch.Tensor:
    """``n`` preprocessed calibration images from the dataset's training split (CIFAR-10: train_10k)."""
    x, _ = _load_npz(_SPLITS[dataset][0])
    return prep(x[calibration_indices(len(x), n, seed)])


def load_test(dataset: str, prep: Preprocessing, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed test split and its labels. ``limit`` takes a seeded random subset, because the
    CIFAR-10 test file is stored class by class (its first 2000 images are only two classes)."""
    x, y = _load_npz(_SPLITS[dataset][1])
    if limit is not None and limit < len(x):
        idx = calibration_indices(len(x), limit, TEST_SUBSET_SEED)
        x, y = x[idx], y[idx]
    return prep(x), torch.from_numpy(np.asarray(y)).long()


def load_train(dataset: str, prep: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training split (for benchmarks/train_models.py)."""
    x, y = _load_npz(_SPLITS[dataset][0])
    return prep(x), torch.from_numpy(np.asarray(y)).long()


def evaluate_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent over all of ``x``."""
    try:
        model.eval()
    except NotImplementedError:  # exported (PT2E) programs refuse .eval(); their peer already set eval mode
        pass
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size])
            if isinstance(out, (list, tuple)):  # some exported / fake-quant models return a 1-tuple
                out = out[0]
            correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(x)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock) and ``t.cpu_seconds`` (CPU time of this
    process, all threads). On a shared machine the CPU time is the steadier figure: wall time stretches
    with other processes' load, CPU time much less."""

    def __enter__(self) -> Timer:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        self.seconds = self.cpu_seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB). Peak RSS is
    per process and never goes down, which is why compare.py runs every method in a fresh subprocess."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20
