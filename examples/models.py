"""A zoo of small, fx-traceable models for the test suite and the benchmarks.

Every factory builds its model under a private RNG seed (the global RNG is left untouched) and returns it in
``eval()`` mode. The tiny models also get random BatchNorm statistics (``randomize_batchnorm_``) so that BN
folding and quantization are exercised on non-trivial numbers. ``MODELS`` maps a name to its factory and
``example_input(name)`` gives a matching deterministic input batch.

The CIFAR ResNets and ConvMixer match the layout of the pretrained checkpoints in ``../shared/data/weights``
(see that folder's README), so ``load_cifar_resnet`` / ``load_convmixer`` load them with a strict
``load_state_dict``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.485, 0.456, 0.406)  # normalisation the ResNet checkpoints were trained with
CIFAR_STD = (0.229, 0.224, 0.225)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` under ``seed`` without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    return model.eval()


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (in place).

    Fresh BNs are the identity in eval mode, which would let BN-folding bugs pass unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


# --------------------------------------------------------------------------------------- CIFAR ResNet
class OptionAShortcut(nn.Module):
    """Parameter-free shortcut of He et al. (option A): subsample 2x and zero-pad the channels."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU (names as in the checkpoints)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = OptionAShortcut(planes) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-10. Input: (B, 3, 32, 32), normalised with CIFAR_MEAN / CIFAR_STD."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10, seed: int = 0) -> CifarResNet:
    return _seeded(lambda: CifarResNet(3, num_classes), seed)


def resnet56(num_classes: int = 10, seed: int = 0) -> CifarResNet:
    return _seeded(lambda: CifarResNet(9, num_classes), seed)


def data_dir() -> Path:
    """The shared real-data folder: $EPTQ_DATA, else ../shared/data next to the repository."""
    env = os.environ.get("EPTQ_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _strip_module_prefix(state_dict: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_cifar_resnet(depth: int, path: str | Path | None = None) -> CifarResNet:
    """A CIFAR ResNet-``depth`` (20 or 56) with the pretrained checkpoint loaded (strict), in eval mode."""
    files = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}
    if depth not in files:
        raise ValueError(f"depth must be one of {sorted(files)}, got {depth}.")
    path = Path(path) if path is not None else data_dir() / "weights" / files[depth]
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = CifarResNet((depth - 2) // 6)
    model.load_state_dict(_strip_module_prefix(checkpoint["state_dict"]))
    return model.eval()


# ------------------------------------------------------------------------------------------ ConvMixer
class Residual(nn.Module):
    """``fn(x) + x``; the attribute name ``fn`` matches the ConvMixer checkpoint."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _build_convmixer(dim: int, depth: int, kernel: int, patch: int, num_classes: int) -> nn.Sequential:
    def mixer_block() -> nn.Sequential:
        return nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2), nn.GELU(), nn.BatchNorm2d(dim),
            )),
            nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim),
        )

    return nn.Sequential(
        nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.BatchNorm2d(dim),
        *[mixer_block() for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, num_classes),
    )


def convmixer(dim: int = 256, depth: int = 8, kernel: int = 9, patch: int = 4, num_classes: int = 10,
              seed: int = 0) -> nn.Sequential:
    """ConvMixer-dim/depth (odd ``kernel``). Input: (B, 3, 32, 32), normalised with mean = std = 0.5."""
    return _seeded(lambda: _build_convmixer(dim, depth, kernel, patch, num_classes), seed)


def convmixer_tiny(seed: int = 0) -> nn.Sequential:
    """ConvMixer-16/2, kernel 3, patch 2. Input: (B, 3, 16, 16)."""
    model = convmixer(dim=16, depth=2, kernel=3, patch=2, seed=seed)
    return randomize_batchnorm_(model, seed)


def load_convmixer(path: str | Path | None = None) -> nn.Sequential:
    """ConvMixer-256/8 (kernel 9, patch 4) with the pretrained checkpoint loaded (strict), in eval mode."""
    path = Path(path) if path is not None else data_dir() / "weights" / "convmixer256_8_k9_p4.pth"
    state_dict = torch.load(path, map_location="cpu", weights_only=False)
    model = _build_convmixer(256, 8, 9, 4, 10)
    model.load_state_dict(_strip_module_prefix(state_dict))
    return model.eval()


# ------------------------------------------------------------------------------------------ tiny CNNs
class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, two BasicBlock-style residual blocks (the second strided, with a 1x1 conv + BN
    projection shortcut), global pooling, linear. Input: (B, 3, 16, 16) (any size >= 8 works)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _ResidualBlock(width, width, stride=1)
        self.block2 = _ResidualBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN; skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_skip else out


class MobileNetV2Tiny(nn.Module):
    """Stem conv-BN-ReLU6, inverted residuals 8->8 (skip), 8->16 stride 2 (no skip), 16->16 (skip), a 1x1
    conv-BN-ReLU6 to 32 channels, pooling and linear. Input: (B, 3, 16, 16)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 16, 2, 2), InvertedResidual(16, 16, 1, 2),
        )
        self.last = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last(self.blocks(self.stem(x)))
        return self.classifier(out.mean((2, 3)))


