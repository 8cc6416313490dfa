"""ResNet-20 (CIFAR-10, pretrained) quantized from the nn.Module and from torch.export, side by side.

    OMP_NUM_THREADS=1 python -m benchmarks.capture_parity --bits W4A4 --method eptq

Prints top-1 on the CIFAR-10 test set for both paths and whether their integer weights are identical.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import eptq_fx
from eptq_fx import EPTQConfig
from examples.demo import accuracy, cifar_split
from examples.models import data_dir, load_cifar_resnet


def _int_weights(q: torch.nn.Module) -> list[torch.Tensor]:
    return [t for name, t in q.named_buffers() if name.endswith("_weight_int")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--method", default="eptq", choices=("rtn", "eptq"))
    parser.add_argument("--n-calib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w_bits, a_bits = (int(v) for v in args.bits.removeprefix("W").split("A"))
    split = cifar_split(data_dir(), args.n_calib)
    config = EPTQConfig(weight_bits=w_bits, act_bits=a_bits, method=args.method, n_calib=args.n_calib)
    model = load_cifar_resnet(20)
    results = {"float": accuracy(model, split.x_test, split.y_test)}
    ep = torch.export.export(model, (split.x_train[:8],),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    qs = {}
    for name, source in (("nn.Module", model), ("torch.export", ep)):
        t0 = time.perf_counter()
        qs[name] = eptq_fx.quantize(source, split.x_train, config, progress=False)
        results[f"{name} s"] = round(time.perf_counter() - t0, 1)
        results[name] = accuracy(qs[name], split.x_test, split.y_test)
        print(json.dumps(results), flush=True)
    a, b = _int_weights(qs["nn.Module"]), _int_weights(qs["torch.export"])
    results["same integer weights"] = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    results["weight tensors"] = [len(a), len(b)]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
