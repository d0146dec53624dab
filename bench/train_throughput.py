"""Training throughput: slmkit's trainer vs a plain loop over transformers' GPT2LMHeadModel + torch.optim.AdamW.

Identical config — nanoGPT's CPU config for char-level Shakespeare: 4 layers, 4 heads, 128 dims, context 64, batch 12,
AdamW lr 1e-3 (beta2 0.99, wd 0.1), warmup + cosine, grad clip 1.0 — same batches, same machine, same run, 2 threads.
Runs are interleaved (slmkit, peer, peer, slmkit, ...) and medians reported, because the machine is shared.

slmkit runs as `slm train` would by default (precision auto: bf16 autocast with fp32 master weights where the CPU
multiplies bf16 natively, else fp32) and, on such CPUs, pinned to fp32 as well. The peer is nanoGPT's CPU setting: a
plain fp32 loop (nanoGPT autocasts only on GPUs). It runs with GPT-2's default tanh-GELU ("gelu_new", what
GPT2LMHeadModel uses out of the box) and with exact GELU (what slmkit and nanoGPT use); where the CPU has native bf16
it also runs under bf16 autocast, so the share of the ratio that autocast alone buys is visible.

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


def run_slmkit(data: Path, steps: int, seed: int, precision: str = "auto") -> tuple[float, float]:
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


def run_hf(data: Path, steps: int, seed: int, activation: str, bf16: bool = False) -> tuple[float, float]:
    from slmkit.data import load_split
    from slmkit.eval.lm import lm_loss

    train_tokens = load_split(data, "train")
    torch.manual_seed(seed)
    model = HFGPT2(train_tokens.vocab_size, activation=activation, **NANO)
    spent = hf_train_loop(model, train_tokens.tokens, steps=steps, batch_size=BATCH, block_size=64, seed=seed,
                          bf16=bf16, **OPT)
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

    bf16 = cpu_has_fast_bf16()  # slmkit's default (precision=auto) is bf16 autocast on such a CPU
    default = "slmkit (auto: bf16)" if bf16 else "slmkit (auto: fp32)"
    runs: dict[str, list[tuple[float, float]]] = {default: [], **({"slmkit fp32": []} if bf16 else {}),
                                                   "hf gelu_new (default)": [], "hf gelu (exact)": [],
                                                   **({"hf gelu_new bf16 autocast": []} if bf16 else {})}
    for rep in range(args.repeats):
        runs[default].append(run_slmkit(data, args.steps, seed=rep, precision="auto"))
        if bf16:
            runs["slmkit fp32"].append(run_slmkit(data, args.steps, seed=rep, precision="fp32"))
        runs["hf gelu_new (default)"].append(run_hf(data, args.steps, rep, "gelu_new"))
        runs["hf gelu (exact)"].append(run_hf(data, args.steps, rep, "gelu"))
        if bf16:
            runs["hf gelu_new bf16 autocast"].append(run_hf(data, args.steps, rep, "gelu_new", bf16=True))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1][0]:,.0f} tok/s" for k, v in runs.items()), flush=True)
    ours = statistics.median([t for t, _ in runs[default]])
    print(f"\n{args.steps} steps x batch {BATCH} x context 64, 2 threads, {args.repeats} repeats (medians); "
          "val loss on 1,000 val windows")
    print(f"{'trainer':28s} {'tokens/s':>10s} {'val loss':>9s} {'slmkit ratio':>13s}")
    for name, results in runs.items():
        tps = statistics.median([t for t, _ in results])
        val = statistics.median([v for _, v in results])
        print(f"{name:28s} {tps:10,.0f} {val:9.4f} {ours / tps:12.2f}x")

if __name__ == "__main__":
    main()