class SmallCNN(nn.Module):
    """conv-BN-ReLU, one residual conv-BN-ReLU (identity skip), pooling, linear. Input: (B, 3, 8, 8)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = out + F.relu(self.bn2(self.conv2(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TupleOutputNet(nn.Module):
    """Shared conv trunk with two linear heads; returns ``(logits, aux)``. Input: (B, 3, 8, 8)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, 10)
        self.aux = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x).mean((2, 3))
        return self.head(features), self.aux(features)


class DictOutputNet(TupleOutputNet):
    """Same as TupleOutputNet, returns ``{"logits": ..., "aux": ...}``. Input: (B, 3, 8, 8)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        features = self.trunk(x).mean((2, 3))
        return {"logits": self.head(features), "aux": self.aux(features)}


# ------------------------------------------------------------------------------------ tiny token models
class PatchEmbed(nn.Module):
    """Non-overlapping patches via a strided conv, then (B, C, H, W) -> (B, H*W, C) tokens."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear q/k/v/proj and torch.matmul, so fx sees every op.

    Heads are split with ``unflatten`` on constant sizes so the graph needs no shape arithmetic."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, head_dim)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.proj(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch-embedding conv (patch 4), ``depth`` pre-norm transformer blocks, final LayerNorm, mean pooling
    over tokens (no cls token), linear head. Input: (B, 3, 16, 16)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim, 4)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.blocks(self.patch_embed(x)))
        return self.head(tokens.mean(1))


class MixerBlock(nn.Module):
    """Token-mixing MLP (across the token axis, via transpose) + residual, channel-mixing MLP + residual."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TinyMixer(nn.Module):
    """MLP-Mixer: patch embedding (patch 4, 16 tokens for 16x16), ``depth`` mixer blocks, LayerNorm, mean
    pooling, linear head. Input: (B, 3, 16, 16) (the token MLP fixes the number of tokens)."""

    def __init__(self, dim: int = 32, depth: int = 2, image: int = 16, patch: int = 4,
                 num_classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = PatchEmbed(dim, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 2 * tokens, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.patch_embed(x))).mean(1))


# ---------------------------------------------------------------------------------------- registry
def _tiny(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def factory(seed: int = 0) -> nn.Module:
        return randomize_batchnorm_(_seeded(cls, seed), seed)

    factory.__name__ = cls.__name__
    return factory


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "convmixer": convmixer,
    "convmixer_tiny": convmixer_tiny,
    "tiny_resnet": _tiny(TinyResNet),
    "mobilenetv2_tiny": _tiny(MobileNetV2Tiny),
    "tiny_vit": _tiny(TinyViT),
    "tiny_mixer": _tiny(TinyMixer),
    "small_cnn": _tiny(SmallCNN),
    "tuple_output": _tiny(TupleOutputNet),
    "dict_output": _tiny(DictOutputNet),
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "convmixer": (3, 32, 32),
    "convmixer_tiny": (3, 16, 16), "tiny_resnet": (3, 16, 16), "mobilenetv2_tiny": (3, 16, 16),
    "tiny_vit": (3, 16, 16), "tiny_mixer": (3, 16, 16), "small_cnn": (3, 8, 8),
    "tuple_output": (3, 8, 8), "dict_output": (3, 8, 8),
}


def make_model(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` (a key of MODELS), deterministically initialised, in eval mode."""
    if name not in MODELS:
        raise KeyError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
    return MODELS[name](seed=seed)


def example_input(model_name: str, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic standard-normal batch with the input shape ``model_name`` expects."""
    if model_name not in INPUT_SHAPES:
        raise KeyError(f"Unknown model {model_name!r}; choose one of {sorted(INPUT_SHAPES)}.")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *INPUT_SHAPES[model_name], generator=gen)
