"""Peak memory of decoding SmolLM2-135M, each case in a fresh process: `slm generate` on the fp32 import, on int8 and
int4 checkpoints written by `slm quantize` (loaded packed, never widened), and with a bf16 / int8 KV cache — against
what it has to hold: the packed weight file + the KV cache, over the Python + torch + slmkit baseline (a process that
imports the same modules and decodes nothing).

    target (issue 14): peak RSS of int4 ≤ 1.3 × (model.safetensors + KV cache) + baseline

    python bench/memory.py [--prompt-tokens 1024] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE
from bench.decode import PROMPT, smollm2

CHILD = """
import json, sys
argv = json.loads(sys.argv[1])
import torch
from slmkit import cli
from slmkit.api import LLM  # the modules generate imports, for the baseline too
if argv:
    with open("/dev/null", "w") as null:
        stdout, sys.stdout = sys.stdout, null
        code = cli.main(argv)
        sys.stdout = stdout
    assert code in (0, None), code
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a large parent starts at the parent's size
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def peak_rss(argv: list[str]) -> int:
    """Peak resident bytes of a fresh Python running `slm ARGV` (nothing when ARGV is empty)."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from slmkit.api import LLM
    from slmkit.compress.stage import quantize_run

    _, run = smollm2(CACHE)
    runs = {"fp32": run}
    for weights in ("int8", "int4"):
        out = CACHE / f"smollm2-135m-{weights}"
        if not (out / "meta.json").exists():
            quantize_run(run, out, weights=weights, overwrite=True)
        runs[weights] = out
    llm = LLM.load(run)
    prompt = llm.tokenizer.decode(llm.tokenizer.encode(f"{PROMPT} " * args.prompt_tokens)[: args.prompt_tokens])
    cfg = llm.model.config
    positions = min(cfg.block_size, args.prompt_tokens + args.new_tokens + 8)
    del llm

    base = peak_rss([])
    print(f"baseline (python + torch + slmkit imported): {base / 1e6:.0f} MB")
    print(f"{'weights':8s} {'kv':5s} {'file MB':>8s} {'KV MB':>6s} {'peak MB':>8s} {'over base':>10s} "
          f"{'(peak-base)/(file+KV)':>22s}")
    for weights, path in runs.items():
        file = (Path(path) / "model.safetensors").stat().st_size if (Path(path) / "model.safetensors").exists() \
            else sum(p.stat().st_size for p in Path(path).rglob("model.safetensors"))
        for kv in ("fp32", "bf16", "int8") if weights == "int4" else ("fp32",):
            width = {"fp32": 4, "bf16": 2, "int8": 1}[kv]
            kv_bytes = 2 * cfg.n_layer * cfg.n_kv_head * positions * cfg.head_dim * width
            kv_bytes += 2 * cfg.n_layer * cfg.n_kv_head * positions * 4 if kv == "int8" else 0  # row scales
            argv = ["generate", str(path), "--prompt", prompt, "--max-new-tokens", str(args.new_tokens),
                    "--temperature", "0", "--threads", str(args.threads), "--kv-cache", kv]
            peak = peak_rss(argv)
            print(f"{weights:8s} {kv:5s} {file / 1e6:8.1f} {kv_bytes / 1e6:6.1f} {peak / 1e6:8.0f} "
                  f"{(peak - base) / 1e6:9.0f}  {(peak - base) / (file + kv_bytes):21.2f}x")


if __name__ == "__main__":
    main()
