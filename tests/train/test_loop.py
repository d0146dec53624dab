"""The trainer: learning happens, runs are self-describing, and resume reproduces an uninterrupted run exactly —
in-process from an earlier checkpoint, and end-to-end after a SIGKILL of the `slm train` process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from slmkit import checkpoint
from slmkit.config import ModelConfig, TrainConfig
from slmkit.errors import SlmError
from slmkit.train import train
from slmkit.train.loop import _auto_eval_windows
from slmkit.train.optim import lr_at

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, pos="rope", norm="rmsnorm", mlp="swiglu")


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=30, batch_size=8, eval_interval=10, eval_batches=4, ckpt_interval=10, log_interval=5,
                warmup_steps=5, lr=3e-3, threads=1, precision="fp32", keep_checkpoints=5)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_loss_and_writes_a_run(tiny_data, tmp_path):
    res = train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=60), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first_val = next(r["val_loss"] for r in records if "val_loss" in r)
    assert records[0]["step"] == 0 and first_val > 3.0  # untrained: near ln(vocab)
    assert res.val_loss < first_val - 0.8, (first_val, res.val_loss)
    assert res.step == 60 and res.tokens == 60 * 8 * 32
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    assert meta["status"] == "finished" and meta["params"]["total"] == res.num_params
    assert (tmp_path / "run/loss.png").stat().st_size > 10_000
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")][-1] == "step_000060"


def test_sgd_and_wsd_train_too(tiny_data, tmp_path):
    res = train(tiny_data, tmp_path / "run", TINY, cfg(optimizer="sgd", lr=0.3, schedule="wsd"), progress=False)
    assert res.val_loss < 3.0


@pytest.mark.slow
def test_muon_learns_faster_than_adamw_per_step(tiny_data, tmp_path):
    """Same steps, same batches: Muon on the matrices ends lower than AdamW alone (its reason to exist)."""
    kw = dict(max_steps=40, eval_interval=40, ckpt_interval=40, min_lr_ratio=0.0)
    adamw = train(tiny_data, tmp_path / "a", TINY, cfg(**kw), progress=False)
    muon = train(tiny_data, tmp_path / "m", TINY, cfg(optimizer="muon", muon_lr=0.05, **kw), progress=False)
    assert muon.val_loss < adamw.val_loss - 0.05, (muon.val_loss, adamw.val_loss)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_from_an_earlier_checkpoint_reproduces_the_run(tiny_data, tmp_path, optimizer):
    run = tmp_path / "run"
    full = train(tiny_data, run, TINY.replace(dropout=0.1), cfg(optimizer=optimizer), progress=False)
    final_weights = load_file(str(run / "checkpoints/step_000030/model.safetensors"))
    for step in (20, 30):  # as if killed right after the step-10 checkpoint
        shutil.rmtree(run / f"checkpoints/step_{step:06d}")
    resumed = train(None, run, resume=True, progress=False)
    assert resumed.step == 30
    assert resumed.val_loss == full.val_loss
    again = load_file(str(run / "checkpoints/step_000030/model.safetensors"))
    for k, v in final_weights.items():
        torch.testing.assert_close(again[k], v, atol=0, rtol=0)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records past the checkpoint were dropped before the resumed run appended


def test_lr_schedules():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    assert lr_at(c, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(c, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(c, 100, 1.0) == pytest.approx(0.1)
    w = c.replace(schedule="wsd", decay_frac=0.2)
    assert lr_at(w, 50, 0.5) == 1.0 and lr_at(w, 90, 0.9) == pytest.approx(0.55)


def test_bad_runs(tiny_data, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/file").write_text("x")
    with pytest.raises(SlmError, match="already exists"):
        train(tiny_data, tmp_path / "taken", TINY, cfg())
    with pytest.raises(SlmError, match="give a budget"):
        train(tiny_data, tmp_path / "r", TINY, cfg(max_steps=None))
    with pytest.raises(SlmError, match="not an slmkit directory"):
        train(None, tmp_path / "taken", resume=True)
    with pytest.raises(SlmError, match="fewer than one context"):
        train(tiny_data, tmp_path / "r", TINY.replace(block_size=100_000), cfg())
    assert not (tmp_path / "r").exists()  # nothing half-written for a run that never started


def test_resume_with_another_optimizer_is_a_clear_error(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=10, optimizer="muon"), progress=False)
    with pytest.raises(SlmError, match=r"optimizer \('muon' → 'adamw'\) cannot change on resume"):
        train(None, tmp_path / "run", train_config=cfg(max_steps=20, optimizer="adamw"), resume=True, progress=False)


def test_truncated_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=10), progress=False)
    weights = tmp_path / "run/checkpoints/step_000010/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SlmError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "run")
    opt = tmp_path / "run/checkpoints/step_000010/optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(SlmError, match="truncated or corrupt"):
        checkpoint.load_train_state(opt.parent)


def _slm(*args: str) -> list[str]:
    return [sys.executable, "-m", "slmkit", *args]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--max-steps", "80", "--ckpt-interval", "20", "--eval-interval", "20",
              "--threads", "1", "--precision", "fp32", "--batch-size", "8", "--quiet",
              "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32", "--set", "block_size=32",
              "--set", "keep_checkpoints=5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_slm("train", *common, "--out", str(tmp_path / "a")), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_slm("train", *common, "--out", str(tmp_path / "b")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "b/checkpoints/step_000040/meta.json").exists():  # kept: keep_checkpoints=5
            assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (tmp_path / "b/checkpoints/step_000080").exists()
    out = subprocess.run(_slm("train", "--resume", str(tmp_path / "b"), "--quiet"), check=True, env=env,
                         capture_output=True, text=True)
    assert "finished: step 80" in out.stdout

    a = json.loads((tmp_path / "a/meta.json").read_text())["result"]
    b = json.loads((tmp_path / "b/meta.json").read_text())["result"]
    assert b["val_loss"] == a["val_loss"]
    wa = load_file(str(tmp_path / "a/checkpoints/step_000080/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/step_000080/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accum_equals_one_big_batch(tiny_data, tmp_path):
    """2 micro-batches of 4 draw the same windows as one batch of 8 and average to the same gradient."""
    a = train(tiny_data, tmp_path / "a", TINY, cfg(max_steps=3, batch_size=8, grad_accum=1), progress=False)
    b = train(tiny_data, tmp_path / "b", TINY, cfg(max_steps=3, batch_size=4, grad_accum=2), progress=False)
    assert a.tokens == b.tokens
    wa = load_file(str(tmp_path / "a/checkpoints/step_000003/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/step_000003/model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bf16_autocast_matches_fp32_loss(tiny_data, tmp_path):
    """bf16 autocast (fp32 master weights) must train to the same loss as fp32 within bf16 noise."""
    a = train(tiny_data, tmp_path / "a", TINY, cfg(max_steps=40, precision="fp32"), progress=False)
    b = train(tiny_data, tmp_path / "b", TINY, cfg(max_steps=40, precision="bf16"), progress=False)
    assert abs(a.val_loss - b.val_loss) < 0.05, (a.val_loss, b.val_loss)
    meta = json.loads((tmp_path / "b/meta.json").read_text())
    assert meta["runtime"]["precision"] == "bf16"
    assert load_file(str(tmp_path / "b/checkpoints/step_000040/model.safetensors"))["tok_emb.weight"].dtype == \
        torch.float32


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resumes(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--max-steps", "100000", "--ckpt-interval", "10", "--threads", "1",
            "--batch-size", "4", "--quiet", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
            "--set", "block_size=32", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(_slm("train", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not checkpoint.list_checkpoints(tmp_path / "run"):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("interrupted: step "), out
    step = int(last.split()[2].rstrip(","))
    assert (tmp_path / f"run/checkpoints/step_{step:06d}/meta.json").exists()
    assert json.loads((tmp_path / "run/meta.json").read_text())["status"] == "interrupted"
    saved = TrainConfig.from_dict(json.loads((tmp_path / "run/meta.json").read_text())["train"])
    resumed = train(None, tmp_path / "run", train_config=saved.replace(max_steps=step + 5), resume=True,
                    progress=False)
    assert resumed.step == step + 5 and resumed.status == "finished"


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, tmp_path):
    """--compile changes how the step runs, not what it computes: same loss within float noise; the one-off compile
    shows up as the first step's time."""
    from slmkit.cli import build_parser

    assert build_parser().parse_args(["train", "--data", "d", "--compile"]).compile is True
    assert build_parser().parse_args(["train", "--data", "d"]).compile is None  # unset: a resume keeps the run's
    a = train(tiny_data, tmp_path / "a", TINY, cfg(max_steps=8, eval_interval=8), progress=False)
    b = train(tiny_data, tmp_path / "b", TINY, cfg(max_steps=8, eval_interval=8, compile=True), progress=False)
    assert abs(a.val_loss - b.val_loss) < 1e-3, (a.val_loss, b.val_loss)
    assert b.first_step_time > a.first_step_time > 0


