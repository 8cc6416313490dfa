"""Vision transformers whose attention symbolic_trace cannot see into (torchvision ViT's
nn.MultiheadAttention, Swin's fx-wrapped shifted_window_attention, timm DeiT / MobileViT) quantize fully:
≥ 95 % of their conv / linear / attention-projection weights end up stored as integers at W8A8, with
≥ 15 dB output SQNR. Random init, 64×64 images (Swin-T / MobileViT at their default layouts), 16 calibration
samples: the architectures matter here, not the size (ViT-B/16 at 224 takes minutes on two cores)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import eptq_fx
from benchmarks.shim import ensure_torchvision_importable
from eptq_fx import EPTQConfig

SIZE = 64
W8A8 = EPTQConfig(method="rtn", weight_bits=8, act_bits=8, n_calib=16, calib_batch_size=8)


def _zoo(name: str) -> nn.Module:
    ensure_torchvision_importable()
    if name in ("vit_b_16", "swin_t"):
        torchvision = pytest.importorskip("torchvision")
        kwargs = {"image_size": SIZE} if name == "vit_b_16" else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
        if name == "vit_b_16":  # torchvision zero-initialises the head: all-zero logits have no SQNR
            nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": SIZE} if name.startswith("deit") else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def matrix_weight_count(model: nn.Module) -> int:
    """Elements of every conv / linear weight and packed attention in-projection of the float model."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            total += m.weight.numel()
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            total += m.in_proj_weight.numel()
    return total


def integer_weight_count(q: torch.fx.GraphModule) -> int:
    return sum(t.numel() for name, t in q.named_buffers() if name.endswith("_weight_int"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "deit_tiny_patch16_224", "mobilevit_xs"])
def test_vision_transformer_weights_are_stored_as_integers(name: str) -> None:
    torch.manual_seed(0)
    model = _zoo(name).eval()
    gen = torch.Generator().manual_seed(0)
    calib, test = torch.randn(16, 3, SIZE, SIZE, generator=gen), torch.randn(4, 3, SIZE, SIZE, generator=gen)
    q = eptq_fx.quantize(model, calib, W8A8, progress=False)
    assert integer_weight_count(q) >= 0.95 * matrix_weight_count(model)
    with torch.no_grad():
        ref, out = model(test), q(test)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert float(sqnr) >= 15.0


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def test_torchvision_vit_through_eptq() -> None:
    """torchvision's VisionTransformer runs nn.MultiheadAttention, sequence-first inside: EPTQ reconstructs it
    (it stopped with an IndexError on the (L, N, E) values before blocks followed the sample layout) and ends
    at least as close to the float model as round-to-nearest. Two small layers, so it runs in seconds."""
    ensure_torchvision_importable()
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    gen = torch.Generator().manual_seed(0)
    calib, test = torch.randn(64, 3, 32, 32, generator=gen), torch.randn(32, 3, 32, 32, generator=gen)
    sqnr = {}
    for method in ("rtn", "eptq"):
        config = EPTQConfig(method=method, weight_bits=4, act_bits=8, n_calib=64,
                            hessian=eptq_fx.HessianConfig(cache_dir=None, max_probes=4, min_probes=2),
                            reconstruction=eptq_fx.ReconstructionConfig(iters=50, hessian_scope="all"))
        q = eptq_fx.quantize(model, calib, config, progress=False)
        assert integer_weight_count(q) == matrix_weight_count(model)
        with torch.no_grad():
            sqnr[method] = _sqnr(model(test), q(test))
    assert sqnr["eptq"] >= sqnr["rtn"] - 0.5 and sqnr["eptq"] >= 15.0
