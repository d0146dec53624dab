"""`slm compare`: many runs measured on the same text, in one table and two trade-off plots.

    slm compare runs/ngram-5 runs/gpt-rope-3m runs/smollm2 --out reports/spectrum
    slm compare --recipe spectrum --budget 3m --out reports/spectrum    # train a standard set first

Each run's measurements come from its eval.json (`slm eval`) where an entry was measured exactly as compare would
measure it — the same checkpoint, weights, text, window and questions (and threads, for speed) — otherwise from
`slmkit.eval.evaluate`, and are written back to RUN/eval.json. Train time comes from the run's meta.json. The report
(slmkit.eval.report) goes into a report directory. Quality is bits per byte (lower is better), so runs with different
tokenizers compare.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.eval.evaluate import checkpoint_stamp, task_name
from slmkit.eval.lm import default_stride
from slmkit.eval.pareto import classify, pareto_front
from slmkit.eval.report import claim_report_dir, write_report
from slmkit.fsutil import write_json
from slmkit.runtime import available_cores

DEFAULT_SETS = ("shakespeare:val", "shakespeare:folio")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


# --- which eval.json entries can be reused ----------------------------------------------------------------------------


def _has(entry: Any, **settings: Any) -> bool:
    """An eval.json entry that records every one of `settings` with the same value (a missing one never matches)."""
    return isinstance(entry, dict) and all(k in entry and entry[k] == v for k, v in settings.items())


@dataclass(frozen=True)
class Request:
    """How compare measures every model: an eval.json entry is reused only when it was measured this way."""

    max_bytes: int | None = None
    context: int | None = None
    limit: int | None = None
    threads: int | None = None  # None: every core, as `measure` resolves it
    weights: str = "fp32"
    shots: int = 0

    def window(self, ev: dict[str, Any]) -> int | None:
        """The scoring window a model gets: `context` capped by its block size (an n-gram model has none)."""
        block = ev.get("model", {}).get("block_size")
        return block if not self.context or block is None else min(self.context, block)

    def has_set(self, ev: dict[str, Any], name: str) -> bool:
        T = self.window(ev)
        return _has(ev.get("lm", {}).get(name), weights=self.weights, max_bytes=self.max_bytes, context=T,
                    stride=default_stride(T))

    def has_task(self, ev: dict[str, Any], task: str) -> bool:
        return _has(ev.get("tasks", {}).get(task_name(task)), weights=self.weights, shots=self.shots,
                    limit=self.limit, context=self.window(ev))

    def has_efficiency(self, ev: dict[str, Any]) -> bool:
        return _has(ev.get("efficiency"), weights=self.weights, threads=self.threads or available_cores())

    def has_kl(self, ev: dict[str, Any], name: str, reference: str) -> bool:
        T = self.window(ev)
        return _has(ev.get("kl", {}).get(name), weights=self.weights, max_bytes=self.max_bytes, context=T,
                    stride=default_stride(T), reference=reference)


def parent_model(run: Path) -> str | None:
    """The checkpoint a compressed model was made from (its lineage parent), as eval.json records it; None for a
    model that was not made from another (trained, counted, imported)."""
    from slmkit import checkpoint
    from slmkit import run as runs

    ckpt = checkpoint.resolve(run) if runs.kind_of(run) != "ngram" else run
    if runs.kind_of(ckpt) != "quantize":
        return None
    parent = (runs.read_meta(ckpt).get("lineage") or {}).get("parent") or {}
    return str(Path(parent["path"]).resolve()) if runs.kind_of(parent.get("path", "")) in runs.MODEL_KINDS else None


def _existing(run: str | Path) -> Path:
    run = Path(run)
    if not run.exists():
        raise SlmError(f"no such run directory: {run}")
    return run


def measure(run: str | Path, *, lm_sets: Sequence[str] = DEFAULT_SETS, tasks: Sequence[str] = (),
            limit: int | None = None, efficiency: bool = True, threads: int | None = None,
            max_bytes: int | None = None, context: int | None = None, progress: bool = False,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """The eval.json dict of one run covering `lm_sets` (each on its first `max_bytes` bytes, or whole), `tasks` (and
    efficiency), scored with windows of at most `context` tokens: the entries of RUN/eval.json measured the same way
    on the checkpoint there now are kept, the rest measured, and RUN/eval.json rewritten."""
    from slmkit import checkpoint

    run = _existing(run)
    path = run / "eval.json"
    ev = _read_json(path)
    if ev.get("model", {}).get("checkpoint") != checkpoint_stamp(checkpoint.resolve(run)):
        ev = {}  # measured on other weights (or recorded before eval.json pinned them): nothing in it holds
    req = Request(max_bytes=max_bytes, context=context, limit=limit, threads=threads)
    parent = parent_model(run)  # a quantized model is also measured against its parent: KL on the in-domain set
    kl_missing = parent is not None and bool(lm_sets) and not req.has_kl(ev, lm_sets[0], parent)
    missing_sets = [s for s in lm_sets if not req.has_set(ev, s) or (kl_missing and s == lm_sets[0])]
    missing_tasks = [t for t in tasks if not req.has_task(ev, t)]
    need_eff = efficiency and not req.has_efficiency(ev)
    if ev and not (missing_sets or missing_tasks or need_eff):
        say(f"{run.name}: reusing {path}")
        return ev
    from slmkit.eval import evaluate  # looked up per call, so a test can tell it must not run

    say(f"{run.name}: evaluating {', '.join([*missing_sets, *missing_tasks]) or 'efficiency'}")
    new = evaluate(run, lm=missing_sets, tasks=missing_tasks, limit=limit, efficiency=need_eff, max_bytes=max_bytes,
                   context=context, threads=threads, progress=progress, kl_to=parent if kl_missing else None)
    # merged, so an earlier efficiency block or other sets survive a partial re-measurement
    ev = {**ev, **new, "lm": {**ev.get("lm", {}), **new["lm"]}, "tasks": {**ev.get("tasks", {}), **new["tasks"]},
          "kl": {**ev.get("kl", {}), **new.get("kl", {})}}
    write_json(path, ev)
    return ev


# --- rows ----------------------------------------------------------------------------------------------------------


def _train_info(run: Path, ckpt: Path) -> dict[str, Any]:
    """Train time and tokens from the run's meta.json (slmkit.train or train_ngram), else the checkpoint's."""
    for meta in (_read_json(run / "meta.json"), _read_json(ckpt.parent.parent / "meta.json"),
                 _read_json(ckpt / "meta.json")):
        res = meta.get("result") or {}
        if res.get("train_time") is not None:
            return {"train_time_s": float(res["train_time"]), "train_tokens": res.get("tokens"),
                    "status": meta.get("status")}
        if meta.get("train_time") is not None:
            return {"train_time_s": float(meta["train_time"]), "train_tokens": meta.get("tokens"), "status": None}
    return {"train_time_s": None, "train_tokens": None, "status": None}


def row_of(run: str | Path, ev: dict[str, Any], lm_sets: Sequence[str]) -> dict[str, Any]:
    """One table row from a run directory and its eval.json dict."""
    run = Path(run)
    m = ev.get("model", {})
    ckpt = Path(m.get("path") or run)
    config = _read_json(ckpt / "config.json")
    meta = {**_read_json(ckpt.parent.parent / "meta.json"), **_read_json(ckpt / "meta.json")}
    model_class = m.get("model_class") or meta.get("model_class")
    eff = ev.get("efficiency") or {}
    first = ev.get("lm", {}).get(lm_sets[0]) or {} if lm_sets else {}
    bytes_per_token = first["bytes"] / first["tokens"] if first.get("tokens") else None
    tok_s = eff.get("decode_tok_s")
    return {
        "name": m.get("name") or run.name,
        "path": str(run),
        "class": classify(model_class, config, m.get("tokenizer"), m.get("params_total")),
        "model_class": model_class,
        "tokenizer": m.get("tokenizer"),
        "params_total": m.get("params_total"),
        "params_active": m.get("params_active"),
        "bytes_on_disk": m.get("bytes_on_disk"),
        **_train_info(run, ckpt),
        "bpb": {s: (ev.get("lm", {}).get(s) or {}).get("bpb") for s in lm_sets},
        "decode_tok_s": tok_s,
        # tokens differ across tokenizers (a byte, a character, ~4 bytes of BPE): text generated per second compares
        "bytes_per_token": bytes_per_token,
        "decode_bytes_s": tok_s * bytes_per_token if tok_s and bytes_per_token else None,
        "peak_rss_mb": eff.get("peak_rss_mb"),
        "tasks": {t: {k: r.get(k) for k in ("acc", "acc_norm", "n")} for t, r in (ev.get("tasks") or {}).items()},
        # compressed models: bits per weight of the quantized layers, KL from the parent on the in-domain set
        "bits_per_weight": (meta.get("storage") or {}).get("bits_per_weight"),
        "parent": ((ev.get("kl") or {}).get(lm_sets[0]) or {}).get("reference") if lm_sets else None,
        "kl": ((ev.get("kl") or {}).get(lm_sets[0]) or {}).get("kl_mean") if lm_sets else None,
    }


# --- compare -------------------------------------------------------------------------------------------------------


def compare(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    lm_sets: Sequence[str] = DEFAULT_SETS,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    efficiency: bool = True,
    threads: int | None = None,
    max_bytes: int | None = None,
    context: int | None = None,
    progress: bool = False,
    recipe: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure `runs` (eval.json reused where it was measured the same way) and write the report into the report
    directory `out` (new, empty, or an earlier report: anything else is refused before measuring). `max_bytes` scores
    every model on the same first N bytes of each set (a 135M model on all 4.5 MB of the Folio takes ~1 h here);
    `context` caps every model's scoring window (SmolLM2's 8192-token windows cost ~5x its 1024-token ones).
    `recipe`: what else made the report (the spectrum recipe's settings), recorded in out/meta.json.

    Returns the compare.json dict: {"lm_sets", "tasks", "rows": [...], "pareto": {"size": [...], "speed": [...]}}.

    >>> compare(["runs/ngram-5", "runs/gpt-rope-3m"], "reports/spectrum")  # doctest: +SKIP
    """
    if not runs:
        raise SlmError("give at least one run directory to compare (or --recipe spectrum)")
    if not lm_sets:
        raise SlmError("give at least one held-out text set (--lm), e.g. shakespeare:val")
    runs = [_existing(r) for r in runs]
    settings = {"lm_sets": list(lm_sets), "tasks": list(tasks), "limit": limit, "efficiency": efficiency,
                "threads": threads, "max_bytes": max_bytes, "context": context}
    out = claim_report_dir(out, {"runs": [str(r) for r in runs], **settings, **(recipe or {})})
    t0 = time.perf_counter()
    evals = [measure(r, lm_sets=lm_sets, tasks=tasks, limit=limit, efficiency=efficiency, threads=threads,
                     max_bytes=max_bytes, context=context, progress=progress, say=say) for r in runs]
    rows = [row_of(r, ev, lm_sets) for r, ev in zip(runs, evals, strict=True)]
    seen: dict[str, int] = {}
    for r in rows:  # two runs named alike (…/a/run, …/b/run) stay distinguishable
        seen[r["name"]] = seen.get(r["name"], 0) + 1
        if seen[r["name"]] > 1:
            r["name"] = f"{r['name']}-{seen[r['name']]}"
    y_set = lm_sets[0]
    by_ckpt = {str(Path((ev.get("model") or {}).get("path", "")).resolve()): r for r, ev in zip(rows, evals,
                                                                                              strict=True)}
    for r in rows:  # a compressed model beside its parent: how much bpb it gave up
        parent = by_ckpt.get(r["parent"] or "")
        mine, theirs = r["bpb"].get(y_set), parent["bpb"].get(y_set) if parent else None
        r["bpb_delta_pct"] = 100 * (mine - theirs) / theirs if mine is not None and theirs else None
        r["parent_name"] = parent["name"] if parent else None
    for key, x_key, maxi in (("front_size", "params_total", False), ("front_speed", "decode_bytes_s", True)):
        flags = pareto_front([(r[x_key], r["bpb"].get(y_set)) for r in rows], maximize=(maxi, False))
        for r, f in zip(rows, flags, strict=True):
            r[key] = f
    result = {
        "kind": "slmkit-compare/1",
        "lm_sets": list(lm_sets),
        "max_bytes": max_bytes,
        "context": context,
        "tasks": sorted({t for r in rows for t in r["tasks"]}),
        "rows": rows,
        "pareto": {"size": [r["name"] for r in rows if r["front_size"]],
                   "speed": [r["name"] for r in rows if r["front_speed"]]},
        "evals": {r["name"]: ev for r, ev in zip(rows, evals, strict=True)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_report(out, result)
    return result
