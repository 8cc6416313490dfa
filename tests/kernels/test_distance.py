"""The fused reconstruction distance against its composite autograd (values and prediction gradients)."""
import pytest
import torch

from eptq_fx.numerics.distance import squared_distance


def _reference(pred, target, profile=None):
    sq = (pred - target).pow(2)
    if profile is not None:
        sq = sq * profile.view(*profile.shape, *([1] * (sq.dim() - 2)))
    return sq.flatten(1).sum(1)


@pytest.mark.parametrize("shape,channels_last", [((5, 3, 4, 6), False), ((5, 3, 4, 6), True), ((4, 7), False),
                                                 ((3, 9, 5), False)])
def test_values_and_gradient_match_composite(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    pred0, target = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)
    if channels_last:
        pred0, target = (t.contiguous(memory_format=torch.channels_last) for t in (pred0, target))
    w = torch.rand(shape[0], generator=g, dtype=torch.float64)
    grads = []
    for fn in (squared_distance, _reference):
        pred = pred0.clone().requires_grad_(True)
        out = fn(pred, target)
        torch.testing.assert_close(out, _reference(pred0, target))
        (out * w).sum().backward()
        grads.append(pred.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], 2 * (pred0 - target) * w.view(-1, *([1] * (len(shape) - 1))))


def test_profile_weights_channels():
    pred, target = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    profile = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 2.0]])
    torch.testing.assert_close(squared_distance(pred, target, profile), torch.tensor([12.0, 12.0]))
    torch.testing.assert_close(squared_distance(pred, target), torch.tensor([12.0, 12.0]))
