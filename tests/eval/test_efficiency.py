"""`slmkit.eval.efficiency.measure`: a real measurement in a child process (keys, units, a plausible peak RSS), the
token counts behind every rate (on a virtual clock), the batch cache tiling, `slm eval --efficiency`'s table, and the
errors users see."""

import json
import math

import pytest
import torch

from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.eval import efficiency, evaluate
from slmkit.eval.efficiency import measure
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

TIMINGS = ("prefill_tok_s", "ttft_s", "decode_tok_s", "decode_batch_tok_s")


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
    """A real measurement, taken while this process holds 256 MB that the child must not count."""
    hog = torch.ones(64 * 2**20)  # (64M,) fp32, written, so resident
    res = measure(wide_run, threads=1)
    parent_rss = efficiency._rss_mb()[0]
    del hog
    return res, parent_rss


@pytest.fixture(scope="module")
def measured(measured_and_parent_rss):
    return measured_and_parent_rss[0]


def test_measure_reports_every_figure_with_its_settings(measured):
    for key in (*TIMINGS, "peak_rss_mb", "base_rss_mb"):
        assert isinstance(measured[key], float) and math.isfinite(measured[key]) and measured[key] > 0, key
    # block 96: new tokens capped at half the context, the prompt cut to what is left
    assert {k: measured[k] for k in ("threads", "weights", "prompt_tokens", "new_tokens", "batch", "batch_new_tokens",
                                     "repeats")} == {"threads": 1, "weights": "fp32", "prompt_tokens": 48,
                                                     "new_tokens": 48, "batch": 8, "batch_new_tokens": 12, "repeats": 3}
    assert "engine.generate" in measured["method"]
    assert json.loads(json.dumps(measured)) == measured  # goes into eval.json as is


def test_peak_rss_is_the_models_own(measured_and_parent_rss, wide_run):
    measured, parent_rss = measured_and_parent_rss
    weights_mb = (checkpoint.resolve(wide_run) / "model.safetensors").stat().st_size / 2**20
    assert weights_mb > 20
    # the child read the weights after its baseline, so its peak holds them; python + torch alone is far below a GB
    assert measured["peak_rss_mb"] - measured["base_rss_mb"] >= weights_mb
    assert 20 < measured["base_rss_mb"] < measured["peak_rss_mb"] < 2048
    # not inherited from the measuring process (a forked child's ru_maxrss starts at its parent's RSS)
    assert measured["peak_rss_mb"] < parent_rss - 200


class Clocked(torch.nn.Module):
    """A model whose forward advances a virtual clock by one second per position, whatever the batch: a rate measured
    on this clock is the number of tokens the harness counted per position it ran. Not a GPT, so the engine decodes
    through forward (the fused C step only takes a GPT)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.now = model, model.config, 0.0

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, idx, **kwargs):
        self.now += idx.shape[1]
        return self.inner(idx, **kwargs)


def test_rates_count_the_right_tokens(monkeypatch):
    torch.manual_seed(0)
    model = Clocked(GPT(ModelConfig(vocab_size=50, block_size=64, n_layer=1, n_head=2, n_embd=16)))
    monkeypatch.setattr(efficiency, "perf_counter", lambda: model.now)
    res = efficiency._bench(model, list(range(20)), new_tokens=10, batch=3, batch_new_tokens=4, repeats=2)
    # prefill: 20 tokens in one 20-position forward; first token: after that prefill; decode: 9 tokens after the first
    # in 9 one-position steps; batch: 3 rows × 4 steps in 4 steps
    assert res == {"prefill_tok_s": 1.0, "ttft_s": 20.0, "decode_tok_s": 1.0, "decode_batch_tok_s": 3.0}


@pytest.mark.parametrize("attention", ["full", "local", "blocksparse", "linear", "lsh"])
def test_tiled_cache_continues_like_the_batch_one_cache(attention):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, pos="rope",
                            attention=attention, attn_window=8, attn_block=8)).eval()
    prompt, nxt = torch.randint(0, 50, (1, 12)), torch.tensor([[7]])
    with torch.inference_mode():
        one = model.new_cache(1, 16)
        model(prompt, cache=one)
        big = model.new_cache(3, 16)
        efficiency._tile_cache(one, big)
        got = model(nxt.expand(3, 1), cache=big, last_only=True)[0]  # (3, 1, V)
        want = model(nxt, cache=one, last_only=True)[0]  # (1, 1, V)
    assert big.pos == one.pos == 13
    torch.testing.assert_close(got, want.expand(3, -1, -1))


def test_slm_eval_prints_the_efficiency_table(tmp_path, monkeypatch, capsys):
    run = _save_run(tmp_path / "run", block_size=32)
    (tmp_path / "t.txt").write_text("a few words of held-out text, " * 4)
    fake = {"prefill_tok_s": 12345.6, "ttft_s": 0.0123, "decode_tok_s": 987.65, "decode_batch_tok_s": 4321.0,
            "peak_rss_mb": 312.4, "base_rss_mb": 290.0, "threads": 2, "weights": "fp32", "prompt_tokens": 16,
            "new_tokens": 16, "batch": 8, "batch_new_tokens": 4, "repeats": 3, "method": "..."}
    calls = []
    monkeypatch.setattr(efficiency, "measure",
                        lambda path, threads=None, weights="fp32": calls.append((path, threads)) or fake)
    assert main(["eval", str(run), "--lm", str(tmp_path / "t.txt"), "--efficiency", "--threads", "2", "--quiet"]) == 0
    assert calls == [(checkpoint.resolve(run), 2)]  # the checkpoint actually evaluated
    out = capsys.readouterr().out
    for text in ("efficiency (2 threads, fp32 weights, median of 3)", "prefill, 16-token prompt", "12,346 tok/s",
                 "12.3 ms", "decode, batch 1", "988 tok/s", "decode, batch 8", "4,321 tok/s", "312 MB", "290 MB"):
        assert text in out, text
    assert json.loads((run / "eval.json").read_text())["efficiency"] == fake


def test_ngram_run_is_a_clear_error_before_any_scoring(tmp_path, tiny_data):
    from slmkit.model.ngram import train_ngram

    run = train_ngram(tiny_data, tmp_path / "ngram", order=2)
    with pytest.raises(SlmError, match="n-gram run"):
        measure(run)
    with pytest.raises(SlmError, match="n-gram run"):  # scoring this missing set first would fail differently
        evaluate(run, lm=[str(tmp_path / "missing.txt")], efficiency=True, threads=1)


def test_bad_arguments_are_user_errors(tmp_path, wide_run):
    with pytest.raises(SlmError, match="no such checkpoint"):
        measure(tmp_path / "nothing")
    with pytest.raises(SlmError, match="weights='fp8'"):
        measure(wide_run, weights="fp8")
    with pytest.raises(SlmError, match="new_tokens=1 must be >= 2"):
        measure(wide_run, new_tokens=1)


def test_a_user_error_in_the_child_comes_back_as_one(tmp_path):
    run = _save_run(tmp_path / "run", block_size=32)
    weights = checkpoint.resolve(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(SlmError, match="truncated or corrupt"):
        measure(run, threads=1)
