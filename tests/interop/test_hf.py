"""`import_hf`: a tiny transformers Llama checkpoint saved by transformers itself imports with equal logits."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.checkpoint import load
from slmkit.errors import SlmError
from slmkit.interop import import_hf
from slmkit.tokenizer import Tokenizer
from tests.conftest import WORDS

transformers = pytest.importorskip("transformers")


def _save_tiny_llama(path, tied: bool = True):
    tok = Tokenizer.train("bpe:320", [" ".join(WORDS)] * 10)
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
                                  tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(hc).eval()
    hf.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tk, bos_token="<|bos|>", eos_token="<|eos|>",
                                                pad_token="<|pad|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(path)
    return hf, tok


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_import_hf_matches_transformers(tmp_path, tied):
    hf, tok = _save_tiny_llama(tmp_path / "hf", tied)
    ck = load(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert ck.model.config.rope_theta == 5000.0 and ck.model.config.tie_embeddings == tied
    assert ck.model.num_params() == sum(p.numel() for p in hf.parameters())
    x = torch.randint(0, tok.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x)[0], hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert ck.tokenizer.eos_id == tok.eos_id and ck.tokenizer.chat_template is not None
    assert ck.tokenizer.encode("the king is dead") == tok.encode("the king is dead")


def test_import_hf_bad_inputs(tmp_path):
    with pytest.raises(SlmError, match=r"no config\.json"):
        import_hf(tmp_path, tmp_path / "run")
    _save_tiny_llama(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(SlmError, match="gpt_neox' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SlmError, match="truncated or corrupt"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_writes_the_run_contract_and_overwrites_only_its_own(tmp_path):
    _save_tiny_llama(tmp_path / "hf")
    out = import_hf(tmp_path / "hf", tmp_path / "run")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "import" and meta["model_class"] == "imported"
    assert meta["lineage"]["parent"] == {"path": str((tmp_path / "hf").resolve())}
    assert meta["lineage"]["recipe"]["format"] == "hf"
    with pytest.raises(SlmError, match="already exists"):
        import_hf(tmp_path / "hf", out)
    import_hf(tmp_path / "hf", out, overwrite=True)  # its own: replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("keep me")
    with pytest.raises(SlmError, match="not written by slmkit"):
        import_hf(tmp_path / "hf", tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes/todo.txt").read_text() == "keep me"
