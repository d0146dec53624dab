"""The C kernels against exact references: each weight kind, ragged shapes, bias, and the fused decode step against
the PyTorch forward on every model configuration it covers — on each instruction path this machine can run (AVX-512,
AVX2, scalar C; builds with SLMKIT_KERNEL_FLAGS)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmkit import kernels
from slmkit.compress import quantize
from slmkit.config import ModelConfig
from slmkit.finetune.lora import add_lora
from slmkit.infer.engine import SamplingParams, generate
from slmkit.infer.fused import FusedDecoder
from slmkit.model import GPT

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")

# Builds of kernels.c: "native" is AVX-512 where the CPU has it, else AVX2 + FMA; "avx2" takes the AVX2 paths on
# AVX-512 machines too (the same build as native elsewhere); "scalar" the portable C loops.
VARIANTS = {"native": "", "avx2": "-mno-avx512f", "scalar": "-mno-avx2"}
_built: dict[str, object] = {}


def use_build(flags: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Point slmkit.kernels at the build of kernels.c with these SLMKIT_KERNEL_FLAGS (built once per session)
    and return its features; skip when it does not build."""
    if flags not in _built:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLMKIT_KERNEL_FLAGS", flags)
            _built[flags] = kernels._build()
    if not _built[flags]:
        pytest.skip(f"kernels.c does not build with {flags!r}")
    monkeypatch.setattr(kernels, "_lib", _built[flags])
    return kernels.features()


def _cpu_has(flag: str) -> bool:
    return f" {flag} " in Path("/proc/cpuinfo").read_text() + " "


def variant_params(names) -> list:
    """The builds as fixture params: the quick lane (-m "not slow") checks the native build, the full suite all."""
    return [pytest.param(n, marks=() if n == "native" else pytest.mark.slow) for n in names]


@pytest.fixture(params=variant_params(VARIANTS))
def variant(request, monkeypatch) -> str:
    name = request.param
    if name == "avx2" and not _cpu_has("avx512f"):
        pytest.skip("without AVX-512 the native build is the AVX2 one")
    feats = use_build(VARIANTS[name], monkeypatch)
    if name == "scalar":
        assert not feats & {"avx2", "vnni", "avx512"}
    else:
        assert ("avx2" in feats) == (_cpu_has("avx2") and _cpu_has("fma"))
        assert ("avx512" in feats) == (name == "native" and _cpu_has("avx512f"))
    return name


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _vnni_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel computes: activations rounded to int8 per block of 64, exact integer dot products."""
    M, K = x.shape
    xb = x.view(M, K // kernels.QBLOCK, kernels.QBLOCK).double()
    xs = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xb / xs)
    dots = torch.einsum("mbk,nbk->mnb", xq, q.double().view(q.shape[0], K // kernels.QBLOCK, kernels.QBLOCK))
    return ((dots * xs.squeeze(-1)[:, None, :]).sum(-1) * scale.double()).float()


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N", [37, 128])
@pytest.mark.parametrize("K", [200, 203])  # 200 = 6 x 32 + 8 and 203 leave the SIMD loops' tails a scalar rest
def test_fp32_matches_matmul(variant, M, N, K):
    torch.manual_seed(M * N + K)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    torch.testing.assert_close(kernels.matmul(x, w, None, b), x @ w.T + b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [1, 5])
def test_int8_is_exact_block_quantized_arithmetic(variant, M):
    """SIMD builds quantize the activations (3 blocks here: an odd number), scalar ones widen the weights."""
    torch.manual_seed(M)
    x, w = torch.randn(M, 192), torch.randn(67, 192)
    q, scale = _int8(w)
    got = kernels.matmul(x, q, scale)
    quantized = kernels.features() & {"vnni", "avx2"}
    want = _vnni_reference(x, q, scale) if quantized else x @ (q.float() * scale[:, None]).T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and close to the fp32 product: int8 weights and activations cost well under 2% here
    exact = x @ w.T
    assert (got - exact).norm() / exact.norm() < 0.02


def test_int8_with_ragged_k_widens_weights_and_keeps_activations_exact(variant):
    torch.manual_seed(1)
    x, w = torch.randn(2, 100), torch.randn(9, 100)  # 100 is not a multiple of 64
    q, scale = _int8(w)
    torch.testing.assert_close(kernels.matmul(x, q, scale), x @ (q.float() * scale[:, None]).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("K", [96, 100])
def test_bf16_is_the_bf16_product(variant, K):
    torch.manual_seed(K)
    x, w = torch.randn(3, K), torch.randn(21, K).bfloat16()
    got = kernels.matmul(x, w)
    exact = x @ w.float().T
    if K % 32 == 0 and "bf16" in kernels.features():  # vdpbf16ps: activations rounded to bf16 too
        torch.testing.assert_close(got, x.bfloat16().float() @ w.float().T, rtol=1e-4, atol=1e-3)
    else:  # widened weights, exact activations
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-4)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="int8 weights need"):
        kernels.matmul(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="contiguous 2-D"):
        kernels.matmul(torch.randn(1, 64), torch.zeros(64, 4).T)


CONFIGS = {
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "sinusoidal-untied": dict(pos="sinusoidal", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=False),
    "nopos-shared-mlp": dict(pos="none", norm="rmsnorm", mlp="swiglu", share_mlp=True),
    "shared-blocks": dict(pos="rope", norm="rmsnorm", mlp="swiglu", share_blocks=2),
    "local-window": dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention="local", attn_window=4),
    "moe-top2": dict(pos="rope", norm="rmsnorm", mlp="swiglu", moe_experts=4, moe_top_k=2),
    "moe-top1-gelu-bias": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, moe_experts=3, moe_top_k=1),
    # head_dim 24 and 20: the vector attention paths (16 lanes AVX-512, 8 AVX2) leave a scalar tail / fall back to
    # scalar
    "head-dim-24": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_embd=96, n_head=4, n_kv_head=2),
    "head-dim-20": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_embd=80, n_head=4, n_kv_head=2),
}


def _model(std: float | None = 0.2, **kw) -> GPT:
    """std: redraw the matrices larger than the init's 0.02, so errors are not hidden by tiny activations (and greedy
    decoding does not collapse onto one token); None keeps the init."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 97, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and std is not None:
                p.normal_(0, std)
    return model


