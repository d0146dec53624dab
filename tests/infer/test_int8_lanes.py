"""The int8 kernels for several activation rows (kernels.c: tile_q8_amx with AMX; tile_q8_lanes for 2 to 16 rows
and tile_q8 for the others with AVX-512 VNNI; the AVX2 and scalar rows elsewhere): every row of a batched product is
bit for bit that row's product alone and the same on every VNNI build, and the product is the block-quantized
arithmetic's — over shapes, whole and partial tiles, and the int8 extremes."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import use_build, variant  # noqa: F401  (variant: a fixture) tests/infer is on sys.path

from slmkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")


def _reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the int8 kernels compute: activations rounded to int8 per block of QBLOCK (an all-zero block to zeros),
    exact integer dot products, in float64."""
    M, K = x.shape
    xb = x.view(M, K // kernels.QBLOCK, kernels.QBLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    # fp32 as in the C: x times (127 / amax), one division (torch's `127 / t` multiplies by a reciprocal instead)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    xq = torch.round(xb * inv).double()
    xs = (amax / 127).double()
    dots = torch.einsum("mbk,nbk->mnb", xq, q.double().view(q.shape[0], K // kernels.QBLOCK, kernels.QBLOCK))
    return ((dots * xs.squeeze(-1)[:, None, :]).sum(-1) * scale.double()).float()


def _weights(g: torch.Generator, N: int, K: int, extremes: int, low: int = -127) -> torch.Tensor:
    """Random int8 weights in low..127; `extremes` rows (from the first) all `low` or all 127, and a column of each.
    slmkit's int8 weights are symmetric (-127..127): the row kernels' sign trick (dot_q8) relies on it; the tiles
    take -128 too."""
    q = torch.randint(low, 128, (N, K), dtype=torch.int8, generator=g)
    for n in range(min(extremes, N)):
        q[n] = low if n % 2 == 0 else 127
    q[:, 0], q[:, -1] = low, 127
    return q


def _check(M: int, N: int, K: int, extremes: int, bias: bool, seed: int, low: int = -127) -> None:
    g = torch.Generator().manual_seed(seed)
    q = _weights(g, N, K, extremes, low)
    scale = torch.rand(N, generator=g) / 100 + 1e-4
    b = torch.randn(N, generator=g) if bias else None
    # rows of very different magnitudes, an all-zero row, and a row whose blocks round to +-127 everywhere
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g).pow(4) * 100
    if M > 1:
        x[1] = 0
    if M > 2:
        x[2] = torch.where(torch.arange(K) % 2 == 0, 1.0, -1.0)
    got = kernels.matmul(x, q, scale, b)
    alone = torch.cat([kernels.matmul(x[m : m + 1], q, scale, b) for m in range(M)])
    assert torch.equal(got, alone)
    want = x @ (q.float() * scale[:, None]).T  # widened weights, exact activations: the scalar build
    if kernels.features() & {"vnni", "avx2"}:
        want = _reference(x, q, scale)
    if b is not None:
        want = want + b
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-3)  # fp32 sums in another order


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 40), N=st.integers(1, 70), blocks=st.integers(1, 6), extremes=st.integers(0, 3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_rows_of_a_batch_equal_each_row_alone(variant, M, N, blocks, extremes, bias, seed):  # noqa: F811
    _check(M, N, blocks * kernels.QBLOCK, extremes, bias, seed)


@pytest.mark.skipif(not kernels.available() or "vnni" not in kernels.features(), reason="no AVX-512 VNNI")
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 40), tiles=st.integers(1, 4), blocks=st.integers(1, 6), extremes=st.integers(0, 3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_whole_tiles_take_minus_128_too(M, tiles, blocks, extremes, bias, seed):
    _check(M, tiles * kernels.TILE, blocks * kernels.QBLOCK, extremes, bias, seed, low=-128)


# Builds whose int8 products must agree bit for bit (AVX-512 VNNI machines): AMX tiles where the CPU has them (from 2
# rows by default, from 1 with -DAMX_MIN=1), the VNNI lanes without AMX, and tile_q8 alone (no lanes; as on a build
# before them).
VNNI_BUILDS = {"amx": "", "amx1": "-DAMX_MIN=1", "lanes": "-mno-amx-tile -mno-amx-int8",
               "tile_q8": "-mno-amx-tile -DLANES_MIN=99"}


@pytest.mark.skipif(not kernels.available() or "vnni" not in kernels.features(), reason="no AVX-512 VNNI")
@pytest.mark.parametrize("N, K", [(48, 192), (37, 576)])
def test_the_int8_kernels_agree_bit_for_bit(monkeypatch, N, K):
    g = torch.Generator().manual_seed(N)
    q, scale, bias = _weights(g, N, K, 3), torch.rand(N, generator=g), torch.randn(N, generator=g)
    x = torch.randn(40, K, generator=g)
    results = {}
    for name, flags in VNNI_BUILDS.items():
        feats = use_build(flags, monkeypatch)
        assert name.startswith("amx") or "amx" not in feats
        results[name] = [kernels.matmul(x[:M], q, scale, bias) for M in [*range(1, 18), 32, 33, 40]]
    for name in VNNI_BUILDS:
        for got, want in zip(results[name], results["tile_q8"], strict=True):
            assert torch.equal(got, want), name


def test_weight_sums_are_each_tiles_block_sums():
    g = torch.Generator().manual_seed(0)
    N, K = 2 * kernels.TILE + 5, 3 * kernels.QBLOCK
    q = _weights(g, N, K, 2)
    m = kernels.mat(q, torch.ones(N))
    T, nb = N // kernels.TILE, K // kernels.QBLOCK
    got = torch.tensor(m.wsum[: T * nb * kernels.TILE]).view(T, nb, kernels.TILE)
    want = q[: T * kernels.TILE].view(T, kernels.TILE, nb, kernels.QBLOCK).sum(-1).transpose(1, 2)
    assert torch.equal(got.long(), want)
    # where the kernel does not apply, no sums
    assert not kernels.mat(q[:, :100].contiguous(), torch.ones(N)).wsum
    assert not kernels.mat(q[: kernels.TILE - 1].contiguous(), torch.ones(kernels.TILE - 1)).wsum
    assert not kernels.mat(q.float()).wsum


def test_the_sums_outlive_the_call_that_made_them():
    """A Mat copied into another struct (fused.py builds Layer and Model from them) keeps its sums alive."""
    q = torch.randint(-128, 128, (kernels.TILE, kernels.QBLOCK), dtype=torch.int8)
    layer = kernels.Layer(None, None, None, None, kernels.mat(q, torch.ones(kernels.TILE)))
    import gc

    gc.collect()
    junk = [torch.full((kernels.TILE * 4,), 7, dtype=torch.int16) for _ in range(100)]  # reuse freed memory
    assert ctypes.cast(layer.qkv.wsum, ctypes.c_void_p).value
    want = q.view(1, kernels.TILE, 1, kernels.QBLOCK).sum(-1).transpose(1, 2).flatten()
    assert [layer.qkv.wsum[i] for i in range(kernels.TILE)] == want.tolist()
    del junk
