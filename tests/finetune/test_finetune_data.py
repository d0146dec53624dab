"""What fine-tuning reads: the assistant-only loss mask, rows that never see each other, labelled splits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.finetune import load_labelled, render_chat
from slmkit.finetune.data import load_chat
from slmkit.finetune.loop import _chat_tensors, classification_metrics, masked_lm_loss
from slmkit.model import GPT
from tests.conftest import noisy_weights
from tests.finetune.conftest import labelled_dir, tiny_tokenizer

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is the king"},
        {"role": "assistant", "content": "my lord"}, {"role": "user", "content": "and romeo"},
        {"role": "assistant", "content": "o romeo"}, {"role": "user", "content": "thanks"}]


def _masked_text(tok, ids, mask, on=True):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m == on])


def test_the_loss_mask_covers_exactly_the_assistant_replies_with_their_end_of_turn():
    tok = tiny_tokenizer(chat=True)
    ids, mask = render_chat(tok, CONV)
    assert len(ids) == len(mask)
    # the model's template: the reply text and its <|eos|> end-of-turn are trained, nothing else
    assert _masked_text(tok, ids, mask) == " my lord<|eos|> o romeo<|eos|>"
    prompt = _masked_text(tok, ids, mask, on=False)
    assert "who is the king" in prompt and "be brief" in prompt and "my lord" not in prompt
    assert "thanks" not in tok.decode(ids)  # a turn after the last reply carries no loss: dropped
    # the tokens are those of the rendered conversation, with the BOS that LLM.generate(chat=True) and the server put
    # before a rendered prompt when the tokenizer adds one
    full = tok.apply_chat_template(CONV[:5], add_generation_prompt=False)
    assert tok.add_bos and tok.decode(ids) == "<|bos|>" + full


def test_without_a_chat_template_the_plain_one_is_used_and_each_reply_ends_with_eos():
    tok = tiny_tokenizer()
    ids, mask = render_chat(tok, CONV[1:3])
    assert ids[0] == tok.bos_id and not mask[0]
    assert tok.decode(ids[1:]) == "User: who is the king\nAssistant: my lord\n<|eos|>"
    assert _masked_text(tok, ids, mask) == " my lord\n<|eos|>"


def test_targets_are_the_next_token_only_where_it_is_an_assistant_token():
    tok = tiny_tokenizer(chat=True)
    row = render_chat(tok, CONV[1:3])
    x, y = _chat_tensors([row], tok.pad_id)
    ids, mask = row
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]


def test_rows_of_a_batch_never_attend_to_each_other_or_to_padding():
    """What packing must not break: each conversation's logits in a padded batch are its logits alone."""
    tok = tiny_tokenizer(chat=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      pos="rope", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    model = noisy_weights(GPT(cfg)).eval()
    rows = [render_chat(tok, CONV[1:3]), render_chat(tok, CONV[:3]), render_chat(tok, CONV[3:5])]
    x, y = _chat_tensors(rows, tok.pad_id)
    with torch.no_grad():
        batch = model(x)[0]
        for i, (ids, _) in enumerate(rows):
            alone = model(torch.tensor([ids[:-1]]))[0][0]
            torch.testing.assert_close(batch[i, : len(ids) - 1], alone, atol=1e-5, rtol=1e-5)
        # and the masked loss of the batch is the token-weighted mean of the rows' own
        total = sum(float(masked_lm_loss(model, *_chat_tensors([r], tok.pad_id), reduction="sum")) for r in rows)
        assert float(masked_lm_loss(model, x, y)) == pytest.approx(total / int((y != -1).sum()), rel=1e-5)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_rows_split_and_bad_rows_are_one_line_errors(tmp_path):
    tok = tiny_tokenizer(chat=True)
    good = _jsonl(tmp_path / "train.jsonl", [{"messages": CONV[1:3]}] * 20)
    conv = load_chat(str(good), tok, max_len=64, val_fraction=0.2)
    assert conv.splits["train"] and conv.splits["val"]  # a lone file named train.jsonl is still split
    assert len(conv.splits["train"]) + len(conv.splits["val"]) == 20
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": CONV[1:3]}, {"messages": [CONV[1]]}])
    with pytest.raises(SlmError, match=r"bad\.jsonl:2: the conversation has no assistant turn"):
        load_chat(str(bad), tok, max_len=64)
    (tmp_path / "broken.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(SlmError, match=r"broken\.jsonl:1: invalid JSON"):
        load_chat(str(tmp_path / "broken.jsonl"), tok, max_len=64)
    with pytest.raises(SlmError, match=r'no "messages" list'):
        load_chat(str(_jsonl(tmp_path / "text.jsonl", [{"text": "hi"}])), tok, max_len=64)


def test_a_labelled_directory_is_split_stratified_and_seeded(tmp_path):
    root = labelled_dir(tmp_path / "d", n=20)
    data = load_labelled(str(root), seed=0, val_fraction=0.1, test_fraction=0.2)
    assert data.labels == ["love", "royal"] and not data.given
    for split, per_label in (("train", 14), ("val", 2), ("test", 4)):
        assert sorted(y for _, y in data.splits[split]) == [0] * per_label + [1] * per_label, split
    again = load_labelled(str(root), seed=0, val_fraction=0.1, test_fraction=0.2)
    assert again.digest() == data.digest()
    assert load_labelled(str(root), seed=1, val_fraction=0.1, test_fraction=0.2).digest() != data.digest()


def test_jsonl_labels_and_given_splits(tmp_path):
    rows = [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(10)]
    data = load_labelled(str(_jsonl(tmp_path / "l.jsonl", rows)), test_fraction=0)
    assert data.labels == ["a", "b"] and data.splits["test"] == data.splits["val"]
    for split, label in (("train", "x"), ("train", "y"), ("test", "x")):
        (tmp_path / "g" / split / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / split / label / "1.txt").write_text(f"{label} text")
    data = load_labelled(str(tmp_path / "g"))
    assert data.given and len(data.splits["train"]) == 2 and data.splits["val"] == data.splits["test"]


def _flat(d: Path) -> Path:
    d.mkdir()
    (d / "a.txt").write_text("hi")
    return d


@pytest.mark.parametrize(("make", "needle"), [
    (lambda d: _jsonl(d / "x.jsonl", [{"text": "a", "label": "p"}, {"text": "b"}]),
     r'labels missing: .*x\.jsonl:2 has no "label"'),
    (lambda d: _flat(d / "flat"),
     r"labels missing: .*a\.txt is not inside a label directory"),
    (lambda d: _jsonl(d / "one.jsonl", [{"text": f"t{i}", "label": "only"} for i in range(9)]),
     r"a single class \(only\)"),
    (lambda d: _jsonl(d / "few.jsonl", [{"text": "t", "label": "a"}] * 9 + [{"text": "u", "label": "b"}] * 2),
     r"label 'b' has 2 example\(s\); each label needs at least 3"),
])
def test_bad_labelled_data_is_one_line(tmp_path, make, needle):
    with pytest.raises(SlmError, match=needle):
        load_labelled(str(make(tmp_path)))


def test_a_label_seen_only_at_test_time_is_an_error(tmp_path):
    for split, label in (("train", "x"), ("train", "y"), ("test", "x"), ("test", "z")):
        (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / label / "1.txt").write_text("text")
    with pytest.raises(SlmError, match=r"label 'z' appears in the test split .* but never in train"):
        load_labelled(str(tmp_path))


def test_macro_f1_is_the_mean_of_per_class_f1():
    import numpy as np

    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 2]))
    # class 0: tp1 fp1 fn0 → 2/3; class 1: tp2 fp0 fn1 → 0.8; class 2: 1
    assert m["accuracy"] == pytest.approx(0.8) and m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)