def _fused_logits(model: GPT, ids: torch.Tensor, split: int, kv: str = "fp32") -> torch.Tensor:
    cache = model.new_cache(1, 32, kv=kv)
    with torch.inference_mode():
        model(ids[:, :split], cache=cache)
        dec = FusedDecoder.for_model(model, cache)
        assert dec is not None
        out = []
        for t in range(split, ids.size(1)):
            out.append(dec(int(ids[0, t]), cache.pos).clone())
            cache.pos += 1
    return torch.stack(out)


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_step_matches_pytorch(variant, name):
    model = _model(**CONFIGS[name])
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids)[0][0, 6:]
    torch.testing.assert_close(_fused_logits(model, ids, 6), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [("bf16", 0.01), ("int8", 0.03)])
def test_fused_step_with_quantized_weights_stays_close_to_fp32(variant, dtype, tol):
    model = _model(None, **CONFIGS["llama"])
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)[0][0, 6:]
    got = _fused_logits(quantize(copy.deepcopy(model), dtype), ids, 6)
    assert (got - want).norm() / want.norm() < tol


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
@pytest.mark.parametrize("name", ["moe-top2", "moe-top1-gelu-bias"])
def test_fused_step_matches_pytorch_for_quantized_moe(variant, name, dtype):
    """A quantized MoE still decodes through the C step, reading the packed experts in place, and computes what the
    PyTorch forward of the same quantized model does."""
    model = quantize(_model(**CONFIGS[name]), dtype)
    packed = {"int8": torch.int8, "bf16": torch.bfloat16}[dtype]
    assert all(block.mlp.fc.weight.dtype == block.mlp.proj.weight.dtype == packed for block in model.blocks)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = model(ids)[0][0, 6:]
    got = _fused_logits(model, ids, 6)
    if dtype == "bf16" and "bf16" in kernels.features():  # vdpbf16ps rounds the activations to bf16 as well
        assert (got - want).norm() / want.norm() < 0.01
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    fast = list(generate(model, [1, 2, 3], params))
    assert fast == list(generate(model, [1, 2, 3], params, fast=False)) and len(set(fast)) >= 5


