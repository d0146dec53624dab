"""Fine-tuning against real baselines (issue 18): domain adaptation, classification, LoRA vs full.

1. Domain adaptation: SmolLM2-135M (imported from the installed GGUF, as bench/decode.py does) fine-tuned on
   Shakespeare for `--minutes` with LoRA and with full fine-tuning: bits per byte on held-out Shakespeare before →
   after (in-domain gain), and on a held-out BBC slice (how much general text got worse).
2. LoRA vs full: trainable parameters, peak RSS (each fine-tune runs in its own process), tokens/s, quality.
3. Classification on BBC news, one stratified split (slmkit.finetune.load_labelled, seed 0, 10 % val, 10 % test) for
   every row: SmolLM2 + LoRA, a small model trained here (pretrained on the split's training texts only, then fully
   fine-tuned), and TF-IDF + logistic regression from scikit-learn (skipped with a message when it is missing) —
   test accuracy, macro-F1, what each costs to train and to run.

    python bench/finetune.py --minutes 10                   # the issue's tables (about an hour on 2 cores)
    python bench/finetune.py --parts classify --clf-minutes 5
    python bench/finetune.py --smoke                        # seconds: a tiny base, a few steps, tiny text slices

Markdown tables on stdout, with the CPU model; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE, cpu_model

SHK, BBC = "shakespeare:val", "bbc-news:val"


def tiny_base(root: Path) -> Path:
    """--smoke: a 2-layer model over a BPE vocabulary trained on a Shakespeare sample, written as a checkpoint."""
    from slmkit import checkpoint, run
    from slmkit.config import ModelConfig
    from slmkit.data.corpora import iter_documents
    from slmkit.model import GPT
    from slmkit.tokenizer import Tokenizer

    out = root / "tiny-base"
    if (out / "model.safetensors").exists():
        return out
    sample = [next(iter_documents("shakespeare")).text[:200_000]]
    tok = Tokenizer.train("bpe:512", sample)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=64, pos="rope",
                      norm="rmsnorm", mlp="swiglu")
    checkpoint.save(out, GPT(cfg).eval(), tok, run.new_meta("import", model_class="imported",
                                                             imported={"name": "tiny"}))
    return out


def slm(*args: str, threads: int | None = None) -> None:
    """One `slm` command in its own process (so its peak RSS is its own); its output goes to our stderr."""
    cmd = [sys.executable, "-m", "slmkit", *args, *(["--threads", str(threads)] if threads else [])]
    print("$ slm " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def bpb(run: Path, sets: list[str], max_bytes: int, threads: int) -> dict[str, float]:
    from slmkit.eval import evaluate

    ev = evaluate(run, lm=sets, max_bytes=max_bytes, threads=threads, progress=False)
    return {name: r["bpb"] for name, r in ev["lm"].items()}


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:,.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v:,.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def shakespeare_shards(base: Path, work: Path) -> Path:
    """Shakespeare tokenized with the base's tokenizer (seed 0, 10 % held out: what `shakespeare:val` names), prepared
    once per part for every run in it."""
    from slmkit.checkpoint import resolve

    shards = work / f"shakespeare-{base.name}"
    slm("data", "prepare", "--corpus", "shakespeare", "--tokenizer", str(resolve(base) / "tokenizer.json"), "--out",
        str(shards), "--overwrite", "--quiet")
    return shards


# --- 1 + 2: domain adaptation, LoRA vs full -------------------------------------------------------------------------


def domain(base: Path, work: Path, a: argparse.Namespace) -> str:
    from slmkit.run import read_meta

    before = bpb(base, [SHK, BBC], a.eval_bytes, a.threads)
    shards = shakespeare_shards(base, work)
    rows, costs = [], []
    extras = {"lora": ["--lora-rank", str(a.lora_rank), "--lora-alpha", str(2 * a.lora_rank)]
              + (["--lr", str(a.lora_lr)] if a.lora_lr else [])
              + (["--lora-plus", str(a.lora_plus)] if a.lora_plus else [])
              + (["--lora-layers", str(a.lora_layers)] if a.lora_layers else []),
              "full": ["--grad-checkpoint"]}
    for method in a.methods:
        extra = extras[method]
        out = work / f"domain-{method}"
        extra = extra + (["--schedule", a.schedule] if a.schedule else []) \
            + (["--warmup-steps", str(a.warmup_steps)] if a.warmup_steps is not None else [])
        slm("finetune", str(base), "--data", str(shards), "--task", "lm", "--method", method, *extra,
            "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), *a.budget, "--out", str(out),
            "--overwrite", "--quiet", threads=a.threads)
        after = bpb(out, [SHK, BBC], a.eval_bytes, a.threads)
        meta = read_meta(out)
        res = meta["result"]
        rows.append([method, before[SHK], after[SHK], before[SHK] - after[SHK], before[BBC], after[BBC],
                     after[BBC] - before[BBC], res["status"], res["step"]])
        costs.append([method, f"{meta['params']['trainable']:,} / {meta['params']['total']:,}",
                      f"{res['peak_rss_mb']:,.0f}", f"{res['tokens_per_s']:,.0f}", f"{res['train_time']:.0f}",
                      after[SHK], after[BBC]])
    return ("### Domain adaptation: Shakespeare bpb (held out) and a BBC slice\n\n"
            + table(["method", "Shakespeare before", "after", "gain", "BBC before", "after", "loss", "status",
                     "steps"], rows)
            + "\n\n### LoRA vs full fine-tuning\n\n"
            + table(["method", "trainable / total params", "peak RSS MB", "tokens/s", "train s", "Shakespeare bpb",
                     "BBC bpb"], costs))


# --- memory: what LoRA's options cost and save -----------------------------------------------------------------------

MEMORY = {  # label → slm finetune flags
    "LoRA": ["--method", "lora"],
    "LoRA + grad checkpointing": ["--method", "lora", "--grad-checkpoint"],
    "LoRA over an int8 base": ["--method", "lora", "--base-weights", "int8"],
    "LoRA over an int8 base + grad checkpointing": ["--method", "lora", "--base-weights", "int8", "--grad-checkpoint"],
    "full + grad checkpointing": ["--method", "full", "--grad-checkpoint"],
}


def memory(base: Path, work: Path, a: argparse.Namespace) -> str:
    """Each setting of MEMORY for --memory-steps steps at the domain part's shape, in its own process: peak RSS,
    tokens/s and the run's own held-out loss after those steps (a check that the cheaper settings still learn)."""
    from slmkit.run import read_meta

    shards = shakespeare_shards(base, work)
    rank = ["--lora-rank", str(a.lora_rank), "--lora-alpha", str(2 * a.lora_rank)]
    rows = []
    for label, flags in MEMORY.items():
        out = work / "memory"
        slm("finetune", str(base), "--data", str(shards), "--task", "lm", *flags,
            *(rank if "lora" in flags else []), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
            "--max-steps", str(a.memory_steps), "--eval-interval", str(a.memory_steps), "--set", "eval_windows=16",
            "--out", str(out), "--overwrite", "--quiet", threads=a.threads)
        meta = read_meta(out)
        res = meta["result"]
        rows.append([label, f"{meta['params']['trainable']:,}", f"{res['peak_rss_mb']:,.0f}",
                     f"{res['tokens_per_s']:,.0f}", f"{meta['before']['bpb']:.4f} → {meta['best']['bpb']:.4f}"])
    return (f"### Memory and speed of LoRA's options ({a.memory_steps} steps of {a.batch_size} x {a.seq_len} tokens "
            f"each)\n\n" + table(["setting", "trainable params", "peak RSS MB", "tokens/s",
                                   "val bpb (its own windows)"], rows))


