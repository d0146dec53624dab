"""One optimizer step. Muon: torch.optim.Muon (matrix by matrix) vs slmkit's Muon (matrices of one shape batched), on
the 16 hidden matrices of a preset (default gpt-rope-0.8m). AdamW with gradient clipping, on all the preset's
parameters: torch.optim.AdamW(fused=True) + clip_grad_norm_ vs slmkit's AdamW + clip_gradients (one fused call per
group, the clip folded into it). Random gradients, 2 threads, interleaved rounds, medians.

    python bench/muon_step.py [--preset gpt-rope-0.8m] [--repeats 5] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-rope-0.8m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    from slmkit.config import ModelConfig
    from slmkit.model import GPT
    from slmkit.train.optim import AdamW, Muon, clip_gradients

    torch.set_num_threads(2)
    model = GPT(ModelConfig.preset(args.preset, vocab_size=65))
    groups = {g["kind"]: g["params"] for g in model.param_groups(0.1)}
    matrices = groups["matrix"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    # the same hyperparameters for both Muons: lr 0.05, momentum 0.95, Nesterov, Keller's shape scaling
    def torch_adamw_clipped() -> Callable[[], None]:
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, fused=True)
        return lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), opt.step())

    def slmkit_adamw_clipped() -> Callable[[], None]:
        opt = AdamW(model.param_groups(0.1), lr=1e-3)
        return lambda: (clip_gradients(opt, 1.0), opt.step())

    makers: dict[str, Callable[[], Callable[[], object]]] = {  # each returns one step
        "torch.optim.Muon": lambda: torch.optim.Muon(matrices, lr=0.05, weight_decay=0.1,
                                                     adjust_lr_fn="original").step,
        "slmkit Muon": lambda: Muon(matrices, lr=0.05, weight_decay=0.1).step,
        "torch AdamW fused + clip": torch_adamw_clipped,
        "slmkit AdamW + clip": slmkit_adamw_clipped,
    }
    times: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(args.repeats):
        for name, make in makers.items():
            step = make()
            step()  # warm-up (state allocation)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    shapes = sorted({tuple(p.shape) for p in matrices})
    print(f"{args.preset}: {len(matrices)} matrices of shapes {shapes} (Muon rows), all parameters (AdamW rows); "
          f"ms per optimizer step, median of "
          f"{args.repeats}")
    for name, t in times.items():
        print(f"{name:26s} {statistics.median(t):7.2f} ms")


if __name__ == "__main__":
    main()