def _stepped_logits(model: GPT, ids: torch.Tensor, split: int, kv: str) -> torch.Tensor:
    """PyTorch: prefill ids[:split] into a `kv` cache, then one token per forward."""
    cache = model.new_cache(1, 32, kv=kv)
    with torch.inference_mode():
        model(ids[:, :split], cache=cache)
        out = []
        for t in range(split, ids.size(1)):
            out.append(model(ids[:, t : t + 1], cache=cache)[0][0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("kv, tol", [("bf16", 0.01), ("int8", 0.03)])
@pytest.mark.parametrize("name", ["llama", "gpt2", "local-window", "head-dim-20", "moe-top2"])
def test_fused_step_with_a_narrow_kv_cache_matches_pytorch(variant, name, kv, tol):
    """The C step reads the bf16/int8 rows the PyTorch prefill stored and stores its own by the same rounding rule,
    so both compute the same function of the stored values (up to a rounding tie that an fp32 last-bit difference
    tips the other way: a norm bound, not elementwise); that function stays close to the fp32 cache's (except for
    MoE, whose routing a rounded key can flip: measured ~47 % with int8 on these random weights)."""
    model = _model(**CONFIGS[name])
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(4))
    got, stepped = _fused_logits(model, ids, 6, kv), _stepped_logits(model, ids, 6, kv)
    assert (got - stepped).norm() / stepped.norm() < 2e-4
    with torch.inference_mode():
        exact = model(ids)[0][0, 6:]
    err = ((got - exact).norm() / exact.norm()).item()
    assert err > 1e-3 and (err < tol or name.startswith("moe"))  # rounded (not exact), and close


def test_generate_fast_and_pytorch_paths_give_the_same_tokens(variant):
    model = _model(**CONFIGS["llama"])
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    fast = list(generate(model, [1, 2, 3], params))
    slow = list(generate(model, [1, 2, 3], params, fast=False))
    assert fast == slow and len(fast) == 40


def test_unsupported_models_fall_back():
    cache_of = lambda m: m.new_cache(1, 16)  # noqa: E731
    # an unmerged LoRA adapter: LoRALinear is no layer the C step reads (every attention kind and low-rank is)
    for model in (add_lora(_model(1.0, pos="rope"), rank=4),):  # std 1: varied greedy tokens, so the test can fail
        assert FusedDecoder.for_model(model, cache_of(model)) is None
        params = SamplingParams(max_new_tokens=12, temperature=0.0)
        fallback = list(generate(model, [1, 2, 3, 4], params))
        assert fallback == list(generate(model, [1, 2, 3, 4], params, use_cache=False)) and len(set(fallback)) >= 3
    model = _model(pos="rope")
    assert FusedDecoder.for_model(model, model.new_cache(2, 16)) is None  # batch 2


def test_moe_expert_copies_follow_weight_updates():
    model = _model(**CONFIGS["moe-top2"])
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    _fused_logits(model, ids, 5)  # caches the transposed experts
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc.mul_(-1.5)  # in place: same storage, new version
    with torch.inference_mode():
        want = model(ids)[0][0, 5:]
    torch.testing.assert_close(_fused_logits(model, ids, 5), want, rtol=1e-4, atol=1e-4)


def test_xent_rows_match_torch(variant):
    """The training loss's rows (slm_xent_rows): each row's loss, and its gradient written over the logits."""
    g = torch.Generator().manual_seed(5)
    for dt in (torch.float32, torch.bfloat16):
        z = (6 * torch.randn(13, 1001, generator=g)).to(dt)
        z[2, 7] = -200.0  # far below the row's max: exp underflows to 0
        y, scale = torch.randint(0, 1001, (13,), generator=g), torch.rand(13, generator=g)
        scale[4] = 0  # an ignored row: a zero gradient
        ref_z = z.float().clone().requires_grad_()
        ref = F.cross_entropy(ref_z, y, reduction="none")
        (ref * scale).sum().backward()
        out = z.clone()
        losses = kernels.xent_rows(out, y, scale)
        torch.testing.assert_close(losses, ref.detach(), rtol=1e-6, atol=2e-6)
        torch.testing.assert_close(out, ref_z.grad.to(dt), rtol=1e-5, atol=1e-7)  # computed in fp32, rounded once
        assert torch.all(out[4] == 0)
        again = z.clone()
        torch.testing.assert_close(kernels.xent_rows(again, y, None), losses)
        assert torch.equal(again, z)  # no scale: the logits are left as they were
