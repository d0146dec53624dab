"""The spectrum recipe: its rows cover every class of the report, each row's label is what `classify` says of the model,
derived rows a build cannot make are skipped with a reason, and a tiny-budget recipe runs end to end (trained, derived
and resumed)."""

import pytest

from slmkit.config import PRESETS, ModelConfig
from slmkit.eval.pareto import CLASSES, classify
from slmkit.model import GPT
from slmkit.recipes.spectrum import (
    DERIVED,
    IMPORTED_CLASS,
    SMALL_DENSE,
    SPECTRUM,
    Derived,
    Trained,
    classes,
    run_recipe,
    unavailable,
)
from slmkit.run import read_meta


def test_the_recipe_covers_every_class_of_the_report():
    assert classes(SPECTRUM, DERIVED) == set(CLASSES)
    assert IMPORTED_CLASS in CLASSES
    names = [r.name for r in SPECTRUM] + [d.name for d in DERIVED]
    assert len(names) == len(set(names))  # one run directory each
    for row in SPECTRUM:
        assert row.preset.startswith("ngram-") or row.preset in PRESETS, row
    assert {d.parent for d in DERIVED} == {SMALL_DENSE} and SMALL_DENSE in {r.name for r in SPECTRUM}
    assert {d.stage for d in DERIVED} == {"quantize", "prune", "distill"}
    assert any(d.settings.get("sparsity", 0) >= 0.9 for d in DERIVED)  # the very sparse row


@pytest.mark.parametrize("row", [r for r in SPECTRUM if not r.preset.startswith("ngram")], ids=lambda r: r.name)
def test_each_trained_row_is_the_class_it_claims(row):
    vocab = 259 if row.tokenizer == "byte" else int(row.tokenizer.partition(":")[2])
    cfg = ModelConfig.preset(row.preset, vocab_size=vocab)
    params = GPT(cfg).num_params()
    model_class = "moe" if cfg.moe_experts else "dense"
    assert classify(model_class, cfg.to_dict(), row.tokenizer, params) == row.cls


def test_a_derived_row_this_build_cannot_make_says_why():
    assert unavailable(Derived("q", "quantize", "p", {"weights": "int8"})) is None
    assert "no imaginary option" in unavailable(Derived("q", "quantize", "p", {"imaginary": 1}))
    assert "--method 'nope'" in unavailable(Derived("p", "prune", "p", {"method": "nope", "sparsity": 0.5}))
    assert unavailable(Derived("p", "prune", "p", {"method": "magnitude", "sparsity": 0.5, "heal": 0.5})) is None
    for d in DERIVED:  # the recipe's own rows: made, or skipped with a reason naming what is missing
        why = unavailable(d)
        assert why is None or (d.cls == "very sparse" and "gradual" in why), (d, why)


@pytest.mark.slow
def test_a_tiny_recipe_trains_derives_compares_and_resumes(tiny_data, tmp_path):
    corpus = str(tiny_data.parent / "corpus")
    parent = "dense"
    models = [Trained("ngram-3", "ngram-3", "char", "n-gram"), Trained(parent, "gpt-0.8m", "char", "small dense")]
    derived = [
        Derived("int8", "quantize", parent, {"weights": "int8"}, "quantized"),
        Derived("mag50", "prune", parent, {"method": "magnitude", "sparsity": 0.5, "heal": 0.5}, "pruned"),
        Derived("rank8", "factorize", parent, {"rank": 8}, "low-rank"),
        Derived("student", "distill", parent, {"student": "gpt-0.8m", "top_k": 8, "windows": 16}, "distilled"),
        Derived("vs", "prune", parent, {"method": "magnitude", "sparsity": 0.9, "no_such_option": True}),
        Derived("orphan", "quantize", "not-trained", {"weights": "int8"}),
    ]
    overrides = dict(max_steps=2, batch_size=2, eval_batches=1, threads=1, warmup_steps=1)
    kw = dict(budget="1m", corpus=corpus, models=models, derived=derived, imported=False, threads=1,
              train_overrides=overrides, efficiency=False, progress=False)
    notes: list[str] = []
    res = run_recipe(tmp_path / "spec", say=notes.append, **kw)
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["ngram-3", parent, "int8", "mag50", "rank8", "student"]
    assert {n: r["class"] for n, r in rows.items()} == {
        "ngram-3": "n-gram", parent: "small dense", "int8": "quantized", "mag50": "pruned", "rank8": "low-rank",
        "student": "distilled"}
    for name in ("int8", "mag50", "rank8", "student"):  # each beside its parent (a student's is its teacher)
        r = rows[name]
        assert r["parent_name"] == parent and r["kl"] is not None and r["bpb_delta_from"] == "table", name
    assert any("skipping vs" in n and "no_such_option" in n for n in notes)
    assert any("skipping orphan" in n and "not-trained" in n for n in notes)
    recipe = read_meta(tmp_path / "spec", kinds=("report",))["lineage"]["recipe"]
    assert [d[0] for d in recipe["derived"]] == [d.name for d in derived]

    notes.clear()  # an interrupted recipe resumes: nothing is trained or made again
    run_recipe(tmp_path / "spec", say=notes.append, **kw)
    assert sum("reusing" in n and "made from the current" in n for n in notes) == 4
    assert not any("training" in n or n.startswith(f"{d.name}: {d.stage} ") for n in notes for d in derived)

@pytest.mark.slow
def test_recipe_at_a_tiny_budget(tiny_data, tmp_path):
    corpus = str(tiny_data.parent / "corpus")
    notes = []
    models = [("ngram-3", "ngram-3", "char"), ("tiny-gpt", "gpt-0.8m", "byte"), ("nope", "no-such-preset", "char")]
    overrides = dict(max_steps=2, batch_size=2, eval_batches=1, threads=1, warmup_steps=1)
    res = run_recipe(tmp_path / "spec", budget="1m", corpus=corpus, models=models, derived=(), imported=False,
                     threads=1, train_overrides=overrides, efficiency=False, progress=False, say=notes.append)
    assert [r["name"] for r in res["rows"]] == ["ngram-3", "tiny-gpt"]
    assert [r["class"] for r in res["rows"]] == ["n-gram", "super-tiny"]  # gpt-0.8m at vocab 259: 0.83M params
    assert any("skipping nope" in n for n in notes)
    assert res["lm_sets"] == [f"{corpus}:val"]
    assert {p.name for p in (tmp_path / "spec").iterdir()} >= {"data-char", "data-byte", "runs", "report.md"}
    recipe = read_meta(tmp_path / "spec", kinds=("report",))["lineage"]["recipe"]
    assert recipe["recipe"] == "spectrum" and recipe["lm_sets"] == [f"{corpus}:val"] and len(recipe["runs"]) == 2
    notes.clear()
    run_recipe(tmp_path / "spec", budget="1m", corpus=corpus, models=models[:2], derived=(), imported=False,
               threads=1, train_overrides=overrides, efficiency=False, progress=False, say=notes.append)
    assert sum("reusing the finished run" in n for n in notes) == 2  # an interrupted recipe resumes, not restarts
    notes.clear()
    run_recipe(tmp_path / "spec", budget="1m", corpus=corpus, models=models[:2], derived=(), imported=False,
               train_overrides={**overrides, "optimizer": "adamw", "threads": 2}, efficiency=False, progress=False,
               say=notes.append)  # another optimizer retrains the network (threads alone would not)
    assert [n.partition(":")[0] for n in notes if "reusing the finished run" in n] == ["ngram-3"]
    assert any("tiny-gpt: training" in n for n in notes)


