"""`evaluate(run)`: every measurement of one model — held-out text, multiple-choice tasks, efficiency — as one dict.

The dict is what `slm eval` writes to eval.json and `slm compare` reads; its keys are a contract:

    {"model": {"path", "name", "model_class", "params_total", "params_active", "bytes_on_disk", "tokenizer",
               "block_size", ...},
     "lm": {"<set>": {"loss_nats_per_token", "perplexity", "bpb", "tokens", "bytes", ...}},
     "tasks": {"<task>": {"acc", "acc_norm", "acc_macro", "acc_norm_macro", "n", "shots", "limit",
                          "subjects": {...}, "prompt": {...}}},
     "efficiency": {"prefill_tok_s", "ttft_s", "decode_tok_s", "decode_batch_tok_s", "peak_rss_mb", "base_rss_mb",
                    "threads", "weights", "prompt_tokens", "new_tokens", ...},  # only with efficiency=True
     "versions": {...}, "elapsed_s": float}
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit.compress.quantize import WeightDtype, quantize
from slmkit.errors import SlmError
from slmkit.eval.lm import Scorer, encode_documents, evaluate_docs, gpt_scorer, nll_scorer, resolve_text_set
from slmkit.eval.mc import run_task
from slmkit.runtime import set_threads
from slmkit.versions import versions


@dataclass
class Loaded:
    """A model ready to score: the object, its tokenizer, its meta.json, where it came from and what it is."""

    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    path: Path  # the checkpoint (or n-gram run) directory actually read
    model_class: str


def load_for_eval(path: str | Path) -> Loaded:
    """A checkpoint or run directory — a transformer checkpoint (native or imported) or an n-gram run."""
    from slmkit import checkpoint
    from slmkit.model.ngram import NgramLM, is_ngram_run
    from slmkit.tokenizer import Tokenizer

    path = Path(path)
    if is_ngram_run(path):
        meta = checkpoint.read_json(path / "meta.json")
        return Loaded(NgramLM.load(path), Tokenizer.load(path / "tokenizer.json"), meta, path, "ngram")
    ckpt = checkpoint.load(path)
    run_meta_file = ckpt.path.parent.parent / "meta.json"  # run/checkpoints/step_N → run/meta.json
    in_run = ckpt.path.parent.name == "checkpoints" and run_meta_file.exists()
    run_meta = checkpoint.read_json(run_meta_file) if in_run else {}
    model_class = ckpt.meta.get("model_class") or run_meta.get("model_class")
    if not model_class:
        model_class = "moe" if getattr(ckpt.model.config, "moe_experts", 0) > 0 else "dense"
    return Loaded(ckpt.model, ckpt.tokenizer, {**run_meta, **ckpt.meta}, ckpt.path, model_class)


def scorer_for(loaded: Loaded, *, context: int | None = None, on_batch: Any = None) -> Scorer:
    """The per-token scorer of a loaded model (transformer or n-gram)."""
    if loaded.model_class == "ngram":
        return nll_scorer(loaded.model.nll, on_batch=on_batch)
    return gpt_scorer(loaded.model, context=context, on_batch=on_batch)


def model_info(loaded: Loaded, given: str | Path) -> dict[str, Any]:
    """The "model" block of eval.json."""
    model, tok = loaded.model, loaded.tokenizer
    num_params = model.num_params
    total = num_params()
    active = num_params(active=True) if "active" in inspect.signature(num_params).parameters else total
    weights = loaded.path / "model.safetensors"
    given = Path(given)
    name = given.resolve().name if loaded.path.parent.name != "checkpoints" else loaded.path.parent.parent.name
    cfg = getattr(model, "config", None)
    return {
        "path": str(loaded.path),
        "name": name,
        "model_class": loaded.model_class,
        "params_total": int(total),
        "params_active": int(active),
        "bytes_on_disk": weights.stat().st_size if weights.exists() else None,
        "tokenizer": getattr(tok, "spec", type(tok).__name__),
        "vocab_size": tok.vocab_size,
        "block_size": getattr(cfg, "block_size", None),
        "step": loaded.meta.get("step"),
    }


def first_bytes(texts: Sequence[str], n: int) -> list[str]:
    """The documents in order up to `n` UTF-8 bytes in all; the last one cut (at a character boundary)."""
    out: list[str] = []
    for text in texts:
        raw = text.encode("utf-8")
        if len(raw) >= n:
            if n:
                out.append(raw[:n].decode("utf-8", errors="ignore"))
            break
        out.append(text)
        n -= len(raw)
    return out


def _split_params(loaded: Loaded, source: str) -> dict[str, Any]:
    """The seed/val_fraction the model's training data was split with, when it was prepared from `source`, so
    `<source>:val` is exactly the held-out part; otherwise `slm data prepare`'s defaults."""
    from slmkit.data import load_meta

    data = loaded.meta.get("data")
    with contextlib.suppress(SlmError, OSError, TypeError, KeyError):
        meta = load_meta(data)
        same = meta["source"] == source or Path(meta["source"]).resolve() == Path(source).resolve()
        if same:
            return {"seed": meta["seed"], "val_fraction": meta["val_fraction"]}
    return {"seed": 0, "val_fraction": 0.1}


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not (enabled and console.is_terminal)) as bar:
        yield bar


