import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptq_fx.errors import KernelInputError
from eptq_fx.numerics.kernels import fake_quant_per_channel, fake_quant_per_tensor, quantize_per_channel, signed_range
from eptq_fx.numerics.kernels.reference import (
    fake_quant_per_channel_ref,
    fake_quant_per_tensor_ref,
    quantize_per_channel_ref,
)

from .strategies import f32, matrices, vectors

scales = st.floats(f32(1e-6), 1e3, width=32)


@settings(max_examples=50, deadline=None)
@given(w=matrices(), bits=st.integers(2, 8), data=st.data())
def test_per_channel_matches_reference(w, bits, data):
    s = np.array([data.draw(scales) for _ in range(w.shape[0])], dtype=np.float32)
    qmin, qmax = signed_range(bits)
    codes = quantize_per_channel(w, s, qmin, qmax)
    assert codes.dtype == np.int32 and codes.min() >= qmin and codes.max() <= qmax
    np.testing.assert_array_equal(codes, quantize_per_channel_ref(w, s, qmin, qmax))
    out = fake_quant_per_channel(w, s, qmin, qmax)
    assert out.dtype == np.float32 and out.shape == w.shape
    np.testing.assert_array_equal(out, fake_quant_per_channel_ref(w, s, qmin, qmax))


def test_rounds_half_to_even_and_clips():
    w = np.array([[0.5, 1.5, 2.5, -0.5, -2.5, 6.9, 7.5, -8.6, 100.0]], dtype=np.float32)
    codes = quantize_per_channel(w, np.ones(1, np.float32), -8, 7)
    np.testing.assert_array_equal(codes, [[0, 2, 2, 0, -2, 7, 7, -8, 7]])
    out = fake_quant_per_channel(w, np.full(1, 0.5, np.float32), -8, 7)  # w / 0.5 = 1, 3, 5, -1, ...
    np.testing.assert_array_equal(out, [[0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 3.5, -4.0, 3.5]])


def test_each_row_uses_its_own_scale():
    w = np.array([[1.0, 2.0], [1.0, 2.0]], dtype=np.float32)
    out = fake_quant_per_channel(w, np.array([1.0, 0.75], np.float32), -8, 7)
    np.testing.assert_array_equal(out, [[1.0, 2.0], [0.75, 2.25]])


@settings(max_examples=50, deadline=None)
@given(x=vectors(), scale=scales, bits=st.integers(2, 8), zp_frac=st.floats(0, 1), shape_2d=st.booleans())
def test_per_tensor_matches_reference(x, scale, bits, zp_frac, shape_2d):
    qmin, qmax = 0, 2**bits - 1
    zp = round(zp_frac * qmax)
    if shape_2d and x.size % 2 == 0:
        x = x.reshape(2, -1)
    out = fake_quant_per_tensor(x, float(scale), zp, qmin, qmax)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, fake_quant_per_tensor_ref(x, float(scale), zp, qmin, qmax))


def test_per_tensor_known_values():
    x = np.array([-2.0, 0.26, 100.0, 0.0], dtype=np.float32)
    # q = clip(rint(x / 0.5) + 3, 0, 15) = [0, 4, 15, 3]; (q - 3) * 0.5
    np.testing.assert_array_equal(fake_quant_per_tensor(x, 0.5, 3, 0, 15), [-1.5, 0.5, 6.0, 0.0])


@pytest.mark.parametrize(
    "call, needle",
    [
        (
            lambda: fake_quant_per_channel(np.array([[np.nan]], np.float32), np.ones(1), -8, 7),
            "w contains NaN",
        ),
        (lambda: fake_quant_per_channel(np.ones(3, np.float32), np.ones(1), -8, 7), "w must be 2-D"),
        (lambda: fake_quant_per_channel(np.ones((2, 3)), np.ones(3), -8, 7), "scale must have shape (2,)"),
        (lambda: fake_quant_per_channel(np.ones((1, 3)), np.zeros(1), -8, 7), "scale must be > 0"),
        (lambda: fake_quant_per_channel(np.ones((1, 3)), np.array([np.inf]), -8, 7), "scale contains NaN"),
        (lambda: quantize_per_channel(np.ones((1, 3)), np.ones(1), 7, -8), "qmin < qmax"),
        (lambda: fake_quant_per_tensor(np.array([1.0, np.inf]), 1.0, 0, 0, 255), "x contains NaN or Inf"),
        (lambda: fake_quant_per_tensor(np.ones(2), 0.0, 0, 0, 255), "scale must be a finite number > 0"),
        (lambda: fake_quant_per_tensor(np.ones(2), 1.0, 300, 0, 255), "zero_point must lie in"),
        (lambda: fake_quant_per_tensor(np.array(["a"]), 1.0, 0, 0, 255), "real numeric array"),
    ],
)
def test_bad_inputs_raise_one_line_errors(call, needle):
    with pytest.raises(KernelInputError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_float64_input_that_overflows_float32_is_rejected():
    with pytest.raises(KernelInputError, match="after conversion to float32"):
        fake_quant_per_channel(np.array([[1e300]]), np.ones(1), -8, 7)
