"""ActFakeQuant (the reconstruction steps' activation quantizer) against the op-by-op chain it replaces."""
import pytest
import torch

from eptq_fx.graph.meta import ActQuant
from eptq_fx.numerics.act_fake_quant import ActFakeQuant, drop_threshold, random_drop_mask
from eptq_fx.numerics.quantizers import ActQuantizer, round_ste


def composite(x, s, zp, qmin, qmax, mix, drop):
    """The chain ActQuantizer used before: autograd differentiates it op by op."""
    q = torch.clamp(round_ste(x * (1.0 / s)) + zp, qmin, qmax)
    out = (q - zp) * s
    if mix > 0.0:
        out = mix * x + (1.0 - mix) * out
    return out if drop is None else torch.where(drop, x, out)


@pytest.mark.parametrize("mix", [0.0, 0.4])
@pytest.mark.parametrize("with_drop", [False, True])
@pytest.mark.parametrize("qmin,qmax,zp", [(0, 15, 3.0), (-8, 7, 0.0), (0, 255, 128.0)])
def test_values_and_gradients_match_the_composite_chain(mix, with_drop, qmin, qmax, zp):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 6, 9, 9, generator=gen) * 0.2 * (qmax - qmin) / 3).requires_grad_(True)  # some clamp
    log_gain = torch.tensor(0.1, requires_grad=True)
    zp_t = torch.tensor(zp)
    drop = random_drop_mask(tuple(x.shape), 0.5, gen) if with_drop else None
    upstream = torch.randn(x.shape, generator=gen)

    def run(fn):
        x.grad, log_gain.grad = None, None
        s = torch.tensor(0.2) * torch.exp(log_gain)
        out = fn(x, s, zp_t, qmin, qmax, mix, drop)
        (out * upstream).sum().backward()
        return out.detach(), x.grad.clone(), log_gain.grad.clone()

    ref, ref_gx, ref_gs = run(composite)
    out, gx, gs = run(ActFakeQuant.apply)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # the blend rounds once less
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-6)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=1e-4)
    assert (ref_gx == 0).any() or mix > 0 or with_drop  # some values were clamped: the mask mattered


def test_without_blend_or_drop_the_values_are_the_eager_quantizers_bit_for_bit():
    x = torch.randn(2, 3, 17, 17) * 3
    aq = ActQuantizer(ActQuant(bits=4, scheme="asymmetric"))
    aq.mode = "on"
    with torch.no_grad():
        aq.scale.fill_(0.07)
        aq.zero_point.fill_(5.0)
    out = ActFakeQuant.apply(x.requires_grad_(True), aq.scale, aq.zero_point, aq.qmin, aq.qmax, 0.0, None)
    assert torch.equal(out.detach(), aq.fake_quant(x.detach()))  # the path convert and export are checked on


def test_drop_masks_keep_the_asked_share_and_follow_the_seed():
    shape = (8, 16, 32, 32)
    a = random_drop_mask(shape, 0.5, torch.Generator().manual_seed(1))
    b = random_drop_mask(shape, 0.5, torch.Generator().manual_seed(1))
    c = random_drop_mask(shape, 0.5, torch.Generator().manual_seed(2))
    assert a.shape == shape and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.float().mean()) - 0.5) < 0.005
    tenth = random_drop_mask(shape, 0.1, torch.Generator())
    assert abs(float(tenth.float().mean()) - drop_threshold(0.1) / 256) < 0.005
    # odd sizes (not a multiple of the 8 bytes of a draw) and empty ones
    assert random_drop_mask((3, 5, 7), 0.5, torch.Generator()).shape == (3, 5, 7)
    assert random_drop_mask((0, 4), 0.5, torch.Generator()).numel() == 0