def evaluate(
    path: str | Path,
    *,
    lm: Sequence[str] = ("shakespeare:val",),
    tasks: Sequence[str] = (),
    shots: int = 0,
    limit: int | None = None,
    efficiency: bool = False,
    threads: int | None = None,
    progress: bool = False,
    stride: int | None = None,
    context: int | None = None,
    max_bytes: int | None = None,
    weights: WeightDtype = "fp32",
) -> dict[str, Any]:
    """Evaluate a checkpoint or run directory; returns the eval.json dict (see the module docstring).

    `lm`: held-out text sets (`shakespeare:val`, `shakespeare:folio`, `bbc-news:val`, `path[:split]`), scored with a
    sliding window of `stride` tokens (default: half the context; `context` caps the window, default the model's
    block_size). `tasks`: multiple-choice task names or YAML paths,
    `shots`-shot, at most `limit` questions per subject. `efficiency`: also time prefill, time to first token and
    decoding and read the peak memory, in a fresh process with `threads` threads (`slmkit.eval.efficiency.measure`).
    `max_bytes`: score only the first N bytes of each text set (documents in order, the last one cut), the same text
    for every model. `weights`: "int8"/"bf16" quantize the linear layers first (slmkit.compress.quantize), so a
    compressed model is measured like any other.

    >>> m = evaluate("runs/smollm2", lm=["shakespeare:val"], tasks=["mmlu"], limit=20)  # doctest: +SKIP
    >>> m["lm"]["shakespeare:val"]["bpb"], m["tasks"]["mmlu"]["acc"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    set_threads(threads)
    if max_bytes is not None and max_bytes < 1:
        raise SlmError(f"max_bytes={max_bytes} must be >= 1")
    loaded = load_for_eval(path)
    eff = None
    if efficiency:  # first, so an n-gram run fails before minutes of scoring
        from slmkit.eval.efficiency import measure

        # in a fresh process: the model's own peak RSS
        eff = measure(loaded.path, threads=threads, weights=weights)
    out: dict[str, Any] = {"model": {**model_info(loaded, path), "weights": weights}, "lm": {}, "tasks": {}}
    if weights != "fp32":
        if loaded.model_class == "ngram":
            raise SlmError("an n-gram model has no weights to quantize; drop --weights")
        quantize(loaded.model, weights)
    with _progress(progress) as bar:
        task_id = bar.add_task("", total=None)

        def advance(k: int) -> None:
            bar.advance(task_id, k)

        scorer = scorer_for(loaded, context=context, on_batch=advance)
        for name in lm:
            source = name.rpartition(":")[0] or name
            texts, about = resolve_text_set(name, **_split_params(loaded, source))
            if max_bytes is not None:
                texts, about = first_bytes(texts, max_bytes), {**about, "max_bytes": max_bytes}
            docs = list(encode_documents(loaded.tokenizer, texts))
            bar.reset(task_id, description=f"lm {name}", total=None)
            res = evaluate_docs(scorer, docs, stride=stride)
            out["lm"][name] = {**res, **about, "context": scorer.context,
                               "stride": stride or max(1, (scorer.context or 2) // 2)}
        for task in tasks:
            bar.reset(task_id, description=f"task {task}", total=None)
            res = run_task(scorer, loaded.tokenizer, task, shots=shots, limit=limit,
                           on_total=lambda n: bar.update(task_id, total=n))
            out["tasks"][Path(task).stem if str(task).endswith((".yaml", ".yml")) else str(task)] = res
    if eff is not None:
        out["efficiency"] = eff
    out["versions"] = versions()
    out["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return out


def metrics_table(metrics: dict[str, Any]) -> Any:
    """A rich renderable of an eval dict: a table with one row per LM set (nats/token, ppl, bpb, tokens scored) and
    per task (acc, acc_norm, questions), and under it the efficiency figures when the dict has them."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    m = metrics["model"]
    title = f"{m['name']} ({m['model_class']}, {m['params_total'] / 1e6:.1f}M params, tokenizer {m['tokenizer']})"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)  # light borders: fits 80 columns
    for col in ("set / task", "nats/tok", "ppl", "bpb", "acc", "acc_norm", "n"):
        table.add_column(col, justify="left" if col == "set / task" else "right", no_wrap=True, min_width=len(col))
    for name, r in metrics.get("lm", {}).items():
        table.add_row(name, f"{r['loss_nats_per_token']:.4f}", f"{r['perplexity']:.2f}", f"{r['bpb']:.4f}", "", "",
                      f"{r['tokens']:,}")
    for name, r in metrics.get("tasks", {}).items():
        limit = "" if r["limit"] is None else f", ≤{r['limit']}/subj"
        label = f"{name} {r['shots']}-shot{limit}"
        table.add_row(label, "", "", "", f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}", f"{r['n']:,}")
    if not metrics.get("efficiency"):
        return table
    return Group(table, _efficiency_table(metrics["efficiency"], m))


