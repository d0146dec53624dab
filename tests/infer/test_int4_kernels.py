"""The int4 C kernels against references: the matrix product on every instruction path this machine can run (the
SIMD one and the portable fallbacks, built with SLMKIT_KERNEL_FLAGS), prefill's widening, the fused decode step with
int4 dense and MoE models, and a compile check of the AVX-512 paths this machine cannot run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_kernels import CONFIGS, _cpu_has, _fused_logits, _model, use_build, variant_params  # tests/infer on sys.path

from slmkit import kernels
from slmkit.compress import quantize
from slmkit.infer import quantized
from slmkit.infer.engine import SamplingParams, generate
from slmkit.infer.quantized import QuantExperts, QuantLinear, dequantize, quantize_int4, unpack_int4

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")

# Builds of kernels.c: the flags, and the int4 dot each must use. "native" is VNNI on AVX-512 VNNI machines, else AVX2;
# "avx2" the AVX2 dot on VNNI machines too (the same build as native elsewhere); "-mno-f16c" converts the fp16 scales
# in portable C; "-mno-avx2" takes the scalar dot (and drops AVX-512 too).
VARIANTS = {"native": "", "avx2": "-mno-avx512f", "no-f16c": "-mno-f16c", "scalar": "-mno-avx2"}


@pytest.fixture(params=variant_params(VARIANTS))
def variant(request, monkeypatch):
    """Point slmkit.kernels at the build with this variant's flags (each built once per session)."""
    name = request.param
    if name == "avx2" and not _cpu_has("avx512_vnni"):
        pytest.skip("without AVX-512 VNNI the native build's int4 dot is the AVX2 one")
    feats, simd = use_build(VARIANTS[name], monkeypatch), _cpu_has("avx2")
    if name == "scalar":
        assert not feats & {"avx2", "vnni"}
    else:
        assert bool(feats & {"avx2", "vnni"}) == simd and (name != "no-f16c" or "f16c" not in feats)
        assert name != "avx2" or "vnni" not in feats
        assert name != "native" or ("vnni" in feats) == _cpu_has("avx512_vnni")
    return name


def _weights(N: int, K: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 weights of a random matrix; every fifth row tiny, so its fp16 scales are subnormal (< 2^-14)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[::5] *= 1e-4
    packed, scale = quantize_int4(w, group)
    assert (scale[::5].abs() < 2**-14).all()
    return packed, scale


def _acts(M: int, K: int, seed: int) -> torch.Tensor:
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, :32] = 0  # an all-zero activation block: scale 0, no 0/0
    return x


