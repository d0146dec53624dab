"""`slm generate` checks everything a user can get wrong before it writes anything: a bad flag gives an empty stdout,
one line on stderr and exit code 2 — never the echoed prompt with the error glued to it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16, pos="rope"))
    out = tmp_path_factory.mktemp("gen") / "ck"
    checkpoint.save(out, model, Tokenizer.train("char", ["hi there, how are you?"]), {"step": 0})
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--max-new-tokens", "-5"], "max_new_tokens=-5 must be >= 0"),
    (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["--top-k", "0"], "top_k=0 must be >= 1"),
    (["--top-p", "1.5"], r"top_p=1.5 must be in \(0, 1\]"),
    (["--repetition-penalty", "0"], "repetition_penalty=0.0 must be > 0"),
    (["--num-samples", "0"], "--num-samples=0 must be >= 1"),
    (["--threads", "-2"], "--threads=-2 must be >= 1"),
    (["--stop", ""], "--stop needs a non-empty string"),
    (["--prompt", "hi Zed"], "character 'Z' is not in the char tokenizer's vocabulary"),  # found while encoding
    (["--chat"], "has no chat template"),
])
def test_user_errors_come_before_any_output(ckpt, capsys, flags, needle):
    code, out, err = _run(capsys, str(ckpt), *(["--prompt", "hi"] if "--prompt" not in flags else []), *flags)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith("slm: error: ")
    assert re.search(needle, err), err


def test_a_missing_run_is_one_line(tmp_path, capsys):
    code, out, err = _run(capsys, str(tmp_path / "nope"), "--prompt", "hi")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1 and err.startswith("slm: error: ")


def test_a_good_call_echoes_the_prompt_then_the_continuation(ckpt, capsys):
    code, out, err = _run(capsys, str(ckpt), "--prompt", "hi", "--max-new-tokens", "6", "--temperature", "0")
    from slmkit.api import LLM

    want = LLM.load(ckpt).generate("hi", max_new_tokens=6, temperature=0)
    assert (code, err) == (0, "")
    assert out == "hi" + want + "\n"


@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_kv_cache_flag_reaches_the_cache(ckpt, capsys, kv, monkeypatch):
    from slmkit.api import LLM
    from slmkit.model.gpt import KVCache

    made: list[KVCache] = []
    init = KVCache.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(KVCache, "__init__", spy)
    code, out, err = _run(capsys, str(ckpt), "--prompt", "hi", "--max-new-tokens", "6", "--kv-cache", kv,
                          "--temperature", "0")
    assert (code, err) == (0, "") and out.startswith("hi")
    assert made and made[-1].kv == kv and made[-1].k[0].dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kv]
    assert LLM.load(ckpt, kv_cache=kv).lm.kv_cache == kv


def test_an_lsh_model_refuses_a_rounded_kv_cache_at_load(tmp_path, capsys):
    model = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16, attention="lsh",
                            attn_window=8, lsh_buckets=4))
    checkpoint.save(tmp_path / "lsh", model, Tokenizer.train("char", ["hi there"]), {"step": 0})
    code, out, err = _run(capsys, str(tmp_path / "lsh"), "--prompt", "hi", "--kv-cache", "int8")
    assert (code, out) == (2, "") and "LSH attention hashes" in err and len(err.splitlines()) == 1
