"""Causal attention core for training: SDPA's CPU kernel vs the explicit path of `slmkit.model.attention`.

Forward + backward of the attention core alone (q, k, v → output; no projections) at shapes the presets and imported
models train with (grouped-query heads where they have them: SmolLM2-135M is 9 query / 3 key-value heads, hd 64),
fp32 and bf16, 2 threads (--threads). `explicit` is what `causal_attention` runs for bf16 up to EXPLICIT_MAX_T tokens
(queries in blocks of EXPLICIT_BLOCK positions, each scored against the keys it may see); `one block` is the explicit
path as it was before the blocks (the whole T×T score matrix at once, key/value heads repeated for grouped queries);
`sdpa` is `F.scaled_dot_product_attention(is_causal=True)`. The numbers set EXPLICIT_MAX_T and EXPLICIT_BLOCK. Runs
are interleaved and the median of --repeats rounds is printed, with the ratios to `explicit`.

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

# (B, query heads, key/value heads, T, hd)
SHAPES = [(12, 4, 4, 64, 32), (8, 4, 4, 256, 32), (8, 6, 6, 256, 64), (4, 6, 6, 512, 64), (2, 9, 3, 512, 64),
          (2, 6, 6, 1024, 64), (1, 9, 3, 2048, 64)]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


def one_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The explicit path before query blocks: all T×T scores in one baddbmm, grouped key/value heads repeated."""
    B, nh, n, hd = q.shape
    k, v = (x.repeat_interleave(nh // x.size(1), dim=1).reshape(B * nh, n, hd) for x in (k, v))
    future = torch.full((n, n), float("-inf"), dtype=q.dtype).triu(1)
    scores = torch.baddbmm(future.expand(B * nh, n, n), q.reshape(B * nh, n, hd), k.mT, alpha=hd**-0.5)
    return (scores.softmax(dim=-1) @ v).view(B, nh, n, hd)


def time_one(fn, shape: tuple[int, ...], dtype: torch.dtype, iters: int) -> float:
    """Mean ms of one forward + backward over `iters` calls after 3 warm-ups. q, k and v are laid out as the model
    makes them (views of one (B, T, heads, hd) projection) and the output is reshaped as the model hands it to the
    output projection, (B, T, heads·hd)."""
    B, nh, nkv, T, hd = shape
    q = torch.randn(B, T, nh, hd, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, T, nkv, hd, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    g = torch.randn(B, T, nh * hd, dtype=dtype)
    for _ in range(3):
        fn(q, k, v).transpose(1, 2).reshape(B, T, nh * hd).backward(g)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(q, k, v).transpose(1, 2).reshape(B, T, nh * hd).backward(g)
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = {"sdpa": sdpa, "explicit": explicit, "one block": one_block}
    print(f"forward + backward ms, {args.threads} threads, median of {args.repeats} interleaved rounds")
    print(f"{'B,h,kv,T,hd':>16s} {'dtype':>6s} {'sdpa':>8s} {'explicit':>9s} {'one block':>10s} "
          f"{'sdpa/explicit':>14s} {'one block/explicit':>19s}")
    for shape in SHAPES:
        iters = max(3, 20 * 256 // shape[3])
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            times: dict[str, list[float]] = {p: [] for p in paths}
            for _ in range(args.repeats):
                for p, fn in paths.items():
                    times[p].append(time_one(fn, shape, dtype, iters))
            s, e, o = (statistics.median(times[p]) for p in paths)
            print(f"{','.join(map(str, shape)):>16s} {name:>6s} {s:8.2f} {e:9.2f} {o:10.2f} {s / e:13.2f}x "
                  f"{o / e:18.2f}x", flush=True)


if __name__ == "__main__":
    main()
