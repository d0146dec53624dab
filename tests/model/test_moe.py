"""Mixture-of-Experts FFN: dispatch against a per-token reference, capacity dropping, the load-balancing term, active
parameter accounting, that the reported loss stays the LM cross-entropy, and the trainer's utilisation records."""

import json

import pytest
import torch
import torch.nn.functional as F

from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.model.ffn import MoE, _activate

BASE = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="rope")


def moe_layer(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "moe_experts": 4, "moe_top_k": 2, "mlp_hidden": 24, **kw})
    m = MoE(cfg)
    m.init_experts(0.2, 0.2)
    nn_init = torch.nn.init
    nn_init.normal_(m.router.weight, std=0.5)
    if m.fc_bias is not None:
        nn_init.normal_(m.fc_bias, std=0.1)
        nn_init.normal_(m.proj_bias, std=0.1)
    return m


def reference(m: MoE, x: torch.Tensor, cap: int | None = None) -> torch.Tensor:
    """Token by token: Σ over its top-k experts of gate · expert(x); an expert past its capacity skips the token."""
    xf = x.reshape(-1, x.size(-1))
    probs = torch.softmax(xf @ m.router.weight.T, -1)
    out = torch.zeros_like(xf)
    load = [0] * m.E
    choices = [probs[n].topk(m.k) for n in range(len(xf))]
    served = {}  # assignments are served in (token, slot) order within each expert
    for n, (_, e) in enumerate(choices):
        for j in range(m.k):
            ei = int(e[j])
            served[(n, j)] = cap is None or load[ei] < cap
            load[ei] += 1
    for n, (p, e) in enumerate(choices):
        gates = p if m.k == 1 else p / p.sum()
        for j in range(m.k):
            if not served[(n, j)]:
                continue
            ei = int(e[j])
            h = xf[n] @ m.fc[ei] + (m.fc_bias[ei] if m.fc_bias is not None else 0)
            y = _activate(h, m.swiglu) @ m.proj[ei] + (m.proj_bias[ei] if m.proj_bias is not None else 0)
            out[n] += gates[j] * y
    return out.view_as(x)


@pytest.mark.parametrize("kw", [dict(), dict(moe_top_k=1), dict(mlp="swiglu"), dict(bias=True, moe_top_k=3)])
def test_dispatch_matches_per_token_reference(kw):
    m = moe_layer(**kw)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(m(x), reference(m, x), atol=1e-5, rtol=1e-5)
    counts = m.calls[-1].counts
    assert counts.sum() == 21 * m.k and m.calls[-1].dropped == 0


def test_capacity_drops_the_overflow_in_token_order():
    m = moe_layer(moe_capacity_factor=0.5)
    x = torch.randn(2, 10, 32)
    cap = -(-0.5 * 20 * 2 // 4)  # ceil(c · N·k / E) = 5
    out = m(x)
    torch.testing.assert_close(out, reference(m, x, cap=int(cap)), atol=1e-5, rtol=1e-5)
    assert m.calls[-1].dropped == int((m.calls[-1].counts - int(cap)).clamp(min=0).sum()) > 0


def test_load_balancing_term():
    m = moe_layer()
    torch.nn.init.zeros_(m.router.weight)  # uniform router: P_e = 1/E, so aux = E·Σ f_e/E = 1 whatever f is
    m(torch.randn(2, 8, 32))
    assert m.calls[-1].aux.item() == pytest.approx(1.0)
    with torch.no_grad():  # a router that sends everything to expert 0 (and prefers it strongly)
        m.router.weight.zero_()
        m.router.weight[0] = 10.0
    x = torch.randn(2, 8, 32).abs()  # positive inputs: expert 0's logit is largest for every token
    m(x)
    aux = m.calls[-1].aux
    f = m.calls[-1].counts.float() / 32
    p = torch.softmax(x.reshape(-1, 32) @ m.router.weight.T, -1).mean(0)
    assert aux.item() == pytest.approx(4 * (f * p).sum().item()) and aux.item() > 1.5


def test_returned_loss_is_the_lm_loss_and_aux_is_separate():
    torch.manual_seed(0)
    m = GPT(ModelConfig(**BASE, moe_experts=4, moe_top_k=2, moe_aux_loss_coef=0.5))
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    logits, loss = m(x, y, return_logits=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 61), y.view(-1)))
    assert m.aux_loss is not None and m.aux_loss.requires_grad
    assert m.aux_loss.item() == pytest.approx(0.5 * sum(c.aux.item() for c in m._moe_calls))
    assert len(m._moe_calls) == 2  # one record per layer, cleared each forward
    m(x)
    assert len(m._moe_calls) == 2
    (loss + m.aux_loss).backward()
    assert m.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    stats = m.moe_stats()
    assert len(stats["expert_util"]) == 2 and all(abs(sum(u) - 1) < 1e-3 for u in stats["expert_util"])


