"""Exports in their own runtimes: one slmkit model exported as hf, gguf (F32, Q8_0) and onnx, then per format the file
size, the load time, and batch-1 greedy decode tok/s in transformers / llama.cpp / onnxruntime — next to slmkit
decoding the same model (fp32 and int8 weights) with the same threads, in the same run, interleaved, medians.

The model is the quickstart's (gpt-rope-3m on Shakespeare, BPE 2048, trained here for --train-time and cached under
~/.cache/slmkit-bench), or `--run DIR`. llama.cpp is the anchor (issue 16: slmkit ≥ 0.5× of it is the floor, ≥ 1×
the goal); it needs llama-cpp-python (`bash scripts/setup.sh peers`), and its rows are skipped without it.

    python bench/export.py [--run DIR] [--train-time 4m] [--new-tokens 128] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode import time_hf, time_llama_cpp, time_slmkit
from bench.quantize import parent_run

PROMPT = "ROMEO:\nWhat light through yonder window breaks?"


def time_onnx(lm, prompt: list[int], n: int) -> float:
    t = time.perf_counter()
    out = lm.generate(prompt, n)
    dt = time.perf_counter() - t
    assert len(out) == n
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a run or checkpoint to export (default: the quickstart model, trained here)")
    ap.add_argument("--preset", default="gpt-rope-3m")
    ap.add_argument("--train-time", default="4m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit import LLM
    from slmkit.compress import quantize
    from slmkit.interop.onnx_export import OnnxLM

    run = Path(args.run) if args.run else parent_run(args.preset, args.train_time, args.threads)
    llm = LLM.load(run, threads=args.threads)
    prompt = llm.tokenizer.encode(PROMPT, bos=llm.tokenizer.add_bos)
    n = args.new_tokens
    tmp = Path(tempfile.mkdtemp(prefix="slmkit-export-bench-"))
    rows: dict[str, dict] = {}  # name → {"mb", "load_s", "timer": (fn, obj)}

    def timed_load(fn):
        t = time.perf_counter()
        obj = fn()
        return obj, time.perf_counter() - t

    def size(path: Path) -> float:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "meta.json") / 1e6

    m, dt = timed_load(lambda: LLM.load(run, threads=args.threads).model)
    ckpt_mb = sum(p.stat().st_size for p in Path(llm.path).glob("model.safetensors")) / 1e6
    rows["slmkit fp32"] = {"mb": ckpt_mb, "load_s": dt, "timer": (time_slmkit, m)}
    m8, dt8 = timed_load(lambda: quantize(LLM.load(run, threads=args.threads).model, "int8"))
    rows["slmkit int8"] = {"mb": float("nan"), "load_s": dt8, "timer": (time_slmkit, m8)}

    exports = {}
    for name, fmt, kw in (("hf", "hf", {}), ("gguf f32", "gguf", {}), ("gguf q8_0", "gguf", {"quant": "q8_0"}),
                          ("onnx", "onnx", {})):
        t = time.perf_counter()
        exports[name] = llm.export(fmt, tmp / name.replace(" ", "-"), **kw)
        print(f"exported {name} in {time.perf_counter() - t:.1f}s: {size(exports[name]):.1f} MB")

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf, dt = timed_load(lambda: AutoModelForCausalLM.from_pretrained(exports["hf"]).eval())
    rows["transformers (hf)"] = {"mb": size(exports["hf"]), "load_s": dt, "timer": (time_hf, hf)}
    ox, dt = timed_load(lambda: OnnxLM(exports["onnx"], threads=args.threads))
    rows["onnxruntime (onnx)"] = {"mb": size(exports["onnx"]), "load_s": dt, "timer": (time_onnx, ox)}
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        for name in ("gguf f32", "gguf q8_0"):
            path = exports[name] / "model.gguf"
            ll, dt = timed_load(lambda path=path: Llama(model_path=str(path), n_ctx=llm.config.block_size,
                                                        n_threads=args.threads, n_threads_batch=args.threads,
                                                        verbose=False))
            rows[f"llama.cpp ({name})"] = {"mb": size(exports[name]), "load_s": dt, "timer": (time_llama_cpp, ll)}
    else:
        print("llama-cpp-python is not installed (bash scripts/setup.sh peers): no llama.cpp rows")

    # the same greedy tokens everywhere (fp32 runtimes), before timing anything
    from slmkit.infer.engine import SamplingParams, generate

    k = min(32, llm.config.block_size - len(prompt) - 1)
    ours = list(generate(m, prompt, SamplingParams(max_new_tokens=k, temperature=0.0)))
    theirs = {"onnxruntime": ox.generate(prompt, k)}
    ids = torch.tensor([prompt])
    theirs["transformers"] = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=k,
                                         min_new_tokens=k, pad_token_id=0)[0, len(prompt):].tolist()
    if "llama.cpp (gguf f32)" in rows:
        ll = rows["llama.cpp (gguf f32)"]["timer"][1]
        ll.reset()
        stream = ll.generate(prompt, top_k=1, temp=0.0, reset=True)
        theirs["llama.cpp F32"] = [next(stream) for _ in range(k)]
    for name, got in theirs.items():
        same = next((i for i, (a, b) in enumerate(zip(got, ours, strict=False)) if a != b), min(len(got), k))
        print(f"{name}: greedy tokens equal to slmkit's for the first {same}/{k}")

    n = min(n, llm.config.block_size - len(prompt) - 1)
    speeds: dict[str, list[float]] = {name: [] for name in rows}
    for r in rows.values():  # warm-up
        fn, obj = r["timer"]
        fn(obj, prompt, 4)
    for rep in range(args.repeats):
        for name, r in rows.items():
            fn, obj = r["timer"]
            if fn is time_llama_cpp:
                speeds[name].append((n - 1) / fn(obj, prompt, n))
            else:
                t1, tn = fn(obj, prompt, 1), fn(obj, prompt, n)
                speeds[name].append((n - 1) / (tn - t1))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in speeds.items()))

    anchor = statistics.median(speeds["llama.cpp (gguf f32)"]) if "llama.cpp (gguf f32)" in speeds else None
    print(f"\n{run}: {n} new tokens after a {len(prompt)}-token prompt, {args.threads} threads, medians of "
          f"{args.repeats}")
    print("| runtime | MB | load s | decode tok/s | vs llama.cpp F32 |\n|---|---|---|---|---|")
    for name, r in rows.items():
        med = statistics.median(speeds[name])
        ratio = f"{med / anchor:.2f}x" if anchor else "-"
        print(f"| {name} | {r['mb']:.1f} | {r['load_s']:.2f} | {med:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
