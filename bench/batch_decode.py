"""Continuous-batching decode throughput: SmolLM2-135M (int8 weights by default) decoding N sequences at once with
BatchDecoder (one C call per step for all N, each weight read once per step) vs one stream with FusedDecoder (one
call per token), same model, same run, same thread count.

Each of the N cache slots is prefilled with the prompt through `cache.slot(b)`; then every step feeds each sequence
its greedy next token at its own position. Aggregate tokens/s = N × steps / time of the steps; the per-stream rate
(steps / time) is what each client sees. Runs are interleaved (one stream, N = 1, 8, 32, repeat) and medians
reported, because the machine is shared. Before timing, the batched greedy tokens of every slot are checked against
the one-stream decoder's (they compute the same arithmetic per row).

    python bench/batch_decode.py [--batch 1 8 32] [--steps 32] [--repeats 3] [--threads 2] [--dtype int8] [--kv fp32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE
from bench.decode import PROMPT, smollm2


def one_stream(model, prompt: list[int], steps: int, kv: str) -> tuple[float, list[int]]:
    """Seconds of `steps` FusedDecoder steps after the prompt, and the greedy tokens."""
    from slmkit.infer.fused import FusedDecoder

    cache = model.new_cache(1, len(prompt) + steps, kv=kv)
    with torch.inference_mode():
        nxt = int(model(torch.tensor([prompt]), cache=cache, last_only=True)[0][0, -1].argmax())
        dec = FusedDecoder.for_model(model, cache)
        assert dec is not None, "the model does not decode through the C step"
        out, t = [], time.perf_counter()
        for i in range(steps):
            out.append(nxt)
            nxt = int(dec(nxt, len(prompt) + i).argmax())
        return time.perf_counter() - t, out


def batched(model, prompt: list[int], n: int, steps: int, kv: str) -> tuple[float, list[list[int]]]:
    """Seconds of `steps` BatchDecoder steps over n sequences (slots in reverse order, to show order is free), and
    each slot's greedy tokens."""
    from slmkit.infer.fused import BatchDecoder

    cache = model.new_cache(n, len(prompt) + steps, kv=kv)
    with torch.inference_mode():
        first = []
        for b in range(n):  # what a server does per request
            first.append(int(model(torch.tensor([prompt]), cache=cache.slot(b), last_only=True)[0][0, -1].argmax()))
        dec = BatchDecoder.for_model(model, cache)
        assert dec is not None, "the model does not decode through the C step"
        slots = list(reversed(range(n)))
        tokens = [first[b] for b in slots]
        out: list[list[int]] = [[] for _ in range(n)]
        t = time.perf_counter()
        for i in range(steps):
            for b, tok in zip(slots, tokens, strict=True):
                out[b].append(tok)
            tokens = dec(tokens, slots, [len(prompt) + i] * n).argmax(-1).tolist()
        return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="int8", choices=["fp32", "bf16", "int8", "int4"])
    ap.add_argument("--kv", default="fp32", choices=["fp32", "bf16", "int8"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit import LLM
    from slmkit.compress import quantize

    _, run = smollm2(CACHE)
    llm = LLM.load(run, threads=args.threads)
    model = quantize(copy.deepcopy(llm.model), args.dtype) if args.dtype != "fp32" else llm.model
    prompt = llm.tokenizer.encode(PROMPT, bos=llm.tokenizer.add_bos)

    _, ref = one_stream(model, prompt, 16, args.kv)  # also the warm-up: kernels built, pages touched
    for n in args.batch:
        _, got = batched(model, prompt, n, 16, args.kv)
        print(f"N={n}: every slot's greedy tokens equal one stream's: {all(g == ref for g in got)}")
    print(f"sample: {PROMPT}{llm.tokenizer.decode(ref)!r}")

    single: list[float] = []
    rates: dict[int, list[float]] = {n: [] for n in args.batch}
    for r in range(args.repeats):
        single.append(args.steps / one_stream(model, prompt, args.steps, args.kv)[0])
        for n in args.batch:
            rates[n].append(n * args.steps / batched(model, prompt, n, args.steps, args.kv)[0])
        print(f"repeat {r + 1}/{args.repeats}: one stream {single[-1]:.1f} tok/s, " +
              ", ".join(f"N={n} {v[-1]:.1f}" for n, v in rates.items()))
    one = statistics.median(single)
    print(f"\nSmolLM2-135M {args.dtype} weights, kv {args.kv}, {args.threads} threads, {args.steps} steps after a "
          f"{len(prompt)}-token prompt, medians of {args.repeats}")
    print(f"{'decode':16s} {'aggregate tok/s':>16s} {'per stream':>11s} {'vs one stream':>14s}")
    print(f"{'one stream':16s} {one:16.1f} {one:11.1f} {'1.00x':>14s}")
    for n, v in rates.items():
        agg = statistics.median(v)
        print(f"{'batch N=' + str(n):16s} {agg:16.1f} {agg / n:11.1f} {f'{agg / one:.2f}x':>14s}")


if __name__ == "__main__":
    main()
