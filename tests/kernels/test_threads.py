"""The numba kernels leave torch's thread count as the user set it (numba's OpenMP pool used to reset it)."""
import subprocess
import sys

SCRIPT = """
import numpy as np, torch
torch.set_num_threads(1)
from eptq_fx.numerics import kernels
rng = np.random.default_rng(0)
kernels.search_weight_scale(rng.standard_normal((64, 300)).astype(np.float32), 4)
kernels.search_act_range(rng.standard_normal(5000).astype(np.float32), 4, "asymmetric")
kernels.quantize_per_channel(rng.standard_normal((8, 9)).astype(np.float32), np.ones(8, np.float32), -8, 7)
import numba
print(torch.get_num_threads(), numba.get_num_threads())
"""


def test_a_one_thread_torch_stays_one_thread_after_the_kernels_run():
    # a fresh interpreter: the reset happened when numba first started its thread pool
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]