def _efficiency_table(e: dict[str, Any], m: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    def rate(v: float) -> str:
        return f"{v:,.1f} tok/s" if v < 100 else f"{v:,.0f} tok/s"

    def mb(v: float) -> str:
        return f"{v:,.1f} MB" if v < 100 else f"{v:,.0f} MB"

    threads = e.get("threads")
    about = ", ".join(x for x in (threads and f"{threads} thread{'s' if threads > 1 else ''}",
                                  e.get("weights") and f"{e['weights']} weights",
                                  e.get("repeats") and f"median of {e['repeats']}") if x)
    title = f"efficiency ({about})" if about else "efficiency"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, min_width=len(title))
    table.add_column("measure", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    rows = (
        (f"prefill, {e.get('prompt_tokens')}-token prompt", e.get("prefill_tok_s"), rate),
        ("time to first token", e.get("ttft_s"), lambda v: f"{v * 1e3:,.1f} ms" if v < 1 else f"{v:.2f} s"),
        ("decode, batch 1", e.get("decode_tok_s"), rate),
        (f"decode, batch {e.get('batch')} (all rows)", e.get("decode_batch_tok_s"), rate),
        ("peak RSS", e.get("peak_rss_mb"), mb),
        ("RSS before loading the weights", e.get("base_rss_mb"), mb),
        ("on disk", m.get("bytes_on_disk"), lambda v: f"{v / 1e6:,.1f} MB" if v >= 1e5 else f"{v / 1e3:.0f} KB"),
        ("params total / active", m.get("params_total"),
         lambda v: f"{v / 1e6:.2f}M / {m.get('params_active', v) / 1e6:.2f}M"),
    )
    for label, value, fmt in rows:
        if value is not None:
            table.add_row(label, fmt(value))
    return table
