"""The CSR weight kind of the C kernels (very sparse models): the sparse product against a float64 reference on odd
shapes, rows independent of the batch, and the fused decode step of a pruned model against the PyTorch forward —
batch-1 and batched, on each instruction path this machine builds (AVX-512 gathers and transposes, scalar C)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from slmkit import kernels
from slmkit.compress.prune import prune_model
from slmkit.config import ModelConfig
from slmkit.infer.fused import BatchDecoder, FusedDecoder
from slmkit.model import GPT
from tests.conftest import noisy_weights
from tests.infer.test_kernels import use_build

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")


@pytest.fixture(params=["native", "scalar"])
def build(request, monkeypatch) -> str:
    use_build({"native": "", "scalar": "-mno-avx2"}[request.param], monkeypatch)
    return request.param


def sparse(N: int, K: int, density: float, seed: int = 0, bf16: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) < density)
    return w.bfloat16().float() if bf16 else w


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("N", "K", "density"), [(37, 53, 0.1), (65, 129, 0.05), (100, 70, 0.9), (16, 16, 1.0),
                                                 (31, 1000, 0.0), (3, 17, 0.3)])
def test_csr_product_equals_the_dense_one_and_rows_do_not_depend_on_the_batch(build, N, K, density, bf16):
    w = sparse(N, K, density, seed=N, bf16=bf16)
    b = torch.randn(N)
    x = torch.randn(33, K)
    want = F.linear(x.double(), w.double(), b.double()).float()
    one = torch.cat([kernels.sparse_matmul(x[i : i + 1], w, b) for i in range(5)])
    torch.testing.assert_close(one, want[:5], rtol=1e-5, atol=1e-5)
    for M in (2, 3, 5, 17, 33):  # below and above CSR_T_MIN (gathers, then transposed chunks of 16 rows)
        got = kernels.sparse_matmul(x[:M], w, b)
        assert torch.equal(got[:5], one[: min(M, 5)]), M  # bit for bit: the same lanes and tree on every path


def test_csr_values_are_bf16_only_when_that_is_exact():
    w = sparse(8, 40, 0.2)
    assert kernels.csr(w)[0].kind == kernels.W_CSR32
    assert kernels.csr(w.bfloat16().float())[0].kind == kernels.W_CSR16
    _, (val, col, off) = kernels.csr(w)
    assert off[-1] == val.numel() == int((w != 0).sum()) and col.dtype == torch.uint16
    with pytest.raises(ValueError, match="65536"):
        kernels.csr(torch.zeros(2, 70000))


def test_csr_widens_to_the_dense_matrix():
    w = sparse(20, 33, 0.2)
    m, _keep = kernels.csr(w)
    out = torch.empty(7, 33)
    kernels._lib.slm_widen(ctypes.byref(m), 10, 17, out.data_ptr(), 1)
    assert torch.equal(out, w[10:17])


TINY = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, pos="rope",
                   norm="rmsnorm", mlp="swiglu")
GELU = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_embd=48, block_size=32, bias=True)


def pruned(cfg: ModelConfig, s: float = 0.9) -> GPT:
    torch.manual_seed(0)
    return prune_model(noisy_weights(GPT(cfg)).eval(), "magnitude", s)


@pytest.mark.parametrize("cfg", [TINY, GELU], ids=["llama", "gpt2-bias"])
def test_fused_decode_of_a_pruned_model_reads_csr_and_matches_pytorch(build, cfg):
    model = pruned(cfg)
    ids = torch.randint(0, 61, (1, 14), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, 32)
    with torch.inference_mode():
        want = model(ids)[0][0, 6:]
        model(ids[:, :6], cache=cache)
        dec = FusedDecoder.for_model(model, cache)
        assert dec is not None
        layer = dec._cm.layers[0]
        assert {layer.qkv.kind, layer.proj.kind, layer.fc.kind, layer.down.kind} == {kernels.W_CSR32}
        assert dec._cm.head.kind == 2  # the head (tied embeddings) is never pruned: dense fp32
        got = []
        for t in range(6, 14):
            got.append(dec(int(ids[0, t]), cache.pos).clone())
            cache.pos += 1
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("S", [2, 5], ids=["gather", "transposed"])
def test_batched_decode_of_a_pruned_model_equals_batch_1(build, S):
    model = pruned(TINY)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (1, 3 + i), generator=g) for i in range(S)]
    steps = torch.randint(0, 61, (S, 4), generator=g)
    alone = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):  # each sequence by itself, batch 1
            cache = model.new_cache(1, 32)
            model(p, cache=cache)
            dec = FusedDecoder.for_model(model, cache)
            rows = []
            for t in range(4):
                rows.append(dec(int(steps[i, t]), cache.pos).clone())
                cache.pos += 1
            alone.append(torch.stack(rows))
        cache = model.new_cache(S, 32)
        views = [cache.slot(i) for i in range(S)]
        for v, p in zip(views, prompts, strict=True):
            model(p, cache=v)
        dec = BatchDecoder.for_model(model, cache)
        assert dec._cm.layers[1].fc.kind == kernels.W_CSR32
        for t in range(4):
            out = dec(steps[:, t].tolist(), list(range(S)), [v.pos for v in views])
            for i, v in enumerate(views):
                assert torch.equal(out[i], alone[i][t]), (i, t)
                v.pos += 1


def test_dense_and_lightly_pruned_layers_stay_dense_and_csr_follows_weight_updates():
    model = pruned(TINY, 0.5)
    cache = model.new_cache(1, 32)
    assert FusedDecoder.for_model(model, cache)._cm.layers[0].fc.kind == 2  # 50 % zeros: the dense kernel
    prune_model(model, "magnitude", 0.95)  # in place: the cached views see the new version
    assert FusedDecoder.for_model(model, cache)._cm.layers[0].fc.kind == kernels.W_CSR32
