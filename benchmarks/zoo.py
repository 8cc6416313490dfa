"""The benchmark's models: which architecture, which weights, which dataset and preprocessing.

Architectures come from tests/models.py (one definition for tests and benchmarks). Pretrained CIFAR-10 models
load the checkpoints in the shared data folder; the Fashion-MNIST models are trained here by
benchmarks/train_models.py and cached under benchmarks/.weights/ (not committed).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import (FASHION_MNIST_MEAN_STD, HALF_MEAN_STD, IMAGENET_MEAN_STD, Preprocessing,
                               data_file)
from tests import models as arch

WEIGHTS_DIR = Path(__file__).resolve().parent / ".weights"


class WeightsMissingError(FileNotFoundError):
    """A model trained by benchmarks/train_models.py has no cached weights yet."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dataset: str  # key understood by benchmarks.common.load_calibration / load_test
    prep: Preprocessing
    architecture: Callable[[], nn.Module]  # untrained model, eval mode
    checkpoint: str | None = None  # file in the shared weights folder (pretrained models)
    train_epochs: int = 0  # > 0: trained here on the dataset's training split

    @property
    def trained_here(self) -> bool:
        return self.train_epochs > 0

    @property
    def cached_weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.pt"

    def build(self) -> nn.Module:
        """The float model with its weights, in eval mode."""
        if self.checkpoint is not None:
            path = data_file(f"weights/{self.checkpoint}")
            if self.name.startswith("resnet"):
                return arch.load_cifar_resnet(int(self.name.removeprefix("resnet")), path)
            return arch.load_convmixer(path)
        if not self.cached_weights.is_file():
            raise WeightsMissingError(
                f"{self.cached_weights} not found: run `python -m benchmarks.train_models --models {self.name}`.")
        model = self.architecture()
        model.load_state_dict(torch.load(self.cached_weights, map_location="cpu", weights_only=True))
        return model.eval()


_CIFAR = "cifar10"
_FMNIST = "fashion_mnist"

SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("resnet20", _CIFAR, Preprocessing(*IMAGENET_MEAN_STD), lambda: arch.CifarResNet(3),
              checkpoint="resnet20-12fca82f.th"),
    ModelSpec("resnet56", _CIFAR, Preprocessing(*IMAGENET_MEAN_STD), lambda: arch.CifarResNet(9),
              checkpoint="resnet56-4bfd9763.th"),
    ModelSpec("convmixer", _CIFAR, Preprocessing(*HALF_MEAN_STD), lambda: arch.convmixer(),
              checkpoint="convmixer256_8_k9_p4.pth"),
    # Fashion-MNIST (28x28, repeated to 3 channels), sized to train in a few minutes on 2 CPU cores.
    ModelSpec("mobilenetv2_fmnist", _FMNIST, Preprocessing(*FASHION_MNIST_MEAN_STD),
              lambda: arch.MobileNetV2Tiny(num_classes=10).eval(), train_epochs=2),
    ModelSpec("vit_fmnist", _FMNIST, Preprocessing(*FASHION_MNIST_MEAN_STD),
              lambda: arch.TinyViT(dim=48, depth=2, heads=4).eval(), train_epochs=3),
    ModelSpec("mixer_fmnist", _FMNIST, Preprocessing(*FASHION_MNIST_MEAN_STD),
              lambda: arch.TinyMixer(dim=64, depth=3, image=28, patch=4).eval(), train_epochs=3),
)}

# Float top-1 (%) measured with this harness on the full test split (CIFAR-10 JPEG copy / Fashion-MNIST).
KNOWN_FLOAT_TOP1 = {"resnet20": 81.03, "resnet56": 83.20, "convmixer": 86.85}


def get_spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]
