"""`slm compare`: Pareto front, classification, eval.json reuse, the report directory and its files, compressed runs
beside their parents (KL, Δbpb). (What `slm eval` records so compare can reuse it:
test_eval_run.py; the spectrum recipe's rows: tests/recipes/test_spectrum.py.)"""

import json
import math
import re
import shutil

import pytest

import slmkit.eval
from slmkit.cli import main
from slmkit.compress.factorize import factorize_run
from slmkit.compress.prune import prune_run
from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.eval.compare import Request, compare, parent_of
from slmkit.eval.evaluate import checkpoint_stamp
from slmkit.eval.pareto import classify, pareto_front
from slmkit.model.ngram import train_ngram
from slmkit.run import kind_of, read_meta
from slmkit.runtime import available_cores
from slmkit.tokenizer import Tokenizer
from slmkit.train import train


def test_pareto_front_minimising_both_axes():
    pts = [(1, 3), (2, 2), (3, 3), (2, 2), (4, 1), (5, 1)]
    # (3,3) is beaten by (2,2); (5,1) by (4,1); the duplicate (2,2) points do not beat each other
    assert pareto_front(pts) == [True, True, False, True, True, False]


def test_pareto_front_maximising_x_and_skipping_missing_values():
    pts = [(3000, 2.2), (900, 2.0), (400, 1.9), (20, 1.95), (None, 1.0), (100, math.nan), (3000, 2.3)]
    assert pareto_front(pts, maximize=(True, False)) == [True, True, True, False, False, False, False]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [True]


@pytest.mark.parametrize(("model_class", "config", "tokenizer", "params", "expected"), [
    ("ngram", {}, "char", 10**7, "n-gram"),
    ("imported", {"attention": "full"}, "bpe:49152", 1.3e8, "imported pretrained"),
    ("dense", {"moe_experts": 8, "attention": "full"}, "bpe:2048", 3e6, "MoE"),
    ("dense", {"moe_experts": 0, "attention": "local"}, "bpe:2048", 3e6, "sliding-window"),
    ("dense", {"attention": "blocksparse"}, "bpe:2048", 3e6, "block-sparse"),
    ("dense", {"attention": "linear"}, "bpe:2048", 3e6, "Performer (linear)"),
    ("dense", {"attention": "lsh"}, "bpe:2048", 3e6, "Reformer (LSH)"),
    ("dense", {"attention": "full", "share_mlp": True}, "bpe:2048", 3e6, "shared-FFN"),
    ("dense", {"attention": "full", "lowrank": 64}, "bpe:2048", 3e6, "low-rank"),
    ("dense", {"attention": "full"}, "byte", 8e5, "super-tiny"),
    ("dense", {"attention": "full"}, "byte", 3e6, "small dense"),
    (None, {}, "bpe:2048", 3e6, "small dense"),
])
def test_classify(model_class, config, tokenizer, params, expected):
    assert classify(model_class, config, tokenizer, params) == expected


def test_classify_a_model_made_from_another_by_how_it_was_made():
    dense = ("dense", {"attention": "full"}, "bpe:2048", 3e6)
    assert classify(*dense, kind="quantize") == "quantized"
    assert classify(*dense, kind="prune", sparsity=0.5) == "pruned"
    assert classify(*dense, kind="prune", sparsity=0.9) == "very sparse"  # ≥ 90 % zeros, however it got there
    assert classify(*dense, kind="prune", sparsity=0.89999) == "very sparse"  # int(0.9 · K) of each matrix
    assert classify(*dense, kind="prune", sparsity=0.89) == "pruned"
    assert classify(*dense, kind="distill") == "distilled"
    assert classify("dense", {"lowrank": 16}, "bpe:2048", 3e6, kind="factorize") == "low-rank"


FAKE = {  # name: (model_class, config, tokenizer, params total/active, bpb val/folio, decode tok/s, train time)
    "ng": ("ngram", {"order": 5}, "char", (100_000, 100_000), (2.2, 2.8), 3000.0, 5.0),
    "tiny": ("dense", {"attention": "full"}, "byte", (800_000, 800_000), (2.0, 2.6), 900.0, 180.0),
    "moe": ("dense", {"attention": "full", "moe_experts": 8}, "bpe:2048", (3_000_000, 1_500_000), (1.9, 2.5), 400.0,
            180.0),
    "big": ("imported", {"attention": "full"}, "bpe:49152", (135_000_000, 135_000_000), (1.95, 2.1), 20.0, None),
}


