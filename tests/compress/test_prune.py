"""`slm prune`: masks and shapes of each method, smaller dense models that load and decode, sparse storage that
round-trips and is smaller, healing that keeps the mask, and one-line errors that write nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit import LLM, checkpoint
from slmkit.cli import main
from slmkit.compress import sparse
from slmkit.compress.prune import Method, _head_shape, _prune, prunable, prune_model, prune_run
from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.train import train
from tests.conftest import noisy_weights

# Llama style with grouped KV heads; mlp_hidden 192 (a multiple of 32, so channel counts round to 32s)
TINY = ModelConfig(vocab_size=40, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, block_size=32, pos="rope",
                   norm="rmsnorm", mlp="swiglu")
GELU = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_embd=64, block_size=32, bias=True)  # GPT-2 style, biases


def tiny(cfg: ModelConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return noisy_weights(GPT(cfg), seed=seed).eval()


def calib(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (n, 32), generator=torch.Generator().manual_seed(seed))


X = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(X % model.config.vocab_size)[0]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "run"
    train(tiny_data, out, TINY, TrainConfig(max_steps=6, batch_size=4, threads=1, precision="fp32", eval_windows=8),
          progress=False)
    return out


# --- unstructured masks ------------------------------------------------------------------------------------------


def test_magnitude_zeroes_the_smallest_share_of_each_matrix_and_nothing_else():
    model, ref = tiny(), tiny()
    prune_model(model, "magnitude", 0.5)
    for key, (mod, attr) in prunable(model).items():
        w, w0 = getattr(mod, attr).detach(), dict(ref.named_parameters())[key].detach()
        pruned = w == 0
        assert int(pruned.sum()) == w.numel() // 2, key  # per matrix, exactly
        assert w0.abs()[pruned].max() <= w0.abs()[~pruned].min(), key  # the smallest |W| went
        torch.testing.assert_close(w[~pruned], w0[~pruned], atol=0, rtol=0)
    assert set(prunable(model)) == {f"blocks.{i}.{n}.weight" for i in range(3)
                                    for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    for name in ("tok_emb.weight", "blocks.0.norm1.weight", "norm_f.weight"):  # embeddings/head, norms untouched
        assert torch.equal(dict(model.named_parameters())[name], dict(ref.named_parameters())[name])


def test_wanda_keeps_the_same_count_in_every_row_and_follows_the_papers_score():
    model, ref = tiny(), tiny()
    ids = calib()
    prune_model(model, "wanda", 0.5, calib=ids)
    for key, (mod, attr) in prunable(model).items():
        w = getattr(mod, attr)
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), key
    # the first block's qkv by the formula: |W_ij| · ‖X_j‖ over the calibration tokens, the lowest half of each row
    xs = []
    hook = ref.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        ref(ids)
    hook.remove()
    metric = ref.blocks[0].attn.qkv.weight.detach().abs() * torch.cat(xs).norm(dim=0)
    expect = torch.ones_like(metric, dtype=torch.bool).scatter_(1, metric.argsort(dim=1)[:, :32], False)
    assert torch.equal(model.blocks[0].attn.qkv.weight != 0, expect)


def test_wanda_keeps_small_weights_on_loud_inputs_where_magnitude_drops_them():
    models = {}
    for method in ("magnitude", "wanda"):
        m = tiny()
        with torch.no_grad():
            m.blocks[0].norm1.weight[:8] = 1000.0  # input channels 0-7 of the first qkv are 1000x louder
            m.blocks[0].attn.qkv.weight[:, :8] *= 0.3  # ... and their weights ~3x smaller
        models[method] = prune_model(m, method, 0.5, calib=calib() if method == "wanda" else None)
    kept = {k: float((m.blocks[0].attn.qkv.weight[:, :8] != 0).float().mean()) for k, m in models.items()}
    assert kept["wanda"] > 0.98 and kept["magnitude"] < 0.1


@pytest.mark.parametrize(("n", "m", "score"), [(2, 4, "wanda"), (1, 4, "magnitude"), (4, 8, "wanda")])
def test_n_m_keeps_n_of_every_m_along_the_input(n, m, score):
    model = tiny()
    prune_model(model, f"nm:{n}:{m}", calib=calib() if score == "wanda" else None, score=score)
    for key, (mod, attr) in prunable(model).items():
        w = getattr(mod, attr)
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), key


def test_mixture_of_experts_stacks_are_pruned_per_expert_and_the_router_is_not():
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_embd=64, block_size=32, pos="rope", moe_experts=4,
                      moe_top_k=2, mlp_hidden=64)
    model, ref = tiny(cfg), tiny(cfg)
    _, record = _prune(model, Method.parse("wanda"), 0.5, calib(), "wanda")
    assert record["layers"]["blocks.0.mlp.fc"] == 0.5 and record["layers"]["blocks.1.mlp.proj"] == 0.5
    fc = model.blocks[0].mlp.fc.detach()  # (E, in, out): each expert's output row keeps half its inputs
    assert ((fc == 0).sum(1) == 32).all()
    assert torch.equal(model.blocks[0].mlp.router.weight, ref.blocks[0].mlp.router.weight)
    assert torch.isfinite(logits(model)).all()


# --- structured -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, GELU], ids=["swiglu-gqa", "gelu-bias"])
@pytest.mark.parametrize("method", ["channels", "layers", "heads"])
def test_pruning_nothing_gives_the_same_model(cfg, method):
    model = tiny(cfg)
    pruned = prune_model(tiny(cfg), method, 0.0, calib=calib())
    assert pruned.config == model.config
    torch.testing.assert_close(logits(pruned), logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [TINY, GELU], ids=["swiglu-gqa", "gelu-bias"])
def test_channel_pruning_equals_silencing_those_channels(cfg):
    """The smaller model computes what the parent computes with the removed channels' fc rows (and biases) zeroed
    — GELU(0) = SiLU(0)·up = 0, so they add nothing: shapes, row/column pairing and biases all line up."""
    model = tiny(cfg)
    pruned = prune_model(tiny(cfg), "channels", 0.5, calib=calib())
    H = cfg.mlp_hidden
    assert pruned.config.mlp_hidden == H // 2 and pruned.config.replace(mlp_hidden=H) == cfg
    assert pruned.config.n_kv_head == cfg.n_kv_head
    with torch.no_grad():
        for block, small in zip(model.blocks, pruned.blocks, strict=True):
            down = block.mlp.proj.weight
            kept = [int((col == down.T).all(1).nonzero()) for col in small.mlp.proj.weight.T]  # match columns
            gone = sorted(set(range(H)) - set(kept))
            rows = gone + [H + j for j in gone] if cfg.mlp == "swiglu" else gone
            block.mlp.fc.weight[rows] = 0
            if block.mlp.fc.bias is not None:
                block.mlp.fc.bias[rows] = 0
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=1e-5)
    C, L = cfg.n_embd, cfg.n_layer
    assert model.num_params() - pruned.num_params() == L * (H // 2) * (3 * C if cfg.mlp == "swiglu" else 2 * C + 1)


# 6 query heads in 3 groups of 2 (head size 8): removing 2/3 of them drops two whole groups
GQA3 = TINY.replace(n_embd=48, n_head=6, n_kv_head=3)


@pytest.mark.parametrize(("cfg", "s", "shape"), [(TINY, 0.5, (2, 2)), (GELU, 0.5, (2, 2)), (GELU, 0.25, (3, 3)),
                                                 (GQA3, 0.67, (2, 1))], ids=["in-groups", "mha", "mha-3", "groups"])
def test_head_pruning_equals_silencing_those_heads(cfg, s, shape):
    """The smaller model computes what the parent computes with the removed heads' columns of the output projection
    zeroed (a head adds W_o[:, h] y_h to the stream; a dropped KV group's key/value head then feeds nothing)."""
    model = tiny(cfg)
    pruned, record = _prune(tiny(cfg), Method.parse("heads"), s, calib(), "wanda")
    c, hd = pruned.config, cfg.head_dim
    assert (c.n_head, c.n_kv_head) == shape and c.head_size == hd and c.attn_dim == shape[0] * hd
    assert record["n_head"] == [cfg.n_head, shape[0]] and record["n_kv_head"] == [cfg.n_kv_head, shape[1]]
    g_old, g_new = cfg.n_head // cfg.n_kv_head, shape[0] // shape[1]
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            kept = record["kept_heads"][f"blocks.{i}.attn"]
            assert len(kept) == shape[0] and len({h // g_old for h in kept}) == shape[1]
            assert all(kept[j] // g_old == kept[j - j % g_new] // g_old for j in range(len(kept)))  # groups stay whole
            for h in sorted(set(range(cfg.n_head)) - set(kept)):
                block.attn.proj.weight[:, h * hd : (h + 1) * hd] = 0
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=1e-5)
    C, L, nh, nkv = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head
    qkv_rows = (nh - shape[0] + 2 * (nkv - shape[1])) * hd
    removed = L * (qkv_rows * (C + cfg.bias) + C * (nh - shape[0]) * hd)
    assert model.num_params() - pruned.num_params() == removed


def test_head_pruning_keeps_the_heads_that_add_most():
    model = tiny(GELU)
    with torch.no_grad():  # heads 1 and 3 write nothing to the stream in every layer
        for block in model.blocks:
            block.attn.proj.weight[:, 16:32] = 0
            block.attn.proj.weight[:, 48:64] = 0
    _, record = _prune(model, Method.parse("heads"), 0.5, calib(), "wanda")
    assert all(kept == [0, 2] for kept in record["kept_heads"].values())


def test_head_counts_round_to_whole_groups_or_equal_groups():
    assert _head_shape(4, 1, 0.25) == (3, 1)  # one KV head: any count
    assert _head_shape(6, 2, 0.3) == (4, 2)  # 2 of 3 in each group (4.2 wanted)
    assert _head_shape(6, 2, 0.5) == (3, 1)  # one whole group
    assert _head_shape(8, 4, 0.25) == (6, 3)  # whole groups (6 of 8), not 4 per group
    assert _head_shape(4, 2, 0.25) == (4, 2)  # 3 wanted: 2 and 4 are as near; the one that removes less
    assert _head_shape(9, 3, 0.9) == (3, 3)  # 3 heads either way: one query head per group keeps every KV head


def test_layer_pruning_drops_the_block_that_changes_the_stream_least():
    model = tiny()
    with torch.no_grad():  # block 1 adds nothing: its output is its input (block influence 0)
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].mlp.proj.weight.zero_()
    pruned, record = _prune(model, Method.parse("layers"), 0.3, calib(), "wanda")
    assert record["kept_layers"] == [0, 2] and pruned.config.n_layer == 2 and record["block_influence"][1] < 1e-6
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-5, rtol=1e-5)


# --- the stage: checkpoints, storage, loading, healing ---------------------------------------------------------------


def test_a_wanda_checkpoint_is_sparse_on_disk_and_loads_the_same_model(trained, tmp_path):
    from slmkit.compress.stage import calibration_tokens

    out = prune_run(trained, tmp_path / "w", method="wanda", sparsity=0.5, calib_samples=8)
    ck = checkpoint.load(trained)
    ids, _ = calibration_tokens(json.loads((trained / "meta.json").read_text()), ck.tokenizer, None, samples=8,
                                seq_len=32)  # the windows prune_run drew: the run's own data, seed 0
    expect = prune_model(ck.model, "wanda", 0.5, calib=ids)
    llm = LLM.load(out)
    torch.testing.assert_close(logits(llm.model), logits(expect), atol=0, rtol=0)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "prune" and meta["lineage"]["parent"]["path"] == str(checkpoint.resolve(trained).resolve())
    assert meta["lineage"]["recipe"]["method"] == "wanda" and meta["lineage"]["recipe"]["calibration"]["samples"] == 8
    assert meta["pruning"]["sparsity"] == 0.5 and set(meta["pruning"]["layers"].values()) == {0.5}
    assert meta["storage"]["sparse_tensors"] == 12 and meta["storage"]["format"] == sparse.FORMAT
    stored = load_file(str(out / "model.safetensors"))
    assert "blocks.0.attn.qkv.weight" not in stored and stored["blocks.0.attn.qkv.weight.sparse_mask"].dtype == \
        torch.uint8
    size, parent = ((d / "model.safetensors").stat().st_size for d in (out, checkpoint.resolve(trained)))
    block = sum(getattr(m, a).numel() for m, a in prunable(ck.model).values()) * 4
    assert size < parent - block * 0.45  # 0.5 density + 1 bit each: ~0.52x of the block matrices' bytes
    assert meta["nonzero"] == pytest.approx(meta["counts"]["total"] - block / 8, abs=64)
    assert meta["quality"]["kl_to_parent"] > 0 and meta["quality"]["parent_val_bpb"] > 0
    assert llm.lm.params().total == ck.model.num_params()
    assert len(llm.generate("the", max_new_tokens=5, temperature=0)) > 0


def test_sparse_storage_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 5), (2, 9, 11), (64, 64)]:
        t = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) > 0.6)
        mask, values = sparse.encode(t)
        assert mask.numel() == (t.numel() + 7) // 8 and values.numel() == int((t != 0).sum())
        assert torch.equal(sparse.decode(mask, values, t.shape), t)
    with pytest.raises(SlmError, match="marks"):
        sparse.decode(mask, values[:-1], t.shape)
    with pytest.raises(SlmError, match="does not describe"):
        sparse.decode(mask[:-1], values, t.shape)


