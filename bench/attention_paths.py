"""Causal attention core for training: SDPA's CPU kernel vs the explicit path of `slmkit.model.attention`.

Forward + backward of the attention core alone (q, k, v → output; no projections) at shapes the presets train with,
fp32 and bf16, 2 threads (--threads). `explicit` is what `causal_attention` runs for bf16 up to EXPLICIT_MAX_T tokens
(scores materialised by one baddbmm, softmax over them); `sdpa` is `F.scaled_dot_product_attention(is_causal=True)`.
The numbers set EXPLICIT_MAX_T. Runs are interleaved and the median of --repeats rounds is printed.

    python bench/attention_paths.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slmkit.model.attention import explicit_causal_attention as explicit

SHAPES = [(12, 4, 64, 32), (8, 4, 256, 32), (8, 6, 256, 64), (4, 6, 512, 64), (2, 6, 1024, 64)]  # (B, heads, T, hd)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_one(fn, shape: tuple[int, ...], dtype: torch.dtype, iters: int) -> float:
    """Mean ms of one forward + backward over `iters` calls after 3 warm-ups."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(*shape, dtype=dtype)
    for _ in range(3):
        fn(q, k, v).backward(g)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(q, k, v).backward(g)
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"forward + backward ms, {args.threads} threads, median of {args.repeats} interleaved rounds")
    print(f"{'B,h,T,hd':>16s} {'dtype':>6s} {'sdpa':>8s} {'explicit':>9s} {'sdpa/explicit':>14s}")
    for shape in SHAPES:
        iters = max(5, 20 * 256 // shape[2])
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            times: dict[str, list[float]] = {"sdpa": [], "explicit": []}
            for _ in range(args.repeats):
                times["sdpa"].append(time_one(sdpa, shape, dtype, iters))
                times["explicit"].append(time_one(explicit, shape, dtype, iters))
            s, e = statistics.median(times["sdpa"]), statistics.median(times["explicit"])
            print(f"{','.join(map(str, shape)):>16s} {name:>6s} {s:8.2f} {e:9.2f} {s / e:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