def _fake_run(root, name, spec):
    model_class, config, tok, (total, active), (val, folio), tok_s, train_time = spec
    run = root / name
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / "config.json").write_text(json.dumps(config))
    meta = {"model_class": model_class} if model_class != "dense" else {}
    if train_time is not None:
        meta.update(status="finished", result={"train_time": train_time, "tokens": 1000})
    (run / "meta.json").write_text(json.dumps(meta))
    # measured as compare measures by default: fp32, whole sets, the model's own window, every core
    how = {"weights": "fp32", "max_bytes": None, "context": 128, "stride": 64}
    lm = {s: {"loss_nats_per_token": b, "perplexity": 1.0, "bpb": b, "tokens": 10, "bytes": 20, **how}
          for s, b in (("shakespeare:val", val), ("shakespeare:folio", folio))}
    mmlu = {"acc": 0.25, "acc_norm": 0.26, "n": 57, "weights": "fp32", "shots": 0, "limit": None, "context": 128}
    ev = {"model": {"path": str(run), "name": name, "model_class": model_class, "params_total": total,
                    "params_active": active, "bytes_on_disk": 1000, "tokenizer": tok, "block_size": 128,
                    "checkpoint": checkpoint_stamp(run)},
          "lm": lm, "tasks": {"mmlu": mmlu} if name == "big" else {},
          "efficiency": {"decode_tok_s": tok_s, "peak_rss_mb": 300.0, "weights": "fp32", "threads": available_cores()},
          "versions": {}, "elapsed_s": 1.0}
    (run / "eval.json").write_text(json.dumps(ev))
    return run


@pytest.mark.slow
def test_compare_reuses_eval_json_and_writes_the_report(tmp_path, monkeypatch):
    def no_evaluate(*a, **k):
        raise AssertionError("eval.json covers the request; evaluate must not run")

    monkeypatch.setattr(slmkit.eval, "evaluate", no_evaluate)
    runs = [_fake_run(tmp_path, name, spec) for name, spec in FAKE.items()]
    out = tmp_path / "report"
    res = compare(runs, out, efficiency=True, say=lambda s: None)
    rows = {r["name"]: r for r in res["rows"]}
    assert [rows[n]["class"] for n in FAKE] == ["n-gram", "super-tiny", "MoE", "imported pretrained"]
    assert rows["moe"]["params_active"] == 1_500_000 and rows["tiny"]["train_time_s"] == 180.0
    assert rows["big"]["train_time_s"] is None and rows["big"]["tasks"]["mmlu"]["acc"] == 0.25
    assert rows["ng"]["bpb"] == {"shakespeare:val": 2.2, "shakespeare:folio": 2.8}
    assert rows["ng"]["decode_bytes_s"] == pytest.approx(2 * rows["ng"]["decode_tok_s"])  # 20 bytes / 10 tokens
    # every model has the same bytes on disk and peak memory here: the best bpb alone is on those fronts
    assert res["pareto"] == {"size": ["moe"], "memory": ["moe"], "speed": ["ng", "tiny", "moe"]}
    assert json.loads((out / "compare.json").read_text())["pareto"] == res["pareto"]
    md = (out / "report.md").read_text()
    assert "| big | imported pretrained | 1 KB | 300 | 135M |" in md
    assert "| moe†§‡ | MoE | 1 KB | 300 | 3.00M | 1.50M |" in md
    assert "mmlu acc" in md and "![size.png](size.png)" in md
    assert "KL to parent |" not in md  # no such column: nothing here was made from another model
    for png in ("size.png", "memory.png", "speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r'src="(?!data:)', page)  # self-contained: no external image


@pytest.mark.slow
def test_compare_measures_what_is_missing_then_reuses_it(tiny_data, tmp_path, monkeypatch):
    run = train_ngram(tiny_data, tmp_path / "ng", order=3)
    corpus = tiny_data.parent / "corpus"
    sets = [f"{corpus}:val"]
    res = compare([run], tmp_path / "r1", lm_sets=sets, threads=1, say=lambda s: None)
    row, eff = res["rows"][0], res["evals"]["ng"]["efficiency"]
    meta = json.loads((run / "meta.json").read_text())
    # the held-out docs of the run's own split, scored per document: close to the shard's (which adds end events)
    assert row["bpb"][sets[0]] == pytest.approx(meta["result"]["val_bpb"], rel=0.05)
    assert row["train_time_s"] == pytest.approx(meta["result"]["train_time"])
    # n-gram decoding timed by the same harness as a transformer's, in its own process
    assert row["decode_tok_s"] > 0 and row["peak_rss_mb"] > 0 and "LanguageModel.generate" in eff["method"]
    assert (run / "eval.json").exists()

    monkeypatch.setattr(slmkit.eval, "evaluate", lambda *a, **k: pytest.fail("should reuse eval.json"))
    again = compare([run], tmp_path / "r2", lm_sets=sets, threads=1, say=lambda s: None)
    assert again["rows"][0]["bpb"] == row["bpb"]


# --- compressed runs beside their parents ----------------------------------------------------------------------------

# Llama style, mlp_hidden 192: wide enough for rank-8 factors and channel pruning
TINY = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, pos="rope", norm="rmsnorm",
                   mlp="swiglu")


