"""Optimizers: Muon's orthogonalization and update against a plain per-matrix reference, the parameter split between
Muon and AdamW, and the schedule reaching Muon's groups."""

import math

import pytest
import torch

from slmkit.config import ModelConfig, TrainConfig
from slmkit.model import GPT
from slmkit.train.optim import (
    NS_COEFFS,
    AdamW,
    Muon,
    OptimizerSet,
    build_optimizer,
    clip_gradients,
    orthogonalize,
    set_lr,
)


def reference_orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """One matrix, fp32, the iteration as written in the Muon paper."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x


@pytest.mark.parametrize("shape", [(4, 16), (8, 8), (3, 40)])
def test_orthogonalize_matches_reference_and_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(3, m, m))
    v, _ = torch.linalg.qr(torch.randn(3, n, m))
    g = u @ torch.diag(torch.logspace(-1.5, 0, m)) @ v.mT  # singular values from 0.03 to 1: condition number 30
    out = orthogonalize(g)
    for i in range(3):
        torch.testing.assert_close(out[i].float(), reference_orthogonalize(g[i]), atol=4e-2, rtol=4e-2)
        sv = torch.linalg.svdvals(out[i].float())
        assert sv.min() > 0.5 and sv.max() < 1.3, sv  # every direction ends near unit scale


def test_muon_step_matches_a_per_matrix_reference():
    """Batched by shape (tall matrices transposed into their wide batch) == each matrix updated on its own."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 16), (8, 16), (12, 12)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):  # reference: nesterov momentum, orthogonalize, decoupled decay, shape scale
            bufs[i] = 0.9 * bufs[i] + 0.1 * g
            u = g + 0.9 * (bufs[i] - g)
            o = reference_orthogonalize(u.T).T if u.size(0) > u.size(1) else reference_orthogonalize(u)
            ref[i] = ref[i] * (1 - 0.05 * 0.1) - 0.05 * math.sqrt(max(1.0, u.size(0) / u.size(1))) * o
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, atol=3e-3, rtol=3e-2)


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16),
    ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16, pos="rope", norm="rmsnorm",
                mlp="swiglu", bias=False, tie_embeddings=False),
    ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16, moe_experts=4, moe_top_k=2),
])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(cfg):
    model = GPT(cfg)
    opt = build_optimizer(model.param_groups(0.1), TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.04))
    assert isinstance(opt, OptimizerSet)
    muon, adamw = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names)  # every parameter exactly once
    assert all(n.startswith("blocks.") and ".router." not in n for i, n in names.items() if i in in_muon)
    assert {names[i] for i in in_adamw} >= {"tok_emb.weight", "norm_f.weight"}
    set_lr(opt, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.04), 5e-4)  # half the peak
    assert {g["lr"] for g in muon.param_groups} == {0.02} and {g["lr"] for g in adamw.param_groups} == {5e-4}
    decay = {g["kind"]: g["weight_decay"] for g in opt.param_groups}
    assert decay["vector"] == 0.0 and decay["matrix"] == 0.1


def test_optimizer_set_state_round_trips():
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16))
    tc = TrainConfig(optimizer="muon")
    opt = build_optimizer(model.param_groups(0.1), tc)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model.param_groups(0.1), tc)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.parts[0].state_dict()["state"][0]["momentum_buffer"],
                       opt.parts[0].state_dict()["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="different optimizer"):
        fresh.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def _model_with_grads(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipping active (total norm ~30) / inactive
def test_adamw_with_folded_clipping_matches_torch(max_norm):
    """Our AdamW + clip_gradients == torch.optim.AdamW(fused=True) + clip_grad_norm_, step after step, and the two
    optimizers' state dicts load into each other (checkpoints from either resume with the other)."""
    ours, ref = _model_with_grads(0), _model_with_grads(0)
    groups = lambda m: m.param_groups(0.1)  # noqa: E731
    opt = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.99))
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.99), fused=True)
    for step in range(3):
        torch.manual_seed(step)
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            a.grad = torch.randn_like(a) * 5
            b.grad = a.grad.clone()
        total = clip_gradients(opt, max_norm)
        ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        torch.testing.assert_close(total, ref_total)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    crossed = AdamW(groups(ref), lr=1e-2)
    crossed.load_state_dict(ref_opt.state_dict())
    torch.testing.assert_close(crossed.state_dict()["state"][0]["exp_avg"], ref_opt.state_dict()["state"][0]["exp_avg"])


def test_clip_gradients_scales_every_part_of_an_optimizer_set():
    model = _model_with_grads(1)
    opt = build_optimizer(model.param_groups(0.1), TrainConfig(optimizer="muon"))
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    total = clip_gradients(opt, 1.0)
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in before.values()]))
    torch.testing.assert_close(total, expected)
    muon, adamw = opt.parts
    coef = 1.0 / (float(expected) + 1e-6)
    for p in (p for g in muon.param_groups for p in g["params"]):  # Muon's gradients scaled in place
        name = next(n for n, q in model.named_parameters() if q is p)
        torch.testing.assert_close(p.grad, before[name] * coef)
    torch.testing.assert_close(adamw.grad_coef, torch.tensor(coef))  # AdamW's kernel applies it in its step
