"""Attention scaling: forward time and peak memory of one attention layer of each kind at contexts 256 → 4096.

One layer as in the *-3m presets (d=192, 6 heads of 32; local w=64; block-sparse b=32, 4 global, 2 summary; linear
m=64 features; LSH 8 buckets × 2 rounds, 32 keys per bucket), batch 1, 2 torch threads (--threads), fp32, inference
mode, q/k/v and output projections included. The peer is full attention measured in the same run:

- `full`      — what the model runs: SDPA with is_causal (on CPU this dispatches to a flash-style kernel that never
                materialises the T×T scores, so its memory is O(T) while its time is O(T²));
- `full-math` — SDPA forced to the math backend, which materialises the T×T score matrix: the textbook O(T²) memory.

Each (kind, T) point runs in two fresh subprocesses. Memory: ru_maxrss after the first forward minus ru_maxrss just
before it, with glibc told to serve every allocation ≥ 64 KB by mmap (so freed setup memory is not silently reused
and resident-set growth is the forward's real footprint). Time: median of `--reps` forwards after one warm-up, in a
process with the default allocator (the mmap setting makes every large temporary page-fault afresh, which would
penalise the kinds with more intermediate tensors).

    python bench/attention_scaling.py [--reps 5] [--lengths 256 512 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ["full", "full-math", "local", "blocksparse", "linear", "lsh"]
LAYER = dict(n_embd=192, n_head=6, n_layer=1, pos="rope", bias=False, attn_window=64, attn_block=32, attn_global=4,
             attn_summary=2, linear_features=64, lsh_buckets=8, lsh_hashes=2)
LSH_WINDOW = 32


def point(kind: str, T: int, reps: int, threads: int, mode: str) -> dict:
    """Measure one (kind, T) in this process (run it in a fresh one): mode 'mem' (peak) or 'time'."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slmkit.config import ModelConfig
    from slmkit.model import GPT

    torch.set_num_threads(threads)
    attention = "full" if kind.startswith("full") else kind
    fields = dict(LAYER, attn_window=LSH_WINDOW) if kind == "lsh" else LAYER
    model = GPT(ModelConfig(vocab_size=256, block_size=T, attention=attention, **fields)).eval()
    block = model.blocks[0]
    x = torch.randn(1, T, LAYER["n_embd"])
    ctx = sdpa_kernel(SDPBackend.MATH) if kind == "full-math" else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        if mode == "mem":
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            block.attn(x, None, 0)
            return {"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
        block.attn(x, None, 0)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            block.attn(x, None, 0)
            times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (default 2; use 1 when another process holds a core: 2 threads on 1 free core "
                         "spin against each other and every point takes ~100+ ms)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    ap.add_argument("--point", nargs=3, metavar=("KIND", "T", "MODE"), help=argparse.SUPPRESS)  # internal
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if a.point:
        print(json.dumps(point(a.point[0], int(a.point[1]), a.reps, a.threads, a.point[2])))
        return

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(a.threads))
    res: dict[tuple[str, int], dict] = {}
    for T in a.lengths:
        for kind in a.kinds:
            res[kind, T] = {"kind": kind, "T": T}
            for mode in ("mem", "time"):
                out = subprocess.run(
                    [sys.executable, __file__, "--point", kind, str(T), mode, "--reps", str(a.reps),
                     "--threads", str(a.threads)],
                    env=dict(env, MALLOC_MMAP_THRESHOLD_="65536") if mode == "mem" else env,
                    capture_output=True, text=True, check=True)
                res[kind, T].update(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {kind:12s} T={T:5d} {res[kind, T]['ms']:9.2f} ms {res[kind, T]['peak_mb']:9.1f} MB",
                  file=sys.stderr)

    for metric, unit in (("ms", "forward time, ms (median)"), ("peak_mb", "peak memory of the forward, MB")):
        print(f"\n{unit}; in brackets: ratio to `full` at the same T ({a.threads} threads, batch 1)")
        print(f"{'T':>6} | " + " | ".join(f"{k:>18}" for k in a.kinds))
        for T in a.lengths:
            base = res["full", T][metric] if "full" in a.kinds else None
            cells = []
            for k in a.kinds:
                v = res[k, T][metric]
                ratio = f" ({v / base:5.2f}x)" if base and k != "full" else ""
                cells.append(f"{v:9.1f}{ratio}".rjust(18))
            print(f"{T:>6} | " + " | ".join(cells))
    if len(a.lengths) > 1:
        lo, hi = a.lengths[0], a.lengths[-1]
        print(f"\ngrowth from T={lo} to T={hi} ({hi // lo}x longer): time ×, memory ×")
        for k in a.kinds:
            t = res[k, hi]["ms"] / res[k, lo]["ms"]
            m = res[k, hi]["peak_mb"] / max(res[k, lo]["peak_mb"], 1e-3)
            print(f"  {k:12s} time ×{t:7.1f}   memory ×{m:7.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(list(res.values()), indent=1))


if __name__ == "__main__":
    main()
