"""LoRA as a transform: identity at init, merge exact, only the factors train, the base frozen (fp32 or int8)."""

from __future__ import annotations

import copy

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.finetune import LoRALinear, add_lora, merge_lora
from slmkit.finetune.lora import lora_layers, lora_state
from slmkit.finetune.model import checkpoint_blocks, freeze_int8
from slmkit.infer.quantized import QuantLinear
from slmkit.model import GPT
from tests.conftest import noisy_weights

CFG = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope",
                  norm="rmsnorm", mlp="swiglu")


def model(**fields) -> GPT:
    torch.manual_seed(0)
    return noisy_weights(GPT(CFG.replace(**fields))).eval()


def ids(B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def test_lora_at_init_computes_exactly_what_the_base_does():
    base = model()
    lora = add_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert len([m for m in lora.modules() if isinstance(m, LoRALinear)]) == 2 * 4  # qkv, proj, fc, proj per layer
    with torch.no_grad():
        torch.testing.assert_close(lora(ids())[0], base(ids())[0], atol=0, rtol=0)


def test_merged_equals_unmerged_and_is_a_plain_gpt_again():
    lora = add_lora(model(), rank=4, alpha=8, targets=["attn.qkv", "mlp"])
    with torch.no_grad():
        for m in lora.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)  # a trained update
        unmerged = lora(ids())[0]
        merged = merge_lora(lora)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(model().state_dict())
        torch.testing.assert_close(merged(ids())[0], unmerged, atol=1e-5, rtol=1e-5)
    assert (unmerged - model()(ids())[0]).abs().max() > 1e-2  # and the update did change the model