# --- resume keeps the recipe; --overwrite only replaces what slmkit wrote --------------------------------------------


def test_resume_without_a_checkpoint_is_an_error_not_a_restart(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=10), progress=False)
    shutil.rmtree(tmp_path / "run/checkpoints")  # as if killed before its first checkpoint
    with pytest.raises(SlmError, match="has no checkpoint yet"):
        train(None, tmp_path / "run", train_config=cfg(max_steps=20), resume=True, progress=False)
    assert not (tmp_path / "run/checkpoints").exists()


def test_resume_changes_only_the_budget_and_records_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, run, TINY, cfg(max_steps=10), progress=False)
    for bad, needle in ((cfg(max_steps=20, lr=1e-2), r"lr \(0.003 → 0.01\) cannot change"),
                        (cfg(max_steps=20, batch_size=4), "batch_size"),
                        (cfg(max_steps=10), "step 10: --max-steps 10 does not go past it")):
        with pytest.raises(SlmError, match=needle):
            train(None, run, train_config=bad, resume=True, progress=False)
    res = train(None, run, train_config=cfg(max_steps=15, threads=2), resume=True, progress=False)
    assert res.step == 15
    meta = json.loads((run / "meta.json").read_text())
    assert meta["train"]["max_steps"] == 15 and meta["runtime"]["threads"] == 2
    assert meta["resumes"][0]["step"] == 10 and meta["resumes"][0]["changed"] == {"max_steps": 15, "threads": 2}


