"""When the C kernels cannot be built, slmkit says so once, in one line on stderr with the reason, and decodes through
PyTorch; SLMKIT_NO_KERNELS=1 skips the build silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmkit import kernels
from slmkit.config import ModelConfig
from slmkit.infer import SamplingParams, generate
from slmkit.model import GPT

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from slmkit.config import ModelConfig
from slmkit import kernels
from slmkit.infer import SamplingParams, generate
from slmkit.model import GPT
torch.manual_seed(0)
m = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, pos="rope")).eval()
out = list(generate(m, [1, 2, 3], SamplingParams(8, temperature=0)))
out += list(generate(m, [4, 5], SamplingParams(8, temperature=0)))
print(json.dumps({"available": kernels.available(), "tokens": out}))
"""


def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cc: str) -> None:
    """A process state that has not tried the build yet, a compiler `cc` and an empty kernel cache."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLMKIT_NO_KERNELS", raising=False)


def _fake_cc(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the kernels are built on Linux only")
def test_a_failed_build_says_why_once_and_decoding_falls_back(tmp_path):
    env = {**os.environ, "CC": "/bin/false", "SLMKIT_CACHE": str(tmp_path)}
    env.pop("SLMKIT_NO_KERNELS", None)
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        "slmkit: C kernels unavailable, using PyTorch (slower): /bin/false exited with status 1 and no message. "
        "SLMKIT_NO_KERNELS=1 skips the build."]
    got = json.loads(res.stdout)
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, pos="rope")).eval()
    want = [*generate(m, [1, 2, 3], SamplingParams(8, temperature=0), fast=False),
            *generate(m, [4, 5], SamplingParams(8, temperature=0), fast=False)]
    assert got == {"available": False, "tokens": want}
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left to be mistaken for a library


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels are built on Linux only")
@pytest.mark.parametrize(("body", "reason"), [
    (None, "C compiler '{cc}' not found (install gcc or set CC)"),
    ('echo "$6: In function f:" >&2; echo "$6:3:1: error: no such type" >&2; echo "$6:9:2: error: later" >&2; exit 1',
     "kernels.c:3:1: error: no such type"),
    ("echo 'cc1: fatal: out of memory' >&2; exit 4", "cc1: fatal: out of memory"),
    ("exec sleep 5", "{cc} took over 0.2 s to compile kernels.c"),
], ids=["missing", "compile-error", "no-error-word", "timeout"])
def test_the_reason_is_one_line_and_said_once(monkeypatch, tmp_path, capsys, body, reason):
    cc = str(tmp_path / "no-such-cc") if body is None else _fake_cc(tmp_path, body)
    _fresh(monkeypatch, tmp_path, cc)
    monkeypatch.setattr(kernels, "COMPILE_TIMEOUT_S", 0.2)
    assert not kernels.available() and not kernels.available()
    assert kernels.features() == set()
    err = capsys.readouterr().err
    assert err == (f"slmkit: C kernels unavailable, using PyTorch (slower): {reason.format(cc=cc)}. "
                   "SLMKIT_NO_KERNELS=1 skips the build.\n")


def test_switched_off_kernels_are_silent(monkeypatch, tmp_path, capsys):
    _fresh(monkeypatch, tmp_path, "/bin/false")
    monkeypatch.setenv("SLMKIT_NO_KERNELS", "1")
    assert not kernels.available()
    assert capsys.readouterr().err == ""
