"""`evaluate(run)`: every measurement of one model — held-out text, multiple-choice tasks, efficiency — as one dict.

The dict is what `slm eval` writes to eval.json and `slm compare` reads; its keys are a contract:

    {"model": {"path", "name", "model_class", "params_total", "params_active", "params_non_embedding",
               "bytes_on_disk", "tokenizer", "block_size", "weights", "checkpoint": {"path", "bytes", "mtime_ns"}, ...},
     "lm": {"<set>": {"loss_nats_per_token", "perplexity", "bpb", "tokens", "bytes", ...,
                      "weights", "context", "stride", "max_bytes"}},
     "tasks": {"<task>": {"acc", "acc_norm", "acc_macro", "acc_norm_macro", "n", "shots", "limit", "weights",
                          "context", "subjects": {...}, "prompt": {...}}},
     "efficiency": {"prefill_tok_s", "ttft_s", "decode_tok_s", "peak_rss_mb", "base_rss_mb",
                    "threads", "weights", "prompt_tokens", "new_tokens", ...},  # only with efficiency=True
     "versions": {...}, "elapsed_s": float}

Each measurement records every setting that changes its numbers (the weights, the window, the text, the questions, the
threads) and the model block pins the checkpoint read, so `slm compare` reuses an entry only when it was measured as it
would measure it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from slmkit import checkpoint, run
from slmkit.api import LLM
from slmkit.compress.quantize import WeightDtype
from slmkit.data.textsets import resolve_text_set
from slmkit.errors import SlmError
from slmkit.eval import efficiency as efficiency_of
from slmkit.eval.kl import kl_divergence
from slmkit.eval.lm import default_stride, encode_documents, evaluate_docs, scorer
from slmkit.eval.mc import run_task
from slmkit.runtime import set_threads
from slmkit.versions import versions


def weights_file(path: Path) -> Path:
    """The weights a checkpoint directory holds: model.safetensors, or for a fine-tune that kept only its LoRA
    adapter (`slm finetune --adapter-only`), adapter.safetensors."""
    full = path / "model.safetensors"
    return full if full.exists() or not (path / "adapter.safetensors").exists() else path / "adapter.safetensors"


def checkpoint_stamp(path: Path) -> dict[str, Any]:
    """Which weights were read: the directory, and the size and modification time of its weights file (a
    retrained or replaced checkpoint of the same name differs in them)."""
    stat = weights_file(path).stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def bytes_on_disk(llm: LLM) -> int:
    """What running the model needs on disk: its weights file, and for an adapter-only fine-tune its base's too."""
    own = weights_file(llm.path)
    if own.name != "adapter.safetensors":
        return own.stat().st_size
    from slmkit.finetune.model import pinned_base

    return own.stat().st_size + weights_file(checkpoint.resolve(pinned_base(llm.meta, llm.path))).stat().st_size


def model_info(llm: LLM, given: str | Path) -> dict[str, Any]:
    """The "model" block of eval.json (without "weights", which the caller knows)."""
    params, tok = llm.lm.params(), llm.tokenizer
    in_run = llm.path.parent.name == "checkpoints"
    return {
        "path": str(llm.path),
        "name": llm.path.parent.parent.name if in_run else Path(given).resolve().name,
        "model_class": llm.lm.model_class,
        "params_total": params.total,
        "params_active": params.active,
        "params_non_embedding": params.non_embedding,
        "bytes_on_disk": bytes_on_disk(llm),
        "tokenizer": getattr(tok, "spec", type(tok).__name__),
        "vocab_size": tok.vocab_size,
        "block_size": llm.lm.context_length,
        "step": llm.meta.get("step"),
        "checkpoint": checkpoint_stamp(llm.path),
    }


def task_name(task: str | Path) -> str:
    """The key of a task in eval.json: a YAML file's stem, else the name given (`mmlu`)."""
    return Path(task).stem if str(task).endswith((".yaml", ".yml")) else str(task)


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


def _training_data(meta: dict[str, Any]) -> dict[str, Any] | None:
    """meta.json of the data directory the model was trained on, when it has one that is still there."""
    from slmkit.data import load_meta

    with contextlib.suppress(SlmError, OSError, TypeError, KeyError):
        return load_meta(meta["data"])
    return None


def own_val_set(meta: dict[str, Any], path: str | Path) -> str:
    """`<source>:val`, the held-out part of the text the model was trained on: `evaluate`'s default set."""
    data = _training_data(meta)
    if data is None or not data.get("source"):
        why = f"its data directory {meta['data']} is gone" if meta.get("data") else "e.g. an imported model"
        raise SlmError(f"{path} has no training text of its own to hold out ({why}); name held-out text with --lm, "
                       "e.g. --lm shakespeare:val, --lm bbc-news:val or --lm path/to/notes.txt")
    return f"{data['source']}:val"


