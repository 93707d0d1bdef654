"""kernels.upsample_bilinear against its twin, F.interpolate: values and gradients on odd shapes, both corner rules,
both memory formats; where it hands over to the twin (half precision, autocast, force_twins), the twin's bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsp_fast.kernels import force_twins, twins, upsample_bilinear

SHAPES = [((2, 3, 5, 7), (33, 19)), ((1, 19, 16, 16), (128, 128)), ((3, 4, 1, 6), (9, 13)), ((2, 2, 9, 4), (9, 4))]


@pytest.mark.parametrize("shape,size", SHAPES)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_gradients_match_f_interpolate(shape, size, align_corners, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape[:2] + size, generator=gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = upsample_bilinear(a, size, align_corners)
    want = F.interpolate(b, size=size, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_the_fast_form_is_not_the_twin_on_cpu():
    """The matrix products run (not F.interpolate under another name): their rounding differs somewhere."""
    x = torch.randn(4, 19, 17, 17, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(upsample_bilinear(x, (128, 128), True), twins.upsample_bilinear(x, (128, 128), True))


@pytest.mark.parametrize("case", ["float16", "autocast", "force_twins"])
def test_hands_over_to_the_twin_bit_for_bit(case):
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    if case == "float16":
        x = x.half()
        got = upsample_bilinear(x, (11, 9), False)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = upsample_bilinear(x, (11, 9), False)
    else:
        with force_twins():
            got = upsample_bilinear(x, (11, 9), False)
    assert torch.equal(got, F.interpolate(x, size=(11, 9), mode="bilinear", align_corners=False))