def test_a_tampered_sparse_checkpoint_is_refused(trained, tmp_path):
    out = prune_run(trained, tmp_path / "m", method="magnitude", sparsity=0.6)
    file = out / "model.safetensors"
    good = load_file(str(file))
    key = "blocks.1.mlp.fc.weight"
    for sd in ({**good, key + ".sparse_values": good[key + ".sparse_values"][:-3]},
               {k: v for k, v in good.items() if k != key + ".sparse_values"},
               {**good, "blocks.9.mlp.fc.weight.sparse_mask": good[key + ".sparse_mask"].clone()}):
        save_file(sd, str(file))
        with pytest.raises(SlmError) as e:
            LLM.load(out)
        assert "\n" not in str(e.value)


def test_structured_runs_are_smaller_dense_checkpoints_every_stage_reads(trained, tmp_path):
    parent = checkpoint.load(trained).model
    for method, field, value in (("channels", "mlp_hidden", 96), ("layers", "n_layer", 2), ("heads", "n_head", 2)):
        out = prune_run(trained, tmp_path / method, method=method, sparsity=0.34 if method == "layers" else 0.5,
                        calib_samples=4)
        model = checkpoint.load(out).model  # the ordinary loader: nothing sparse in it
        assert getattr(model.config, field) == value
        meta = json.loads((out / "meta.json").read_text())
        assert meta["counts"]["total"] == model.num_params() < parent.num_params() == meta["parent_counts"]["total"]
        assert meta["storage"]["format"] == "dense"
        llm = LLM.load(out)
        assert llm.lm.params().total == model.num_params()
        assert len(llm.generate("the", max_new_tokens=6, temperature=0)) > 0
    from slmkit.compress.stage import quantize_run

    quantize_run(tmp_path / "channels", tmp_path / "q", weights="int4")  # 96 channels: still int4 group 32
    quantize_run(tmp_path / "heads", tmp_path / "qh", weights="int8")  # a narrower attention quantizes and decodes
    assert len(LLM.load(tmp_path / "qh").generate("the", max_new_tokens=4, temperature=0)) > 0


