"""`slm finetune` and `slm classify` from the command line."""

from __future__ import annotations

import json

import pytest

from slmkit.cli import main
from tests.finetune.conftest import labelled_dir

pytestmark = pytest.mark.slow  # end-to-end: real runs, servers or a browser (the quick lane skips them)

FAST = ["--seq-len", "32", "--batch-size", "4", "--threads", "1", "--precision", "fp32", "--eval-interval", "5",
        "--quiet"]


def test_finetune_then_resume_from_the_command_line(base, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", str(base), "--data", str(corpus), "--max-steps", "5", "--out", str(out),
                 "--lora-rank", "4", "--lora-targets", "attn.qkv,mlp", "--lora-layers", "1", "--set", "warmup_steps=1",
                 *FAST]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("finished: step 5") and "val loss" in line and str(out) in line
    meta = json.loads((out / "meta.json").read_text())
    assert meta["adapter"] == {"rank": 4, "alpha": 16.0, "targets": ["attn.qkv", "mlp"], "layers": 1}
    assert meta["train"]["warmup_steps"] == 1 and meta["train"]["lr"] == 1e-3  # the LoRA default lr
    assert main(["finetune", "--resume", str(out), "--max-steps", "7", "--quiet"]) == 0
    assert "step 7" in capsys.readouterr().out
    assert main(["finetune", "--resume", str(out), "--lora-rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lora-rank cannot be given with it" in err


def test_classify_prints_label_and_probabilities(base, tmp_path, capsys):
    out = tmp_path / "clf"
    data = labelled_dir(tmp_path / "labels", n=12)
    assert main(["finetune", str(base), "--data", str(data), "--task", "classify", "--method", "frozen",
                 "--max-steps", "3", "--out", str(out), *FAST]) == 0
    assert "; test loss" in capsys.readouterr().out
    assert main(["classify", str(out), "o romeo", "the king is dead", "--top", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("love", "royal") for line in lines)
    assert len(lines[0].split("\t")[1].split("  ")) == 1


def test_bad_input_is_one_line_and_exit_2(base, corpus, tmp_path, capsys):
    for args, needle in (
        ([str(base), "--data", str(corpus), "--lora-rank", "99"], "LoRA rank 99 is larger than the layer"),
        ([str(base), "--data", str(corpus), "--method", "frozen"], "--method frozen trains only a classification"),
        ([str(base), "--data", str(corpus), "--set", "lora_rnk=2"], "did you mean lora_rank"),
        (["--data", str(corpus)], "needs the model RUN"),
    ):
        assert main(["finetune", *args, "--max-steps", "2", "--out", str(tmp_path / "o"), *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "o").exists()
    assert main(["classify", str(base), "text"]) == 2
    assert "holds a checkpoint imported from GGUF or transformers (slm import), not a model fine-tuned" in \
        capsys.readouterr().err


def test_ctrl_c_checkpoints_writes_the_best_model_and_resumes(base, corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from slmkit import LLM, checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slmkit", "finetune", str(base), "--data", str(corpus), "--max-steps", "100000",
           "--ckpt-interval", "10", "--out", str(out), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not checkpoint.list_checkpoints(out):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("interrupted: step "), stdout
    step = int(last.split()[2].rstrip(","))
    assert (out / "checkpoints" / f"step_{step:06d}" / "meta.json").exists()
    assert json.loads((out / "meta.json").read_text())["status"] == "interrupted"
    assert LLM.load(out).generate("the", max_new_tokens=2, temperature=0) is not None  # the best model was written
    assert main(["finetune", "--resume", str(out), "--max-steps", str(step + 3), "--quiet"]) == 0