def _emulated(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the int4 kernel computes, step by step: x rounded to int8 per block of 32 in fp32 arithmetic as the C code
    does it (inv = 127 / amax, round half to even), exact integer dot products per block, each scaled by activation
    scale × weight scale."""
    M, K = x.shape
    xb = x.view(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq, xs = torch.round(xb * inv), (amax / 127.0)[..., 0]  # (M, K/32, 32), (M, K/32)
    q = unpack_int4(packed).double().view(packed.shape[0], K // 32, 32)
    dots = torch.einsum("mbk,nbk->mnb", xq.double(), q)
    ws = scale.float().repeat_interleave(K // scale.shape[1] // 32, dim=1)  # (N, K/32)
    y = (dots * (xs[:, None, :] * ws[None]).double()).sum(-1)
    return (y if bias is None else y + bias.double()).float()


def _rounding_bound(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How far the kernel may be from the exact product x @ dequantize(weight)ᵀ: rounding x to int8 per block of 32
    moves each value by at most half its block's step amax / 127, so output (m, n) moves by at most
    Σ_blocks (step / 2) · Σ_block |w[n, k]| — plus fp32 accumulation, covered by a 1e-4 relative slack."""
    M, K = x.shape
    step = x.view(M, K // 32, 32).abs().amax(-1) / 127  # (M, K/32)
    wabs = dequantize(packed, scale).abs().view(packed.shape[0], K // 32, 32).sum(-1)  # (N, K/32)
    return step / 2 @ wabs.T * (1 + 1e-4) + 1e-4


def _check(x, packed, scale, bias):
    got = kernels.matmul(x, packed, scale, bias)
    torch.testing.assert_close(got, _emulated(x, packed, scale, bias), rtol=1e-5, atol=1e-4)
    exact = F.linear(x, dequantize(packed, scale), bias)
    assert ((got - exact).abs() <= _rounding_bound(x, packed, scale)).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matmul_is_block_quantized_arithmetic_within_the_rounding_bound(variant, group):
    for K in (32, 96, 128, 160, 320, 384):  # 96, 160, 320: not multiples of 64 (an odd number of 32-blocks)
        if K % group:
            continue
        packed, scale = _weights(37, K, group, seed=K + group)
        for M in (1, 3, 16):
            x = _acts(M, K, seed=M * K)
            _check(x, packed, scale, None)
            _check(x, packed, scale, torch.randn(37, generator=torch.Generator().manual_seed(M)))


@pytest.mark.parametrize("break_", ["nibbles swapped", "scales of another group"])
def test_a_wrong_layout_fails_the_check(break_):
    """The check above can fail: the kernel fed a layout it does not read (as a kernel reading the wrong layout
    would compute) lands outside the rounding bound."""
    packed, scale = _weights(37, 128, 32, seed=0)
    x = _acts(3, 128, seed=1)
    if break_ == "nibbles swapped":
        got = kernels.matmul(x, (packed >> 4) | (packed << 4), scale)
    else:  # group 64's scales: the kernel reads scale[n, k // 64] where k // 32 was meant
        got = kernels.matmul(x, packed, scale[:, ::2].contiguous())
    exact = F.linear(x, dequantize(packed, scale))
    assert not ((got - exact).abs() <= _rounding_bound(x, packed, scale)).all()


def test_widening_for_prefill_is_exactly_dequantize(variant, monkeypatch):
    """Larger batches widen a slice of rows at a time (here 7 rows, forced small) and use the fp32 GEMM: the same
    numbers as dequantize (the identity's product shows the widened weights bit for bit), activations exact."""
    monkeypatch.setattr(kernels, "WIDEN_BYTES", 7 * 4 * 128)
    packed, scale = _weights(37, 128, 64, seed=2)
    q8, s8 = torch.randint(-127, 128, (37, 128), dtype=torch.int8), torch.rand(37) + 0.5
    for w, s in ((packed, scale), (q8, s8), (torch.randn(37, 128).bfloat16(), None)):
        widened = kernels.widened_matmul(torch.eye(128), w, s)
        assert torch.equal(widened, dequantize(w, torch.ones(37) if s is None else s).T)
    x, b = _acts(quantized.VNNI_BATCH + 24, 128, seed=3), torch.randn(37)  # more rows than any kernel path takes
    lin = QuantLinear(packed, scale, b)
    # GEMM blockings differ in summation order only (~1e-5 here); rounded activations would be off by ~1e-2
    torch.testing.assert_close(lin(x), F.linear(x, dequantize(packed, scale), b), rtol=1e-4, atol=1e-4)


def test_bad_int4_weights_are_refused():
    packed, scale = _weights(4, 64, 32, seed=0)
    for bad in (None, scale.float(), scale.T.contiguous(), torch.ones(4, 3).half(), torch.ones(4, 4).half()):
        with pytest.raises(ValueError, match="int4 weights need their group scales"):
            kernels.mat(packed, bad)
    with pytest.raises(ValueError, match=r"x \[1, 32\] does not match the weight's 64 input features"):
        kernels.matmul(torch.randn(1, 32), packed, scale)


# --- the fused decode step with int4 weights ------------------------------------------------------------------------

FUSED = [("llama", 32), ("gpt2", 64), ("gpt2", 128), ("moe-top2", 32), ("moe-top1-gelu-bias", 128)]


@pytest.mark.parametrize("name, group", FUSED)
def test_fused_int4_decode_matches_pytorch(name, group, monkeypatch):
    """An int4 model decodes through the C step (int4 QuantLinear and QuantExperts read in place) and gives the
    logits of PyTorch decoding the same model one token at a time, and the same greedy tokens; and both stay within
    the activation rounding of the exactly dequantized model (measured ≤ 0.9 %; a wrong kernel is off by ~100 %)."""
    model = quantize(_model(None, **CONFIGS[name]), "int4", group=group)
    mods = [m for m in model.modules() if isinstance(m, QuantLinear | QuantExperts)]
    assert mods and all(m.weight.dtype == torch.uint8 for m in mods)
    assert any(isinstance(m, QuantExperts) for m in mods) == name.startswith("moe")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    got = _fused_logits(model, ids, 6)
    with torch.inference_mode():  # PyTorch, one token at a time: each QuantLinear calls the int4 kernel with M = 1
        cache = model.new_cache(1, 32)
        model(ids[:, :6], cache=cache)
        stepwise = torch.stack([model(ids[:, t : t + 1], cache=cache)[0][0, -1] for t in range(6, 12)])
    torch.testing.assert_close(got, stepwise, rtol=1e-4, atol=1e-4)
    _same_greedy_tokens(model, [1, 2, 3], 20)
    monkeypatch.setattr(kernels, "available", lambda: False)  # the reference: dequantize + fp32 matmul in PyTorch
    with torch.inference_mode():
        exact = model(ids)[0][0, 6:]
    assert (got - exact).norm() / exact.norm() < 0.02


def _same_greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the fused C step equal PyTorch's, step by step — except where the two were at a near tie:
    int8 activation rounding turns a 1-ulp difference elsewhere (another CPU's attention or norm code) into a
    different rounding of one activation, which may flip a tie. Such a flip must be a tie in the reference's logits."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    fast, slow = list(generate(model, prompt, params)), list(generate(model, prompt, params, fast=False))
    i = next((j for j, (a, b) in enumerate(zip(fast, slow, strict=True)) if a != b), None)
    if i is not None:
        with torch.inference_mode():
            logits = model(torch.tensor([[*prompt, *slow[:i]]]))[0][0, -1]
        gap = float(logits[slow[i]] - logits[fast[i]]).__abs__()
        assert gap < 1e-2 * float(logits.abs().max()), (i, fast, slow, gap)
    return slow


def test_fused_int4_greedy_decoding_varies():
    """The token comparison above is not vacuous: with larger weights greedy decoding does not repeat one token."""
    model = quantize(_model(**CONFIGS["llama"]), "int4")
    assert len(set(_same_greedy_tokens(model, [1, 2, 3], 20))) >= 5


def test_int4_model_is_close_to_fp32():
    model = _model(None, **CONFIGS["llama"])
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)[0][0, 6:]
    got = _fused_logits(quantize(copy.deepcopy(model), "int4"), ids, 6)
    assert (got - want).norm() / want.norm() < 0.2  # measured 0.11: 4-bit RTN of Gaussian weights, group 32


# --- paths this machine may not run ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the kernels are built on Linux only")
@pytest.mark.parametrize("march", ["skylake-avx512", "icelake-server", "sapphirerapids"])
def test_avx512_paths_compile(march, tmp_path):
    """AVX-512 (no VNNI), AVX-512 VNNI, and VNNI + BF16 builds compile without implicit declarations (a misspelled
    intrinsic would otherwise only fail when loaded on such a machine)."""
    src = Path(kernels.__file__).parent / "csrc" / "kernels.c"
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O3", f"-march={march}", "-fopenmp", "-Wall",
           "-Werror=implicit-function-declaration",
           "-Werror=incompatible-pointer-types", "-c", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode and ("unrecognized" in res.stderr or "bad value" in res.stderr):
        pytest.skip(f"{cc} does not know -march={march}")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
