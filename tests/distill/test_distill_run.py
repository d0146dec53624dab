"""`slm distill` end to end on tiny models: a distilled student learns and records its teacher, a preset student gets
the teacher's vocabulary, a run student starts from its weights, resume reproduces an uninterrupted run (projection
included), and bad input — another tokenizer, no budget — is one line that writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmkit import checkpoint, run
from slmkit.api import LLM
from slmkit.cli import main
from slmkit.data import load_tokenizer, prepare
from slmkit.distill import DistillConfig, distill
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer
from tests.conftest import make_corpus
from tests.distill.conftest import STUDENT, tcfg

pytestmark = pytest.mark.slow  # end-to-end: real runs, servers or a browser (the quick lane skips them)


def first_val(out: Path) -> float:
    return next(r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in r)


def test_a_distilled_student_learns_and_records_its_teacher(teacher, tiny_data, tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))  # the default cache goes into the data directory
    dc = DistillConfig(loss="mix", alpha=0.7, temperature=2.0, top_k=8, windows=64)
    res = distill(teacher, STUDENT, data, tmp_path / "d", dc, tcfg(max_steps=40), progress=False)
    untrained = first_val(tmp_path / "d")
    assert untrained > 3.0 and res.train.val_loss < untrained - 0.5, (untrained, res.train.val_loss)
    assert res.cache == data / "teacher-cache" / res.cache_key and (res.cache / "ids.npy").exists()
    assert res.epochs == pytest.approx(40 * 8 / 64)  # 40 steps of 8 windows over 64 cached ones

    meta = run.read_meta(tmp_path / "d")
    teacher_ckpt = checkpoint.resolve(teacher)
    assert meta["kind"] == "distill" and run.kind_of(tmp_path / "d") == "distill" and "distill" in run.MODEL_KINDS
    parent = meta["lineage"]["parent"]
    assert parent["path"] == str(teacher_ckpt.resolve()) and parent["kind"] == "checkpoint"
    assert parent["meta_sha256"] == meta["teacher"]["meta_sha256"]
    recipe = meta["lineage"]["recipe"]
    assert recipe["stage"] == "distill" and recipe["cache_key"] == res.cache_key == meta["cache"]["key"]
    assert recipe["distill"] == dc.to_dict() and recipe["student"]["model"]["n_embd"] == 32
    assert meta["cache"]["spec"]["top_k"] == 8 and meta["cache"]["spec"]["windows"] == 64
    assert meta["status"] == "finished" and meta["result"]["val_loss"] == res.train.val_loss
    assert LLM.load(tmp_path / "d").config.vocab_size == load_tokenizer(tiny_data).vocab_size

    # a second student of the same teacher, data and settings reads the same cache: no teacher pass
    again = distill(teacher, STUDENT.replace(n_layer=1), data, tmp_path / "d2", dc, tcfg(max_steps=2),
                    progress=False)
    assert again.cache == res.cache and again.teacher_time == res.teacher_time


def test_a_preset_student_gets_the_teachers_vocabulary_and_context(teacher, tiny_data, tmp_path):
    distill(teacher, "gpt-0.8m", tiny_data, tmp_path / "d", DistillConfig(top_k=8, windows=8),
            tcfg(max_steps=2, batch_size=4), cache=tmp_path / "cache", progress=False)
    meta = run.read_meta(tmp_path / "d")
    assert meta["model"]["vocab_size"] == load_tokenizer(tiny_data).vocab_size != 256  # not the preset's default
    assert meta["model"]["block_size"] == 32  # the preset's 64, cut to the teacher's context
    assert meta["model"]["n_embd"] == 128 and meta["student"] == {"preset": "gpt-0.8m"}


def test_a_run_student_continues_from_its_weights(teacher, tiny_data, tmp_path):
    distill(teacher, teacher, tiny_data, tmp_path / "d", DistillConfig(top_k=8, windows=8),
            tcfg(max_steps=1, lr=1e-12, warmup_steps=0), cache=tmp_path / "cache", progress=False)
    start = checkpoint.load(teacher).model.state_dict()
    after = load_file(str(tmp_path / "d/checkpoints/step_000001/model.safetensors"))
    for name, value in after.items():
        torch.testing.assert_close(value, start[name], atol=1e-8, rtol=0)
    meta = run.read_meta(tmp_path / "d")
    assert meta["student"]["path"] == str(checkpoint.resolve(teacher).resolve()) and "meta_sha256" in meta["student"]
    assert meta["lineage"]["recipe"]["student"] == meta["student"]


def test_resume_reproduces_an_uninterrupted_run_with_hidden_matching(teacher, tiny_data, tmp_path):
    out = tmp_path / "d"
    dc = DistillConfig(loss="fkl", top_k=8, windows=20, hidden_match=True, hidden_weight=0.5)
    full = distill(teacher, STUDENT.replace(dropout=0.1), tiny_data, out, dc, tcfg(), cache=tmp_path / "cache",
                   progress=False)
    final = load_file(str(out / "checkpoints/step_000030/model.safetensors"))
    extra = torch.load(out / "checkpoints/step_000030/optimizer.pt", weights_only=True)["extra"]
    assert extra["weight"].shape == (48, 32)  # the projection: student width 32 → teacher width 48
    assert "weight" not in {k.split(".")[-1] for k in final if k.startswith("proj")}  # not in the model
    for step in (20, 30):  # as if killed right after the step-10 checkpoint
        shutil.rmtree(out / f"checkpoints/step_{step:06d}")
    resumed = distill(None, None, None, out, resume=True, progress=False)
    assert resumed.train.step == 30 and resumed.train.val_loss == full.train.val_loss
    again = load_file(str(out / "checkpoints/step_000030/model.safetensors"))
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, atol=0, rtol=0)
    assert run.read_meta(out)["resumes"][0]["step"] == 10
    with pytest.raises(SlmError, match="cannot change on resume"):
        distill(None, None, None, out, DistillConfig(loss="rkl"), resume=True, progress=False)


def test_another_tokenizer_is_one_line_naming_both(teacher, tiny_data, tmp_path):
    byte_data = prepare(str(make_corpus(tmp_path / "corpus", n_docs=4)), "byte", tmp_path / "bytes", progress=False)
    with pytest.raises(SlmError, match=r"tokenized with byte .*not the teacher's char") as e:
        distill(teacher, STUDENT, byte_data, tmp_path / "d", DistillConfig(), tcfg(), progress=False)
    assert "\n" not in str(e.value) and "--tokenizer" in str(e.value)

    tok = Tokenizer.train("byte", [])
    other = tmp_path / "byte-student"
    checkpoint.save(other, GPT(STUDENT.replace(vocab_size=tok.vocab_size)), tok,
                    run.new_meta("import", model_class="imported", imported={"name": "b"}))
    with pytest.raises(SlmError, match=r"student .* uses the byte tokenizer .* the teacher .* the char") as e:
        distill(teacher, other, tiny_data, tmp_path / "d", DistillConfig(), tcfg(), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "d").exists()


def test_bad_input_writes_nothing(teacher, tiny_data, tmp_path):
    for kwargs, message in (
        (dict(train_config=tcfg(max_steps=None)), "give a budget"),
        (dict(train_config=tcfg(compile=True)), "runs eagerly"),
        (dict(config=DistillConfig(windows=10**6)), "holds only"),
        (dict(student="no-such-preset"), "neither a model preset"),
    ):
        args = {"config": DistillConfig(top_k=8), "train_config": tcfg(), "student": STUDENT, **kwargs}
        with pytest.raises(SlmError, match=message):
            distill(teacher, args["student"], tiny_data, tmp_path / "d", args["config"], args["train_config"],
                    cache=tmp_path / "cache", progress=False)
        assert not (tmp_path / "d").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(SlmError, match="alpha"):
        DistillConfig(alpha=1.5)


def test_distill_then_resume_from_the_command_line(teacher, tiny_data, tmp_path, capsys):
    out = tmp_path / "d"
    fast = ["--threads", "1", "--precision", "fp32", "--batch-size", "4", "--eval-interval", "2", "--ckpt-interval",
            "2", "--quiet"]
    assert main(["distill", "--teacher", str(teacher), "--student", "llama-0.8m", "--data", str(tiny_data),
                 "--out", str(out), "--loss", "rkl", "--temperature", "2", "--top-k", "8", "--windows", "16",
                 "--cache", str(tmp_path / "cache"), "--max-steps", "4", "--set", "n_layer=1", "--set", "n_embd=32",
                 "--set", "hidden_weight=0.5", "--set", "eval_batches=2", *fast]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("finished: step 4") and "teacher cache" in line and "bpb" in line and str(out) in line
    meta = run.read_meta(out)
    assert meta["model"]["n_layer"] == 1 and meta["model"]["block_size"] == 32
    assert meta["distill"]["loss"] == "rkl" and meta["distill"]["hidden_weight"] == 0.5
    assert meta["train"]["eval_batches"] == 2
    assert main(["distill", "--resume", str(out), "--max-steps", "6", "--quiet"]) == 0
    assert "step 6" in capsys.readouterr().out
    assert main(["eval", str(out), "--kl-to", "parent", "--threads", "1", "--quiet", "--out",
                 str(tmp_path / "eval.json")]) == 0
    kl = json.loads((tmp_path / "eval.json").read_text())
    assert kl["kl"], kl.keys()  # KL to the teacher, its lineage parent
    for argv, message in (
        (["distill", "--resume", str(out), "--top-k", "4"], "--top-k cannot be given with it"),
        (["distill", "--teacher", str(teacher), "--student", str(teacher), "--data", str(tiny_data), "--out",
          str(tmp_path / "x"), "--max-steps", "2", "--set", "n_layer=1"], "changes a model preset"),
        (["distill", "--teacher", str(teacher), "--data", str(tiny_data), "--out", str(tmp_path / "x")],
         "needs --teacher RUN, --student"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
