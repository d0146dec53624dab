"""`slm factorize`: truncated SVD into slmkit's low-rank layers — exact at full rank, the best rank-r approximation
below it, an ordinary `lowrank` checkpoint that every stage reads, and one-line errors."""

import json

import pytest
import torch
from torch import nn

from slmkit import LLM, checkpoint
from slmkit.cli import main
from slmkit.compress.factorize import (
    energy_rank,
    factorizable,
    factorize_linear,
    factorize_model,
    factorize_run,
    spectra,
)
from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.model.ffn import LowRankLinear
from slmkit.train import train
from tests.conftest import noisy_weights

TINY = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, pos="rope",
                   norm="rmsnorm", mlp="swiglu")


def tiny(cfg: ModelConfig = TINY) -> GPT:
    torch.manual_seed(0)
    return noisy_weights(GPT(cfg)).eval()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("f") / "run"
    train(tiny_data, out, TINY, TrainConfig(max_steps=6, batch_size=4, threads=1, precision="fp32", eval_windows=8),
          progress=False)
    return out


@pytest.mark.parametrize(("out_f", "in_f", "bias"), [(48, 32, True), (32, 48, False), (40, 40, True)])
def test_full_rank_reproduces_the_layer(out_f, in_f, bias):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    low = factorize_linear(lin, min(out_f, in_f))
    x = torch.randn(5, in_f)
    torch.testing.assert_close(low(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.b.weight @ low.a.weight, lin.weight, atol=1e-6, rtol=1e-5)
    with pytest.raises(SlmError, match=f"rank {min(out_f, in_f) + 1} is outside 1..{min(out_f, in_f)}"):
        factorize_linear(lin, min(out_f, in_f) + 1)


def test_a_lower_rank_is_the_truncated_svd_with_balanced_factors():
    lin = nn.Linear(64, 48)
    low = factorize_linear(lin, 10)
    U, S, Vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    best = (U[:, :10] * S[:10]) @ Vh[:10]  # Eckart–Young: the closest rank-10 matrix
    torch.testing.assert_close((low.b.weight @ low.a.weight).double(), best, atol=1e-5, rtol=1e-4)
    # Σ split evenly: both factors carry the same singular values
    torch.testing.assert_close(torch.linalg.svdvals(low.a.weight), torch.linalg.svdvals(low.b.weight), atol=1e-5,
                               rtol=1e-4)


def test_the_factorised_model_is_an_ordinary_lowrank_model():
    model = tiny()
    small = factorize_model(model, rank=16)
    assert small.config == TINY.replace(lowrank=16)
    assert sorted(n for n, m in small.named_modules() if isinstance(m, LowRankLinear)) == sorted(factorizable(model))
    # each layer: r·(in + out) instead of in·out; embeddings and norms as they were
    saved = sum(lin.weight.numel() - 16 * (lin.in_features + lin.out_features) for lin in factorizable(model).values())
    assert model.num_params() - small.num_params() == saved
    fresh = GPT(small.config)  # the config alone builds the same shapes: it loads like any checkpoint
    fresh.load_state_dict(small.state_dict())
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], small(x)[0], atol=0, rtol=0)
        # the largest rank below the layers' (63 of 64) is close to the parent
        near = factorize_model(model, rank=63)
        assert (near(x)[0] - model(x)[0]).abs().max() < (small(x)[0] - model(x)[0]).abs().max()


def test_energy_picks_the_smallest_rank_every_layer_accepts():
    model = tiny()
    s2 = spectra(model)
    r = energy_rank(s2, 0.6)
    for v in s2.values():
        assert v[:r].sum() / v.sum() >= 0.6
    assert any(v[: r - 1].sum() / v.sum() < 0.6 for v in s2.values())  # one rank less fails some layer
    assert factorize_model(model, energy=0.6).config.lowrank == r


def test_bad_requests_are_one_line():
    model = tiny()
    for kw, needle in ((dict(rank=64), "--rank 64 is not below the rank of blocks.0.attn.qkv \\(128×64: 64\\)"),
                       (dict(rank=0), "must be >= 1"),
                       (dict(energy=1.0), "must be in \\(0, 1\\)"),
                       (dict(energy=0.999999), "needs rank 64, which is not below"),
                       (dict(), "one of --rank R or --energy E"),
                       (dict(rank=8, energy=0.5), "one of --rank R or --energy E")):
        with pytest.raises(SlmError, match=needle) as e:
            factorize_model(model, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(SlmError, match="already factorised"):
        factorize_model(factorize_model(model, rank=8), rank=4)
    with pytest.raises(SlmError, match="Mixture-of-Experts"):
        factorize_model(tiny(TINY.replace(moe_experts=2, moe_top_k=1)), rank=8)


@pytest.mark.slow
def test_factorize_run_writes_a_checkpoint_every_stage_reads(trained, tmp_path):
    out = factorize_run(trained, tmp_path / "f", rank=8, heal_steps=2)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "factorize" and meta["lineage"]["recipe"]["rank"] == 8
    assert meta["lineage"]["parent"]["path"] == str(checkpoint.resolve(trained).resolve())
    assert meta["factorization"]["rank"] == 8 and len(meta["factorization"]["energy_kept"]) == 8
    model = checkpoint.load(out).model
    assert model.config.lowrank == 8 and meta["counts"]["total"] == model.num_params()
    assert meta["counts"]["total"] < meta["parent_counts"]["total"]
    assert meta["heal"]["steps"] == 2 and meta["quality"]["kl_to_parent"] > 0
    assert len(LLM.load(out).generate("the", max_new_tokens=5, temperature=0)) > 0
    with pytest.raises(SlmError, match="already factorised"):
        factorize_run(out, tmp_path / "again", rank=4)
    assert not (tmp_path / "again").exists()


@pytest.mark.slow
def test_cli_factorize(trained, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["factorize", str(trained), "--energy", "0.8", "--heal", "1s", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "factorised" in text and "healed" in text and "KL to the parent" in text
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["factorize", str(trained), "--rank", "64", "--out", str(tmp_path / "bad")]) == 2
    assert "is not below the rank of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
