"""The one-pass RMSNorm, SwiGLU and RoPE (slmkit/model/elementwise.py, kernels.c): under bf16 autocast they agree
with PyTorch's formulas in fp32 to bf16 rounding, forward and backward (the norm's weight gradient too), across odd
row counts and widths (RoPE on a strided slice, at an offset); outside autocast, for the final norm and without the
kernels, nothing changes; bad shapes are refused."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit import kernels
from slmkit.config import ModelConfig
from slmkit.model import GPT
from slmkit.model import elementwise as E
from slmkit.runtime import autocast

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), c=st.integers(2, 300), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_rmsnorm_matches_torch_forward_and_backward(rows, c, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, c, generator=g)).requires_grad_()
    ours = E.RMSNorm(c, eps=1e-5, bf16_out=True)
    ref = torch.nn.RMSNorm(c, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(c, generator=g) + 0.5)
    ref.load_state_dict(ours.state_dict())  # the same parameters and keys
    if not weighted:
        ours.weight = ref.weight = None
    with autocast("bf16"):
        y = ours(x)
    assert y.dtype == torch.bfloat16
    y_ref = ref(x.detach().clone().requires_grad_())
    # one rounding of the fp32 result: within half a bf16 ulp of it
    assert torch.equal(y, y_ref.detach().bfloat16()) or (y.float() - y_ref).abs().max() <= \
        y_ref.abs().max() * 2 ** -8
    dy = torch.randn(rows, c, generator=g).bfloat16()
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()  # the exact gradient, against fp32 rounding
    ref.double()(x64).backward(dy.double())
    assert rel(x.grad, x64.grad) < 1e-4
    if weighted:
        assert rel(ours.weight.grad, ref.weight.grad) < 1e-4


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), h=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_swiglu_matches_torch_forward_and_backward(rows, h, seed):
    g = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(rows, 2 * h, generator=g)).bfloat16().requires_grad_()  # large |gate| both ways too
    with autocast("bf16"):
        y = E.swiglu(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, h)
    x64 = x.detach().double().requires_grad_()
    gate, up = x64.chunk(2, dim=-1)
    y64 = F.silu(gate) * up
    assert rel(y, y64) < 2 ** -8
    dy = torch.randn(rows, h, generator=g).bfloat16()
    y.backward(dy)
    y64.backward(dy.double())
    assert x.grad.dtype == torch.bfloat16
    assert rel(x.grad, x64.grad) < 2 ** -8


def test_torch_paths_where_the_kernels_do_not_apply(monkeypatch):
    x = torch.randn(3, 8)
    n = E.RMSNorm(8, eps=1e-6, bf16_out=True)
    ref = torch.nn.RMSNorm(8, eps=1e-6)
    assert torch.equal(n(x), ref(x))  # no autocast: nn.RMSNorm's fp32 output
    with autocast("bf16"):
        assert E.RMSNorm(8, eps=1e-6)(x).dtype == torch.float32  # bf16_out off: as nn.RMSNorm
    monkeypatch.setattr(kernels, "available", lambda: False)
    with autocast("bf16"):
        assert torch.equal(n(x), ref(x))
        h = torch.randn(3, 8).bfloat16()
        gate, up = h.chunk(2, dim=-1)
        assert torch.equal(E.swiglu(h), F.silu(gate) * up)


@needs_kernels
def test_llama_blocks_use_them_and_train_the_same():
    """A Llama-style model under bf16 autocast: block norms hand bf16 to their linears, the final norm stays fp32, and
    loss and gradients agree with the model run through PyTorch's formulas."""
    cfg = ModelConfig.preset("llama-3m", vocab_size=97)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.blocks[0].norm1.bf16_out and model.blocks[0].norm2.bf16_out and not model.norm_f.bf16_out
    idx = torch.randint(0, 97, (2, 24))

    def run(fused: bool):
        model.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            if not fused:
                mp.setattr(E, "fused_ok", lambda x: False)
            with autocast("bf16"):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_f, grads_f = run(True)
    loss_t, grads_t = run(False)
    assert abs(loss_f - loss_t) < 1e-2
    assert all(rel(a, b) < 0.05 for a, b in zip(grads_f, grads_t, strict=True))