def _split_params(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """The seed/val_fraction the model's training data was split with, when it was prepared from `source`, so
    `<source>:val` is exactly the held-out part; otherwise `slm data prepare`'s defaults."""
    data = _training_data(meta)
    with contextlib.suppress(KeyError, TypeError, OSError):
        if data is not None and (data["source"] == source or Path(data["source"]).resolve() == Path(source).resolve()):
            return {"seed": data["seed"], "val_fraction": data["val_fraction"]}
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
    lm: Sequence[str] | None = None,
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
    kl_to: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint, run or n-gram run directory; returns the eval.json dict (see the module docstring).

    `lm`: held-out text sets (`shakespeare:val`, `shakespeare:folio`, `bbc-news:val`, `path[:split]`); default: the
    val split of the text the model was trained on (a model without one, e.g. an imported checkpoint, must name its
    sets). Scored with a sliding window of `stride` tokens (default: half the context; `context` caps the window,
    default the model's block_size). `tasks`: multiple-choice task names or YAML paths,
    `shots`-shot, at most `limit` questions per subject. `efficiency`: also time prefill, time to first token and
    decoding and read the peak memory, in a fresh process with `threads` threads (`slmkit.eval.efficiency.measure`).
    `max_bytes`: score only the first N bytes of each text set (documents in order, the last one cut), the same text
    for every model. `weights`: "int8"/"int4"/"bf16" quantize the linear layers first (slmkit.compress.quantize), so a
    compressed model is measured like any other. `kl_to`: a reference model (a directory, or "parent": the one its
    meta.json lineage names) — each text set also gets the per-token KL divergence from it (slmkit.eval.kl).

    >>> m = evaluate("runs/smollm2", lm=["shakespeare:val"], tasks=["mmlu"], limit=20)  # doctest: +SKIP
    >>> m["lm"]["shakespeare:val"]["bpb"], m["tasks"]["mmlu"]["acc"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    set_threads(threads)
    if max_bytes is not None and max_bytes < 1:
        raise SlmError(f"max_bytes={max_bytes} must be >= 1")
    llm = LLM.load(path, threads=threads, weights=weights)
    lm = [own_val_set(llm.meta, path)] if lm is None else lm
    # first, so a model the harness cannot time fails before minutes of scoring; in a fresh process, so the peak RSS
    # is the model's own
    eff = efficiency_of.measure(llm.path, threads=threads, weights=weights) if efficiency else None
    reference = None if kl_to is None else LLM.load(_reference(llm, kl_to, path), threads=threads)
    out: dict[str, Any] = {"model": {**model_info(llm, path), "weights": weights}, "lm": {}, "tasks": {}}
    if reference is not None:
        out["kl"] = {}
    with _progress(progress) as bar:
        task_id = bar.add_task("", total=None)

        def advance(k: int) -> None:
            bar.advance(task_id, k)

        score = scorer(llm.lm, context=context, on_batch=advance)
        for name in lm:
            source = name.rpartition(":")[0] or name
            texts, about = resolve_text_set(name, **_split_params(llm.meta, source))
            if max_bytes is not None:
                texts = first_bytes(texts, max_bytes)
            docs = list(encode_documents(llm.tokenizer, texts))
            bar.reset(task_id, description=f"lm {name}", total=None)
            res = evaluate_docs(score, docs, stride=stride)
            out["lm"][name] = {**res, **about, "weights": weights, "context": score.context,
                               "stride": stride or default_stride(score.context), "max_bytes": max_bytes}
            if reference is not None:
                bar.reset(task_id, description=f"KL to {reference.path} on {name}", total=None)
                out["kl"][name] = {**kl_divergence(llm, reference, texts, context=context, stride=stride),
                                   "reference": str(reference.path), "weights": weights, "max_bytes": max_bytes}
        for task in tasks:
            bar.reset(task_id, description=f"task {task}", total=None)
            res = run_task(score, llm.tokenizer, task, shots=shots, limit=limit,
                           on_total=lambda n: bar.update(task_id, total=n))
            out["tasks"][task_name(task)] = {**res, "weights": weights, "context": score.context}
    if eff is not None:
        out["efficiency"] = eff
    out["versions"] = versions()
    out["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return out


def _reference(llm: LLM, kl_to: str | Path, given: str | Path) -> Path:
    """The directory `kl_to` names; "parent" is the parent recorded in the model's lineage."""
    if str(kl_to) != "parent":
        return Path(kl_to)
    parent = ((llm.meta.get("lineage") or {}).get("parent") or {}).get("path")
    if not parent or run.kind_of(parent) not in run.MODEL_KINDS:  # a trained run's parent is its data
        raise SlmError(f"{given} records no parent model to compare with (its meta.json lineage); give --kl-to DIR")
    return Path(parent)


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
    parts = [table]
    if metrics.get("kl"):
        kl = Table(title="KL divergence from the reference, nats/token", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("set", "mean", "median", "p99", "max", "same top-1", "tokens"):
            kl.add_column(col, justify="left" if col == "set" else "right", no_wrap=True)
        for name, r in metrics["kl"].items():
            kl.add_row(name, f"{r['kl_mean']:.5f}", f"{r['kl_median']:.5f}", f"{r['kl_p99']:.4f}", f"{r['kl_max']:.3f}",
                       f"{100 * r['top1_agree']:.2f} %", f"{r['tokens']:,}")
        parts.append(kl)
    if metrics.get("efficiency"):
        parts.append(_efficiency_table(metrics["efficiency"], m))
    return parts[0] if len(parts) == 1 else Group(*parts)


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
