"""Peak RSS over repeated forward passes of a prepared (fake-quant) torchvision model, to tell heap
fragmentation from a leak.

    python -m benchmarks.heap_growth --model resnet18 --passes 12
    MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.heap_growth --model resnet18 --passes 12

Random weights and inputs (batch 32, 224×224), quantizers in observe mode (what calibration runs). With
glibc's default the peak climbs with every pass; with a fixed mmap threshold large blocks go back to the
system and it stays flat, so the growth is fragmentation of freed memory, not memory still referenced.
"""
from __future__ import annotations

import argparse
import resource

import torch

import eptq_fx
from benchmarks.scale import build
from eptq_fx.numerics.calibration import set_act_mode_, set_weight_mode_


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--passes", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = build(args.model)
    torch.set_num_threads(args.threads)
    x = torch.randn(32, 3, 224, 224)
    prepared = eptq_fx.prepare(model, eptq_fx.EPTQConfig(weight_bits=4, act_bits=8), example_inputs=(x[:2],))
    set_act_mode_(prepared, "observe")
    set_weight_mode_(prepared, "off")
    print(f"before: peak RSS {peak_gb():.2f} GB")
    for _ in range(args.passes):
        with torch.no_grad():
            prepared(x)
    print(f"after {args.passes} passes: peak RSS {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()
