"""The one-pass RMSNorm, SwiGLU and RoPE kernels (slmkit/model/elementwise.py) against PyTorch's operators.

1. Each op alone, forward + backward, at the shapes a SmolLM2-135M step at 2 × 512 tokens runs it (RMSNorm of the
   fp32 residual (1024, 576) → bf16; SwiGLU (1024, 2 × 1536) bf16; RoPE of 9 query and 3 key heads of 64 out of the
   fused q/k/v output), under bf16 autocast: `kernels` vs `torch` (the
   same code with the kernels switched off: PyTorch's operators as they ran before).
2. The whole LoRA training step (rank 16 on every block's linears, AdamW, bf16 autocast, the frozen head and loss
   fused) of SmolLM2-135M imported from the installed GGUF (as bench/decode.py does), on 2 × 512 Shakespeare tokens
   (a random llama preset with --preset), with the kernels and without — one model, alternating steps.

Every row is interleaved with its peer (the order reversed every other round) and the median of --repeats rounds is
printed with the ratio, because the machine is shared and its speed drifts within minutes. 2 threads (--threads).

    python bench/fused_step.py [--repeats 10] [--threads 2] [--preset llama-30m]
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
from bench.common import CACHE, cpu_model
from slmkit import kernels
from slmkit.model import elementwise as E
from slmkit.runtime import autocast, set_threads


def alternate(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn over `repeats` rounds, each round running all of them, reversed every other round."""
    for fn in fns.values():  # warm-up: oneDNN picks its kernels, the C library loads
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def switched(fn: Callable[[], None], fused: bool) -> Callable[[], None]:
    """fn with the kernels on, or off (elementwise.fused_ok answering no: PyTorch's formulas)."""
    def run() -> None:
        saved = E.fused_ok
        if not fused:
            E.fused_ok = lambda x: False  # type: ignore[assignment]
        try:
            with autocast("bf16"):
                fn()
        finally:
            E.fused_ok = saved  # type: ignore[assignment]
    return run


def ops(repeats: int) -> list[tuple[str, float, float]]:
    from slmkit.model.attention import project_qkv
    from slmkit.model.gpt import Rotary

    g = torch.Generator().manual_seed(0)
    N, C, H, nh, nkv, hd = 1024, 576, 1536, 9, 3, 64
    norm = E.RMSNorm(C, eps=1e-5, bf16_out=True)
    x = torch.randn(2, N // 2, C, generator=g).requires_grad_()
    dy = torch.randn(2, N // 2, C, generator=g).bfloat16()
    h = torch.randn(2, N // 2, 2 * H, generator=g).bfloat16().requires_grad_()
    dh = torch.randn(2, N // 2, H, generator=g).bfloat16()

    class QKV(torch.nn.Module):  # project_qkv's view of an attention module, the projection already done
        def __init__(self) -> None:
            super().__init__()
            self.nh, self.nkv, self.hd, self.rotary = nh, nkv, hd, Rotary(hd, 2048, 100000.0)
            self.out = torch.randn(2, N // 2, (nh + 2 * nkv) * hd, generator=g).bfloat16().requires_grad_()

        def qkv(self, _: torch.Tensor) -> torch.Tensor:
            return self.out

    m = QKV()
    dq = torch.randn(2, nh, N // 2, hd, generator=g).bfloat16()
    dk = torch.randn(2, nkv, N // 2, hd, generator=g).bfloat16()

    def rope() -> None:
        q, k, _ = project_qkv(m, x, 0)
        torch.autograd.backward([q, k], [dq, dk])

    cases = {"RMSNorm (1024, 576) fp32 → bf16": lambda: norm(x).backward(dy),
             "SwiGLU (1024, 2 × 1536) bf16": lambda: E.swiglu(h).backward(dh),
             "RoPE q and k (1024, 9 + 3 heads × 64) bf16": rope}
    rows = []
    for name, fn in cases.items():
        t = alternate({"kernels": switched(fn, True), "torch": switched(fn, False)}, repeats)
        rows.append((name, t["kernels"] * 1e3, t["torch"] * 1e3))
    return rows


def step_model(preset: str | None) -> tuple[str, torch.nn.Module, torch.Tensor]:
    from slmkit.finetune import lora

    if preset:
        from slmkit.config import ModelConfig
        from slmkit.model import GPT

        model, what = GPT(ModelConfig.preset(preset, vocab_size=49152)), f"{preset} (random init)"
        tokens = torch.randint(0, 49152, (2, 513), generator=torch.Generator().manual_seed(0))
    else:
        from bench.decode import smollm2
        from slmkit.data.corpora import iter_documents
        from slmkit.finetune.model import load_base

        base = load_base(smollm2(CACHE)[1])
        model, what = base.model, "SmolLM2-135M"
        text = next(iter_documents("shakespeare")).text[:20_000]
        ids = base.tokenizer.encode(text)[: 2 * 513]
        tokens = torch.tensor(ids, dtype=torch.long).view(2, 513)
    lora.add_lora(model, rank=16, alpha=32)  # freezes the rest
    return what, model, tokens


def whole_step(repeats: int, preset: str | None) -> tuple[str, float, float]:
    what, model, tokens = step_model(preset)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = alternate({"kernels": switched(step, True), "torch": switched(step, False)}, repeats)
    return f"LoRA step, {what}, 2 × 512 tokens", t["kernels"], t["torch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default=None, help="time the step on this preset (random init) instead of SmolLM2")
    a = ap.parse_args()
    set_threads(a.threads)
    if not kernels.available():
        sys.exit("bench/fused_step.py needs the C kernels (a C compiler)")
    print(f"CPU: {cpu_model()}; {a.threads} threads; median of {a.repeats} interleaved rounds\n")
    print("| forward + backward | kernels ms | PyTorch ms | speed-up |\n|---|---|---|---|")
    for name, k, t in ops(a.repeats):
        print(f"| {name} | {k:.2f} | {t:.2f} | {t / k:.2f}x |")
    name, k, t = whole_step(a.repeats, a.preset)
    print("\n| step | kernels s | PyTorch s | kernels tokens/s | PyTorch tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| {name} | {k:.3f} | {t:.3f} | {1024 / k:.0f} | {1024 / t:.0f} | {t / k:.2f}x |")


if __name__ == "__main__":
    main()