def test_dense_model_has_no_aux_and_same_param_names():
    m = GPT(ModelConfig(**BASE))
    m(torch.zeros(1, 4, dtype=torch.long))
    assert m.aux_loss is None and m.moe_stats() is None
    assert sorted(n for n in m.state_dict() if n.startswith("blocks.0.")) == [
        "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight",
        "blocks.0.norm1.weight", "blocks.0.norm2.weight"]


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_active_params_and_flops_by_formula(mlp):
    E, k, H, C, L = 8, 2, 48, 32, 2
    moe = GPT(ModelConfig(**BASE, mlp=mlp, mlp_hidden=H, moe_experts=E, moe_top_k=k))
    dense = GPT(ModelConfig(**BASE, mlp=mlp, mlp_hidden=k * H))  # same active width per token
    h_in = 2 * H if mlp == "swiglu" else H
    expert = C * h_in + H * C
    router = C * E
    assert moe.num_params() - dense.num_params() == L * (E * expert + router - (C * k * h_in + k * H * C))
    assert moe.num_params(active=True) == moe.num_params() - L * (E - k) * expert
    assert moe.num_params(active=True) - dense.num_params() == L * router
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * L * router
    # the vocabulary enters both models identically (embedding, head), so the differences do not depend on it
    big = {**BASE, "vocab_size": 997, "mlp": mlp}
    moe_v = GPT(ModelConfig(**big, mlp_hidden=H, moe_experts=E, moe_top_k=k))
    dense_v = GPT(ModelConfig(**big, mlp_hidden=k * H))
    assert moe_v.num_params() - dense_v.num_params() == moe.num_params() - dense.num_params()
    assert moe_v.flops_per_token() - dense_v.flops_per_token() == 6 * L * router
    assert moe_v.num_params() - moe.num_params() == (997 - 61) * C


def test_moe_preset_matches_dense_active_params():
    moe = GPT(ModelConfig.preset("moe-3m", vocab_size=4096))
    dense = GPT(ModelConfig.preset("gpt-rope-3m", vocab_size=4096))
    assert abs(moe.num_params(active=True) / dense.num_params() - 1) < 0.01
    assert moe.num_params() > 2 * dense.num_params()


@pytest.mark.parametrize(("overrides", "needle"), [
    (dict(moe_experts=4, moe_top_k=5), r"moe_top_k=5 must be in \[1, moe_experts=4\]"),
    (dict(moe_experts=1), "moe_experts=1 must be 0"),
    (dict(moe_experts=4, moe_capacity_factor=0), "moe_capacity_factor=0"),
    (dict(moe_experts=4, lowrank=4), "lowrank applies to dense projections"),
    (dict(moe_experts=-2), "moe_experts=-2"),
])
def test_invalid_moe_config(overrides, needle):
    with pytest.raises(SlmError, match=needle):
        ModelConfig(**{**BASE, **overrides})


def test_loss_decreases(short_training):
    first, last = short_training(moe_experts=4, moe_top_k=2, mlp_hidden=64)
    assert last < first - 0.7, (first, last)


@pytest.mark.slow
def test_trainer_trains_on_aux_and_records_utilisation(tiny_data, tmp_path):
    from slmkit.train import train

    cfg = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, pos="rope", moe_experts=4, moe_top_k=1,
                      mlp_hidden=32, moe_capacity_factor=1.25)
    tc = TrainConfig(max_steps=6, batch_size=4, log_interval=3, eval_interval=6, eval_batches=2, warmup_steps=0)
    train(tiny_data, tmp_path / "run", cfg, tc, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 2
    for r in logged:
        assert len(r["expert_util"]) == 2 and all(len(u) == 4 and abs(sum(u) - 1) < 1e-3 for u in r["expert_util"])
        assert r["moe_aux"] > 0 and 0 <= r["moe_dropped"] < 1
    params = json.loads((tmp_path / "run" / "meta.json").read_text())["params"]
    assert params["total"] - params["active"] == 2 * 3 * (32 * 32 + 32 * 32)