def test_moe_blocks_keep_fp32_norm_output():
    cfg = ModelConfig.preset("llama-3m", vocab_size=97, moe_experts=2, moe_top_k=1)
    block = GPT(cfg).blocks[0]
    assert block.norm1.bf16_out and not block.norm2.bf16_out


@needs_kernels
@pytest.mark.parametrize("call", [
    lambda: kernels.rmsnorm(torch.randn(2, 4).bfloat16(), None, 1e-5),
    lambda: kernels.rmsnorm(torch.randn(2, 4), torch.ones(5), 1e-5),
    lambda: kernels.rmsnorm(torch.randn(4, 2).t(), None, 1e-5),
    lambda: kernels.rmsnorm_backward(torch.randn(2, 3).bfloat16(), torch.randn(2, 4), None, torch.ones(2)),
    lambda: kernels.swiglu(torch.randn(2, 4)),
    lambda: kernels.swiglu(torch.randn(2, 5).bfloat16()),
    lambda: kernels.swiglu_backward(torch.randn(2, 4).bfloat16(), torch.randn(2, 3).bfloat16()),
    lambda: kernels.rope(torch.randn(1, 4, 8).bfloat16(), torch.ones(3, 8), torch.ones(3, 8), 0, 1),  # tables short
    lambda: kernels.rope(torch.randn(1, 4, 6).bfloat16(), torch.ones(8, 6), torch.ones(8, 6), 0, 2),  # odd hd
    lambda: kernels.rope(torch.randn(1, 4, 8), torch.ones(8, 8), torch.ones(8, 8), 0, 1),  # fp32
])
def test_kernels_refuse_bad_operands(call):
    with pytest.raises(ValueError, match="need"):
        call()


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 20), heads=st.integers(1, 4), half=st.integers(1, 16),
       pos=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_rope_matches_rotary_forward_and_backward(b, t, heads, half, pos, seed):
    """The fused rotation of a strided slice of a q/k/v output, against Rotary's formula in float64."""
    from slmkit.model.gpt import Rotary

    g = torch.Generator().manual_seed(seed)
    hd = 2 * half
    rot = Rotary(hd, 32, 10000.0)
    qkv = (3 * torch.randn(b, t, 3 * heads * hd, generator=g)).bfloat16().requires_grad_()
    x = qkv[..., heads * hd : 2 * heads * hd]  # the middle third: rows strided like k out of a fused projection
    with autocast("bf16"):
        y = E.rope(x, rot.cos, rot.sin, pos, heads)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    rot64 = Rotary(hd, 32, 10000.0)
    rot64.cos, rot64.sin = rot.cos.double(), rot.sin.double()
    y64 = rot64(x64.view(b, t, heads, hd).transpose(1, 2), pos).transpose(1, 2).reshape(b, t, -1)
    assert rel(y, y64) < 2 ** -8
    dy = torch.randn(b, t, heads * hd, generator=g).bfloat16()
    y.backward(dy)
    y64.backward(dy.double())
    grad = qkv.grad[..., heads * hd : 2 * heads * hd]
    assert rel(grad, x64.grad) < 2 ** -7
    assert not qkv.grad[..., : heads * hd].any() and not qkv.grad[..., 2 * heads * hd :].any()


def test_rope_declines_outside_bf16_autocast():
    x = torch.randn(1, 4, 8).bfloat16()
    tables = torch.ones(8, 8), torch.zeros(8, 8)
    assert E.rope(x, *tables, 0, 1) is None  # no autocast: the caller's PyTorch formula
    with autocast("bf16"):
        assert E.rope(x.float(), *tables, 0, 1) is None



def test_a_model_cast_to_bf16_runs_under_autocast():
    """Weights and RoPE tables in bf16 (model.bfloat16()): the kernels, which take fp32 ones, step aside."""
    model = GPT(ModelConfig.preset("llama-3m", vocab_size=97)).bfloat16()
    idx = torch.randint(0, 97, (1, 9))
    with autocast("bf16"):
        logits, _ = model(idx)
    assert logits.shape == (1, 9, 97) and torch.isfinite(logits.float()).all()
