"""Weight-only quantization: every linear becomes a QuantLinear, outputs stay close to fp32 on both the kernel
(small batch) and the widened-matmul (large batch) paths, and everything works without the C kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slmkit.compress import quantize
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer import kernels
from slmkit.infer.quantized import QuantLinear
from slmkit.model import GPT


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=128, pos="rope",
                           norm="rmsnorm", mlp="swiglu")).eval()


@pytest.mark.parametrize("dtype, nbytes", [("int8", 1), ("bf16", 2)])
def test_every_linear_is_replaced_and_shrinks(dtype, nbytes):
    model = quantize(_model(), dtype)
    assert not any(type(m) is nn.Linear for m in model.modules())
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 * 4 + 1  # qkv, proj, fc, proj per layer + the head (tied: its own quantized copy)
    assert all(m.weight.element_size() == nbytes for m in q)
    assert model.tok_emb.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype, tol", [("int8", 0.02), ("bf16", 0.01)])
@pytest.mark.parametrize("T", [4, 40])  # ≤ 16 rows: C kernel; more: widened weights + fp32 matmul
def test_quantized_logits_stay_close(dtype, tol, T):
    model = _model()
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.inference_mode():
        want = model(ids)[0]
        got = quantize(copy.deepcopy(model), dtype)(ids)[0]
    assert (got - want).norm() / want.norm() < tol
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_int8_round_trip_error_is_bounded_by_half_a_step():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, "int8")
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized() - lin.weight).abs() <= step / 2 + 1e-7).all()
    zero = QuantLinear.from_linear(nn.Linear(4, 2, bias=False).requires_grad_(False).apply(
        lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None), "int8")
    assert torch.isfinite(zero(torch.randn(3, 4))).all() and not zero(torch.randn(3, 4)).any()


def test_without_kernels_the_same_numbers_come_from_pytorch(monkeypatch):
    model = quantize(_model(), "int8")
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids)[0]  # 40 rows: the widened-matmul path either way
        monkeypatch.setattr(kernels, "_lib", False)
        assert not kernels.available()
        got = model(ids)[0]
        small = model(ids[:, :4])[0]
    torch.testing.assert_close(got, want)
    assert torch.isfinite(small).all()


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(SlmError, match=r"int4.*fp32, bf16 or int8"):
        quantize(_model(), "int4")  # type: ignore[arg-type]
    model = _model()
    assert quantize(model, "fp32") is model
