"""The Python API: a small, exact public surface and `LLM` generation with streaming and stop strings."""

import pytest

import slmkit
from slmkit import LLM, ModelConfig, TrainConfig, train
from tests.conftest import WORDS

PUBLIC = {"GPT", "LLM", "ModelConfig", "SamplingParams", "SlmError", "Tokenizer", "TrainConfig", "TrainResult",
          "__version__", "load_split", "prepare", "train"}


def test_all_lists_exactly_the_public_names():
    assert set(slmkit.__all__) == PUBLIC
    assert all(hasattr(slmkit, name) for name in PUBLIC)


@pytest.fixture(scope="module")
def llm(tiny_data, tmp_path_factory) -> LLM:
    run = tmp_path_factory.mktemp("api") / "run"
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, pos="rope")
    train(tiny_data, run, cfg, TrainConfig(max_steps=80, batch_size=8, threads=1, eval_interval=40, lr=5e-3),
          progress=False)
    return LLM.load(run, threads=1)


def test_generate_is_the_concatenated_stream(llm):
    kw = dict(max_new_tokens=60, temperature=0.9, top_k=20, seed=4)
    pieces = list(llm.stream("the king", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate("the king", **kw)


def test_stop_strings_cut_before_the_match(llm):
    full = llm.generate("the", max_new_tokens=80, temperature=0, seed=0)
    stop = full[10:13]
    cut = llm.generate("the", max_new_tokens=80, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_greedy_is_deterministic_and_learned_the_corpus(llm):
    a = llm.generate("the king is", max_new_tokens=40, temperature=0)
    assert a == llm.generate("the king is", max_new_tokens=40, temperature=0)
    words = a.split()
    known = sum(w.strip(".").lower() in set(WORDS) for w in words[:-1])
    assert known >= len(words[:-1]) // 2, a  # a model that learned nothing emits random characters


def test_the_model_behind_llm_is_a_language_model(llm):
    from slmkit.model.protocol import LanguageModel

    assert isinstance(llm.lm, LanguageModel) and llm.lm.model_class == "dense"
    assert llm.model is llm.lm.module and llm.config.block_size == llm.lm.context_length == 64
    assert llm.meta["step"] == 80 and llm.meta["data"]  # the checkpoint's meta.json over its run's
    assert llm.lm.params().total == llm.model.num_params()
