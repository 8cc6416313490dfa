"""Reproducibility: ``EPTQConfig.seed`` alone fixes every random choice of a run (activation-observer sampling,
the weight-Hessian sample subset, Hutchinson probes, QDrop masks, the order reconstruction draws samples in), so
two runs give bit-identical integer weights whatever the global RNGs hold; the numba kernels give bit-identical
results when called again and with another thread count."""
from __future__ import annotations

import dataclasses
import random

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.numerics import kernels
from eptq_fx.numerics.quantizers import MAX_OBSERVED
from tests.helpers_resume import integer_state

# weight_range="hmse" draws a weight-Hessian subset (weight_samples < n_calib); qdrop > 0 draws masks
CONFIG = EPTQConfig(
    weight_bits=4, act_bits=4, n_calib=64, calib_batch_size=32, weight_range="hmse", seed=3,
    hessian=HessianConfig(max_probes=3, min_probes=2, weight_samples=16, weight_probes=2, cache_dir=None),
    reconstruction=ReconstructionConfig(iters=10, batch_size=8, qdrop=0.5),
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = h + F.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def model() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net().eval()


IMAGES = torch.randn(CONFIG.n_calib, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def run(config: EPTQConfig, global_seed: int) -> dict[str, torch.Tensor]:
    """A full EPTQ run after scrambling every global RNG the code could (wrongly) depend on."""
    torch.manual_seed(global_seed)
    np.random.seed(global_seed)
    random.seed(global_seed)
    return integer_state(eptq_fx.quantize(model(), IMAGES, config, progress=False))


def test_observer_subsampling_is_exercised():
    """The activation observer keeps a seeded random subset once a batch exceeds MAX_OBSERVED // 64 values;
    the first activation (8 x 16 x 16 per sample) does here."""
    assert CONFIG.calib_batch_size * 8 * 16 * 16 > MAX_OBSERVED // 64


@pytest.fixture(scope="module")
def first_run() -> dict[str, torch.Tensor]:
    return run(CONFIG, global_seed=1)


def test_same_seed_gives_bit_identical_integer_weights(first_run):
    second = run(CONFIG, global_seed=2)
    assert sorted(second) == sorted(first_run)
    differ = [k for k in first_run if not torch.equal(first_run[k], second[k])]
    assert not differ, f"two runs with seed {CONFIG.seed} differ in {differ}"
    assert any(k.endswith("_weight_int") for k in first_run)


def test_another_seed_changes_the_result(first_run):
    """The seed is really what drives the random choices (otherwise the test above proves nothing)."""
    other = run(dataclasses.replace(CONFIG, seed=CONFIG.seed + 1), global_seed=1)
    assert any(not torch.equal(first_run[k], other[k]) for k in first_run if k.endswith(("_int", "_bias")))


# ------------------------------------------------------------------------------------------- kernels
def _kernel_calls() -> dict[str, callable]:
    g = np.random.default_rng(0)
    w = g.standard_normal((48, 300)).astype(np.float32)
    h = g.random((48, 300)).astype(np.float32)
    x = np.concatenate([g.standard_normal(30000), 6 * g.random(200)]).astype(np.float32)
    counts, edges = np.histogram(x, bins=512)
    scale = kernels.minmax_weight_scale(w, 4)
    return {
        "search_weight_scale": lambda: kernels.search_weight_scale(w, 4),
        "search_weight_scale_hmse": lambda: kernels.search_weight_scale(w, 4, weights=h),
        "search_weight_scale_l2.4": lambda: kernels.search_weight_scale(w, 3, norm=2.4),
        "search_act_range": lambda: kernels.search_act_range(x, 4, "asymmetric"),
        "search_act_range_l3": lambda: kernels.search_act_range(x, 8, "symmetric", norm=3.0),
        "search_act_range_hist": lambda: kernels.search_act_range_hist(counts, edges, 4, "unsigned"),
        "fake_quant_per_channel": lambda: kernels.fake_quant_per_channel(w, scale, -8, 7),
        "quantize_per_channel": lambda: kernels.quantize_per_channel(w, scale, -8, 7),
        "fake_quant_per_tensor": lambda: kernels.fake_quant_per_tensor(x, 0.05, 3, 0, 255),
    }


def _bits(result) -> bytes:
    arrays = result if isinstance(result, tuple) else (result,)
    return b"".join(np.asarray(a).tobytes() for a in arrays)


@pytest.mark.parametrize("name", list(_kernel_calls()))
def test_numba_kernel_is_deterministic_across_calls_and_thread_counts(name):
    call = _kernel_calls()[name]
    saved = numba.get_num_threads()
    try:
        results = []
        for threads in (numba.config.NUMBA_NUM_THREADS, 1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append(_bits(call()))
    finally:
        numba.set_num_threads(saved)
    assert results[0] == results[1] == results[2]
