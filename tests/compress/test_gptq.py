"""Calibrated int4 (GPTQ, AWQ): on a linear layer with correlated inputs GPTQ's output error is well below
round-to-nearest's at the same group; its weights are exactly the storage format's grid (and with uncorrelated inputs
they are RTN's, bit for bit); layers are calibrated on the inputs the already-quantized layers produce; on a trained
tiny GPT it loses less than RTN; AWQ's rescaling leaves the fp32 model's function unchanged; bad input is one line."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import Tensor, nn

from slmkit import kernels
from slmkit.compress import quantize
from slmkit.compress.awq import awq_scale
from slmkit.compress.gptq import gptq, gptq_weight
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantExperts, QuantLinear, dequantize, pack_int4, quantize_int4, unpack_int4
from slmkit.model import GPT
from slmkit.model.ffn import MoE

N, K = 64, 256


def _inputs(n: int, seed: int) -> Tensor:
    """(n, K) inputs like a transformer's: channels mixed by a fixed random matrix (correlated, non-isotropic) and a
    few channels 10x larger than the rest. Calibration and test sets share the mixing, not the samples."""
    A = torch.randn(K, K, generator=torch.Generator().manual_seed(0)) / K**0.5
    X = torch.randn(n, K, generator=torch.Generator().manual_seed(seed)) @ A
    X[:, :4] *= 10
    return X


def _weights() -> Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05


def _hessian(X: Tensor) -> Tensor:
    X = X.double()
    return 2 * X.T @ X / X.shape[0]


def _out_err(W: Tensor, Wq: Tensor, X: Tensor) -> float:
    return float((X @ (W - Wq).T).norm())


def _rtn(W: Tensor, group: int) -> Tensor:
    return dequantize(*quantize_int4(W, group))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_output_error_is_well_below_rtn(group, act_order):
    """Measured on held-out inputs: GPTQ/RTN output error 0.54 (g32), 0.54 (g128); act_order 0.56, 0.53."""
    W, X_cal, X_test = _weights(), _inputs(2048, seed=2), _inputs(2048, seed=3)
    _, _, Q = gptq_weight(W, _hessian(X_cal), group=group, act_order=act_order)
    ratio = _out_err(W, Q, X_test) / _out_err(W, _rtn(W, group), X_test)
    assert ratio < 0.7, ratio


@pytest.mark.parametrize("group", [32, 128])
def test_awq_scale_lowers_the_output_error_of_rtn(group):
    """AWQ's premise, a few channels with large activations: measured AWQ/RTN output error 0.82 (g32), 0.80 (g128)
    on held-out inputs."""
    W, X_cal, X_test = _weights(), _inputs(2048, seed=2), _inputs(2048, seed=3)
    s = awq_scale(W, _hessian(X_cal), X_cal.abs().mean(0), group=group)
    ratio = _out_err(W, _rtn(W * s, group) / s, X_test) / _out_err(W, _rtn(W, group), X_test)
    assert ratio < 0.92, ratio


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_weights_are_the_int4_grid(act_order):
    W, H = _weights(), _hessian(_inputs(1024, seed=2))
    q, scale, Q = gptq_weight(W, H, group=32, act_order=act_order)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert scale.dtype == torch.float16 and scale.shape == (N, K // 32)
    # what the error feedback rounded to is exactly what the packed weights decode to (fp16 scales included)
    assert torch.equal(dequantize(pack_int4(q), scale), Q)
    # uncorrelated inputs: no error to feed forward, so GPTQ is round-to-nearest with the format's scales, bit for bit
    q, scale, _ = gptq_weight(W, torch.eye(K, dtype=torch.float64), group=32, act_order=act_order)
    packed, rtn_scale = quantize_int4(W, 32)
    assert torch.equal(pack_int4(q), packed) and torch.equal(scale, rtn_scale)


def test_lazy_block_updates_match_column_by_column_and_dead_inputs_get_zero():
    """Blocks of 128 columns with one deferred update per block compute what blocks of one group do (the same
    arithmetic, summed in another order); an input that is always 0 (diag H = 0) gets weight 0."""
    W, X = _weights(), _inputs(1024, seed=2)
    X[:, 40] = 0
    H = _hessian(X)
    q128, _, Q128 = gptq_weight(W, H, group=32, block=128)
    q32, _, Q32 = gptq_weight(W, H, group=32, block=32)
    assert (q128 == q32).float().mean() > 0.999
    torch.testing.assert_close(Q128, Q32, rtol=0, atol=1e-2 * float(Q32.abs().max()))
    assert not q128[:, 40].any() and torch.isfinite(Q128).all()


# ---------------------------------------------------------------------------------------------------------------------
# whole models


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 50, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64,
                              "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", **kw})).eval()


def _ids(B: int = 8, T: int = 32, V: int = 50, seed: int = 0) -> Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_gptq_replaces_what_rtn_replaces():
    """Every linear but the MoE routers becomes an int4 QuantLinear of the given group, expert stacks int4
    QuantExperts (RTN), the tied embedding stays fp32 and untouched; progress is told after each layer and the head."""
    model = _model(moe_experts=4, moe_top_k=2)
    emb = model.tok_emb.weight.detach().clone()
    calls = []
    gptq(model, _ids(), group=64, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    routers = [m.router for m in model.modules() if isinstance(m, MoE)]
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [nn.Linear] * 2 == \
        [type(r) for r in routers]
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 * 2 + 1 and all(m.group == 64 for m in q)  # qkv, proj per layer + the head
    experts = [s for m in model.modules() if isinstance(m, MoE) for s in (m.fc, m.proj)]
    assert len(experts) == 4 and all(isinstance(s, QuantExperts) and s.weight.dtype == torch.uint8 for s in experts)
    assert torch.equal(model.tok_emb.weight, emb) and isinstance(model.lm_head, QuantLinear)
    assert not model._moe_calls and torch.isfinite(model(_ids(1, 8))[0]).all()


@pytest.fixture(scope="module")
def trained(tiny_data) -> tuple[GPT, Tensor, tuple[Tensor, Tensor]]:
    """A GPT-2 style 2-layer model (layernorm, GELU, biases, tied head) after 200 AdamW steps on the tiny corpus, with
    calibration windows from the train split and held-out windows from the val split. Untrained weights would not
    do: their rounding errors have no structure to exploit, and quantizing them barely moves the loss."""
    from slmkit.data import load_split, load_tokenizer
    from slmkit.train.loop import Batcher

    train, val = load_split(tiny_data, "train").tokens, load_split(tiny_data, "val").tokens
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=load_tokenizer(tiny_data).vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batcher = Batcher(train, 16, cfg.block_size, seed=0)
    for _ in range(200):
        _, loss = model(*batcher.next())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)
    return model, Batcher(train, 32, cfg.block_size, seed=1).next()[0], Batcher(val, 128, cfg.block_size, seed=2).next()


@pytest.mark.slow
@pytest.mark.parametrize("group", [32, 64])
def test_gptq_loses_less_than_rtn_on_a_trained_model(trained, group, monkeypatch):
    """KL(fp32 ‖ quantized) of the next-token distributions over 4096 held-out tokens, measured (1 thread; four seeds
    of the fixture's training gave the same picture): g32 RTN 0.0046, GPTQ 0.0007, AWQ 0.0051; g64 RTN 0.0060, GPTQ
    0.0008, AWQ 0.0057. The KL, not the held-out loss: at int4 on this model the loss moves by ±0.005, which is
    within what the training trajectory (thread count, rounding in the loss) changes, and can even drop; the KL is
    what quantization costs and is always positive. AWQ is no better than RTN here: this model's activations have no
    outlier channels (mean |x| spans one decade), which is what AWQ's scaling exploits; per layer it still lowers the
    calibrated output error (0.93-1.0x, the head 0.71x)."""
    monkeypatch.setattr(kernels, "_lib", False)  # the numbers are about the weights; the kernels have their own tests
    model, calib, held_out = trained
    ref = model(held_out[0])[0].double().log_softmax(-1)

    def damage(method: str) -> float:
        q = quantize(copy.deepcopy(model), "int4", group=group, method=method, calib=None if method == "rtn" else calib)
        logq = q(held_out[0])[0].double().log_softmax(-1)
        return float((ref.exp() * (ref - logq)).sum(-1).mean())

    with torch.no_grad():
        rtn, gptq_, awq_ = damage("rtn"), damage("gptq"), damage("awq")
    assert rtn > 1e-3  # rounding visibly changes this model's predictions, so the comparison means something
    assert gptq_ < 0.5 * rtn, (gptq_, rtn)
    assert awq_ < 2 * rtn, (awq_, rtn)  # not a claim that AWQ helps here (see above); a broken fold costs far more


@pytest.mark.slow
def test_each_layer_is_calibrated_on_the_quantized_layers_outputs(trained, monkeypatch):
    """Sequential GPTQ: the head's weights are GPTQ of its fp32 weights under the Hessian of what the quantized blocks
    feed it, and differ from GPTQ under the fp32 model's (so the test can tell the two apart)."""
    monkeypatch.setattr(kernels, "_lib", False)
    model, calib, _ = trained

    def head_hessian(m: GPT) -> Tensor:
        """From a plain forward of the whole model: what the head reads, whatever the GPTQ walk computed."""
        xs = []
        handle = m.lm_head.register_forward_pre_hook(lambda _mod, args: xs.append(args[0].reshape(-1, 64)) and None)
        with torch.no_grad():
            m(calib)
        handle.remove()
        return _hessian(torch.cat(xs))

    quantized = gptq(copy.deepcopy(model), calib, group=32)
    got = unpack_int4(quantized.lm_head.weight)
    W = model.lm_head.weight
    agree = {name: (gptq_weight(W, head_hessian(m), group=32)[0] == got).float().mean().item()
             for name, m in (("sequential", quantized), ("fp32", model))}
    assert agree["sequential"] > 0.999 and agree["fp32"] < 0.995, agree


@pytest.mark.parametrize("kw", [dict(mlp="gelu", norm="layernorm", bias=True), {}, dict(n_kv_head=2),
                                dict(attention="linear"), dict(share_mlp=True)],
                         ids=["gpt2", "llama", "gqa", "linear-attn", "shared-mlp"])
def test_awq_rescaling_keeps_the_fp32_function(kw, monkeypatch):
    """Before rounding, AWQ's scales only move between a layer and the op feeding it: the fp32 model computes the same
    logits (to fp32 rounding), and the scales are not all trivial (norm weights did change)."""
    model = _model(**kw)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))  # channels of unequal size
    ids = _ids()
    with torch.no_grad():
        want = model(ids)[0]
    awq_module = importlib.import_module("slmkit.compress.awq")  # the package's `awq` attribute is the function
    monkeypatch.setattr(awq_module, "round_to_nearest", lambda m, *a, **k: m)  # stop before rounding
    scaled = awq_module.awq(copy.deepcopy(model), ids, group=32)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids)[0], want, rtol=1e-4, atol=1e-4)
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert any(not torch.equal(scaled.get_parameter(n), model.get_parameter(n)) for n in norms)
    assert torch.equal(scaled.tok_emb.weight, model.tok_emb.weight)  # the tied head got its own copy to scale


