"""`slm compare`: many runs measured on the same text, in one table and three trade-off plots.

    slm compare runs/ngram-5 runs/gpt-rope-3m runs/smollm2 --out reports/spectrum
    slm compare --recipe spectrum --budget 3m --out reports/spectrum    # train a standard set first

Each run's measurements come from its eval.json (`slm eval`) where an entry was measured exactly as compare would
measure it — the same checkpoint, weights, text, window and questions (and threads, for speed) — otherwise from
`slmkit.eval.evaluate`, and are written back to RUN/eval.json. Train time comes from the run's meta.json. The report
(slmkit.eval.report) goes into a report directory. Quality is bits per byte (lower is better), so runs with different
tokenizers compare.

A compressed run (`slm quantize`, `prune`, `factorize`, `distill`) is measured beside the parent its meta.json lineage
names (a distilled student's is its teacher): KL divergence from the parent's next-token distribution on the in-domain
set (slmkit.eval.kl), and Δbpb — from the parent's own row when it is in the comparison, else from both models scored
on the KL pass's windows. KL needs one tokenizer for both; when they differ the row says so instead.
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
# the Pareto fronts of quality (in-domain bpb, lower is better) against: bytes on disk, peak memory, decode speed
FRONTS = (("front_size", "bytes_on_disk", False), ("front_memory", "peak_rss_mb", False),
          ("front_speed", "decode_bytes_s", True))


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
        entry = ev.get("kl", {}).get(name)
        # an entry from before kl.py scored both models' bits per byte on its windows is measured again
        return _has(entry, weights=self.weights, max_bytes=self.max_bytes, context=T, stride=default_stride(T),
                    reference=reference) and "parent_bpb" in entry


COMPRESSED = ("quantize", "prune", "factorize", "distill")  # run kinds made from a parent model (meta.json lineage)


@dataclass(frozen=True)
class Parent:
    """The model a compressed run was made from: `kind` of the run (quantize, prune, factorize, distill — whose parent
    is its teacher), the parent's checkpoint directory as `LLM.load` reads it, its name in a report, and `note`: why KL
    to it cannot be measured (None when it can)."""

    kind: str
    path: str
    name: str
    note: str | None = None


def _tokenizer_sha(ckpt: Path) -> str | None:
    from slmkit.tokenizer import Tokenizer

    try:
        return Tokenizer.load(ckpt / "tokenizer.json").sha256
    except SlmError:
        return None


def parent_of(run: str | Path) -> Parent | None:
    """The lineage parent of a compressed run (a directory `slm quantize`, `prune`, `factorize` or `distill` wrote, or
    a checkpoint inside one); None for a model that was not made from another (trained, counted, imported)."""
    from slmkit import checkpoint
    from slmkit import run as runs

    run = Path(run)
    if runs.kind_of(run) in ("ngram", "finetune"):
        return None
    ckpt = checkpoint.resolve(run)
    home = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt  # a distilled student is a training run
    where = next((d for d in (ckpt, home) if runs.kind_of(d) in COMPRESSED), None)
    if where is None:
        return None
    kind = runs.kind_of(where)
    given = ((runs.read_meta(where).get("lineage") or {}).get("parent") or {}).get("path")
    if not given:
        return None
    src = Path(given)
    if runs.kind_of(src) not in runs.MODEL_KINDS:
        return Parent(kind, str(src), src.name, note=f"its parent {src} is not here")
    path = src if runs.kind_of(src) in ("ngram", "finetune") else checkpoint.resolve(src)
    name = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
    note = None
    if runs.kind_of(src) == "ngram":
        note = "its parent is an n-gram model (KL compares two transformers)"
    elif _tokenizer_sha(ckpt) is None or _tokenizer_sha(ckpt) != _tokenizer_sha(path):
        # a student distilled from a teacher shares its tokenizer (slm distill refuses otherwise); an older or copied
        # run may not: next-token distributions over different ids do not compare
        note = f"it and its parent {name} tokenize differently"
    return Parent(kind, str(path), name, note)


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
    # a compressed model is also measured against its parent: KL (and both bpb on the same windows), in-domain set
    parent = parent_of(run)
    kl_to = parent.path if parent is not None and parent.note is None else None
    if parent is not None and parent.note is not None:
        say(f"[note] {run.name}: no KL to its parent: {parent.note}")
    kl_missing = kl_to is not None and bool(lm_sets) and not req.has_kl(ev, lm_sets[0], kl_to)
    missing_sets = [s for s in lm_sets if not req.has_set(ev, s) or (kl_missing and s == lm_sets[0])]
    missing_tasks = [t for t in tasks if not req.has_task(ev, t)]
    need_eff = efficiency and not req.has_efficiency(ev)
    if ev and not (missing_sets or missing_tasks or need_eff):
        say(f"{run.name}: reusing {path}")
        return ev
    from slmkit.eval import evaluate  # looked up per call, so a test can tell it must not run

    say(f"{run.name}: evaluating {', '.join([*missing_sets, *missing_tasks]) or 'efficiency'}")
    new = evaluate(run, lm=missing_sets, tasks=missing_tasks, limit=limit, efficiency=need_eff, max_bytes=max_bytes,
                   context=context, threads=threads, progress=progress, kl_to=kl_to if kl_missing else None)
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
    parent = parent_of(run)
    sparsity = (meta.get("pruning") or {}).get("sparsity")
    eff = ev.get("efficiency") or {}
    first = ev.get("lm", {}).get(lm_sets[0]) or {} if lm_sets else {}
    kl = (ev.get("kl") or {}).get(lm_sets[0]) or {} if lm_sets else {}
    if parent is not None and kl.get("reference") != parent.path:
        kl = {}  # measured against another model than the lineage parent
    bytes_per_token = first["bytes"] / first["tokens"] if first.get("tokens") else None
    tok_s = eff.get("decode_tok_s")
    return {
        "name": m.get("name") or run.name,
        "path": str(run),
        "checkpoint": str(ckpt.resolve()),
        "class": classify(model_class, config, m.get("tokenizer"), m.get("params_total"),
                          kind=parent.kind if parent else None, sparsity=sparsity),
        "model_class": model_class,
        "tokenizer": m.get("tokenizer"),
        "params_total": m.get("params_total"),
        "params_active": m.get("params_active"),
        # a pruned model's dense tensors keep their zeros: the weights it still has
        "params_nonzero": meta.get("nonzero"),
        "sparsity": sparsity,
        "bytes_on_disk": m.get("bytes_on_disk"),
        **_train_info(run, ckpt),
        "bpb": {s: (ev.get("lm", {}).get(s) or {}).get("bpb") for s in lm_sets},
        "decode_tok_s": tok_s,
        # tokens differ across tokenizers (a byte, a character, ~4 bytes of BPE): text generated per second compares
        "bytes_per_token": bytes_per_token,
        "decode_bytes_s": tok_s * bytes_per_token if tok_s and bytes_per_token else None,
        "peak_rss_mb": eff.get("peak_rss_mb"),
        "tasks": {t: {k: r.get(k) for k in ("acc", "acc_norm", "n")} for t, r in (ev.get("tasks") or {}).items()},
        # compressed models: how they were made, from which parent; bits per weight of the quantized layers; KL from
        # the parent on the in-domain set, and both models' bpb on the KL pass's windows (Δbpb when the parent is not
        # in the comparison)
        "compressed": parent.kind if parent else None,
        "bits_per_weight": (meta.get("storage") or {}).get("bits_per_weight"),
        "parent": parent.path if parent else None,
        "parent_name": parent.name if parent else None,
        "kl": kl.get("kl_mean"),
        "kl_note": parent.note if parent else None,
        "kl_bpb": kl.get("bpb"),
        "kl_parent_bpb": kl.get("parent_bpb"),
    }


def bpb_delta(rows: list[dict[str, Any]], y_set: str) -> None:
    """Fill each compressed row's "bpb_delta_pct" (how much bpb it gave up vs its parent, %) and "bpb_delta_from":
    "table" when the parent is a row of the same comparison (both rows' bpb), "kl" when it is not (both models
    scored on the KL pass's windows), None when neither is known."""
    by_ckpt = {r["checkpoint"]: r for r in rows}
    for r in rows:
        parent = by_ckpt.get(r["parent"] or "")
        mine, theirs, source = r["bpb"].get(y_set), parent["bpb"].get(y_set) if parent else None, "table"
        if parent is None:
            mine, theirs, source = r.get("kl_bpb"), r.get("kl_parent_bpb"), "kl"
        else:
            r["parent_name"] = parent["name"]  # as the table names it (two runs named alike get a suffix)
        ok = mine is not None and bool(theirs)
        r["bpb_delta_pct"] = 100 * (mine - theirs) / theirs if ok else None
        r["bpb_delta_from"] = source if ok else None


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

    Returns the compare.json dict: {"lm_sets", "tasks", "rows": [...], "pareto": {"size", "memory", "speed": [...]}}
    (the names on each front of quality vs bytes on disk, peak memory and decode speed).

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
    bpb_delta(rows, y_set)
    for key, x_key, maxi in FRONTS:
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
        "pareto": {key[len("front_"):]: [r["name"] for r in rows if r[key]] for key, _, _ in FRONTS},
        "evals": {r["name"]: ev for r, ev in zip(rows, evals, strict=True)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_report(out, result)
    return result
