"""torch.distributed: 2 gloo processes under torchrun against a 1-process run on the same data and seed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eptq_fx import distributed
from eptq_fx.data import CalibSet
from tests import helpers_distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds: a hang (a rank waiting forever on a dead peer) fails the test instead of the suite


def _torchrun(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "two.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.helpers_distributed", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return proc, out


def _one_process(act_range: str) -> dict[str, torch.Tensor]:
    assert not distributed.is_active()
    return helpers_distributed.quantized_state(helpers_distributed.run(act_range))


def test_one_process_is_the_plain_path():
    calib = CalibSet((torch.arange(10.0).view(10, 1),))
    local, shard = distributed.shard(calib)
    assert local is calib and (shard.start, shard.stop, shard.n_global) == (0, 10, 10)
    idx = torch.tensor([3, 9, 0])
    g, loc = shard.split(idx)
    assert g is idx and loc is idx
    assert distributed.gather_rows(idx) is idx and distributed.is_lead()


def test_shards_cover_the_data_once_and_split_maps_to_local_rows():
    n, w = 11, 3
    spans = [distributed.bounds(n, r, w) for r in range(w)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    shard = distributed.Shard(*spans[1], n)  # rank 1 of 3: samples 3..6
    g, loc = shard.split(torch.tensor([0, 3, 5, 6, 7, 10, 4]))
    assert g.tolist() == [3, 5, 6, 4] and loc.tolist() == [0, 2, 3, 1]


def test_two_gloo_processes_match_one_process(tmp_path):
    proc, out = _torchrun(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = torch.load(out), _one_process("minmax")
    assert two.keys() == one.keys()
    for k in one:
        if k.endswith("_weight_int"):  # the rounding decisions: bit-identical
            assert torch.equal(one[k], two[k]), k
        else:  # trained scales / biases: the same up to the summation order of the all-reduced gradients
            # (Adam's normalised steps turn a last-bit gradient difference near zero into up to ~1e-5)
            torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
def test_two_gloo_processes_with_mse_ranges_differ_in_a_tiny_fraction(tmp_path):
    # MSE ranges search over a random subset of each batch's values; a shard's subset is drawn from the
    # observer's generator at another state than in 1 process, so ranges (and a few roundings) can move
    proc, out = _torchrun(tmp_path, "--act-range", "mse")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = torch.load(out), _one_process("mse")
    ints = [k for k in one if k.endswith("_weight_int")]
    differ = sum(int((one[k] != two[k]).sum()) for k in ints)
    total = sum(one[k].numel() for k in ints)
    assert differ / total <= 0.02, f"{differ}/{total} integer weights differ"


def test_a_failing_rank_stops_the_other_with_its_message(tmp_path):
    proc, out = _torchrun(tmp_path, "--bad-rank", "1")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "[rank1]: eptq_fx.errors.CalibrationDataError: The model fails on the calibration data" in log
    assert "SIGTERM" in log  # rank 0, waiting in a collective, was stopped rather than left hanging
    assert not out.exists()
