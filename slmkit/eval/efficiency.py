"""`measure(model)`: the speed and memory of one model, by the same harness for every model — transformer or n-gram.

Everything is timed in a fresh Python process that loads only this model (`LLM.load`), so the peak RSS is the model's
own — not the evaluating process's, which may hold other models and data sets — and no earlier work has warmed or grown
its allocator. The child times the model only through the `LanguageModel` protocol (slmkit.model.protocol) and prints
one JSON line:

    prefill_tok_s       prompt tokens/s of one scoring pass over the prompt (`score`, batch 1)
    ttft_s              time to first token through `generate`: prefill + the first greedy token
    decode_tok_s        new tokens/s after the first, batch 1, through `generate` (the transformer's: the inference
                        engine with its KV cache and fused C decode)
    peak_rss_mb         peak resident memory (MiB) of the child; base_rss_mb: its resident memory before loading the
                        weights (Python + torch + slmkit)

plus the settings (threads, weights, prompt_tokens, new_tokens, repeats, method). Timings are the median of `repeats`
rounds after one untimed warm-up round. Size on disk and parameter counts are in eval.json's "model" block. The prompt
is the same English text for every model (cut to `prompt_tokens` tokens of its tokenizer); prompt + new tokens always
fit the context, so no timing includes the engine's context-window shift.

>>> measure("runs/smollm2", threads=2)["decode_tok_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from time import perf_counter
from typing import Any, get_args

import torch

from slmkit.compress.quantize import WeightDtype
from slmkit.errors import SlmError
from slmkit.model.protocol import LanguageModel
from slmkit.runtime import available_cores
from slmkit.sampling import SamplingParams

PROMPT_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it "
    "was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
    "Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing "
    "before us, we were all going direct to Heaven, we were all going direct the other way - in short, the period was "
    "so far like the present period, that some of its noisiest authorities insisted on its being received, for good "
    "or for evil, in the superlative degree of comparison only.\n"
)
CHILD = "import json, sys; from slmkit.eval.efficiency import _child; _child(json.loads(sys.argv[1]))"
METHOD = ("child process, threads={threads}, weights={weights}; greedy; median of {repeats} after a warm-up; prefill: "
          "one scoring pass over the prompt (LanguageModel.score); ttft/decode: LanguageModel.generate, decode = "
          "(n-1)/(t_n - t_1)")


def measure(
    path: str | Path,
    *,
    threads: int | None = None,
    weights: WeightDtype = "fp32",
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    repeats: int = 3,
) -> dict[str, Any]:
    """Prefill and decode speed, time to first token and peak memory of a model directory (a checkpoint, a run's
    latest checkpoint, an n-gram run), measured in a fresh process with `threads` threads (default: every core this
    process may use) and `weights` as in `LLM.load`. The prompt is cut to fit the context: at most `prompt_tokens`,
    leaving room for `new_tokens` (at most half the context).

    >>> e = measure("runs/gpt-rope-3m", threads=1)  # doctest: +SKIP
    >>> e["prefill_tok_s"], e["ttft_s"], e["decode_tok_s"], e["peak_rss_mb"]  # doctest: +SKIP
    """
    from slmkit import checkpoint

    if weights not in get_args(WeightDtype):
        raise SlmError(f"weights={weights!r}: use one of {', '.join(get_args(WeightDtype))}")
    for name, value, least in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2),
                               ("repeats", repeats, 1)):
        if value < least:
            raise SlmError(f"{name}={value} must be >= {least}")
    model_dir = checkpoint.resolve(path)  # what LLM.load reads: an n-gram run holds its weights itself
    threads = threads or available_cores()
    spec = {"path": str(model_dir), "threads": threads, "weights": weights, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats}
    # LLM.load pins torch's threads (and the C kernels share torch's pool); the variable covers any library that reads
    # only the environment, so nothing in the child runs more threads than the result reports
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                          check=False)
    last = proc.stdout.strip().splitlines()[-1:]
    result = json.loads(last[0]) if last and last[0].startswith("{") else {}
    if "error" in result:
        raise SlmError(result["error"])
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"measuring {model_dir} failed in its child process (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-3000:]}")
    return result


def _child(spec: dict[str, Any]) -> None:
    """The measuring process: load, time, print one JSON line (an SlmError becomes {"error": ...}, exit 2)."""
    from slmkit.api import LLM

    base = _rss_mb()[0]  # python + torch + slmkit, before any weight is read
    try:
        llm = LLM.load(spec["path"], threads=spec["threads"], weights=spec["weights"])
        block = llm.lm.context_length
        new = spec["new_tokens"] if block is None else min(spec["new_tokens"], block // 2)
        n_prompt = spec["prompt_tokens"] if block is None else min(spec["prompt_tokens"], block - new)
        prompt = _prompt_ids(llm.tokenizer, n_prompt)
        res = _bench(llm.lm, prompt, new_tokens=new, repeats=spec["repeats"])
    except SlmError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(2)
    print(json.dumps({**res, "peak_rss_mb": round(_rss_mb()[1], 1), "base_rss_mb": round(base, 1),
                      "threads": spec["threads"], "weights": spec["weights"], "prompt_tokens": len(prompt),
                      "new_tokens": new, "repeats": spec["repeats"], "method": METHOD.format(**spec)}))


def _rss_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process in MiB. Linux: /proc's VmRSS/VmHWM, because ru_maxrss is not
    this process's own — exec keeps the forking parent's high-water mark, so a child of a 2 GB evaluator would report
    2 GB. Elsewhere ru_maxrss for both (bytes on macOS)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024  # "123 kB"
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        return peak, peak


def _prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """`n` token ids of PROMPT_TEXT (repeated as needed), after a BOS when the tokenizer adds one."""
    text = PROMPT_TEXT
    try:
        ids = tokenizer.encode(text)
    except SlmError:  # a char tokenizer knows only its corpus's characters: keep the ones it has
        text = "".join(c for c in text if _encodes(tokenizer, c))
        ids = tokenizer.encode(text)
    if not ids:
        raise SlmError("the tokenizer encodes none of the efficiency prompt's characters")
    ids = [tokenizer.bos_id] * tokenizer.add_bos + ids * (n // len(ids) + 1)
    return ids[:n]


def _encodes(tokenizer: Any, c: str) -> bool:
    try:
        return bool(tokenizer.encode(c))
    except SlmError:
        return False


@torch.inference_mode()
def _bench(lm: LanguageModel, prompt: list[int], *, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Median timings of `repeats` rounds (after one untimed warm-up round) of `lm` on `prompt`; see the module
    docstring. `len(prompt) + new_tokens` must fit the context."""
    n_prompt = len(prompt)
    rounds = []
    # round 0 is a short warm-up: the first calls pay one-time costs (loading the C kernels, the allocator growing to
    # the prompt's activations) that no later prompt or token pays
    for r in range(repeats + 1):
        n_new = new_tokens if r else 2
        # scoring one more token conditions it on exactly the prompt: one pass over all n_prompt positions
        t0 = perf_counter()
        lm.score([([*prompt, prompt[-1]], 1)])
        prefill = n_prompt / (perf_counter() - t0)

        # no stop ids, so every round yields exactly n_new tokens
        t0 = perf_counter()
        stamps = [perf_counter() for _ in lm.generate(prompt, SamplingParams(n_new, temperature=0))]
        rounds.append((prefill, stamps[0] - t0, (n_new - 1) / (stamps[-1] - stamps[0])))
    keys, columns = ("prefill_tok_s", "ttft_s", "decode_tok_s"), zip(*rounds[1:], strict=True)
    return {k: round(statistics.median(v), 6 if k == "ttft_s" else 2) for k, v in zip(keys, columns, strict=True)}
