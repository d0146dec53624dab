"""The export stage (`slm export`, `LLM.export`): a directory with the format's files and a meta.json whose lineage
points at the run; every check before anything is written; --overwrite replaces only what slmkit wrote; quantized
models export dequantized for transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmkit import checkpoint
from slmkit.api import LLM
from slmkit.cli import main
from slmkit.compress.stage import quantize_run
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.weights import dense_model
from slmkit.model import GPT
from slmkit.run import read_meta
from slmkit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer.train("bpe:300", ["the king is dead, long live the king; what say you to this fair maid"] * 20)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                            pos="rope", norm="rmsnorm", mlp="swiglu"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("export") / "ck"
    checkpoint.save(out, model, tok, {"step": 0})
    return out


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(ids).logits[0]


@pytest.mark.slow
def test_cli_writes_an_hf_dir_with_lineage(ckpt, tmp_path, capsys):
    code, out, err = _cli(capsys, str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert (code, err) == (0, "") and "exported" in out and "LlamaForCausalLM" in out
    meta = read_meta(tmp_path / "hf")
    assert meta["kind"] == "export" and meta["lineage"]["parent"]["path"] == str(ckpt.resolve())
    assert meta["lineage"]["recipe"] == {"stage": "export", "format": "hf", "dtype": "f32", "quant": None}
    assert "model.safetensors" in meta["export"]["files"] and meta["export"]["bytes"] > 0
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        ours = checkpoint.load(ckpt).model(ids)[0][0]
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), ours, atol=1e-4, rtol=1e-4)


def test_overwrite_only_replaces_what_slmkit_wrote(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _cli(capsys, str(ckpt), "--format", "hf", "--out", str(out))[0] == 0
    code, _, err = _cli(capsys, str(ckpt), "--format", "hf", "--out", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert _cli(capsys, str(ckpt), "--format", "hf", "--out", str(out), "--overwrite")[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = _cli(capsys, str(ckpt), "--format", "hf", "--out", str(mine), "--overwrite")
    assert code == 2 and "not written by slmkit" in err and (mine / "notes.txt").read_text() == "keep me"
    before = sorted(p.name for p in ckpt.iterdir())
    code, _, err = _cli(capsys, str(ckpt), "--format", "hf", "--out", str(ckpt), "--overwrite")  # its own input
    assert code == 2 and "refusing to overwrite" in err and sorted(p.name for p in ckpt.iterdir()) == before


def test_bad_requests_are_one_line_and_write_nothing(ckpt, tmp_path, capsys):
    llm = LLM.load(ckpt)
    for kwargs, needle in (({"fmt": "onnx", "quant": "q8_0"}, "--quant is for gguf"),
                           ({"fmt": "tflite"}, "not one of hf, gguf, onnx"),
                           ({"fmt": "hf", "dtype": "f8"}, "not one of f32, f16, bf16")):
        with pytest.raises(SlmError, match=needle):
            llm.export(kwargs.pop("fmt"), tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
    lsh = GPT(ModelConfig(vocab_size=llm.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32,
                          attention="linear"))
    with pytest.raises(SlmError, match="cannot be exported"):
        LLM(lsh, llm.tokenizer).export("hf", tmp_path / "lin")
    assert not (tmp_path / "lin").exists() and not list(tmp_path.glob(".lin*"))  # no temporary left either


def test_an_ngram_run_is_refused(tmp_path, capsys, tiny_data):
    from slmkit.model.ngram import train_ngram

    run = tmp_path / "ng"
    train_ngram(tiny_data, run, order=2)
    code, out, err = _cli(capsys, str(run), "--format", "gguf", "--out", str(tmp_path / "g"))
    assert (code, out) == (2, "") and "n-gram" in err and len(err.splitlines()) == 1


def test_a_quantized_run_exports_dequantized_to_hf(ckpt, tmp_path):
    q = quantize_run(ckpt, tmp_path / "q4", weights="int4")
    llm = LLM.load(q)
    out = llm.export("hf", tmp_path / "hf")
    ids = torch.tensor([[1, 5, 9, 33, 2] * 5])
    with torch.no_grad():  # the dequantized model: what the export holds (the kernels would round activations)
        ours = dense_model(llm.model)(ids)[0][0]
    torch.testing.assert_close(_hf_logits(out, ids), ours, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False  # the head has its own copy
    assert read_meta(out)["lineage"]["parent"]["kind"] == "quantize"
