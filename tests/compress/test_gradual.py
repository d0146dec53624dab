"""Very sparse models: the cubic gradual-pruning schedule, masks that only grow while healing trains, `slm prune
--gradual` end to end, sparse storage in its two layouts (and bf16 values), pruned checkpoints loading through
every loader, and one-line errors."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit import LLM, checkpoint
from slmkit.cli import main
from slmkit.compress import heal as heal_mod
from slmkit.compress import sparse
from slmkit.compress.heal import CubicSchedule, magnitude_keep
from slmkit.compress.prune import prunable, prune_run
from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.infer.neural import NeuralLM
from slmkit.model import GPT
from slmkit.train import train
from tests.conftest import noisy_weights

TINY = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, pos="rope",
                   norm="rmsnorm", mlp="swiglu")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "run"
    train(tiny_data, out, TINY, TrainConfig(max_steps=4, batch_size=4, threads=1, precision="fp32", eval_windows=8),
          progress=False)
    return out


# --- the schedule ---------------------------------------------------------------------------------------------------


def test_cubic_schedule_is_zhu_and_gupta_formula():
    s = CubicSchedule(0.9, initial=0.1, start=0.2, end=0.6)
    # s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ with t0 = 0.2, nΔt = 0.4
    for t in (0.2, 0.3, 0.45, 0.59):
        assert s.sparsity(t) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 0.2) / 0.4) ** 3, abs=1e-12)
    assert s.sparsity(0.0) == s.sparsity(0.2) == pytest.approx(0.1)  # before t0: the initial sparsity
    assert s.sparsity(0.6) == s.sparsity(1.0) == 0.9  # after t0 + nΔt: the final one
    values = [s.sparsity(i / 100) for i in range(101)]
    assert values == sorted(values)
    steps = [CubicSchedule(0.9).sparsity(i / 8) for i in range(7)]  # the rise slows down: fast first, slow last
    assert all(a - b > c - a for b, a, c in zip(steps, steps[1:], steps[2:], strict=False))


@pytest.mark.parametrize("kw", [dict(final=1.0), dict(final=-0.1), dict(final=0.5, initial=0.6),
                                dict(final=0.9, start=0.8, end=0.5), dict(final=0.9, every=0)])
def test_bad_schedules_are_one_line_errors(kw):
    with pytest.raises(SlmError) as e:
        CubicSchedule(**kw)
    assert "\n" not in str(e.value)


def test_magnitude_keep_drops_the_smallest_of_each_matrix_and_of_each_expert():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    keep = magnitude_keep(w, 0.9)
    assert int((~keep).sum()) == int(0.9 * w.numel())
    assert w.abs()[~keep].max() <= w.abs()[keep].min()
    stack = torch.randn(3, 16, 8, generator=g)  # an MoE stack: per expert
    assert ((~magnitude_keep(stack, 0.75)).flatten(1).sum(1) == 96).all()
    assert magnitude_keep(w, 0.0).all()


def test_gradual_healing_prunes_on_schedule_and_pruned_weights_stay_zero(tiny_data, monkeypatch):
    torch.manual_seed(0)
    model = noisy_weights(GPT(TINY))
    parent = noisy_weights(GPT(TINY))
    mats = [getattr(m, a) for m, a in prunable(model).values()]
    seen: list[list[torch.Tensor]] = []
    real = heal_mod.magnitude_keep

    def spy(w, s):
        if w is mats[0]:  # a new update round: the zeros every matrix has after the training steps since the last
            seen.append([(p == 0).clone() for p in mats])
        return real(w, s)

    monkeypatch.setattr(heal_mod, "magnitude_keep", spy)
    record = heal_mod.heal(model, parent, tiny_data, max_steps=12, batch_size=2, seq_len=16, keep_zeros=mats,
                           schedule=CubicSchedule(0.9, end=0.5, every=3))
    updates = record["gradual"]["steps"]
    assert [u[0] for u in updates] == [0, 3, 6, 9, 12] and updates[-1][1] == 0.9
    assert [u[1] for u in updates] == sorted(u[1] for u in updates) and updates[0][1] == 0.0
    seen.append([(p == 0) for p in mats])
    for before, after in itertools.pairwise(seen):
        for a, b in zip(before, after, strict=True):
            assert (b | ~a).all()  # every weight zero at one update is still zero at the next: training kept it
    for p in mats:
        assert float((p == 0).float().mean()) == pytest.approx(0.9, abs=2 / p.numel())


# --- the stage ------------------------------------------------------------------------------------------------------


def test_gradual_prune_run_writes_a_very_sparse_checkpoint_every_loader_reads(trained, tmp_path):
    out = prune_run(trained, tmp_path / "v", method="magnitude", sparsity=0.9, gradual=True, heal_steps=4)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "prune" and meta["lineage"]["recipe"]["gradual"] is True
    assert meta["heal"]["gradual"]["final"] == 0.9 and meta["heal"]["gradual"]["updates"] >= 1
    assert meta["pruning"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert meta["storage"]["format"] == sparse.FORMAT and meta["storage"]["sparse_tensors"] == 8
    ref = LLM.load(out).model
    for model in (checkpoint.load(out).model, checkpoint.read_model(out), NeuralLM.load(out).module):
        for key, (mod, attr) in prunable(model).items():
            w = getattr(mod, attr)
            assert float((w == 0).float().mean()) == pytest.approx(0.9, abs=1e-2), key
            assert torch.equal(w, dict(ref.named_parameters())[key]), key
    parent = (checkpoint.resolve(trained) / "model.safetensors").stat().st_size
    block = sum(getattr(m, a).numel() for m, a in prunable(ref).values()) * 4
    # 10 % of the block matrices' values + 1 bit each: at most ~0.14 of their bytes
    assert (out / "model.safetensors").stat().st_size < parent - 0.85 * block


def test_storage_picks_the_smaller_layout_and_bf16_values_round_trip(tmp_path):
    torch.manual_seed(0)
    model = noisy_weights(GPT(TINY))
    keys = set(prunable(model))
    with torch.no_grad():
        for i, key in enumerate(sorted(keys)):  # 90 % zeros in half of the matrices, 99 % in the others
            w = dict(model.named_parameters())[key]
            w.mul_(magnitude_keep(w, 0.9 if i % 2 else 0.99))
    st = sparse.storage(model, keys)
    assert st["bitmask_tensors"] == st["index_tensors"] == 4  # 1 bit per weight beats 16 bits per non-zero at 90 %
    sparse.write_model(tmp_path, model, keys)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert sum(k.endswith(".sparse_cols") for k in stored) == 4 and stored[next(
        k for k in stored if k.endswith(".sparse_cols"))].dtype == torch.uint16
    back = checkpoint.read_model(tmp_path)
    for key, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key
    sparse.write_model(tmp_path, model, keys, values="bf16")
    assert (tmp_path / "model.safetensors").stat().st_size < sum(
        v.numel() * v.element_size() for v in stored.values())
    back = checkpoint.read_model(tmp_path)
    for key in keys:
        assert torch.equal(back.state_dict()[key], model.state_dict()[key].bfloat16().float()), key
    with pytest.raises(SlmError, match="values='fp16'"):
        sparse.storage(model, keys, "fp16")


def test_tampered_index_layout_is_refused(tmp_path):
    torch.manual_seed(0)
    model = noisy_weights(GPT(TINY))
    w = model.blocks[0].mlp.fc.weight
    with torch.no_grad():
        w.mul_(magnitude_keep(w, 0.99))
    sparse.write_model(tmp_path, model, {"blocks.0.mlp.fc.weight"})
    file = tmp_path / "model.safetensors"
    good = load_file(str(file))
    key = "blocks.0.mlp.fc.weight"
    bad_cols = good[key + ".sparse_cols"].clone()
    bad_cols[0] = 64  # the matrix has 64 columns
    for sd in ({**good, key + ".sparse_rows": good[key + ".sparse_rows"][:-1]},
               {**good, key + ".sparse_cols": bad_cols},
               {k: v for k, v in good.items() if k != key + ".sparse_values"}):
        save_file(sd, str(file))
        with pytest.raises(SlmError) as e:
            checkpoint.read_model(tmp_path)
        assert "\n" not in str(e.value)


def test_gradual_bad_requests_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    for kw, needle in [(dict(method="magnitude", sparsity=0.9, gradual=True), "needs a budget: add --heal"),
                       (dict(method="wanda", sparsity=0.9, gradual=True, heal_steps=2), "use --method magnitude"),
                       (dict(method="magnitude", sparsity=1.0, gradual=True, heal_steps=2), "must be in \\[0, 1\\)"),
                       (dict(method="magnitude", sparsity=0.9, values="fp8"), "values='fp8'")]:
        with pytest.raises(SlmError, match=needle) as e:
            prune_run(trained, tmp_path / "x", **kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()
    assert main(["prune", str(trained), "--method", "magnitude", "--sparsity", "0.9", "--gradual", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--gradual prunes during healing" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
