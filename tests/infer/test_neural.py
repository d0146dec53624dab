"""`NeuralLM`: the transformer behind the `LanguageModel` protocol — the same scores and tokens as the model and the
engine it wraps, parameter counts that survive quantization, and save/load of its own files."""

import numpy as np
import pytest
import torch

from slmkit import LLM, checkpoint
from slmkit.compress import quantize
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer.engine import generate
from slmkit.infer.neural import NeuralLM
from slmkit.model import GPT
from slmkit.model.protocol import LanguageModel
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import Tokenizer


def _gpt(**fields) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16, **fields}))


def test_scores_are_the_models_own_log_probabilities():
    model = _gpt()
    lm = NeuralLM(model)
    assert isinstance(lm, LanguageModel) and (lm.context_length, lm.vocab_size, lm.model_class) == (16, 50, "dense")
    ids = list(range(3, 15))
    (got,) = lm.score([(ids, 4)])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), -1)  # (11, V)
    np.testing.assert_allclose(got, [-float(logp[t - 1, ids[t]]) for t in range(8, 12)], atol=1e-5)
    (capped,) = lm.score([(ids, 4)], context=6)  # a window of 6 tokens: the first 5 are dropped
    (short,) = lm.score([(ids[5:], 4)])
    np.testing.assert_allclose(capped, short, atol=1e-6)


def test_generation_is_the_engines():
    model = _gpt()
    params = SamplingParams(12, temperature=0.9, top_k=8, seed=1)
    assert list(NeuralLM(model).generate([1, 2, 3], params)) == list(generate(model, [1, 2, 3], params))


def test_params_are_counted_before_quantizing():
    moe = NeuralLM(_gpt(moe_experts=4, moe_top_k=1))
    counts = moe.params()
    assert moe.model_class == "moe" and counts.active < counts.total and counts.non_embedding < counts.total
    quantize(moe.module, "int8")  # linear weights become buffers: not parameters any more
    assert moe.module.num_params() < counts.total and moe.params() == counts


def test_save_and_load_round_trip(tmp_path):
    lm = NeuralLM(_gpt(tie_embeddings=True))
    windows = [(list(range(20)), 6), ([4, 5, 6], 2)]
    lm.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    back = NeuralLM.load(tmp_path)
    for a, b in zip(back.score(windows), lm.score(windows), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.params() == lm.params()
    quantize(lm.module, "int8")
    with pytest.raises(SlmError, match="quantized"):
        lm.save(tmp_path / "q")


def test_llm_takes_a_bare_transformer_and_loads_the_model_class_of_an_import(tmp_path):
    tok = Tokenizer.train("byte", [])
    model = _gpt(vocab_size=tok.vocab_size)
    checkpoint.save(tmp_path / "imported", model, tok, {"model_class": "imported"})
    loaded = LLM.load(tmp_path / "imported")
    assert loaded.lm.model_class == "imported" and NeuralLM.load(tmp_path / "imported").model_class == "imported"
    bare = LLM(model, tok)  # a GPT built in Python gets the same adapter
    assert bare.model is model and isinstance(bare.lm, NeuralLM)
    kw = dict(max_new_tokens=10, temperature=0)
    assert bare.generate("ab", **kw) == loaded.generate("ab", **kw)
