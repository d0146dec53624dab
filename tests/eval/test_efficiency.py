"""`slmkit.eval.efficiency.measure`: a real measurement in a child process (keys, units, a plausible peak RSS), the
token counts behind every rate (on a virtual clock), an n-gram model timed by the same harness, `slm eval
--efficiency`'s table, and the errors users see."""

import json
import math

import pytest
import torch

from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.eval import efficiency
from slmkit.eval.efficiency import measure
from slmkit.infer import engine
from slmkit.infer.neural import NeuralLM
from slmkit.model import GPT
from slmkit.model.ngram import NgramLM
from slmkit.tokenizer import Tokenizer

TIMINGS = ("prefill_tok_s", "ttft_s", "decode_tok_s")


def _save_run(root, **fields):
    tok = Tokenizer.train("byte", [])
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{"vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "n_embd": 16, **fields}))
    checkpoint.save(checkpoint.step_dir(root, 1), model, tok, {"step": 1})
    return root


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """~26 MB of fp32 weights: enough to show in the child's RSS, small enough to time in a second."""
    return _save_run(tmp_path_factory.mktemp("eff") / "run", block_size=96, n_layer=2, n_head=4, n_embd=512)


@pytest.fixture(scope="module")
def measured_and_parent_rss(wide_run):
    """A real measurement, taken while this process holds 512 MB that the child must not count (well above the child's
    own peak, so an inherited high-water mark could not pass for it)."""
    hog = torch.ones(128 * 2**20)  # (128M,) fp32, written, so resident
    res = measure(wide_run, threads=1)
    parent_rss = efficiency._rss_mb()[0]
    del hog
    return res, parent_rss


@pytest.fixture(scope="module")
def measured(measured_and_parent_rss):
    return measured_and_parent_rss[0]


@pytest.mark.slow
def test_measure_reports_every_figure_with_its_settings(measured):
    for key in (*TIMINGS, "peak_rss_mb", "base_rss_mb"):
        assert isinstance(measured[key], float) and math.isfinite(measured[key]) and measured[key] > 0, key
    # block 96: new tokens capped at half the context, the prompt cut to what is left
    assert {k: measured[k] for k in ("threads", "weights", "prompt_tokens", "new_tokens", "repeats")} == {
        "threads": 1, "weights": "fp32", "prompt_tokens": 48, "new_tokens": 48, "repeats": 3}
    assert "LanguageModel.generate" in measured["method"]
    assert json.loads(json.dumps(measured)) == measured  # goes into eval.json as is


@pytest.mark.slow
def test_peak_rss_is_the_models_own(measured_and_parent_rss, wide_run):
    measured, parent_rss = measured_and_parent_rss
    weights_mb = (checkpoint.resolve(wide_run) / "model.safetensors").stat().st_size / 2**20
    assert weights_mb > 20
    # the child read the weights after its baseline, so its peak holds them; python + torch alone is far below a GB
    assert measured["peak_rss_mb"] - measured["base_rss_mb"] >= weights_mb
    assert 20 < measured["base_rss_mb"] < measured["peak_rss_mb"] < 2048
    # not inherited from the measuring process (a forked child's ru_maxrss starts at its parent's RSS)
    assert measured["peak_rss_mb"] < parent_rss - 200


class Clocked(GPT):
    """A transformer whose forward advances a virtual clock by one second per position, whatever the batch: a rate
    measured on this clock is the number of tokens the harness counted per position the model ran. The test keeps the
    engine on forward (the fused C step would bypass the clock)."""

    now = 0.0

    def forward(self, idx, *args, **kwargs):
        Clocked.now += idx.shape[1]
        return super().forward(idx, *args, **kwargs)


def test_rates_count_the_right_tokens(monkeypatch):
    torch.manual_seed(0)
    lm = NeuralLM(Clocked(ModelConfig(vocab_size=50, block_size=64, n_layer=1, n_head=2, n_embd=16,
                                      attention="blocksparse", attn_block=8)))
    monkeypatch.setattr(efficiency, "perf_counter", lambda: Clocked.now)
    monkeypatch.setattr(engine.FusedDecoder, "for_model", classmethod(lambda cls, model, cache: None))
    res = efficiency._bench(lm, list(range(20)), new_tokens=10, repeats=2)
    # prefill: 20 prompt tokens in one 20-position pass; first token: after the engine's own 20-position prefill;
    # decode: 9 tokens after the first in 9 one-position steps
    assert res == {"prefill_tok_s": 1.0, "ttft_s": 20.0, "decode_tok_s": 1.0}


def test_an_ngram_model_is_timed_by_the_same_harness(tiny_data):
    from slmkit.data import load_split

    train = load_split(tiny_data, "train")
    lm = NgramLM.fit(train.tokens, vocab_size=train.vocab_size, bos_id=train.bos_id, order=3)
    res = efficiency._bench(lm, train.tokens[:40].tolist(), new_tokens=8, repeats=1)
    assert set(res) == set(TIMINGS) and all(math.isfinite(v) and v > 0 for v in res.values())


@pytest.mark.slow
def test_measure_times_an_ngram_run_in_its_own_process(tmp_path, tiny_data):
    from slmkit.model.ngram import train_ngram

    run = train_ngram(tiny_data, tmp_path / "ngram", order=2)
    res = measure(run, threads=1, new_tokens=8, repeats=1)
    assert all(math.isfinite(res[k]) and res[k] > 0 for k in (*TIMINGS, "peak_rss_mb"))
    # no context limit: the whole prompt and every new token asked for
    assert (res["prompt_tokens"], res["new_tokens"]) == (256, 8)
    with pytest.raises(SlmError, match="no weights to quantize"):
        measure(run, weights="int8")


def test_slm_eval_prints_the_efficiency_table(tmp_path, monkeypatch, capsys):
    run = _save_run(tmp_path / "run", block_size=32)
    (tmp_path / "t.txt").write_text("a few words of held-out text, " * 4)
    fake = {"prefill_tok_s": 12345.6, "ttft_s": 0.0123, "decode_tok_s": 987.65, "peak_rss_mb": 312.4,
            "base_rss_mb": 290.0, "threads": 2, "weights": "fp32", "prompt_tokens": 16, "new_tokens": 16, "repeats": 3,
            "method": "..."}
    calls = []
    monkeypatch.setattr(efficiency, "measure",
                        lambda path, threads=None, weights="fp32": calls.append((path, threads)) or fake)
    assert main(["eval", str(run), "--lm", str(tmp_path / "t.txt"), "--efficiency", "--threads", "2", "--quiet"]) == 0
    assert calls == [(checkpoint.resolve(run), 2)]  # the checkpoint actually evaluated
    out = capsys.readouterr().out
    for text in ("efficiency (2 threads, fp32 weights, median of 3)", "prefill, 16-token prompt", "12,346 tok/s",
                 "12.3 ms", "decode, batch 1", "988 tok/s", "312 MB", "290 MB"):
        assert text in out, text
    assert json.loads((run / "eval.json").read_text())["efficiency"] == fake


def test_bad_arguments_are_user_errors(tmp_path, wide_run):
    with pytest.raises(SlmError, match="no such checkpoint"):
        measure(tmp_path / "nothing")
    with pytest.raises(SlmError, match="weights='fp8'"):
        measure(wide_run, weights="fp8")
    with pytest.raises(SlmError, match="new_tokens=1 must be >= 2"):
        measure(wide_run, new_tokens=1)


@pytest.mark.slow
def test_a_user_error_in_the_child_comes_back_as_one(tmp_path):
    run = _save_run(tmp_path / "run", block_size=32)
    weights = checkpoint.resolve(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(SlmError, match="truncated or corrupt"):
        measure(run, threads=1)
