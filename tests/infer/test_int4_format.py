"""The int4 storage format: Q4_0's block layout and scale rule, packing round-trips, clear errors."""

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.infer.quantized import (
    QuantLinear,
    dequantize,
    int4_round,
    int4_scales,
    pack_int4,
    quantize_int4,
    unpack_int4,
)


def test_pack_round_trips_and_uses_the_q4_0_block_layout():
    q = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # block 1 of row (0, 0): byte 16 + j = (w[32 + j] + 8) | (w[48 + j] + 8) << 4
    j = 5
    assert int(packed[0, 0, 16 + j]) == (int(q[0, 0, 32 + j]) + 8) | ((int(q[0, 0, 48 + j]) + 8) << 4)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_error_is_bounded_by_half_a_step_and_the_extreme_is_exact(group):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    packed, scale = quantize_int4(w, group)
    assert scale.shape == (16, 256 // group) and scale.dtype == torch.float16
    s = scale.float().repeat_interleave(group, dim=-1)
    err = (dequantize(packed, scale) - w).abs()
    # half a step on the grid; the side opposite the extreme reaches only q = 7, so there up to one step (as Q4_0)
    on_grid = (w / s >= -8.5) & (w / s <= 7.5)
    assert (err[on_grid] <= s.abs()[on_grid] / 2 + 1e-6).all() and (err <= s.abs() + 1e-6).all()
    # each group's largest-magnitude weight is its scale × -8, up to fp16 rounding of the scale
    g = w.unflatten(-1, (-1, group))
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(scale.float() * -8, extreme, rtol=1e-3, atol=0)
    assert int4_round(w, int4_scales(w, group), group).min() >= -8


def test_zero_groups_and_bad_groups():
    w = torch.zeros(2, 64)
    packed, scale = quantize_int4(w, 32)
    assert torch.equal(dequantize(packed, scale), w) and (scale == 1).all()
    with pytest.raises(SlmError, match="group 64 does not divide the input width 96"):
        quantize_int4(torch.zeros(2, 96), 64)
    with pytest.raises(SlmError, match="group=48 is not supported"):
        quantize_int4(torch.zeros(2, 96), 48)


def test_int4_linear_computes_the_dequantized_product(monkeypatch):
    from slmkit import kernels

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 24)
    q = QuantLinear.from_linear(lin, "int4", 64)
    assert (q.in_features, q.out_features, q.group) == (128, 24, 64)
    x = torch.randn(5, 128)
    ref = x @ q.dequantized().T + lin.bias
    # the C kernel rounds activations to int8 blocks (tests/infer/test_int4_kernels.py bounds that); PyTorch is exact
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)
    assert (q(x) - lin(x)).abs().max() < 0.2 * lin(x).abs().max()  # and near the fp32 layer
