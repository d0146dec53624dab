"""`evaluate` / `slm eval` on a checkpoint and on an n-gram run: the eval.json schema, the training split reused for
`PATH:val`, the n-gram scored by the same sliding-window code, and the efficiency hook."""

import json

import numpy as np
import pytest
import torch

from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.eval import evaluate
from slmkit.eval.evaluate import first_bytes
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

TASK = """\
data: {path: tiny.jsonl}
group: topic
description: "Questions about {topic}.\\n\\n"
template: "{question}\\nA. {answer_a}\\nB. {answer_b}\\nAnswer:"
choices: ["A", "B"]
target: correct_answer
"""


@pytest.fixture
def run(tmp_path, tiny_data):
    tok = Tokenizer.train("byte", [])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    out = tmp_path / "run"
    checkpoint.save(checkpoint.step_dir(out, 3), model, tok, {"step": 3, "data": str(tiny_data)})
    return out


@pytest.fixture
def task_file(tmp_path):
    rows = [{"question": f"q{i}?", "answer_a": "yes", "answer_b": "no", "correct_answer": "AB"[i % 2],
             "topic": "t1" if i < 3 else "t2"} for i in range(6)]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny.yaml").write_text(TASK)
    return tmp_path / "tiny.yaml"


def test_cli_eval_writes_eval_json(run, task_file, tiny_data, capsys):
    corpus = tiny_data.parent / "corpus"
    code = main(["eval", str(run), "--lm", f"{corpus}:val", "--task", str(task_file), "--limit", "2", "--quiet",
                 "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "bpb" in out and "tiny" in out
    m = json.loads((run / "eval.json").read_text())
    assert set(m) == {"model", "lm", "tasks", "versions", "elapsed_s"}
    assert set(m["model"]) >= {"path", "name", "model_class", "params_total", "params_active", "bytes_on_disk",
                               "tokenizer", "block_size"}
    assert m["model"]["name"] == "run" and m["model"]["model_class"] == "dense" and m["model"]["tokenizer"] == "byte"
    assert m["model"]["bytes_on_disk"] == (checkpoint.step_dir(run, 3) / "model.safetensors").stat().st_size
    lm = m["lm"][f"{corpus}:val"]
    assert set(lm) >= {"loss_nats_per_token", "perplexity", "bpb", "tokens", "bytes"}
    data_meta = json.loads((tiny_data / "meta.json").read_text())
    assert lm["val_fraction"] == 0.2 and lm["bytes"] == data_meta["splits"]["val"]["bytes"]  # training's own split
    assert lm["tokens"] == lm["bytes"]  # byte tokenizer + BOS: every byte scored once
    t = m["tasks"]["tiny"]
    assert t["n"] == 4 and t["limit"] == 2 and set(t["subjects"]) == {"t1", "t2"}
    assert set(t) >= {"acc", "acc_norm", "acc_macro", "acc_norm_macro", "shots", "prompt"}


def test_cli_eval_bad_run_is_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_ngram_run_is_scored_by_the_same_evaluator(tmp_path, tiny_data):
    from slmkit.data import load_tokenizer
    from slmkit.eval.lm import resolve_text_set
    from slmkit.model.ngram import NgramLM, train_ngram

    run = train_ngram(tiny_data, tmp_path / "ngram", order=3)
    corpus = tiny_data.parent / "corpus"
    m = evaluate(run, lm=[f"{corpus}:val"], threads=1)
    assert m["model"]["model_class"] == "ngram"
    lm, tok = NgramLM.load(run), load_tokenizer(tiny_data)
    texts, _ = resolve_text_set(f"{corpus}:val", seed=0, val_fraction=0.2)
    nats = [lm.nll(np.array([tok.bos_id, *tok.encode(t)])) for t in texts]  # by hand: each document on its own
    res = m["lm"][f"{corpus}:val"]
    assert res["tokens"] == sum(len(x) for x in nats)
    assert res["loss_nats_per_token"] == pytest.approx(sum(x.sum() for x in nats) / res["tokens"])


def test_efficiency_hook(run, monkeypatch):
    from slmkit.eval import efficiency

    calls = []
    monkeypatch.setattr(efficiency, "measure", lambda path, threads=None, weights="fp32":
                        calls.append((path, threads, weights)) or {"decode_tok_s": 1.0})
    m = evaluate(run, lm=(), efficiency=True, threads=1, weights="int8")
    assert m["efficiency"] == {"decode_tok_s": 1.0} and calls == [(checkpoint.step_dir(run, 3), 1, "int8")]
    assert m["model"]["weights"] == "int8"


def test_max_bytes_scores_the_same_prefix_for_every_model(run):
    full = evaluate(run, lm=["shakespeare:val"])["lm"]["shakespeare:val"]
    cut = evaluate(run, lm=["shakespeare:val"], max_bytes=5000)["lm"]["shakespeare:val"]
    assert cut["bytes"] == 5000 < full["bytes"] and cut["max_bytes"] == 5000
    assert first_bytes(["ab", "cdé", "fg"], 5) == ["ab", "cd"]  # é is 2 bytes: cut before it, never inside
    assert first_bytes(["ab", "cd"], 100) == ["ab", "cd"]
    with pytest.raises(SlmError, match="max_bytes"):
        evaluate(run, lm=["shakespeare:val"], max_bytes=0)


def test_quantized_weights_score_close_to_fp32(run):
    fp32 = evaluate(run, lm=["shakespeare:val"], max_bytes=20000)["lm"]["shakespeare:val"]["bpb"]
    int8 = evaluate(run, lm=["shakespeare:val"], max_bytes=20000, weights="int8")["lm"]["shakespeare:val"]["bpb"]
    assert int8 != fp32 and abs(int8 - fp32) < 0.02 * fp32


def test_moe_checkpoint_reports_active_params(tmp_path):
    tok = Tokenizer.train("byte", [])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16, moe_experts=4,
                      moe_top_k=1)
    checkpoint.save(tmp_path / "moe", GPT(cfg), tok, {"step": 0})
    (tmp_path / "t.txt").write_text("a few words of held-out text, " * 10)
    m = evaluate(tmp_path / "moe", lm=[str(tmp_path / "t.txt")], threads=1)
    info = m["model"]
    assert info["model_class"] == "moe" and info["params_active"] < info["params_total"]
    assert m["lm"][str(tmp_path / "t.txt")]["tokens"] == 300  # byte tokenizer + BOS: every byte scored
