"""Suite-wide settings: a bounded thread count (the CI machine has 2 cores) and the real-data fixture."""
from __future__ import annotations

import os

# Spinning OpenMP workers (torch's and numba's) make small ops 100x slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest
import torch


def _test_threads() -> int:
    """$EPTQ_TEST_THREADS if set, else min(2, cores): more OpenMP threads than cores only makes them wait."""
    env = os.environ.get("EPTQ_TEST_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError as e:
            raise pytest.UsageError(f"EPTQ_TEST_THREADS must be an integer, got {env!r}.") from e
    return max(1, min(2, os.cpu_count() or 1))


torch.set_num_threads(_test_threads())


def shared_data_dir() -> Path:
    """$EPTQ_DATA, else ../shared/data next to the repository root."""
    env = os.environ.get("EPTQ_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; tests that use it are skipped when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set EPTQ_DATA to use another location)")
    return path