@pytest.fixture(scope="module")
def family(tiny_data, tmp_path_factory):
    """A tiny trained run and two models made from it by the real stages: pruned to half its weights, factorised."""
    root = tmp_path_factory.mktemp("family")
    parent = root / "parent"
    train(tiny_data, parent, TINY, TrainConfig(max_steps=20, batch_size=4, threads=1, precision="fp32",
                                               eval_windows=4, warmup_steps=2), progress=False)
    pruned = prune_run(parent, root / "pruned", method="magnitude", sparsity=0.5)
    low = factorize_run(parent, root / "lowrank", rank=8)
    return parent, pruned, low


@pytest.mark.slow
def test_kl_and_delta_bpb_to_the_parent_for_pruned_and_factorized_runs(family, tiny_data, tmp_path):
    parent, pruned, low = family
    sets = [f"{tiny_data.parent / 'corpus'}:val"]
    res = compare([parent, pruned, low], tmp_path / "r", lm_sets=sets, efficiency=False, threads=1,
                  say=lambda s: None)
    rows = {r["name"]: r for r in res["rows"]}
    assert {n: rows[n]["class"] for n in rows} == {"parent": "small dense", "pruned": "pruned", "lowrank": "low-rank"}
    assert rows["parent"]["parent"] is None and rows["parent"]["kl"] is None
    for name, kind in (("pruned", "prune"), ("lowrank", "factorize")):
        r = rows[name]
        assert r["compressed"] == kind and r["parent_name"] == "parent" and r["bpb_delta_from"] == "table"
        assert r["kl"] > 0 and r["kl_note"] is None  # the weights changed, so the distribution did
        assert r["bpb_delta_pct"] == pytest.approx(100 * (r["bpb"][sets[0]] / rows["parent"]["bpb"][sets[0]] - 1))
        # the KL pass scores both models on the same windows as bits per byte does: the same numbers
        assert r["kl_bpb"] == pytest.approx(r["bpb"][sets[0]], rel=1e-4)
        assert r["kl_parent_bpb"] == pytest.approx(rows["parent"]["bpb"][sets[0]], rel=1e-4)
    assert rows["pruned"]["params_nonzero"] < rows["pruned"]["params_total"]
    assert rows["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Δbpb vs parent" in md and "KL to parent" in md and "non-zero" in md
    assert f"{rows['lowrank']['kl']:.4f}" in md and "(parent)" in md

    # without its parent in the comparison: Δbpb from the KL pass's own scoring of both (marked *), eval.json reused
    notes: list[str] = []
    alone = compare([pruned], tmp_path / "r2", lm_sets=sets, efficiency=False, threads=1, say=notes.append)
    r = alone["rows"][0]
    assert r["bpb_delta_from"] == "kl" and r["parent_name"] == "parent" and r["kl"] == rows["pruned"]["kl"]
    assert r["bpb_delta_pct"] == pytest.approx(rows["pruned"]["bpb_delta_pct"], rel=1e-3)
    assert any("reusing" in n for n in notes)
    assert "%* (parent)" in (tmp_path / "r2" / "report.md").read_text()


def test_a_parent_with_another_tokenizer_is_noted_not_measured(family, tmp_path):
    parent, pruned, _ = family
    assert parent_of(parent) is None  # trained from data, not made from a model
    p = parent_of(pruned)
    assert p.kind == "prune" and p.name == "parent" and p.note is None
    assert p.path == str(sorted((parent / "checkpoints").iterdir())[-1].resolve())
    odd = tmp_path / "odd"
    shutil.copytree(pruned, odd)
    Tokenizer.train("char", ["a different alphabet: xyz 0123"]).save(odd / "tokenizer.json")
    p = parent_of(odd)
    assert p.name == "parent" and "tokenize differently" in p.note


def test_cli_compare(tmp_path, capsys):
    runs = [str(_fake_run(tmp_path, name, spec)) for name, spec in FAKE.items()]
    assert main(["compare", *runs, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "report.md" in capsys.readouterr().out
    assert main(["compare", "--out", str(tmp_path / "r2")]) == 2
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "r3")]) == 2


