"""`slm quantize`: packed checkpoints that load as they are, with lineage, and refuse what they cannot be."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit import LLM, checkpoint
from slmkit.cli import main
from slmkit.compress import quantize
from slmkit.compress.stage import load_quantized, quantize_run, storage
from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.infer import quantized as qmod
from slmkit.infer.quantized import QuantLinear
from slmkit.train import train

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, pos="rope", norm="rmsnorm", mlp="swiglu")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "run"
    train(tiny_data, out, TINY, TrainConfig(max_steps=6, batch_size=4, threads=1, precision="fp32",
                                            eval_windows=8), progress=False)
    return out


@pytest.mark.parametrize(("weights", "group"), [("int8", 32), ("int4", 32), ("int4", 64)])
def test_a_quantized_checkpoint_loads_packed_and_computes_what_in_memory_quantization_does(trained, tmp_path,
                                                                                           weights, group):
    out = quantize_run(trained, tmp_path / "q", weights=weights, group=group)
    ref = quantize(checkpoint.load(trained).model, weights, group=group)
    llm = LLM.load(out)
    x = torch.randint(0, TINY.vocab_size, (2, 16)) % llm.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x)[0], ref(x)[0], atol=0, rtol=0)
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 4 + 1  # qkv, proj, fc, proj per block + the head
    assert {m.weight.dtype for m in layers} == {torch.int8 if weights == "int8" else torch.uint8}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "quantize" and meta["model_class"] == "dense"
    assert meta["lineage"]["parent"]["path"] == str(checkpoint.resolve(trained).resolve())
    assert meta["lineage"]["recipe"] == {"stage": "quantize", "weights": weights, "group": group if weights == "int4"
                                         else None, "method": "rtn", "calibration": None}
    # llama.cpp's bits per weight: int8 8 + 32/K (one fp32 scale per row of K), int4 4 + 16/group
    n = sum(m.in_features * m.out_features for m in layers)
    scale_bits = sum(m.out_features * 32 for m in layers) if weights == "int8" else n * 16 / group
    assert meta["storage"]["bits_per_weight"] == pytest.approx((n * (8 if weights == "int8" else 4) + scale_bits) / n,
                                                               abs=1e-4)
    assert llm.lm.params().total == checkpoint.load(trained).model.num_params()  # the fp32 model's count


def test_the_file_holds_packed_bytes_and_loading_widens_nothing(trained, tmp_path, monkeypatch):
    fp32 = (checkpoint.resolve(trained) / "model.safetensors").stat().st_size
    out = quantize_run(trained, tmp_path / "q4", weights="int4", group=32)
    size = (out / "model.safetensors").stat().st_size
    st = json.loads((out / "meta.json").read_text())["storage"]
    assert size == pytest.approx(st["quantized_bytes"] + st["fp32_bytes"], abs=16_384)  # + the safetensors header
    assert size < fp32 * 0.6  # tiny model: the fp32 embedding is a large share; the matrices are 4.5 bits
    monkeypatch.setattr(qmod, "dequantize", lambda *a: pytest.fail("loading widened a packed layer"))
    model = load_quantized(out)
    # everything the loaded model holds is the packed layers and what stays fp32: no widened copy kept anywhere
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}
               .values())
    assert storage(model)["quantized_bytes"] == st["quantized_bytes"]
    assert held == st["quantized_bytes"] + st["fp32_bytes"]


def test_bad_requests_are_one_line(trained, tmp_path, tiny_data):
    q = quantize_run(trained, tmp_path / "q", weights="int8")
    cases = [
        (dict(src=q, weights="int8"), "already quantized"),
        (dict(src=trained, weights="bf16"), "holds int8 or int4"),
        (dict(src=trained, weights="int8", method="gptq"), "use --weights int4"),
        (dict(src=trained, weights="int4", group=48), "--group 48 is not supported"),
        (dict(src=trained, weights="int8", calib="x"), "--calib is for calibrated methods"),
        (dict(src=trained, weights="int8", method="magic"), "not one of rtn, gptq, awq"),
    ]
    for kw, needle in cases:
        with pytest.raises(SlmError, match=needle) as e:
            quantize_run(out=tmp_path / "x", **kw)
        assert "\n" not in str(e.value)
    train(tiny_data, tmp_path / "wide", TINY.replace(n_embd=48, n_head=2), TrainConfig(max_steps=1, batch_size=2,
          threads=1, eval_windows=8), progress=False)
    with pytest.raises(SlmError, match="group 32 does not divide the input width 48"):
        quantize_run(tmp_path / "wide", tmp_path / "x", weights="int4", group=32)
    with pytest.raises(SlmError, match="already quantized"):
        LLM.load(q, weights="int8")
    assert not (tmp_path / "x").exists()


def test_truncated_or_tampered_checkpoints_are_refused(trained, tmp_path):
    out = quantize_run(trained, tmp_path / "q", weights="int4", group=32)
    file = out / "model.safetensors"
    good = load_file(str(file))
    for name, sd in (
        ("wrong scale shape", {**good, "blocks.0.attn.qkv.scale": good["blocks.0.attn.qkv.scale"][:, :1]}),
        ("missing scale", {k: v for k, v in good.items() if k != "blocks.1.mlp.fc.scale"}),
        ("half the rows", {**good, "lm_head.weight": good["lm_head.weight"][:10]}),
        ("non-finite scale", {**good, "blocks.0.mlp.proj.scale": good["blocks.0.mlp.proj.scale"] * float("inf")}),
    ):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
        with pytest.raises(SlmError) as e:
            LLM.load(out)
        assert "\n" not in str(e.value), name
    save_file(good, str(file))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(SlmError, match="truncated or corrupt"):
        LLM.load(out)


def test_cli_quantize_then_generate(trained, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(trained), "--weights", "int4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "to int4 group 32 (rtn)" in text and "4.50 bits/weight" in text
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["quantize", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.slow
def test_kl_to_the_parent_orders_the_bit_widths(trained, tmp_path):
    from slmkit.eval import evaluate

    data = json.loads((trained / "meta.json").read_text())["lineage"]["parent"]["path"]
    text = f"{json.loads((Path(data) / 'meta.json').read_text())['source']}:val"
    same = evaluate(trained, lm=[text], kl_to=trained, threads=1)["kl"][text]
    assert same["kl_mean"] == 0 and same["top1_agree"] == 1
    kl = {}
    for weights in ("int8", "int4"):
        q = quantize_run(trained, tmp_path / weights, weights=weights)
        res = evaluate(q, lm=[text], kl_to="parent", threads=1)
        kl[weights] = res["kl"][text]
        assert res["kl"][text]["reference"] == str(checkpoint.resolve(trained).resolve())
        assert res["kl"][text]["tokens"] == res["lm"][text]["tokens"]  # every scored token
    assert 0 < kl["int8"]["kl_mean"] < kl["int4"]["kl_mean"] < 0.5
    assert kl["int8"]["top1_agree"] >= kl["int4"]["top1_agree"]
    with pytest.raises(SlmError, match="records no parent"):
        evaluate(trained, lm=[text], kl_to="parent", threads=1)


@pytest.mark.slow
def test_compare_shows_a_quantized_model_beside_its_parent(trained, tmp_path):
    from slmkit.eval.compare import compare

    data = json.loads((trained / "meta.json").read_text())["lineage"]["parent"]["path"]
    text = f"{json.loads((Path(data) / 'meta.json').read_text())['source']}:val"
    q = quantize_run(trained, tmp_path / "q4", weights="int4")
    res = compare([trained, q], tmp_path / "report", lm_sets=[text], efficiency=False, threads=1, say=lambda _: None)
    parent, child = res["rows"]
    assert parent["bits_per_weight"] is None and parent["kl"] is None
    assert child["bits_per_weight"] == pytest.approx(4.5) and child["kl"] > 0 and child["parent_name"] == "run"
    assert child["bpb_delta_pct"] == pytest.approx(100 * (child["bpb"][text] / parent["bpb"][text] - 1))
    assert child["bytes_on_disk"] < parent["bytes_on_disk"]
    report = (tmp_path / "report/report.md").read_text()
    assert "KL to parent" in report and "bits/weight" in report
    again = compare([trained, q], tmp_path / "report", lm_sets=[text], efficiency=False, threads=1,
                    say=lambda _: None)  # everything reused, KL included
    assert again["rows"][1]["kl"] == child["kl"]


def test_gptq_checkpoint_records_its_calibration(trained, tmp_path):
    out = quantize_run(trained, tmp_path / "g", weights="int4", group=32, method="gptq", calib_samples=8,
                       calib_len=32)
    meta = json.loads((out / "meta.json").read_text())
    cal = meta["quantization"]["calibration"]
    data = json.loads((trained / "meta.json").read_text())["data"]
    assert meta["quantization"]["method"] == "gptq" and cal["source"] == data and cal["split"] == "train"
    assert (cal["samples"], cal["seq_len"], cal["tokens"]) == (8, 32, 256)
    rtn = quantize_run(trained, tmp_path / "r", weights="int4", group=32)
    x = torch.randint(0, 20, (1, 16))
    with torch.no_grad():  # different weights from the same grid
        assert not torch.equal(LLM.load(out).model(x)[0], LLM.load(rtn).model(x)[0])
    bare = tmp_path / "bare"  # a checkpoint with no training data of its own here (like an imported one)
    shutil.copytree(checkpoint.resolve(trained), bare)
    meta = json.loads((bare / "meta.json").read_text())
    (bare / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "data"}))
    with pytest.raises(SlmError, match="name calibration text with --calib"):
        quantize_run(bare, tmp_path / "x", weights="int4", method="gptq")
