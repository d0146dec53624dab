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
from slmkit.eval.compare import compare
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
    from slmkit.data.textsets import resolve_text_set
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


def test_max_bytes_scores_the_same_prefix_for_every_model(run, tiny_data):
    sets = [f"{tiny_data.parent / 'corpus'}:val"]
    full = evaluate(run, lm=sets, threads=1)["lm"][sets[0]]
    cut = evaluate(run, lm=sets, max_bytes=1500, threads=1)["lm"][sets[0]]
    assert cut["bytes"] == 1500 < full["bytes"] and cut["max_bytes"] == 1500 and full["max_bytes"] is None
    assert first_bytes(["ab", "cdé", "fg"], 5) == ["ab", "cd"]  # é is 2 bytes: cut before it, never inside
    assert first_bytes(["ab", "cd"], 100) == ["ab", "cd"]
    with pytest.raises(SlmError, match="max_bytes"):
        evaluate(run, lm=sets, max_bytes=0)


def test_quantized_weights_score_close_to_fp32_and_count_the_same_params(run, tiny_data):
    sets = [f"{tiny_data.parent / 'corpus'}:val"]
    fp32, int8 = (evaluate(run, lm=sets, weights=w, threads=1) for w in ("fp32", "int8"))
    a, b = fp32["lm"][sets[0]]["bpb"], int8["lm"][sets[0]]["bpb"]
    assert b != a and abs(b - a) < 0.02 * a
    assert int8["lm"][sets[0]]["weights"] == "int8" and int8["model"]["weights"] == "int8"
    # the model's parameters, not what quantizing leaves as parameters (packed weights are buffers)
    assert int8["model"]["params_total"] == fp32["model"]["params_total"]


def test_default_set_is_the_val_split_of_the_runs_own_training_text(run, tiny_data):
    data_meta = json.loads((tiny_data / "meta.json").read_text())
    own = f"{data_meta['source']}:val"
    m = evaluate(run, threads=1)
    assert list(m["lm"]) == [own]
    assert m["lm"][own]["bytes"] == data_meta["splits"]["val"]["bytes"] and m["lm"][own]["val_fraction"] == 0.2
    assert main(["eval", str(run), "--quiet", "--threads", "1"]) == 0  # `slm eval RUN` with no --lm: the same set
    assert list(json.loads((run / "eval.json").read_text())["lm"]) == [own]


def test_a_model_with_no_training_text_must_name_its_sets(tmp_path, capsys):
    tok = Tokenizer.train("byte", [])
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    checkpoint.save(tmp_path / "imported", model, tok, {"model_class": "imported"})  # as `slm import` writes
    with pytest.raises(SlmError, match="--lm"):
        evaluate(tmp_path / "imported")
    assert main(["eval", str(tmp_path / "imported"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no training text of its own" in err and "--lm shakespeare:val" in err and err.count("\n") == 1


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


@pytest.mark.parametrize("flags", [
    ["--weights", "int8", "--limit", "1"],  # the reported case: an int8, one-question eval became the fp32 row
    ["--weights", "bf16"],
    ["--stride", "7"],
    ["--shots", "1"],
])
@pytest.mark.slow
def test_compare_measures_again_what_slm_eval_measured_differently(run, task_file, tiny_data, tmp_path, flags):
    sets, task = [f"{tiny_data.parent / 'corpus'}:val"], str(task_file)
    assert main(["eval", str(run), "--lm", sets[0], "--task", task, *flags, "--quiet", "--threads", "1"]) == 0
    notes: list[str] = []
    res = compare([run], tmp_path / "report", lm_sets=sets, tasks=[task], efficiency=False, threads=1,
                  say=notes.append)
    assert not any("reusing" in n for n in notes)
    got, want = res["evals"]["run"], evaluate(run, lm=sets, tasks=[task], threads=1)
    assert got["lm"][sets[0]]["bpb"] == want["lm"][sets[0]]["bpb"]
    assert {k: got["tasks"]["tiny"][k] for k in ("acc", "n", "shots")} == {k: want["tasks"]["tiny"][k]
                                                                           for k in ("acc", "n", "shots")}
    notes.clear()  # now measured as compare measures: reused
    compare([run], tmp_path / "report", lm_sets=sets, tasks=[task], efficiency=False, threads=1, say=notes.append)
    assert notes == [f"run: reusing {run / 'eval.json'}"]


@pytest.mark.slow
def test_an_eval_json_is_reused_only_for_the_checkpoint_and_settings_it_records(run, tiny_data, tmp_path):
    sets, notes = [f"{tiny_data.parent / 'corpus'}:val"], []

    def measured_again() -> bool:
        notes.clear()
        compare([run], tmp_path / "report", lm_sets=sets, efficiency=False, threads=1, say=notes.append)
        return not any("reusing" in n for n in notes)

    assert measured_again()
    ev = json.loads((run / "eval.json").read_text())
    del ev["lm"][sets[0]]["weights"]  # as written before eval.json recorded its settings
    (run / "eval.json").write_text(json.dumps(ev))
    assert measured_again() and not measured_again()
    ckpt = checkpoint.resolve(run)  # the same step retrained: other weights under the same name
    torch.manual_seed(1)
    checkpoint.save(ckpt, GPT(checkpoint.load(ckpt).model.config), Tokenizer.train("byte", []), {"step": 3})
    assert measured_again()
