"""ONNX export: onnxruntime runs the exported decoder (with and without a past) to slmkit's own logits and tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer.engine import generate
from slmkit.interop import onnx_export
from slmkit.interop.onnx_export import OnnxLM, write_onnx
from slmkit.model import GPT
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import Tokenizer
from tests.conftest import noisy_weights

pytest.importorskip("onnxruntime")

LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2)
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_head=4)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train("byte", [])


def tiny(tok: Tokenizer, **fields) -> GPT:
    """A 2-layer model with weights large enough (std 0.2) that a wrong mask, position or head mapping shows in the
    logits and greedy decoding does not settle into repeating one token."""
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": 64, "n_layer": 2, "n_embd": 32, **fields})
    return noisy_weights(GPT(cfg).eval())


def export(model: GPT, tok: Tokenizer, path, dtype: str = "f32") -> OnnxLM:
    path.mkdir()
    summary = write_onnx(model, tok, path, dtype=dtype)
    assert summary["external_data"] == (path / "model.onnx.data").exists()
    assert sorted(p.name for p in path.iterdir() if p.suffix != ".data") == ["io.json", "model.onnx", "tokenizer.json"]
    return OnnxLM(path, threads=1)


def reference(model: GPT, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def ids_of(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# both exports in the slow lane: one torch.export of even a tiny model costs 10-15 s, the quick lane's whole budget;
# the quick lane keeps the refusals
@pytest.fixture(scope="module", params=[pytest.param(style, marks=pytest.mark.slow) for style in ("llama", "gpt2")])
def exported(request, tok, tmp_path_factory):
    model = tiny(tok, **(LLAMA if request.param == "llama" else GPT2))
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "gpt2":  # the weights in model.onnx.data, as for a model past ONNX's 2 GB limit
            mp.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
        return model, export(model, tok, tmp_path_factory.mktemp(request.param) / "onnx")


def test_full_sequence_logits_match(exported):
    model, lm = exported
    ids = ids_of(40)
    np.testing.assert_allclose(lm.logits(ids), reference(model, ids), atol=1e-4, rtol=0)


def test_past_then_chunk_matches_the_full_forward(exported):
    model, lm = exported
    ids = ids_of(15)
    _, past = lm.run(np.array([ids[:10]]), lm.empty_past())
    assert past[0].shape == (1, model.config.n_kv_head, 10, model.config.head_dim)
    logits, present = lm.run(np.array([ids[10:]]), past)
    assert present[0].shape[2] == 15
    np.testing.assert_allclose(logits[0], reference(model, ids)[10:], atol=1e-4, rtol=0)


def test_batch_of_two(exported):
    model, lm = exported
    batch = [ids_of(12, seed=2), ids_of(12, seed=3)]
    logits, past = lm.run(np.array(batch), lm.empty_past(2))
    logits2, _ = lm.run(np.array([[5], [7]]), past)  # one decode step for both rows
    for row, ids in enumerate(batch):
        np.testing.assert_allclose(logits[row], reference(model, ids), atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits2[row, -1], reference(model, [*ids, [5, 7][row]])[-1], atol=1e-4, rtol=0)


def test_greedy_generation_matches_the_engine(exported):
    model, lm = exported
    prompt = ids_of(8, seed=4)
    want = list(generate(model, prompt, SamplingParams(max_new_tokens=32, temperature=0.0)))
    got = lm.generate(prompt, max_new_tokens=32)
    assert len(set(want)) >= 5  # a varied sequence, so one wrong step would show
    assert got == want


@pytest.mark.slow
def test_generation_past_the_context_slides_like_the_engine(tok, tmp_path):
    # context 24: the cache is rebuilt from the newest 18 tokens twice during 40 new tokens
    model = tiny(tok, **{**LLAMA, "block_size": 24})
    lm = export(model, tok, tmp_path / "onnx")
    prompt = ids_of(10, seed=5)
    want = list(generate(model, prompt, SamplingParams(max_new_tokens=40, temperature=0.0)))
    assert len(set(want)) >= 5
    assert lm.generate(prompt, max_new_tokens=40) == want


def test_io_description(exported, tok):
    model, lm = exported
    io, cfg = lm.io, model.config
    assert list(io["inputs"]) == ["input_ids", *(f"past_{kv}_{i}" for i in range(2) for kv in ("key", "value"))]
    assert list(io["outputs"])[:3] == ["logits", "present_key_0", "present_value_0"]
    assert io["inputs"]["past_key_1"]["shape"] == ["batch", cfg.n_kv_head, "past", cfg.head_dim]
    assert (io["n_layer"], io["n_kv_head"], io["head_dim"]) == (2, cfg.n_kv_head, cfg.head_dim)
    assert (io["bos_id"], io["eos_id"]) == (tok.bos_id, tok.eos_id)
    assert [i.name for i in lm.session.get_inputs()] == list(io["inputs"])
    assert [o.name for o in lm.session.get_outputs()] == list(io["outputs"])
    with pytest.raises(SlmError, match="exceed the model's context of 64"):
        lm.logits(ids_of(65))


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    dict(LLAMA, share_mlp=True),
    dict(LLAMA, n_layer=3, share_blocks=2),
    dict(GPT2, pos="sinusoidal", tie_embeddings=False),
    dict(LLAMA, pos="none", lowrank=8),
    dict(LLAMA, moe_experts=4, moe_top_k=2),
    dict(GPT2, moe_experts=4, moe_top_k=1, moe_capacity_factor=1.0),
    dict(LLAMA, attention="local", attn_window=6),
    dict(LLAMA, attention="blocksparse", attn_block=4, attn_global=2, attn_summary=1),
    dict(LLAMA, n_head=2, n_kv_head=1, head_size=8),  # heads pruned: the attention narrower than n_embd
], ids=["shared-mlp", "shared-blocks", "sinusoidal-untied", "lowrank", "moe", "moe-capacity", "local", "blocksparse",
        "pruned-heads"])
def test_other_configurations_match(tok, tmp_path, fields):
    model = tiny(tok, **fields)
    lm = export(model, tok, tmp_path / "onnx")
    ids = ids_of(30)
    np.testing.assert_allclose(lm.logits(ids), reference(model, ids), atol=1e-4, rtol=0)
    if fields.get("moe_capacity_factor") is not None:
        assert model.moe_stats()["dropped"] > 0  # the capacity rule was exercised
    else:  # with a capacity, MoE's function depends on the tokens per call
        _, past = lm.run(np.array([ids[:20]]), lm.empty_past())
        logits, _ = lm.run(np.array([ids[20:]]), past)
        np.testing.assert_allclose(logits[0], reference(model, ids)[20:], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_f16(tok, tmp_path):
    model = tiny(tok, **LLAMA)
    lm = export(model, tok, tmp_path / "onnx", dtype="f16")
    assert model.tok_emb.weight.dtype == torch.float32  # the caller's model is not converted
    assert lm.dtype == np.float16 and json.loads((tmp_path / "onnx/io.json").read_text())["dtype"] == "f16"
    ids = ids_of(20)
    with torch.no_grad():
        half = model.half()(torch.tensor([ids]))[0][0].float().numpy()
    np.testing.assert_allclose(lm.logits(ids), half, atol=2e-2, rtol=0)


@pytest.mark.parametrize(("fields", "dtype", "match"), [
    (dict(LLAMA, attention="linear"), "f32", "attention='linear'"),
    (dict(LLAMA, n_kv_head=4, attention="lsh", attn_window=8), "f32", "attention='lsh'"),
    (LLAMA, "bf16", "bf16"),
])
def test_refusals_are_one_line(tok, tmp_path, fields, dtype, match):
    with pytest.raises(SlmError, match=match) as e:
        write_onnx(tiny(tok, **fields), tok, tmp_path, dtype=dtype)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())