@pytest.mark.slow
def test_healing_trains_and_keeps_the_mask(trained, tmp_path):
    plain = prune_run(trained, tmp_path / "plain", method="wanda", sparsity=0.5, calib_samples=4)
    healed = prune_run(trained, tmp_path / "healed", method="wanda", sparsity=0.5, calib_samples=4, heal_steps=3,
                       heal_lr=1e-2)
    a, b = (dict(LLM.load(d).model.named_parameters()) for d in (plain, healed))
    for key in prunable(LLM.load(plain).model):
        assert torch.equal(a[key] == 0, b[key] == 0), key  # the same zeros ...
        assert not torch.equal(a[key], b[key]), key  # ... and trained non-zeros
    meta = json.loads((healed / "meta.json").read_text())
    assert meta["heal"]["steps"] == 3 and meta["heal"]["before"]["kl_to_parent"] > 0
    assert meta["storage"]["sparse_tensors"] == 12
    ch = prune_run(trained, tmp_path / "ch", method="channels", sparsity=0.5, calib_samples=4, heal_steps=2)
    assert LLM.load(ch).config.mlp_hidden == 96


def test_bad_requests_are_one_line_and_write_nothing(trained, tmp_path):
    cases = [
        (dict(method="wanda", sparsity=1.0), "must be in \\[0, 1\\)"),
        (dict(method="magnitude", sparsity=-0.1), "must be in \\[0, 1\\)"),
        (dict(method="wanda"), "needs --sparsity"),
        (dict(method="nm:2:4", sparsity=0.5), "drop --sparsity"),
        (dict(method="nm:4:2"), "0 < N < M"),
        (dict(method="nm:2:5"), "M=5 does not divide the input width 64"),
        (dict(method="sparsest", sparsity=0.5), "not one of magnitude, wanda"),
        (dict(method="heads", sparsity=0.9), "would remove all 4 attention heads"),
        (dict(method="magnitude", sparsity=0.5, calib="shakespeare:val"), "--calib is for calibrated methods"),
        (dict(method="channels", sparsity=0.999), "would remove all 192 FFN channels"),
        (dict(method="layers", sparsity=0.9), "would remove all 3 layers"),
        (dict(method="wanda", sparsity=0.5, heal_data_dir=tmp_path), "give --heal DURATION too"),
        (dict(method="wanda", sparsity=0.5, heal_steps=1, heal_data_dir=tmp_path), "not a prepared data"),
    ]
    for kw, needle in cases:
        with pytest.raises(SlmError, match=needle) as e:
            prune_run(trained, tmp_path / "x", calib_samples=2, **kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SlmError, match="cycles 1 shared blocks"):
        prune_model(tiny(TINY.replace(share_blocks=1)), "layers", 0.5, calib=calib())
    with pytest.raises(SlmError, match="Mixture-of-Experts"):
        prune_model(tiny(TINY.replace(moe_experts=2, moe_top_k=1)), "channels", 0.5, calib=calib())
    with pytest.raises(SlmError, match="LSH"):
        prune_model(tiny(TINY.replace(attention="lsh", n_kv_head=4, attn_window=8)), "heads", 0.5, calib=calib())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SlmError, match="pass --overwrite"):
        prune_run(trained, tmp_path / "mine", method="magnitude", sparsity=0.5)
    with pytest.raises(SlmError, match="not written by slmkit"):
        prune_run(trained, tmp_path / "mine", method="magnitude", sparsity=0.5, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_cli_prune_then_generate_and_eval(trained, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prune", str(trained), "--method", "nm:2:4", "--calib-samples", "4", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "pruned" in text and "50.0 % of the block weights zeroed" in text and "KL to the parent" in text
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["prune", str(trained), "--method", "channels", "--sparsity", "0.5", "--calib-samples", "4",
                 "--heal", "1s", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "FFN channels 192 → 96" in text and "healed" in text
    assert main(["prune", str(trained), "--method", "heads", "--sparsity", "0.5", "--calib-samples", "4",
                 "--out", str(tmp_path / "h"), "--quiet"]) == 0
    assert "attention heads 4 → 2" in capsys.readouterr().out
    assert main(["prune", str(trained), "--method", "wanda", "--sparsity", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "must be in [0, 1)" in capsys.readouterr().err
