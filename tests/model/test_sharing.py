"""Parameter sharing (FFN across layers, cycled blocks), low-rank factorised projections, weight tying and the
byte-level presets: parameter counts by formula, checkpoints that hold each shared weight once, loss decrease."""

import pytest
import torch

from slmkit import checkpoint
from slmkit.config import PRESETS, ModelConfig
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

V, C, L = 259, 32, 4
BASE = dict(vocab_size=V, block_size=32, n_layer=L, n_head=4, n_embd=C, pos="rope")  # bias=False: norms have weights
ATTN, MLP, NORMS = 4 * C * C, 8 * C * C, 2 * C  # GPT-2 style block without biases


def build(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**BASE, **kw})).eval()


def test_dense_count_formula():
    assert build().num_params() == V * C + L * (ATTN + MLP + NORMS) + C  # tied head: embeddings once


def test_tied_vs_untied():
    assert build(tie_embeddings=False).num_params() - build().num_params() == V * C


def test_shared_mlp_is_counted_and_stored_once():
    m = build(share_mlp=True)
    assert m.num_params() == V * C + L * (ATTN + NORMS) + MLP + C
    assert all(b.mlp is m.shared_mlp for b in m.blocks)
    names = set(m.state_dict())
    assert {"shared_mlp.fc.weight", "shared_mlp.proj.weight"} <= names
    assert not any(".mlp." in n for n in names)
    # same compute per token as the unshared model: every layer still runs the FFN
    assert m.flops_per_token() == build().flops_per_token()


def test_shared_blocks_cycle_and_count_once():
    m = build(share_blocks=2)
    assert len(m.blocks) == 2
    assert m.num_params() == V * C + 2 * (ATTN + MLP + NORMS) + C
    assert m.flops_per_token() == build().flops_per_token()
    x = torch.randint(0, V, (2, 20))
    h = m.tok_emb(x)
    for i in range(L):
        h = m.blocks[i % 2](h, None, i)  # layer i uses block i % 2
    torch.testing.assert_close(m(x)[0], m.lm_head(m.norm_f(h)))


def test_lowrank_count_formula_and_init_scale():
    r = 8
    m = build(lowrank=r)
    qkv, proj, fc, mproj = r * (C + 3 * C), r * (C + C), r * (C + 4 * C), r * (4 * C + C)
    assert m.num_params() == V * C + L * (qkv + proj + fc + mproj + NORMS) + C
    w = m.blocks[0].mlp.fc
    product = w.b.weight @ w.a.weight  # (out, in), the dense matrix it stands for
    assert 0.5 * 0.02 < product.std().item() < 1.5 * 0.02  # same scale as a dense layer's init


def test_shared_moe_counts_experts_once():
    m = build(share_mlp=True, moe_experts=4, moe_top_k=1, mlp_hidden=64)
    expert = 2 * C * 64
    assert m.num_params() == V * C + L * (ATTN + NORMS) + 4 * expert + 4 * C + C
    assert m.num_params(active=True) == m.num_params() - 3 * expert
    x = torch.randint(0, V, (1, 10))
    m(x, x)
    assert len(m.moe_stats()["expert_util"]) == L  # one record per layer application of the shared module


@pytest.mark.parametrize("kw", [dict(share_mlp=True), dict(share_blocks=2), dict(lowrank=8),
                                dict(moe_experts=4, share_mlp=True), dict(attention="linear", linear_features=16),
                                dict(attention="lsh", attn_window=8, lsh_buckets=4)])
def test_checkpoint_round_trip(kw, tmp_path):
    """safetensors refuses aliased tensors: sharing must leave one name per weight; buffers (random features,
    rotations) travel with the weights."""
    m = build(**kw)
    checkpoint.save(tmp_path / "ck", m, Tokenizer.train("byte", []), {"step": 0})
    loaded = checkpoint.load(tmp_path / "ck").model
    x = torch.randint(0, V, (2, 24))
    torch.testing.assert_close(loaded(x)[0], m(x)[0])


@pytest.mark.parametrize("kw", [dict(share_mlp=True), dict(share_blocks=1, n_layer=3), dict(lowrank=8)])
def test_loss_decreases(kw, short_training):
    first, last = short_training(**kw)
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize(("overrides", "needle"), [
    (dict(lowrank=32), r"lowrank=32 must be < min\(n_embd, mlp_hidden\)=32"),
    (dict(lowrank=-1), "lowrank=-1 must be an integer >= 0"),
    (dict(share_blocks=5), "share_blocks=5 must be <= n_layer=4"),
])
def test_invalid_sharing_config(overrides, needle):
    with pytest.raises(SlmError, match=needle):
        ModelConfig(**{**BASE, **overrides})


def test_byte_presets_fit_the_byte_tokenizer():
    vocab = Tokenizer.train("byte", []).vocab_size
    assert vocab == 259
    small, mid = GPT(ModelConfig.preset("byte-0.8m")), GPT(ModelConfig.preset("byte-3m"))
    assert small.config.vocab_size == mid.config.vocab_size == vocab
    assert 0.7e6 < small.num_params() < 1e6
    assert 2.7e6 < mid.num_params() < 3.3e6


def test_spectrum_presets_exist_and_build():
    names = ["byte-0.8m", "byte-3m", "moe-3m", "local-3m", "blocksparse-3m", "linear-3m", "lsh-3m", "shared-3m",
             "lowrank-3m"]
    for name in names[2:]:  # "3m" = parameters per token at a 4096 BPE vocabulary (byte presets: tested above)
        m = GPT(ModelConfig.preset(name, vocab_size=4096))
        assert 3.0e6 < m.num_params(active=True) < 3.5e6, name
    assert set(names) <= set(PRESETS)