def _bf16_reference(layer: LoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """LoRALinear's formula in fp32 on the bf16-rounded operands, and the gradients of x, A and B for a sum."""
    def r(t: torch.Tensor) -> torch.Tensor:
        return t.detach().bfloat16().float()

    x32, a, b = (r(t).requires_grad_() for t in (x, layer.lora_a, layer.lora_b))
    base = layer.base
    y = torch.nn.functional.linear(x32, r(base.weight), None if base.bias is None else r(base.bias))
    y = y + torch.nn.functional.linear(torch.nn.functional.linear(x32, a) * layer.scaling, b)
    return y.detach(), torch.autograd.grad(y.sum(), (x32, a, b))


def test_under_bf16_autocast_a_frozen_base_is_rounded_once_and_the_fused_layer_matches_autograd():
    """Under bf16 autocast LoRALinear runs its fused node (_FrozenLoRA) over a bf16 copy of the frozen base weight
    made once: the output and the gradients of x and of both factors must match the formula computed by autograd (in
    fp32 on the same bf16 operands) to bf16 rounding; with dropout the unfused formula runs and agrees; and an
    in-place change of the base weight (a merge, a load) must not leave a stale copy behind."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 48).requires_grad_(False)
    layer = LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.1, generator=g)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    ref, (gx, ga, gb) = _bf16_reference(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert got.grad_fn is not None and "_FrozenLoRA" in type(got.grad_fn).__name__  # the fused node did run
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=1e-2)
    for have, want in ((x.grad, gx), (layer.lora_a.grad, ga), (layer.lora_b.grad, gb)):
        assert have.dtype == torch.float32 and have.shape == want.shape and have.is_contiguous()
        torch.testing.assert_close(have, want, atol=3e-2, rtol=2e-2)

    layer.lora_a.grad = layer.lora_b.grad = None  # an input that needs no gradient: only the factors get one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x.detach()).float().sum().backward()
    torch.testing.assert_close(layer.lora_a.grad, ga, atol=3e-2, rtol=2e-2)
    layer.lora_a.grad = layer.lora_b.grad = None  # a frozen factor gets no gradient, the other still does
    layer.lora_b.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x.detach()).float().sum().backward()
    assert layer.lora_b.grad is None
    torch.testing.assert_close(layer.lora_a.grad, ga, atol=3e-2, rtol=2e-2)
    layer.lora_b.requires_grad_(True)

    dropped = LoRALinear(base, rank=4, alpha=8, dropout=0.5).eval()  # dropout inactive: the same function
    dropped.load_state_dict(layer.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(dropped(x).float(), ref, atol=2e-2, rtol=1e-2)

    with torch.no_grad():
        base.weight.mul_(2)
    ref = _bf16_reference(layer, x)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x).float(), ref, atol=4e-2, rtol=1e-2)


def test_only_the_adapter_trains():
    base = model()
    lora = add_lora(copy.deepcopy(base), rank=2, alpha=4).train()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(3):
        lora(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    frozen = {n.replace(".base.", "."): p for n, p in lora.named_parameters() if not p.requires_grad}
    for name, p in base.named_parameters():
        assert torch.equal(frozen[name], p), name
    assert all(v.abs().sum() > 0 for k, v in lora_state(lora).items() if k.endswith("lora_b"))


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_lora_plus_moves_b_at_ratio_times_the_lr(ratio):
    from slmkit.finetune import FinetuneConfig, default_train_config
    from slmkit.finetune.loop import _param_groups
    from slmkit.train.optim import build_optimizer

    lora = add_lora(model(), rank=2, alpha=4).train()
    tc = default_train_config("lora", lr=1e-3, weight_decay=0.0)
    opt = build_optimizer(_param_groups(lora, lora, FinetuneConfig(lora_plus=ratio), tc), tc)
    for group in opt.param_groups:
        group["lr"] = tc.lr * group.get("lr_scale", 1.0)  # as the loop's schedule sets it
    before = {k: v.clone() for k, v in lora_state(lora).items()}
    x = ids()
    lora(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    after = lora_state(lora)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(after)
    # Adam's first step moves each weight by lr · g/|g|: B (zero at init) by its own lr; A not at all, its gradient
    # is zero while B is
    for k, v in after.items():
        moved = (v - before[k]).abs().max().item()
        assert moved == pytest.approx(tc.lr * ratio if k.endswith("lora_b") else 0.0, rel=1e-4, abs=1e-9), k


def test_top_layers_only_adapts_those_blocks_and_the_backward_stops_below_them():
    m = add_lora(model(n_layer=3), rank=4, alpha=8, layers=1)
    parts = ("attn.proj", "attn.qkv", "mlp.fc", "mlp.proj")
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == [
        f"blocks.2.{part}.{k}" for part in parts for k in ("lora_a", "lora_b")]
    reached = []
    for i, block in enumerate(m.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: reached.append((i, out.requires_grad)))
    m.train()
    with torch.no_grad():
        for lin in lora_layers(m).values():
            lin.lora_b.normal_(std=0.1)
    m(ids(), ids())[1].backward()
    # below the adapted block nothing needs a gradient: autograd records no graph there and keeps no activations
    assert reached == [(0, False), (1, False), (2, True)]


def test_bad_settings_are_one_line_errors():
    with pytest.raises(SlmError, match=r"rank 64 is larger than the layer blocks\.0\.attn\.qkv \(32 → 64\)"):
        add_lora(model(), rank=64)
    with pytest.raises(SlmError, match=r"target 'attn.q' matches no linear layer.*attn.proj, attn.qkv, mlp.fc"):
        add_lora(model(), targets=["attn.q"])
    with pytest.raises(SlmError, match="low-rank factorised layer"):
        add_lora(model(lowrank=8), targets=["mlp"])
    with pytest.raises(SlmError, match=r"matches no linear layer.*Mixture-of-Experts"):
        add_lora(model(moe_experts=4), targets=["mlp"])
    with pytest.raises(SlmError, match=r"--lora-layers 3: this model has 2 blocks; give 1 to 2"):
        add_lora(model(), layers=3)


def test_lora_over_an_int8_base_starts_at_the_int8_model_and_passes_gradients_to_every_layer():
    base = freeze_int8(model())
    assert isinstance(base.blocks[0].attn.qkv, QuantLinear)
    with torch.no_grad():
        ref = base(ids())[0]
    lora = add_lora(base, rank=2, alpha=4).train()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids())[0], ref, atol=0, rtol=0)
    x = ids()
    lora(x[:, :-1], x[:, 1:])[1].backward()
    # B is zero at init, so A's gradient is zero; B's is not, in every layer, the first included: the gradient went
    # back through the packed layers above it
    grads = {n: p.grad for n, p in lora.named_parameters() if n.endswith("lora_b")}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_an_int8_base_under_bf16_autocast_computes_in_bf16_on_autocasts_rounding_of_the_widened_weight():
    """Under bf16 autocast a packed layer's forward and backward are bf16 matmuls on the widened weight rounded as
    autocast would round it (not the fp32 path, whose fp32 outputs would double what LoRA keeps for backward), and the
    input's gradient comes back in the input's dtype."""
    packed = freeze_int8(model(bias=True)).blocks[0].attn.qkv
    assert isinstance(packed, QuantLinear) and packed.bias is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, CFG.n_embd, generator=g, requires_grad=True)
    w = packed.dequantized()
    xr = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = packed(x)
        ref = torch.nn.functional.linear(xr, w, packed.bias)  # autocast rounds xr, w and the bias to bf16
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    upstream = torch.randn(got.shape, generator=g).to(torch.bfloat16)
    got.backward(upstream)
    ref.backward(upstream)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, xr.grad)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = add_lora(model(), rank=2), checkpoint_blocks(add_lora(model(), rank=2))
    x = ids()
    grads = []
    for m in (plain, ckpt):
        m.train()
        with torch.no_grad():
            for layer in m.modules():
                if isinstance(layer, LoRALinear):
                    layer.lora_b.fill_(0.01)
        m(x[:, :-1], x[:, 1:])[1].backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)
