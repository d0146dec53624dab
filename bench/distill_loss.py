"""The training losses' cost against PyTorch's cross-entropy, forward + backward over one batch of logits: slmkit's
cross-entropy (slm train, slm finetune) and the distillation loss (slm distill).

At a 49,152-token vocabulary (SmolLM2's) a small student's step is mostly its head and the loss over the (N, V)
logits, so what `slm distill` adds to a step is roughly what this ratio says. Interleaved repeats, medians.

    python bench/distill_loss.py                         # N = 2,048 positions (batch 8 × 256), V = 49,152, top-64
    python bench/distill_loss.py --positions 512 --vocab 4096 --top-k 32
    python bench/distill_loss.py --dtype bf16            # logits as bf16 autocast leaves them
    python bench/distill_loss.py --head 576              # the head's matmul and the loss together, from (N, 576)
                                                         # hidden states under bf16 autocast, the head frozen (LoRA)
    python bench/distill_loss.py --head 576 --train-head # ... the head trained too (pretraining, full fine-tuning)

Markdown on stdout with the CPU model; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_model


def compare(cases: dict[str, Callable[[Any], Any]], timed: Callable[[Callable[[Any], Any]], float], repeats: int,
            what: str, header: str) -> None:
    """Time every case `repeats` times, interleaved after two warm-up rounds, and print the medians against the
    first case's as a markdown table under `header`."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats + 2):
        for name, fn in cases.items():
            s = timed(fn)
            if r >= 2:
                times[name].append(s)
    base = statistics.median(next(iter(times.values())))
    print(header + "\n")
    print(f"| {what} | ms | × PyTorch's |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {1000 * statistics.median(ts):,.0f} | {statistics.median(ts) / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the logits' dtype")
    ap.add_argument("--head", type=int, metavar="C", help="time the head (V × C) and the loss together instead, from "
                    "hidden states of width C under bf16 autocast: PyTorch's F.linear + F.cross_entropy, slmkit's "
                    "logits path, slmkit's linear_cross_entropy (GPT.forward with targets)")
    ap.add_argument("--train-head", action="store_true", help="with --head: the head weight is trained too")
    a = ap.parse_args()
    if a.head:
        return head(a)

    import torch
    import torch.nn.functional as F

    from slmkit.distill import distill_loss
    from slmkit.model.loss import cross_entropy

    torch.set_num_threads(a.threads)
    N, V, k = a.positions, a.vocab, a.top_k
    g = torch.Generator().manual_seed(0)
    z0, zt = 3 * torch.randn(N, V, generator=g), 3 * torch.randn(N, V, generator=g)
    z0 = z0.to(torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    lp = (zt / a.temperature).log_softmax(-1)
    top, ids = lp.topk(k, -1)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    y = torch.randint(0, V, (N,), generator=g)
    rows = (ids.int().view(1, N, k), top.half().view(1, N, k), rest.view(1, N))

    def timed(loss: Callable[[torch.Tensor], torch.Tensor]) -> float:
        z = z0.clone().requires_grad_()
        t = time.perf_counter()
        loss(z).backward()
        return time.perf_counter() - t

    cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "PyTorch F.cross_entropy(logits.float())": lambda z: F.cross_entropy(z.float(), y),
        "slmkit cross_entropy (slm train, slm finetune)": lambda z: cross_entropy(z, y),
        f"mix, α={a.alpha}, T={a.temperature}, top-{k} (slm distill)": lambda z: distill_loss(
            z.view(1, N, V), y.view(1, N), *rows, loss="mix", alpha=a.alpha, temperature=a.temperature),
    }
    compare(cases, timed, a.repeats, "loss, forward + backward",
            f"CPU: {cpu_model()}; {a.threads} threads; N={N:,} positions, V={V:,}, {a.dtype} logits; "
            f"median of {a.repeats} interleaved")


def head(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from slmkit.model.loss import cross_entropy, linear_cross_entropy

    torch.set_num_threads(a.threads)
    N, V, C = a.positions, a.vocab, a.head
    g = torch.Generator().manual_seed(0)
    h0, w = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) / C**0.5
    w.requires_grad_(a.train_head)
    y = torch.randint(0, V, (N,), generator=g)

    def timed(loss: Callable[[torch.Tensor], torch.Tensor]) -> float:
        h = h0.clone().requires_grad_()
        w.grad = None
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(h)
        out.backward()
        return time.perf_counter() - t

    cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "PyTorch F.linear + F.cross_entropy(logits.float())": lambda h: F.cross_entropy(F.linear(h, w).float(), y),
        "slmkit F.linear + cross_entropy (the logits path)": lambda h: cross_entropy(F.linear(h, w), y),
        "slmkit linear_cross_entropy (GPT.forward with targets)": lambda h: linear_cross_entropy(h, w, y),
    }
    compare(cases, timed, a.repeats, "head + loss, forward + backward",
            f"CPU: {cpu_model()}; {a.threads} threads; N={N:,} positions, head {V:,} × {C}, bf16 autocast, head "
            f"{'trained' if a.train_head else 'frozen'}; median of {a.repeats} interleaved")


if __name__ == "__main__":
    main()
