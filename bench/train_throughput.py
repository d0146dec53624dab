"""Training throughput: slmkit's trainer vs a plain loop over transformers' GPT2LMHeadModel + torch.optim.AdamW.

Identical config — nanoGPT's CPU config for char-level Shakespeare: 4 layers, 4 heads, 128 dims, context 64, batch 12,
AdamW lr 1e-3 (beta2 0.99, wd 0.1), warmup + cosine, grad clip 1.0 — same batches, same machine, same run, 2 threads.
Runs are interleaved (every repeat runs every row, in reversed order every other repeat) and medians reported, plus the
median of per-repeat ratios ("paired"), because the machine is shared and its speed drifts within minutes.

Rows: slmkit as `slm train --compile` and as plain `slm train` (precision auto: bf16 autocast with fp32 master
weights where the CPU multiplies bf16 natively, else fp32), and on such CPUs pinned to fp32 as well. The peer is
nanoGPT's CPU setting: a plain fp32 loop (nanoGPT autocasts only on GPUs), with GPT-2's default tanh-GELU ("gelu_new",
what GPT2LMHeadModel uses out of the box) and with exact GELU (what slmkit and nanoGPT use); where the CPU has native
bf16 also under bf16 autocast, and compiled with torch.compile — so the shares of the ratio that autocast alone and
compiling alone buy are visible. Ratios are against the default peer.

tokens/s counts steps 11 onwards for every row (the first steps carry one-off set-up: oneDNN picking kernels, and
for the compiled rows the compile itself, ~30 s cold and ~3 s from torch's on-disk cache); the one-off is printed
as "first step" so nothing is hidden.

    python bench/train_throughput.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import HFGPT2, hf_train_loop, prepare_tiny_shakespeare_char

NANO = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
OPT = dict(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99)
BATCH = 12


PEER = "hf gelu_new (default)"
WARMUP = 10  # steps excluded from every row's tokens/s: one-off set-up (oneDNN kernel selection, compiling)


def run_slmkit(data: Path, steps: int, seed: int, precision: str = "auto",
               compile: bool = False) -> tuple[float, float, float]:
    """→ (tokens/s after the first WARMUP steps, val loss, seconds of the first step)."""
    from slmkit import checkpoint
    from slmkit.config import ModelConfig, TrainConfig
    from slmkit.data import load_split
    from slmkit.metrics import lm_loss
    from slmkit.train import train

    tc = TrainConfig(batch_size=BATCH, max_steps=steps, threads=2, precision=precision, compile=compile, seed=seed,
                     eval_batches=1, eval_interval=10**9, ckpt_interval=10**9, log_interval=WARMUP, **OPT)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(data, Path(tmp) / "run", ModelConfig.preset("gpt-0.8m"), tc, progress=False)
        logged = {r["step"]: r for r in map(json.loads, (Path(tmp) / "run/metrics.jsonl").read_text().splitlines())
                  if "tok_per_s" in r}
        a, b = logged[WARMUP], logged[steps]
        model = checkpoint.load(Path(tmp) / "run").model
        val = lm_loss(model, load_split(data, "val").tokens, block_size=64, max_windows=1000)
    return (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]), val, res.first_step_time


def run_hf(data: Path, steps: int, seed: int, activation: str, bf16: bool = False,
           compile: bool = False) -> tuple[float, float, float]:
    from slmkit.data import load_split
    from slmkit.metrics import lm_loss

    train_tokens = load_split(data, "train")
    torch.manual_seed(seed)
    model = HFGPT2(train_tokens.vocab_size, activation=activation, **NANO)
    marks: dict[int, float] = {}

    def mark(step: int, spent: float) -> bool:
        marks[step] = spent
        return False

    spent = hf_train_loop(torch.compile(model) if compile else model, train_tokens.tokens, steps=steps,
                          batch_size=BATCH, block_size=64, seed=seed, bf16=bf16, on_step=mark, **OPT)
    val = lm_loss(model, load_split(data, "val").tokens, block_size=64, max_windows=1000)
    return (steps - WARMUP) * BATCH * 64 / (spent - marks[WARMUP]), val, marks[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = prepare_tiny_shakespeare_char()
    from slmkit.runtime import cpu_has_fast_bf16

    bf16 = cpu_has_fast_bf16()  # slmkit's default (precision=auto) is bf16 autocast on such a CPU
    auto = "bf16" if bf16 else "fp32"
    rows: dict[str, Callable[[int], tuple[float, float, float]]] = {
        f"slmkit --compile ({auto})": lambda rep: run_slmkit(data, args.steps, rep, compile=True),
        f"slmkit ({auto})": lambda rep: run_slmkit(data, args.steps, rep),
        **({"slmkit fp32": lambda rep: run_slmkit(data, args.steps, rep, precision="fp32")} if bf16 else {}),
        PEER: lambda rep: run_hf(data, args.steps, rep, "gelu_new"),
        "hf gelu (exact)": lambda rep: run_hf(data, args.steps, rep, "gelu"),
        **({"hf gelu_new bf16 autocast": lambda rep: run_hf(data, args.steps, rep, "gelu_new", bf16=True)}
           if bf16 else {}),
        "hf gelu_new + torch.compile": lambda rep: run_hf(data, args.steps, rep, "gelu_new", compile=True),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rows}
    # the default peer runs between the two headline slmkit rows, so their pairs are close in time
    order = [name for name in rows if name != PEER]
    order.insert(1, PEER)
    for rep in range(args.repeats):
        # every repeat runs every row once, in reversed order every other repeat (A B C .. C B A): a machine that speeds
        # up or slows down during a repeat then favours no row
        for name in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(rows[name](rep))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1][0]:,.0f} tok/s" for k, v in runs.items()), flush=True)
    peer_runs = [t for t, _, _ in runs[PEER]]
    peer = statistics.median(peer_runs)
    print(f"\n{args.steps} steps x batch {BATCH} x context 64, 2 threads, {args.repeats} repeats (medians); tokens/s "
          f"over steps {WARMUP + 1}-{args.steps}; val loss on 1,000 val windows; 'paired' = median over repeats of "
          f"the row's tokens/s / the default peer's in the same repeat; first step = one-off warm-up (incl. "
          "compiling; the slowest repeat)")
    print(f"{'trainer':30s} {'tokens/s':>10s} {'val loss':>9s} {'vs hf default':>14s} {'paired':>7s} "
          f"{'first step':>11s}")
    for name, results in runs.items():
        tps = statistics.median([t for t, _, _ in results])
        val = statistics.median([v for _, v, _ in results])
        paired = statistics.median([t / p for (t, _, _), p in zip(results, peer_runs, strict=True)])
        first = max(f for _, _, f in results)  # the first repeat's: later ones reuse what torch cached in-process
        print(f"{name:30s} {tps:10,.0f} {val:9.4f} {tps / peer:13.2f}x {paired:6.2f}x {first:10.1f}s")

if __name__ == "__main__":
    main()