# --- 3: classification on BBC news ----------------------------------------------------------------------------------


def predict_cost(run: Path, texts: list[str], threads: int) -> float:
    """Milliseconds per document to label `texts` with `Classifier.predict` (batch 16)."""
    from slmkit.finetune import Classifier

    clf = Classifier.load(run, threads=threads)
    t0 = time.perf_counter()
    clf.predict(texts)
    return 1000 * (time.perf_counter() - t0) / len(texts)


def tfidf_row(data: Any) -> list[Any]:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return ["TF-IDF + logistic regression", "skipped: scikit-learn is not installed", "", "", "", ""]
    import numpy as np

    from slmkit.finetune.loop import classification_metrics

    train, test = data.splits["train"], data.splits["test"]
    t0 = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(vec.fit_transform([t for t, _ in train]), [y for _, y in train])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = clf.predict(vec.transform([t for t, _ in test]))
    ms = 1000 * (time.perf_counter() - t0) / len(test)
    m = classification_metrics(np.asarray(pred), np.asarray([y for _, y in test]))
    return ["TF-IDF + logistic regression", m["accuracy"], m["macro_f1"], f"{fit_s:.1f}", f"{ms:.2f}",
            f"{len(vec.vocabulary_) * len(data.labels):,} weights"]


def classify(base: Path, work: Path, a: argparse.Namespace) -> str:
    from slmkit.finetune import load_labelled
    from slmkit.run import read_meta

    data = load_labelled("bbc-news", seed=0, val_fraction=0.1, test_fraction=0.1)
    test_texts = [t for t, _ in data.splits["test"]][: a.predict_docs]
    rows = []

    def row(name: str, out: Path, pretrain_s: float = 0.0) -> list[Any]:
        meta = read_meta(out)
        res, test = meta["result"], meta["test"]
        trained = f"{res['train_time'] + pretrain_s:.0f}" + (f" (+{pretrain_s:.0f} pretraining)" if pretrain_s else "")
        return [name, test["accuracy"], test["macro_f1"], trained, f"{predict_cost(out, test_texts, a.threads):.1f}",
                f"{meta['params']['trainable']:,} of {meta['params']['total']:,}"]

    out = work / "bbc-lora"
    slm("finetune", str(base), "--data", "bbc-news", "--task", "classify", "--method", "lora", "--lora-rank",
        str(a.lora_rank), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), *a.clf_budget,
        "--out", str(out), "--overwrite", "--quiet", threads=a.threads)
    rows.append(row(f"{base.name} + LoRA", out))

    # a small model trained here: pretrained on the classification split's training texts only (no test text is
    # ever seen), then fine-tuned in full with a head
    src = work / "bbc-train-texts"
    src.mkdir(parents=True, exist_ok=True)
    for i, (text, _) in enumerate(data.splits["train"]):
        (src / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    shards = work / "bbc-train-shards"
    slm("data", "prepare", "--corpus", str(src), "--tokenizer", f"bpe:{a.small_vocab}", "--out", str(shards),
        "--overwrite", "--quiet")
    small = work / "bbc-small-lm"
    slm("train", "--data", str(shards), "--preset", a.small_preset, *a.pretrain_budget, "--out", str(small),
        "--overwrite", "--quiet", threads=a.threads)
    pretrain_s = read_meta(small)["result"]["train_time"]
    out = work / "bbc-small-clf"
    slm("finetune", str(small), "--data", "bbc-news", "--task", "classify", "--method", "full", "--lr", "1e-3",
        "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), *a.clf_budget, "--out", str(out),
        "--overwrite", "--quiet", threads=a.threads)
    rows.append(row(f"{a.small_preset} trained here", out, pretrain_s))
    rows.append(tfidf_row(data))
    sizes = {s: len(r) for s, r in data.splits.items()}
    return (f"### BBC news classification ({len(data.labels)} topics; train/val/test {sizes['train']}/{sizes['val']}/"
            f"{sizes['test']}, stratified, seed 0)\n\n"
            + table(["model", "test accuracy", "macro-F1", "train s", "ms/doc to label", "trainable params"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["domain", "classify", "memory"], default=["domain", "classify"],
                    help="memory (not run by default): LoRA's memory options side by side, --memory-steps each")
    ap.add_argument("--memory-steps", type=int, default=12, help="steps per setting of the memory part (default 12)")
    ap.add_argument("--base", type=Path, help="the model to fine-tune (default: SmolLM2-135M imported from its GGUF)")
    ap.add_argument("--minutes", type=float, default=10, help="domain adaptation budget per method (default 10)")
    ap.add_argument("--clf-minutes", type=float, default=10, help="classification budget per model (default 10)")
    ap.add_argument("--small-preset", default="llama-3m", help="the small model trained here (default llama-3m)")
    ap.add_argument("--small-vocab", type=int, default=4096)
    ap.add_argument("--methods", nargs="+", choices=["lora", "full"], default=["lora", "full"],
                    help="domain part: which fine-tunes to run (default both)")
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; alpha is twice it (default 8)")
    ap.add_argument("--lora-lr", type=float, help="LoRA peak lr (default: slm finetune's)")
    ap.add_argument("--lora-plus", type=float, help="LoRA+ ratio: B learns at it x the lr (default: slm finetune's, 1)")
    ap.add_argument("--lora-layers", type=int, help="LoRA on the top N blocks only (default: slm finetune's, all)")
    ap.add_argument("--schedule", choices=["cosine", "wsd", "constant"], help="lr shape, both methods (default: "
                    "slm finetune's)")
    ap.add_argument("--warmup-steps", type=int, help="lr warm-up steps, both methods (default: slm finetune's, 20)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-bytes", type=int, default=200_000, help="bytes of each held-out set scored")
    ap.add_argument("--predict-docs", type=int, default=100, help="test documents timed for the labelling cost")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=CACHE / "finetune", help="where the runs go")
    ap.add_argument("--smoke", action="store_true", help="a tiny base, 3 steps, tiny slices: checks the script runs")
    a = ap.parse_args()

    a.budget = ["--max-time", f"{a.minutes}m"]
    a.clf_budget = ["--max-time", f"{a.clf_minutes}m"]
    a.pretrain_budget = ["--max-time", f"{a.clf_minutes}m"]
    tmp = None
    if a.smoke:
        tmp = tempfile.TemporaryDirectory()
        a.work = Path(tmp.name)
        a.budget = a.clf_budget = a.pretrain_budget = ["--max-steps", "3"]
        a.seq_len, a.batch_size, a.eval_bytes, a.predict_docs, a.memory_steps = 32, 2, 2000, 8, 3
        a.small_preset, a.small_vocab = "gpt-0.8m", 300
        base = a.base or tiny_base(a.work)
    elif a.base is None:
        from bench.decode import smollm2

        base = smollm2(CACHE)[1]
    else:
        base = a.base
    a.work.mkdir(parents=True, exist_ok=True)
    import slmkit

    print(f"CPU: {cpu_model()}; {a.threads} threads; slmkit {slmkit.__version__}; base {base}; "
          f"domain {' '.join(a.budget)} per method, classification {' '.join(a.clf_budget)} per model\n")
    parts = {"domain": domain, "classify": classify, "memory": memory}
    for name in a.parts:
        print(parts[name](base, a.work, a) + "\n", flush=True)
    print(json.dumps({"cpu": cpu_model(), "args": {k: str(v) for k, v in vars(a).items()}}), file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
