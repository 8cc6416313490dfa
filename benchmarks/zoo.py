"""The benchmark's models: which architecture, which weights, which dataset and preprocessing.

Architectures come from tests/models.py (one definition for tests and benchmarks). Pretrained CIFAR-10 models
load the checkpoints in the shared data folder; the Fashion-MNIST models are trained here by
benchmarks/train_models.py and cached under benchmarks/.weights/ (not committed).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import FASHION_MNIST_MEAN_STD, HALF_MEAN_STD, IMAGENET_MEAN_STD, Preprocessing, data_file
from examples import models as arch

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

    def recipe_fingerprint(self) -> str:
        """Changes whenever the architecture or the number of training epochs changes."""
        model = self.architecture()
        shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        text = f"{model!r}|{shapes}|epochs={self.train_epochs}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def weights_current(self) -> bool:
        info_path = self.cached_weights.with_suffix(".json")
        if not (self.cached_weights.is_file() and info_path.is_file()):
            return False
        return json.loads(info_path.read_text()).get("recipe") == self.recipe_fingerprint()

    def build(self) -> nn.Module:
        """The float model with its weights, in eval mode."""
        if self.checkpoint is not None:
            path = data_file(f"weights/{self.checkpoint}")
            if self.name.startswith("resnet"):
                return arch.load_cifar_resnet(int(self.name.removeprefix("resnet")), path)
            return arch.load_convmixer(path)
        if not self.weights_current():
            raise WeightsMissingError(
                f"{self.cached_weights} is missing or was trained for another architecture / recipe: run "
                f"`python -m benchmarks.train_models --models {self.name}`.")
        model = self.architecture()
        model.load_state_dict(torch.load(self.cached_weights, map_location="cpu", weights_only=True))
        return model.eval()


def mobilenetv2_fmnist(num_classes: int = 10) -> nn.Sequential:
    """A MobileNetV2-style CNN for 28x28 inputs from tests/models.py's InvertedResidual blocks: stride-2 stem
    (28 -> 14), five inverted residuals (expansion 4, one more stride 2 -> 7), a 1x1 conv to 128 channels,
    global pooling, linear. MobileNetV2Tiny (8-32 channels) stays near 81% on Fashion-MNIST; this one is
    wide enough for about 90% within a few minutes of CPU training."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
        arch.InvertedResidual(16, 16, 1, 4), arch.InvertedResidual(16, 24, 2, 4),
        arch.InvertedResidual(24, 24, 1, 4), arch.InvertedResidual(24, 32, 1, 4),
        arch.InvertedResidual(32, 32, 1, 4),
        nn.Sequential(nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    ).eval()


class PositionalTinyViT(arch.TinyViT):
    """tests/models.py's TinyViT plus a learned position embedding added to the patch tokens. Without it the
    model sees a bag of patches and stays near 81% on Fashion-MNIST."""

    def __init__(self, dim: int, depth: int, heads: int, tokens: int, num_classes: int = 10) -> None:
        super().__init__(dim=dim, depth=depth, heads=heads, num_classes=num_classes)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.blocks(self.patch_embed(x) + self.pos_embed))
        return self.head(tokens.mean(1))


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
    ModelSpec("mobilenetv2_fmnist", _FMNIST, Preprocessing(*FASHION_MNIST_MEAN_STD), mobilenetv2_fmnist,
              train_epochs=3),
    ModelSpec("vit_fmnist", _FMNIST, Preprocessing(*FASHION_MNIST_MEAN_STD),
              lambda: PositionalTinyViT(dim=64, depth=3, heads=4, tokens=49).eval(), train_epochs=5),
    ModelSpec("mixer_fmnist", _FMNIST, Preprocessing(*FASHION_MNIST_MEAN_STD),
              lambda: arch.TinyMixer(dim=64, depth=3, image=28, patch=4).eval(), train_epochs=3),
)}

# Float top-1 (%) measured with this harness on the full test split (CIFAR-10 JPEG copy / Fashion-MNIST).
KNOWN_FLOAT_TOP1 = {"resnet20": 81.03, "resnet56": 83.20, "convmixer": 86.85}


def get_spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]
