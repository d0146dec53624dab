"""Distillation vs training from scratch at the same student wall-clock (issue 15).

One student preset (default llama-3m: ~12M parameters at SmolLM2's 49,152-token vocabulary, most of them the tied
embedding) is trained twice on Shakespeare tokenized with SmolLM2's tokenizer, for the same training time (--budget:
slmkit's max_time, optimisation only — evaluation and checkpoints are not in it), with the same batches per step:

    scratch    slm train: next-token cross-entropy on random windows of the train split (hard labels)
    distilled  slm distill from SmolLM2-135M-Instruct (imported from the installed GGUF as bench/decode.py does) with
               --loss / --temperature / --alpha / --top-k, on --windows cached train windows (default: all of them)

The teacher pass that fills the cache is timed and reported apart from the student's time; it runs once per teacher,
data and cache settings, so sweeping --loss, --alpha or the budget reuses it (a --temperature, --top-k or --windows
change builds another). Each model is scored with slmkit's eval in bits per byte on the first --eval-bytes of
in-domain (shakespeare:val) and out-of-domain (shakespeare:folio, bbc-news:val) held-out text; the teacher too, as
the reference. Δ is each row minus the scratch student (negative: better than scratch).

    python bench/distill.py --budget 10m                                   # the issue's comparison
    python bench/distill.py --budget 10m --loss fkl --temperature 2 --top-k 32
    python bench/distill.py --smoke                                        # seconds: tiny settings, checks it runs

Finished runs under --work are reused (a sweep trains the scratch student once). Markdown on stdout with the CPU
model; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE, cpu_model
from bench.finetune import bpb, slm, table

SETS = ["shakespeare:val", "shakespeare:folio", "bbc-news:val"]


def finished(run: Path) -> bool:
    from slmkit.run import kind_of, read_meta

    return kind_of(run) is not None and read_meta(run).get("status") == "finished"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="10m", help="student training time, each (default 10m)")
    ap.add_argument("--student", default="llama-3m", help="student preset (default llama-3m)")
    ap.add_argument("--loss", choices=["fkl", "rkl", "mix"], default="mix")
    ap.add_argument("--alpha", type=float, default=0.5, help="mix: weight of the KL term (default 0.5)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--windows", type=int, help="train windows cached (default: every one of the train split)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per step, both students (default 8)")
    ap.add_argument("--lr", type=float, help="peak learning rate, both students (default: slm train's)")
    ap.add_argument("--eval-bytes", type=int, default=200_000, help="bytes of each held-out set scored")
    ap.add_argument("--no-teacher-eval", action="store_true", help="skip scoring the teacher (minutes at 135M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=CACHE / "distill", help="where the runs go")
    ap.add_argument("--smoke", action="store_true", help="3 steps, 4 windows, tiny slices: checks the script runs")
    a = ap.parse_args()

    from bench.decode import smollm2
    from slmkit import __version__
    from slmkit.checkpoint import resolve
    from slmkit.data import load_meta
    from slmkit.run import read_meta

    budget = ["--max-time", a.budget]
    cache: list[str] = []
    tmp = None
    if a.smoke:
        tmp = tempfile.TemporaryDirectory()
        a.work = Path(tmp.name)
        budget, a.windows, a.batch_size, a.eval_bytes, a.no_teacher_eval = ["--max-steps", "3"], 4, 2, 2000, True
        a.student = "gpt-0.8m"
        cache = ["--cache", str(a.work / "teacher-cache")]  # not beside the shared shards: a smoke cache is no use
    a.work.mkdir(parents=True, exist_ok=True)
    teacher = smollm2(CACHE)[1]
    data = CACHE / "shakespeare-smollm2"  # Shakespeare with the teacher's tokenizer (seed 0, 10 % val), kept
    if not (data / "meta.json").exists():
        slm("data", "prepare", "--corpus", "shakespeare", "--tokenizer", str(resolve(teacher) / "tokenizer.json"),
            "--out", str(data), "--quiet")

    common = ["--data", str(data), "--batch-size", str(a.batch_size), *budget, "--quiet", "--overwrite",
              *(["--lr", str(a.lr)] if a.lr else [])]
    tag = f"{a.student}-{'-'.join(budget).strip('-')}-b{a.batch_size}" + (f"-lr{a.lr}" if a.lr else "")
    scratch = a.work / f"scratch-{tag}"
    if not finished(scratch):
        slm("train", "--preset", a.student, "--out", str(scratch), *common, threads=a.threads)
    recipe = ["--loss", a.loss, "--alpha", str(a.alpha), "--temperature", str(a.temperature), "--top-k", str(a.top_k),
              *(["--windows", str(a.windows)] if a.windows else [])]
    distilled = a.work / f"distill-{tag}-{a.loss}-a{a.alpha}-T{a.temperature}-k{a.top_k}-w{a.windows or 'all'}"
    if not finished(distilled):
        slm("distill", "--teacher", str(teacher), "--student", a.student, "--out", str(distilled), *recipe, *cache,
            *common, threads=a.threads)

    scores = {run: bpb(run, SETS, a.eval_bytes, a.threads) for run in (scratch, distilled)}
    base = scores[scratch]

    train_tokens = load_meta(data)["splits"]["train"]["tokens"]

    def row(name: str, meta: dict[str, Any] | None, s: dict[str, float], teacher_s: str) -> list[Any]:
        if meta is None:  # the teacher: scored, not trained here
            trained: list[Any] = ["135M", "-", "-", "-"]
        else:
            r = meta["result"]
            epochs = meta.get("epochs", r["tokens"] / train_tokens)  # distill: passes over its cached windows
            trained = [f"{meta['params']['total'] / 1e6:.1f}M", f"{r['train_time']:.0f}", r["step"], f"{epochs:.2f}"]
        return [name, *trained, teacher_s, *[x for set_ in SETS for x in (s[set_], s[set_] - base[set_])]]

    d = read_meta(distilled)
    c = d["cache"]
    cached_tokens = c["spec"]["windows"] * c["spec"]["seq_len"]
    rows = [row("scratch (hard labels)", read_meta(scratch), base, "-"),
            row(f"distilled ({a.loss}, T={a.temperature}, α={a.alpha}, k={c['spec']['top_k']})", d,
                scores[distilled], f"{c['teacher_time']:.0f}")]
    if not a.no_teacher_eval:
        rows.append(row(f"teacher {teacher.name}", None, bpb(teacher, SETS, a.eval_bytes, a.threads), "-"))
    header = ["model", "params", "train s", "steps", "epochs", "teacher pass s",
              *[x for set_ in SETS for x in (f"{set_} bpb", "Δ")]]
    print(f"CPU: {cpu_model()}; {a.threads} threads; slmkit {__version__}; student {a.student}, "
          f"{' '.join(budget)} each, batch {a.batch_size}; first {a.eval_bytes:,} bytes of each set\n")
    print(table(header, rows))
    print(f"\nteacher pass: {c['spec']['windows']:,} windows × {c['spec']['seq_len']} tokens = {cached_tokens:,} "
          f"tokens in {c['teacher_time']:.0f}s ({cached_tokens / max(c['teacher_time'], 1e-9):,.0f} tok/s), "
          f"precision {c['spec']['precision']}; cache {c['dir']}")
    print(json.dumps({"cpu": cpu_model(), "args": {k: str(v) for k, v in vars(a).items()}}), file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