def test_compare_with_max_bytes_scores_a_prefix_and_remeasures_when_it_changes(tiny_data, tmp_path):
    run = train_ngram(tiny_data, tmp_path / "ng", order=3)
    sets = [f"{tiny_data.parent / 'corpus'}:val"]
    notes: list[str] = []
    res = compare([run], tmp_path / "r1", lm_sets=sets, max_bytes=2000, efficiency=False, threads=1, say=notes.append)
    ev = res["evals"]["ng"]["lm"][sets[0]]
    assert ev["bytes"] == 2000 and ev["max_bytes"] == 2000 and res["max_bytes"] == 2000
    assert "first 2,000 bytes" in (tmp_path / "r1" / "report.md").read_text()
    whole = compare([run], tmp_path / "r2", lm_sets=sets, efficiency=False, threads=1, say=notes.append)
    assert whole["evals"]["ng"]["lm"][sets[0]]["bytes"] > 2000  # not the cached prefix
    assert not any("reusing" in n for n in notes)


def test_request_matches_every_setting_that_changes_a_number():
    ev = {"model": {"block_size": 256},
          "lm": {"a": {"weights": "fp32", "max_bytes": None, "context": 256, "stride": 128},
                 "b": {"weights": "fp32", "max_bytes": 1000, "context": 128, "stride": 64},
                 "q": {"weights": "int8", "max_bytes": None, "context": 256, "stride": 128},
                 "s": {"weights": "fp32", "max_bytes": None, "context": 256, "stride": 7},
                 "old": {"max_bytes": None, "context": 256, "stride": 128}},  # no weights recorded
          "tasks": {"t": {"weights": "fp32", "shots": 0, "limit": 5, "context": 256}},
          "efficiency": {"weights": "fp32", "threads": 1}}
    plain, capped = Request(), Request(context=1024)
    assert plain.has_set(ev, "a") and capped.has_set(ev, "a")  # a cap above the block: the same window
    assert not Request(context=128).has_set(ev, "a") and not Request(max_bytes=1000).has_set(ev, "a")
    assert Request(max_bytes=1000, context=128).has_set(ev, "b") and not plain.has_set(ev, "b")
    assert not any(plain.has_set(ev, s) for s in ("q", "s", "old", "missing"))
    assert Request(limit=5).has_task(ev, "t") and not plain.has_task(ev, "t") and not plain.has_task(ev, "t.yaml")
    assert not Request(limit=5, shots=1).has_task(ev, "t")
    assert Request(threads=1).has_efficiency(ev) and not Request(threads=2).has_efficiency(ev)
    ngram = {"model": {"block_size": None}, "lm": {"n": {"weights": "fp32", "max_bytes": None, "context": None,
                                                        "stride": 1}}}
    assert Request(context=64).has_set(ngram, "n")  # an n-gram model has no window to cap


@pytest.mark.slow
def test_the_report_goes_only_into_a_report_directory(tmp_path, capsys):
    runs = [_fake_run(tmp_path, name, spec) for name, spec in FAKE.items()]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not slmkit's")
    for out in (mine, runs[1]):  # someone's files; a run directory
        with pytest.raises(SlmError, match="refusing to write a report"):
            compare(runs, out, say=lambda s: None)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (runs[1] / "report.md").exists()
    assert main(["compare", *map(str, runs), "--out", str(mine), "--quiet"]) == 2
    assert "refusing" in capsys.readouterr().err
    report = tmp_path / "report"
    compare(runs, report, say=lambda s: None)
    assert kind_of(report) == "report"
    assert read_meta(report)["lineage"]["recipe"]["runs"] == [str(r) for r in runs]
    (report / "extra.txt").write_text("a note next to the report")
    compare(runs[:2], report, say=lambda s: None)  # an earlier report is replaced in place
    assert len(json.loads((report / "compare.json").read_text())["rows"]) == 2
