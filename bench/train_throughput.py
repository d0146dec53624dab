"""Training throughput: slmkit's trainer vs a plain loop over transformers' GPT2LMHeadModel + torch.optim.AdamW.

Identical config — nanoGPT's CPU config for char-level Shakespeare: 4 layers, 4 heads, 128 dims, context 64, batch 12,
AdamW lr 1e-3 (beta2 0.99, wd 0.1), warmup + cosine, grad clip 1.0 — same batches, same machine, same run, 2 threads,
fp32. Runs are interleaved (slmkit, peer, peer, slmkit, ...) and medians reported, because the machine is shared.

The peer runs twice: with GPT-2's default tanh-GELU ("gelu_new", what GPT2LMHeadModel uses out of the box) and with
exact GELU (what slmkit and nanoGPT use), so the ratio that comes from the activation kernel alone is visible.

    python bench/train_throughput.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import HFGPT2, hf_train_loop, prepare_tiny_shakespeare_char

NANO = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
OPT = dict(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99)
BATCH = 12


def run_slmkit(data: Path, steps: int, seed: int, precision: str = "fp32") -> tuple[float, float]:
    from slmkit import checkpoint
    from slmkit.config import ModelConfig, TrainConfig
    from slmkit.data import load_split
    from slmkit.eval.lm import lm_loss
    from slmkit.train import train

    tc = TrainConfig(batch_size=BATCH, max_steps=steps, threads=2, precision=precision, seed=seed, eval_batches=1,
                     eval_interval=10**9, ckpt_interval=10**9, **OPT)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(data, Path(tmp) / "run", ModelConfig.preset("gpt-0.8m"), tc, progress=False)
        model = checkpoint.load(Path(tmp) / "run").model
        val = lm_loss(model, load_split(data, "val").tokens, block_size=64, max_windows=1000)
    return res.tokens_per_s, val


def run_hf(data: Path, steps: int, seed: int, activation: str) -> tuple[float, float]:
    from slmkit.data import load_split
    from slmkit.eval.lm import lm_loss

    train_tokens = load_split(data, "train")
    torch.manual_seed(seed)
    model = HFGPT2(train_tokens.vocab_size, activation=activation, **NANO)
    spent = hf_train_loop(model, train_tokens.tokens, steps=steps, batch_size=BATCH, block_size=64, seed=seed, **OPT)
    val = lm_loss(model, load_split(data, "val").tokens, block_size=64, max_windows=1000)
    return steps * BATCH * 64 / spent, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = prepare_tiny_shakespeare_char()
    from slmkit.runtime import cpu_has_fast_bf16

    bf16 = cpu_has_fast_bf16()  # slmkit's default (precision=auto) on such a CPU; the peer stays a plain fp32 loop
    runs = {"slmkit": [], **({"slmkit bf16 autocast": []} if bf16 else {}), "hf gelu_new (default)": [],
            "hf gelu (exact)": []}
    for rep in range(args.repeats):
        runs["slmkit"].append(run_slmkit(data, args.steps, seed=rep))
        if bf16:
            runs["slmkit bf16 autocast"].append(run_slmkit(data, args.steps, seed=rep, precision="bf16"))
        runs["hf gelu_new (default)"].append(run_hf(data, args.steps, rep, "gelu_new"))
        runs["hf gelu (exact)"].append(run_hf(data, args.steps, rep, "gelu"))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1][0]:,.0f} tok/s" for k, v in runs.items()), flush=True)
    ours = statistics.median([t for t, _ in runs["slmkit"]])
    print(f"\n{args.steps} steps x batch {BATCH} x context 64, 2 threads, fp32 unless named, {args.repeats} repeats "
          "(medians)")
    print(f"{'trainer':24s} {'tokens/s':>10s} {'val loss':>9s} {'slmkit ratio':>13s}")
    for name, results in runs.items():
        tps = statistics.median([t for t, _ in results])
        val = statistics.median([v for _, v in results])
        print(f"{name:24s} {tps:10,.0f} {val:9.4f} {ours / tps:12.2f}x")


if __name__ == "__main__":
    main()
