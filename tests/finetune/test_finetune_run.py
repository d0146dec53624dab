"""`finetune`: runs with lineage that LLM.load and Classifier.load read back, resume, early stopping, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slmkit import LLM, checkpoint, run
from slmkit.data import prepare
from slmkit.errors import SlmError
from slmkit.eval import evaluate
from slmkit.finetune import Classifier, FinetuneConfig, add_lora, default_train_config, finetune
from slmkit.finetune.lora import load_lora_state
from tests.finetune.conftest import labelled_dir, sentences, tiny_tokenizer

pytestmark = pytest.mark.slow  # end-to-end: real runs, servers or a browser (the quick lane skips them)

X = torch.tensor([tiny_tokenizer().encode("the king is dead long live the king", bos=True)])


def tc(**kw):
    fields = {"max_steps": 10, "eval_interval": 5, "batch_size": 4, "threads": 1, "precision": "fp32", "lr": 1e-2,
              "warmup_steps": 2}
    return default_train_config(kw.pop("method", "lora"), **{**fields, **kw})


def logits(model):
    with torch.no_grad():
        return model(X)[0]


def test_lora_on_a_corpus_writes_a_merged_run_with_lineage(base, corpus, tmp_path):
    out = tmp_path / "lm"
    r = finetune(base, str(corpus), out, FinetuneConfig(seq_len=32), tc(), progress=False)
    assert r.status == "finished" and r.step == 10 and r.best["loss"] < r.before["loss"]
    assert 0 < r.trainable_params < r.total_params / 2
    meta = run.read_meta(out, kinds=("finetune",))
    assert meta["lineage"]["parent"]["kind"] == "import" and meta["base"]["path"] == str(base.resolve())
    assert meta["artifact"] == {"body": "full", "files": ["config.json", "model.safetensors", "tokenizer.json"]}
    # the corpus was prepared with the base's tokenizer into the run, and `slm eval RUN` finds its val split
    assert json.loads((out / "data" / "meta.json").read_text())["tokenizer"]["sha256"] == tiny_tokenizer().sha256
    assert meta["data"] == str((out / "data").resolve())
    # an ordinary checkpoint: LLM.load reads it, and it is the base plus the trained adapter
    tuned = LLM.load(out)
    ref = add_lora(checkpoint.load(base).model, rank=8, alpha=16)
    load_lora_state(ref, load_file(out / "best" / "trainable.safetensors"), "best")
    torch.testing.assert_close(logits(tuned.model), logits(ref), atol=1e-5, rtol=1e-5)
    assert (logits(tuned.model) - logits(checkpoint.load(base).model)).abs().max() > 1e-3
    assert checkpoint.resolve(out) == out  # quantize, export and eval read it like any checkpoint


def test_an_adapter_only_run_loads_as_base_plus_adapter(base, corpus, tmp_path):
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    finetune(base, str(corpus), merged, FinetuneConfig(seq_len=32), tc(), progress=False)
    finetune(base, str(corpus), adapter, FinetuneConfig(seq_len=32, merge=False), tc(), progress=False)
    assert not (adapter / "model.safetensors").exists()
    assert sorted(load_file(adapter / "adapter.safetensors"))[0] == "blocks.0.attn.proj.lora_a"
    # an adapter on the top block only loads onto that block
    top = tmp_path / "top"
    finetune(base, str(corpus), top, FinetuneConfig(seq_len=32, merge=False, lora_layers=1), tc(), progress=False)
    n_layer = json.loads((base / "config.json").read_text())["n_layer"]
    assert {k.split(".")[1] for k in load_file(top / "adapter.safetensors")} == {str(n_layer - 1)}
    assert LLM.load(top).model is not None
    torch.testing.assert_close(logits(LLM.load(adapter).model), logits(LLM.load(merged).model), atol=1e-5, rtol=1e-5)
    # slm eval reads it like any run (the held-out split of the data it was tuned on), with the merged run's numbers
    ev = [evaluate(r, max_bytes=4000, threads=1, progress=False)["lm"] for r in (adapter, merged)]
    assert list(ev[0]) == list(ev[1]) and len(ev[0]) >= 1
    for name in ev[0]:
        assert ev[0][name]["bpb"] == pytest.approx(ev[1][name]["bpb"], rel=1e-4)
    # the base is pinned: a changed base is refused rather than silently combined
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    meta = json.loads((adapter / "meta.json").read_text())
    meta["base"]["path"] = str(moved)
    (adapter / "meta.json").write_text(json.dumps(meta))
    (moved / "meta.json").write_text((moved / "meta.json").read_text().replace("tiny", "other"))
    with pytest.raises(SlmError, match=r"its base .* has changed since it was fine-tuned"):
        LLM.load(adapter)
    shutil.rmtree(moved)
    with pytest.raises(SlmError, match=r"reads its base from .*, which is gone"):
        LLM.load(adapter)


def test_full_fine_tuning_with_gradient_checkpointing(base, corpus, tmp_path):
    r = finetune(base, str(corpus), tmp_path / "full", FinetuneConfig(method="full", seq_len=32, grad_checkpoint=True),
                 tc(method="full", lr=1e-3), progress=False)
    assert r.trainable_params == r.total_params and r.best["loss"] < r.before["loss"]


def test_lora_over_an_int8_base_writes_an_fp32_merged_model(base, corpus, tmp_path):
    r = finetune(base, str(corpus), tmp_path / "q", FinetuneConfig(seq_len=32, base_weights="int8"), tc(),
                 progress=False)
    assert r.best["loss"] < r.before["loss"]
    model = LLM.load(tmp_path / "q").model
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_prepared_data_directory_must_use_the_base_tokenizer(base, corpus, tmp_path):
    ok = prepare(str(corpus), base / "tokenizer.json", tmp_path / "ok", progress=False)
    finetune(base, ok, tmp_path / "run", FinetuneConfig(seq_len=32), tc(max_steps=2), progress=False)
    other = prepare(str(corpus), "byte", tmp_path / "bytes", progress=False)
    with pytest.raises(SlmError, match=r"tokenized with byte .* not the base's bpe:300 tokenizer"):
        finetune(base, other, tmp_path / "bad", FinetuneConfig(seq_len=32), tc(), progress=False)
    assert not (tmp_path / "bad").exists()


def test_classification_reaches_high_accuracy_on_a_separable_task(base, tmp_path):
    data = labelled_dir(tmp_path / "labels", n=20)
    out = tmp_path / "clf"
    cfg = FinetuneConfig(task="classify", seq_len=32, head_lr=3e-2, test_fraction=0.25)
    r = finetune(base, str(data), out, cfg, tc(max_steps=30, eval_interval=10), progress=False)
    assert r.test["accuracy"] >= 0.9 and r.test["macro_f1"] >= 0.9
    assert r.before["loss"] > 0.6 and r.best["loss"] < 0.1  # from a chance-level head (ln 2 = 0.69) to separated
    meta = run.read_meta(out)
    assert meta["labels"] == ["love", "royal"] and meta["test"] == r.test and meta["split"]["test"] == 10
    clf = Classifier.load(out)
    assert clf.head.weight.shape == (2, 32)
    x = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    assert clf(x, torch.tensor([3, 2])).shape == (2, 2)
    royal, love = sentences(["the", "king", "my", "lord"], 1, seed=5)[0], "o romeo wherefore art thou fair maid"
    preds = clf.predict([royal, love])
    assert [p.label for p in preds] == ["royal", "love"]
    assert sum(preds[0].probs.values()) == pytest.approx(1.0)
    # the body is an ordinary language model too
    assert LLM.load(out).generate("the", max_new_tokens=3, temperature=0)


def test_chat_fine_tuning_on_a_model_with_a_chat_template(chat_base, tmp_path):
    conv = [{"messages": [{"role": "user", "content": "who is the king"},
                          {"role": "assistant", "content": "my lord the king is dead"}]}] * 12
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conv))
    out = tmp_path / "chat"
    r = finetune(chat_base, str(path), out, FinetuneConfig(task="chat", method="full", seq_len=48),
                 tc(method="full", max_steps=40, eval_interval=10), progress=False)
    assert r.best["loss"] < r.before["loss"] / 2
    llm = LLM.load(out)
    assert "king" in llm.generate("who is the king", chat=True, max_new_tokens=8, temperature=0)


def test_resume_continues_from_the_checkpoint_exactly(base, corpus, tmp_path):
    cfg = FinetuneConfig(seq_len=32, patience=None)
    full = tmp_path / "full"
    finetune(base, str(corpus), full, cfg, tc(max_steps=8, ckpt_interval=4, eval_interval=4), progress=False)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_000008")  # as if killed after the step-4 checkpoint
    r = finetune(None, None, part, resume=True, progress=False)
    assert r.step == 8
    a = load_file(full / "checkpoints" / "step_000008" / "trainable.safetensors")
    b = load_file(part / "checkpoints" / "step_000008" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    r = finetune(None, None, part, train_config=tc(max_steps=10, ckpt_interval=4, eval_interval=4), resume=True,
                 progress=False)
    meta = run.read_meta(part)
    assert r.step == 10 and meta["resumes"][1]["step"] == 8 and meta["resumes"][1]["changed"] == {"max_steps": 10}
    with pytest.raises(SlmError, match="lora_rank cannot change on resume"):
        finetune(None, None, part, FinetuneConfig(seq_len=32, patience=None, lora_rank=4), tc(max_steps=12),
                 resume=True, progress=False)


def test_early_stopping_keeps_the_best_evaluation(base, corpus, tmp_path):
    # an lr far too large: the val loss gets worse after the first evaluations, and the run stops on its own
    r = finetune(base, str(corpus), tmp_path / "es", FinetuneConfig(seq_len=32, patience=2),
                 tc(method="full", max_steps=200, eval_interval=2, lr=0.5, warmup_steps=0), progress=False)
    assert r.status == "early-stopped" and r.step < 200
    assert r.best["loss"] == min(json.loads(line).get("val_loss", 99)
                                 for line in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(config=FinetuneConfig(lora_rank=40, seq_len=32)), r"LoRA rank 40 is larger than the layer"),
    (dict(config=FinetuneConfig(task="classify", seq_len=32), data="one-class"), r"a single class"),
    (dict(config=FinetuneConfig(task="chat", seq_len=32), data="no-reply.jsonl"), r"no assistant turn"),
    (dict(config=FinetuneConfig(task="lm"), data="missing/dir"), r"missing/dir does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(base, corpus, tmp_path, kwargs, needle):
    (tmp_path / "one-class" / "a").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "one-class" / "a" / f"{i}.txt").write_text("text")
    (tmp_path / "no-reply.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    data = str(tmp_path / kwargs.pop("data")) if "data" in kwargs else str(corpus)
    with pytest.raises(SlmError, match=needle):
        finetune(base, data, tmp_path / "out", train_config=tc(), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_configs_are_one_line():
    with pytest.raises(SlmError, match="--method frozen trains only a classification head"):
        FinetuneConfig(method="frozen")
    with pytest.raises(SlmError, match="always writes the whole model"):
        FinetuneConfig(method="full", merge=False)
    with pytest.raises(SlmError, match="--lora-plus scales the learning rate of LoRA's B factors; --method full"):
        FinetuneConfig(method="full", lora_plus=4)
    with pytest.raises(SlmError, match=r"--lora-layers picks the blocks LoRA adapts; --method full"):
        FinetuneConfig(method="full", lora_layers=2)
    with pytest.raises(SlmError, match=r"lora_layers=0 must be >= 1"):
        FinetuneConfig(lora_layers=0)
    with pytest.raises(SlmError, match=r"lora_plus=0.5 must be >= 1"):
        FinetuneConfig(lora_plus=0.5)
    with pytest.raises(SlmError, match=r"FinetuneConfig.task takes one of lm, classify, chat, not 'x'"):
        FinetuneConfig.from_dict({"task": "x"})
