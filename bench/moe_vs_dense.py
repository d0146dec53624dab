"""MoE vs dense at equal active parameters and equal tokens: `moe-3m` (8 experts of width 384, top-2) against its
dense counterpart `gpt-rope-3m` (one MLP of width 768) — same attention, same active parameters per token (+ the
router), same batches, same schedule, same seed — on the fixed char-level Shakespeare split of bench/common.py.

Reports val bits-per-byte (final evaluation: 4 × `--eval-batches` evenly spread windows of the val split), total and
active parameters, training time and tokens/s, and expert utilisation at the end of the MoE run. Equal tokens is the
comparison; wall time is reported but the MoE dispatch (one matmul per expert) costs more per token on CPU.

    python bench/moe_vs_dense.py [--steps 300] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import prepare_tiny_shakespeare_char

PAIR = ("gpt-rope-3m", "moe-3m")


def run(data: Path, preset: str, a: argparse.Namespace, out: Path) -> dict:
    from slmkit.config import ModelConfig, TrainConfig
    from slmkit.train import train

    tc = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.steps // 10,
                     threads=a.threads, precision="fp32", seed=a.seed, eval_interval=10**9,
                     eval_batches=a.eval_batches, ckpt_interval=10**9, log_interval=10)
    r = train(data, out / preset, ModelConfig.preset(preset), tc, progress=False)
    meta = json.loads((out / preset / "meta.json").read_text())
    records = [json.loads(line) for line in (out / preset / "metrics.jsonl").read_text().splitlines()]
    util = next((rec["expert_util"] for rec in reversed(records) if "expert_util" in rec), None)
    return {"preset": preset, "val_bpb": r.val_bpb, "val_loss": r.val_loss, "tokens": r.tokens,
            "train_time": r.train_time, "tok_per_s": r.tokens_per_s, "total": meta["params"]["total"],
            "active": meta["params"]["active"], "expert_util": util}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args()
    data = prepare_tiny_shakespeare_char()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(data, p, a, Path(tmp)) for p in PAIR]
    print(f"\n{a.steps} steps × {a.batch_size} × 128 tokens = {results[0]['tokens']:,} tokens each, "
          f"char-level Shakespeare, {a.threads} threads, fp32")
    print(f"{'preset':>12} | {'total':>8} | {'active':>8} | {'val bpb':>8} | {'train s':>8} | {'tok/s':>7}")
    for r in results:
        print(f"{r['preset']:>12} | {r['total'] / 1e6:7.2f}M | {r['active'] / 1e6:7.2f}M | {r['val_bpb']:8.4f} | "
              f"{r['train_time']:8.1f} | {r['tok_per_s']:7,.0f}")
    dense, moe = results
    print(f"MoE − dense: {moe['val_bpb'] - dense['val_bpb']:+.4f} bpb at equal tokens "
          f"({'MoE better' if moe['val_bpb'] < dense['val_bpb'] else 'dense better or equal'}); "
          f"MoE/dense wall time ×{moe['train_time'] / dense['train_time']:.2f}")
    if moe["expert_util"]:
        print("expert utilisation at the last logged step (fraction of assignments per expert):")
        for i, u in enumerate(moe["expert_util"]):
            print(f"  layer {i}: " + " ".join(f"{x:.2f}" for x in u))


if __name__ == "__main__":
    main()
