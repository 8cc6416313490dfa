"""A compact CIFAR-10 ResNet (He et al. 2016, the 6n+2 family with the parameter-free "option A" shortcut),
laid out so the public ResNet-20 / ResNet-56 checkpoints load with a strict ``load_state_dict``.

Used by the demo to quantize real pretrained weights; the test zoo has its own copy on purpose (the package
must not import from ``tests``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

# Normalisation the public ResNet checkpoints were trained with (ImageNet statistics).
RESNET_MEAN = (0.485, 0.456, 0.406)
RESNET_STD = (0.229, 0.224, 0.225)
DEPTHS = {20: 3, 56: 9}  # depth → blocks per stage


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the new channels equally on both sides."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.side = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.side, self.side))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout - cin) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv3x3(16)-BN-ReLU, three stages of ``n`` blocks (16/32/64 channels, stride 1/2/2), pool, linear."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, cin = (16, 32, 64), 16
        for stage, width in enumerate(widths, start=1):
            blocks = [Block(cin if i == 0 else width, width, 2 if (i == 0 and stage > 1) else 1) for i in range(n)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            cin = width
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


def cifar_resnet(depth: int) -> CifarResNet:
    if depth not in DEPTHS:
        raise CheckpointError(f"CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth}.")
    return CifarResNet(DEPTHS[depth])


def load_cifar_resnet(path: str | Path, depth: int) -> CifarResNet:
    """Build ResNet-``depth`` and load a checkpoint (a dict with ``state_dict``, keys maybe prefixed
    ``module.``, or a bare state_dict); returns it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} not found.")
    # the public checkpoints are legacy pickles (they hold a float 'best_prec1' next to the state_dict)
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a state_dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = cifar_resnet(depth)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit ResNet-{depth}: {e}") from e
    return model.eval()
