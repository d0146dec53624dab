"""Weight-only quantization: every linear and every MoE expert stack is packed to int8/bf16, the packed bytes are what
the dtype promises, outputs stay close to fp32 on both the kernel (small batch) and the widened-matmul (large batch)
paths, and without the C kernels PyTorch computes the same function from the same packed weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slmkit import kernels
from slmkit.compress import quantize
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantExperts, QuantLinear
from slmkit.model import GPT
from slmkit.model.ffn import MoE

MOE = dict(moe_experts=4, moe_top_k=2)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 97, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 128,
                              "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", **kw})).eval()


def _dequantized_copy(model: GPT) -> GPT:
    """The fp32 model a quantized one stands for: each packed weight widened back (the exact reference)."""
    ref = copy.deepcopy(model)
    for mod in list(ref.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data = child.dequantized()
                lin.bias = None if child.bias is None else nn.Parameter(child.bias)
                setattr(mod, name, lin)
            elif isinstance(child, QuantExperts):
                delattr(mod, name)
                setattr(mod, name, nn.Parameter(child.dequantized()))
    return ref


@pytest.mark.parametrize("dtype, nbytes", [("int8", 1), ("bf16", 2)])
def test_every_linear_is_replaced_and_shrinks(dtype, nbytes):
    model = quantize(_model(), dtype)
    assert not any(type(m) is nn.Linear for m in model.modules())
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 * 4 + 1  # qkv, proj, fc, proj per layer + the head (tied: its own quantized copy)
    assert all(m.weight.element_size() == nbytes for m in q)
    assert model.tok_emb.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype, per_weight", [("int8", 1), ("bf16", 2)])
def test_moe_expert_weights_are_packed(dtype, per_weight):
    """The experts hold ~`per_weight` bytes per weight (int8: + one fp32 scale per row of `in` weights), so an int8 MoE
    model's state is ~4x smaller than fp32; only the routers and the non-matrix tensors stay fp32."""
    fp32 = _model(**MOE)
    n_expert_weights = sum(m.fc.numel() + m.proj.numel() for m in fp32.modules() if isinstance(m, MoE))
    fp32_bytes = sum(t.numel() * t.element_size() for t in fp32.state_dict().values())
    model = quantize(copy.deepcopy(fp32), dtype)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2 and all(isinstance(s, QuantExperts) for m in moes for s in (m.fc, m.proj))
    assert not [n for n, _ in model.named_parameters() if ".fc" in n or ".proj" in n]
    expert_bytes = sum(t.numel() * t.element_size() for m in moes for s in (m.fc, m.proj) for t in s.buffers())
    # scales: one fp32 per row; fc rows have C = 128 weights, proj rows mlp_hidden
    rows = sum(s.scale.numel() for m in moes for s in (m.fc, m.proj))
    assert expert_bytes == per_weight * n_expert_weights + 4 * rows
    assert expert_bytes / n_expert_weights < per_weight + 0.05
    assert all(type(m.router) is nn.Linear for m in moes)  # kept fp32, as the docstring says
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert total < fp32_bytes * (per_weight / 4 + 0.1)
    assert [m.expert_params() for m in moes] == [m.expert_params() for m in fp32.modules() if isinstance(m, MoE)]


@pytest.mark.parametrize("dtype, tol", [("int8", 0.02), ("bf16", 0.01)])
@pytest.mark.parametrize("T", [4, 40])  # ≤ 16 rows: C kernel; more: widened weights + fp32 matmul
@pytest.mark.parametrize("kw", [{}, MOE, dict(MOE, mlp="gelu", bias=True, moe_top_k=1)], ids=["dense", "moe", "moe1"])
def test_quantized_logits_stay_close(dtype, tol, T, kw):
    model = _model(**kw)
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.inference_mode():
        want = model(ids)[0]
        quantized = quantize(copy.deepcopy(model), dtype)
        got = quantized(ids)[0]
        exact = _dequantized_copy(quantized)(ids)[0]
    # per position: a token whose router scores are a near tie can switch experts under any rounding of the weights,
    # which changes its output by design (2 of the 40 positions of the top-1 model here); the rest stay within tol
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).flatten()
    assert err.quantile(0.9) < tol
    if not kw:  # dense: nothing to flip, every position
        assert err.max() < tol
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    # what quantization changes is the weights alone: the packed model computes its own dequantized weights' function
    # (within the activation rounding the kernel may apply: int8 blocks, or bf16 with AVX-512 BF16's vdpbf16ps)
    err = ((got - exact).norm(dim=-1) / exact.norm(dim=-1)).flatten()
    rounds_acts = dtype == "int8" or (kernels.available() and "bf16" in kernels.features())
    assert err.quantile(0.9) < (0.01 if rounds_acts else 1e-5)


def test_int8_round_trip_error_is_bounded_by_half_a_step():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, "int8")
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized() - lin.weight).abs() <= step / 2 + 1e-7).all()
    stack = torch.randn(3, 64, 8)  # (E, in, out): rows of the packed form are output features
    qe = QuantExperts.from_stack(stack, "int8")
    step = stack.abs().amax(1, keepdim=True) / 127  # (E, 1, out)
    assert ((qe.dequantized() - stack).abs() <= step / 2 + 1e-7).all()
    zero = QuantLinear.from_linear(nn.Linear(4, 2, bias=False).requires_grad_(False).apply(
        lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None), "int8")
    assert torch.isfinite(zero(torch.randn(3, 4))).all() and not zero(torch.randn(3, 4)).any()


@pytest.mark.parametrize("kw", [{}, MOE], ids=["dense", "moe"])
def test_without_kernels_pytorch_computes_the_dequantized_model(monkeypatch, kw):
    """With the C kernels off, both the small-batch (decoding) and the large-batch path are the fp32 matmul of the
    widened weights: equal to a plain fp32 model holding the dequantized weights."""
    model = quantize(_model(**kw), "int8")
    ref = _dequantized_copy(model)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(kernels, "_lib", False)
    assert not kernels.available()
    with torch.inference_mode():
        for n in (4, 40):
            torch.testing.assert_close(model(ids[:, :n])[0], ref(ids[:, :n])[0], rtol=1e-5, atol=1e-5)


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(SlmError, match=r"'int2' is not supported; use one of fp32, bf16, int8, int4"):
        quantize(_model(), "int2")  # type: ignore[arg-type]
    model = _model()
    assert quantize(model, "fp32") is model