def test_overwrite_replaces_only_what_slmkit_wrote(tiny_data, tmp_path):
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "main.py").write_text("print('precious')\n")
    with pytest.raises(SlmError, match="not written by slmkit"):
        train(tiny_data, foreign, TINY, cfg(max_steps=2), overwrite=True, progress=False)
    assert (foreign / "main.py").read_text() == "print('precious')\n"
    with pytest.raises(SlmError, match=r"reads .* from it"):  # the data it would train on
        train(tiny_data, tiny_data, TINY, cfg(max_steps=2), overwrite=True, progress=False)
    assert (tiny_data / "meta.json").exists()
    train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=2), progress=False)
    (tmp_path / "run/stale.txt").write_text("from the old run")
    train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=3), overwrite=True, progress=False)
    assert not (tmp_path / "run/stale.txt").exists()
    assert json.loads((tmp_path / "run/meta.json").read_text())["result"]["step"] == 3


def test_meta_has_kind_model_class_and_lineage(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "run", TINY, cfg(max_steps=2), progress=False)
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    assert meta["kind"] == "train" and meta["model_class"] == "dense"
    parent = meta["lineage"]["parent"]
    assert parent["path"] == str(tiny_data.resolve()) and parent["kind"] == "data" and len(parent["meta_sha256"]) == 64
    assert meta["lineage"]["recipe"]["stage"] == "train" and meta["lineage"]["recipe"]["train"]["max_steps"] == 2


# --- evaluation has a bounded cost; the log says what happened -------------------------------------------------------


def test_auto_evaluation_is_scaled_to_a_short_budget(tiny_data, tmp_path):
    """A 3-step run must not spend its time scoring: fewer windows than the cap, the same at every evaluation."""
    cap = cfg().eval_batches * cfg().batch_size
    short = train(tiny_data, tmp_path / "s", TINY, cfg(max_steps=3), progress=False)
    windows = json.loads((tmp_path / "s/meta.json").read_text())["eval"]["windows"]
    assert 8 <= windows < cap
    full = train(tiny_data, tmp_path / "a", TINY, cfg(max_steps=3, eval_windows="all"), progress=False)
    assert json.loads((tmp_path / "a/meta.json").read_text())["eval"]["windows"] is None
    assert full.val_loss != short.val_loss  # scored on more text
    for r in (short, full):
        assert r.wall_time >= r.train_time + r.eval_time + r.ckpt_time
    # a long budget gets the cap; a time budget is sized from a timed forward pass, and is bounded the same way
    from slmkit.data import load_split
    from slmkit.model import GPT

    model, val = GPT(TINY.replace(vocab_size=64)), load_split(tiny_data, "val").tokens
    assert _auto_eval_windows(cfg(max_steps=10**6, eval_interval=1000), model, val, 32, "fp32") == cap
    assert 8 <= _auto_eval_windows(cfg(max_steps=None, max_time=0.5), model, val, 32, "fp32") < cap


def test_log_records_mean_micro_batch_loss_grad_norm_and_train_only_tokens_per_s(tiny_data, tmp_path):
    from slmkit.data import load_split
    from slmkit.model import GPT
    from slmkit.train.loop import Batcher

    tc = cfg(max_steps=1, batch_size=4, grad_accum=2, log_interval=1, eval_windows="all")
    train(tiny_data, tmp_path / "run", TINY, tc, progress=False)
    rec = next(json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in x)
    torch.manual_seed(tc.seed)
    model = GPT(TINY.replace(vocab_size=int(load_split(tiny_data, "train").vocab_size)))
    batcher = Batcher(load_split(tiny_data, "train").tokens, 4, TINY.block_size, tc.seed)
    losses = [model(*batcher.next())[1].item() for _ in range(2)]
    assert losses[0] != losses[1]
    assert rec["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)  # was the last micro-batch's
    assert rec["grad_norm"] > 0
    # the first log window holds the step-0 evaluation of the whole split; tokens/s must not count it
    # (time is logged to the millisecond, which alone moves tokens/time by ~7 % for this few-ms step)
    lo, hi = rec["tokens"] / (rec["time"] + 5e-4), rec["tokens"] / (rec["time"] - 5e-4)
    assert 0.99 * lo <= rec["tok_per_s"] <= 1.01 * hi
