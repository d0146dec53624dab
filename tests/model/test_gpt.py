"""The transformer: shapes, causality, cached == full forward, parameter accounting, and logits equal to
transformers' GPT-2 / Llama implementations given the same weights."""

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.model import GPT

STYLES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
    "sinusoidal": dict(pos="sinusoidal", tie_embeddings=False),
    "nopos": dict(pos="none", norm="rmsnorm"),
}


def tiny(style: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, **{**STYLES[style], **kw})
    return GPT(cfg).eval()


@pytest.mark.parametrize("style", STYLES)
def test_shapes_and_loss(style):
    m = tiny(style)
    x = torch.randint(0, 97, (3, 16))
    logits, loss = m(x, torch.randint(0, 97, (3, 16)), return_logits=True)
    assert logits.shape == (3, 16, 97)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near-uniform at init


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("style", ["llama", "sinusoidal"])  # a head tied to the embedding, and one of its own
def test_the_fused_head_and_loss_train_as_the_logits_path_does(style, bf16):
    """GPT.forward with targets and a frozen head runs the head and the loss together (no logits): the same loss and
    the same gradients in every other parameter as the head's logits through cross_entropy."""
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    y[0, :4] = -1
    grads = []
    for fused in (True, False):
        m = tiny(style).train()
        m.lm_head.weight.requires_grad_(False)  # frozen (as under LoRA); tied: the embedding too
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, loss = m(x, y, return_logits=not fused)
        assert (logits is None) == fused
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = grads
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)  # bf16: chunks round differently
    torch.testing.assert_close(l1, l2, **tol)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **tol, msg=name)


@pytest.mark.parametrize("style", STYLES)
def test_causal_no_future_leakage(style):
    m = tiny(style)
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 97
    a, _ = m(x)
    b, _ = m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_matches_full_forward(style):
    m = tiny(style)
    x = torch.randint(0, 97, (2, 24))
    full, _ = m(x)
    cache = m.new_cache(2)
    parts = [m(x[:, :10], cache=cache)[0]]  # prefill
    parts.append(m(x[:, 10:15], cache=cache)[0])  # a chunk after a prefix (explicit mask path)
    parts += [m(x[:, t : t + 1], cache=cache)[0] for t in range(15, 24)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_parameter_accounting_tied_vs_untied():
    tied, untied = tiny("gpt2"), tiny("gpt2", tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 97 * 32
    # GPT-2 block: 12·d² weights + biases (qkv 3d, proj d, fc 4d, proj d, 2 LayerNorms 4d) = 12d² + 13d
    d = 32
    per_block = 12 * d * d + 13 * d
    assert tied.num_params(non_embedding=True) == 2 * per_block + 2 * d  # + final LayerNorm
    assert tied.flops_per_token() == 6 * (2 * 12 * d * d + 97 * d) + 12 * 2 * d * 32


def test_block_size_is_enforced():
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny("gpt2")(torch.zeros(1, 33, dtype=torch.long))


def _hf_gpt2(m: GPT):
    transformers = pytest.importorskip("transformers")
    c = m.config
    hc = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                 n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu",
                                 layer_norm_epsilon=c.norm_eps, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    sd = {"transformer.wte.weight": m.tok_emb.weight, "transformer.wpe.weight": m.pos_emb.weight,
          "transformer.ln_f.weight": m.norm_f.weight, "transformer.ln_f.bias": m.norm_f.bias}
    for i, b in enumerate(m.blocks):
        p = f"transformer.h.{i}."
        # HF GPT-2 uses Conv1D: weights stored (in, out), i.e. transposed nn.Linear
        sd |= {p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
               p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
               p + "attn.c_attn.weight": b.attn.qkv.weight.T, p + "attn.c_attn.bias": b.attn.qkv.bias,
               p + "attn.c_proj.weight": b.attn.proj.weight.T, p + "attn.c_proj.bias": b.attn.proj.bias,
               p + "mlp.c_fc.weight": b.mlp.fc.weight.T, p + "mlp.c_fc.bias": b.mlp.fc.bias,
               p + "mlp.c_proj.weight": b.mlp.proj.weight.T, p + "mlp.c_proj.bias": b.mlp.proj.bias}
    hf.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()}, strict=False)
    hf.tie_weights()
    return hf


def _hf_llama(m: GPT):
    transformers = pytest.importorskip("transformers")
    c = m.config
    hc = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                  num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
                                  rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(hc).eval()
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    sd = {"model.embed_tokens.weight": m.tok_emb.weight, "model.norm.weight": m.norm_f.weight,
          "lm_head.weight": m.tok_emb.weight}
    for i, b in enumerate(m.blocks):
        p = f"model.layers.{i}."
        wq, wk, wv = b.attn.qkv.weight.split([q, kv, kv])
        gate, up = b.mlp.fc.weight.chunk(2)
        sd |= {p + "input_layernorm.weight": b.norm1.weight, p + "post_attention_layernorm.weight": b.norm2.weight,
               p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
               p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": b.attn.proj.weight,
               p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
               p + "mlp.down_proj.weight": b.mlp.proj.weight}
    hf.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()})
    return hf


@pytest.mark.slow  # importing transformers alone takes ~2 s
@pytest.mark.parametrize(("style", "to_hf"), [("gpt2", _hf_gpt2), ("llama", _hf_llama)])
def test_logits_match_transformers(style, to_hf):
    m = tiny(style)
    hf = to_hf(m)
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        ours, _ = m(x)
        ref = hf(input_ids=x).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv", ["fp32", "int8"])
@pytest.mark.parametrize("attention", ["full", "linear"])
def test_cache_slots_are_independent_sequences_over_shared_storage(kv, attention):
    if attention == "linear" and kv != "fp32":
        pytest.skip("linear attention keeps no keys/values to round")
    m = tiny("llama", attention=attention)
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))
    cache = m.new_cache(3, kv=kv)
    s2, s0 = cache.slot(2), cache.slot(0)
    # interleaved, at different lengths: each slot sees only its own sequence
    got_b = [m(b[:, :4], cache=s0)[0]]
    got_a = [m(a[:, :9], cache=s2)[0]]
    got_b.append(m(b[:, 4:], cache=s0)[0])
    got_a += [m(a[:, t : t + 1], cache=s2)[0] for t in range(9, 12)]
    for x, parts in ((a, got_a), (b, got_b)):
        ref = m.new_cache(1, kv=kv)
        want = torch.cat([m(x[:, :-3], cache=ref)[0], m(x[:, -3:], cache=ref)[0]], dim=1)
        torch.testing.assert_close(torch.cat(parts, dim=1), want, atol=1e-5, rtol=1e-4)
    if attention == "full":  # what the slots stored is in the batch cache's own rows; slot 1 untouched
        assert cache.k[0][2, :, :12].abs().sum() > 0 and cache.k[0][0, :, :7].abs().sum() > 0
        assert cache.k[0][1].abs().sum() == 0
    with pytest.raises(IndexError):
        cache.slot(3)
