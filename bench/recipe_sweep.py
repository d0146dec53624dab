"""Recipe sweep for bench/time_to_loss.py: train each variant for a fixed time budget, report its full-val loss.

Reads one JSON object per line on stdin: TrainConfig overrides on top of the base recipe, plus optional "preset" and
"model" (ModelConfig overrides). Each line is a separate run on the fixed char-level split, one after another (never
two at once: 2-thread jobs side by side slow each other 20-40x).

    printf '%s\\n' '{}' '{"optimizer": "muon", "muon_lr": 0.08, "batch_size": 32}' | python bench/recipe_sweep.py 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import prepare_tiny_shakespeare_char
from bench.time_to_loss import run_slmkit

BASE = dict(batch_size=16, lr=6e-3, warmup_steps=20, min_lr_ratio=0.1, schedule="cosine", precision="auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budget", type=float, help="seconds of training per variant")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = prepare_tiny_shakespeare_char()
    for line in sys.stdin:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec = json.loads(line)
        preset, model = spec.pop("preset", "gpt-rope-0.8m"), spec.pop("model", {})
        wall, val, steps, tps = run_slmkit(data, args.budget, {**BASE, **spec}, preset, model)
        print(f"full-val {val:.4f}  wall {wall:5.1f}s  {steps:4d} steps  {tps:7,.0f} tok/s  {preset} {model or ''} "
              f"{spec}", flush=True)


if __name__ == "__main__":
    main()