# ---------------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call, message", [
    (lambda m: quantize(m, "int4", method="gptq"), r"^GPTQ needs calibration data"),
    (lambda m: quantize(m, "int4", method="awq"), r"^AWQ needs calibration data"),
    (lambda m: quantize(m, "int8", method="gptq", calib=_ids()), r"^GPTQ calibrates int4 weights, not int8"),
    (lambda m: quantize(m, "int4", method="hqq", calib=_ids()), r"method 'hqq' is not supported; use one of rtn"),
    (lambda m: quantize(m, "int4", calib=_ids()), r"round-to-nearest needs none"),
    (lambda m: gptq(m, _ids().float()), r"calibration data must be a \(batch, tokens\) tensor of token ids"),
    (lambda m: gptq(m, _ids(T=40)), r"windows of 40 tokens exceed the model's context of 32"),
    (lambda m: gptq(m, _ids(V=60)), r"token ids must be in \[0, 50\)"),
    (lambda m: gptq(m, _ids(), damp=0), r"damp=0 must be > 0"),
    (lambda m: gptq(m, _ids(), group=64, block=96), r"block=96 must be a positive multiple of group=64"),
    (lambda m: quantize(m, "int4", method="gptq", calib=_ids()), r"int4 group 32 does not divide the input width 48"),
    (lambda m: quantize(m, "int4", method="awq", calib=_ids()), r"int4 group 32 does not divide the input width 48"),
])
def test_bad_input_is_one_clear_line_and_changes_nothing(call, message):
    model = _model(n_embd=48) if "width" in message else _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlmError, match=message) as err:
        call(model)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
