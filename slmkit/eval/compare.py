"""`slm compare`: many runs measured on the same text, in one table and two trade-off plots.

    slm compare runs/ngram-5 runs/gpt-rope-3m runs/smollm2 --out reports/spectrum
    slm compare --recipe spectrum --budget 3m --out reports/spectrum    # train a standard set first

Each run's measurements come from its eval.json (`slm eval`) when that already covers the requested sets, otherwise
from `slmkit.eval.evaluate` (and are written back to RUN/eval.json). Train time comes from the run's meta.json.
Output: DIR/report.md, DIR/report.html (self-contained, PNGs inlined), DIR/compare.json, DIR/size.png, DIR/speed.png.
Quality is bits per byte (lower is better), so runs with different tokenizers compare.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.fsutil import write_bytes, write_json

DEFAULT_SETS = ("shakespeare:val", "shakespeare:folio")
CLASSES = ("n-gram", "super-tiny", "small dense", "MoE", "sparse-attention", "imported pretrained")
COLORS = dict(zip(CLASSES, ("tab:gray", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:red"), strict=True))


# --- the Pareto front -----------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float | None, float | None]],
                 maximize: tuple[bool, bool] = (False, False)) -> list[bool]:
    """For each (x, y), whether it is on the Pareto front: no other point is at least as good on both axes and
    strictly better on one. Lower is better unless `maximize[axis]`; points with a missing/NaN value are never on it.

    >>> pareto_front([(1, 3), (2, 2), (3, 3), (2, 2)])
    [True, True, False, True]
    """
    sign = [-1.0 if m else 1.0 for m in maximize]
    valid = [p[0] is not None and p[1] is not None and math.isfinite(p[0]) and math.isfinite(p[1]) for p in points]
    pts = [(sign[0] * p[0], sign[1] * p[1]) if ok else None for p, ok in zip(points, valid, strict=True)]
    front = []
    for i, p in enumerate(pts):
        if p is None:
            front.append(False)
            continue
        dominated = any(q is not None and j != i and q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
                        for j, q in enumerate(pts))
        front.append(not dominated)
    return front


# --- what a row is ---------------------------------------------------------------------------------------------------


def classify(model_class: str | None, config: dict[str, Any], tokenizer: str | None, params_total: int | None) -> str:
    """One of CLASSES, from meta.json's "model_class" and the model config."""
    if model_class == "ngram":
        return "n-gram"
    if model_class == "imported":
        return "imported pretrained"
    if (config.get("moe_experts") or 0) > 1 or model_class == "moe":
        return "MoE"
    if config.get("attention", "full") != "full":
        return "sparse-attention"
    if tokenizer == "byte" and params_total is not None and params_total < 1_000_000:
        return "super-tiny"
    return "small dense"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


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


# --- measuring -------------------------------------------------------------------------------------------------------


def _weights_mtime(run: Path) -> float:
    from slmkit.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run)
    f = (ckpts[-1] if ckpts else run) / "model.safetensors"
    return f.stat().st_mtime if f.exists() else 0.0


def _has_set(ev: dict[str, Any], name: str, max_bytes: int | None, context: int | None = None) -> bool:
    """Does eval.json hold set `name` measured the same way: on the same text (the same `max_bytes` prefix, or all of
    it) and with the same window (`context` capped by the model's block size; n-gram entries have none)?"""
    entry = ev.get("lm", {}).get(name)
    if entry is None or entry.get("max_bytes") != max_bytes:
        return False
    block = ev.get("model", {}).get("block_size")
    want = block if context is None or block is None else min(context, block)
    return entry.get("context") in (None, want)


def _covers(ev: dict[str, Any], lm_sets: Sequence[str], tasks: Sequence[str], efficiency: bool,
            max_bytes: int | None = None, context: int | None = None) -> bool:
    return (all(_has_set(ev, s, max_bytes, context) for s in lm_sets) and all(t in ev.get("tasks", {}) for t in tasks)
            and (not efficiency or "efficiency" in ev))


NGRAM_BENCH = r"""
import json, sys, time
from slmkit.eval.efficiency import _rss_mb
from slmkit.model.ngram import NgramLM
lm = NgramLM.load(sys.argv[1])
n = int(sys.argv[2])
t0 = time.perf_counter()
it = lm.generate([lm.config.bos_id], max_new_tokens=n, temperature=0.8, seed=0)
next(it)
t1 = time.perf_counter()
k = 1 + sum(1 for _ in it)
t2 = time.perf_counter()
print(json.dumps({"decode_tok_s": (k - 1) / (t2 - t1) if k > 1 else None, "ttft_s": t1 - t0, "tokens": k,
                  "peak_rss_mb": _rss_mb()[1]}))
"""


def ngram_efficiency(run: str | Path, tokens: int = 256) -> dict[str, Any]:
    """Decode tokens/s, time to first token and peak RSS of `slm generate` on an n-gram run, in a fresh process
    (so the RSS is the model's own, not this process's). `slmkit.eval.evaluate(efficiency=True)` covers
    transformers only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", NGRAM_BENCH, str(run), str(tokens)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise SlmError(f"measuring n-gram decoding of {run} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "measured_by": "slm compare: n-gram generate, 1 proc"}


def measure(run: str | Path, *, lm_sets: Sequence[str] = DEFAULT_SETS, tasks: Sequence[str] = (),
            limit: int | None = None, efficiency: bool = True, threads: int | None = None,
            max_bytes: int | None = None, context: int | None = None, progress: bool = False,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """The eval.json dict of one run covering `lm_sets` (each on its first `max_bytes` bytes, or whole), `tasks` (and
    efficiency), scored with windows of at most `context` tokens: RUN/eval.json when it covers them and is newer than
    the weights, else the missing parts are measured and RUN/eval.json is rewritten."""
    from slmkit.model.ngram import is_ngram_run

    run = Path(run)
    if not run.exists():
        raise SlmError(f"no such run directory: {run}")
    ngram = is_ngram_run(run)
    path = run / "eval.json"
    ev = _read_json(path) if path.exists() and path.stat().st_mtime >= _weights_mtime(run) else {}
    want_eff = efficiency
    if ev and _covers(ev, lm_sets, tasks, want_eff, max_bytes, context):
        say(f"{run.name}: reusing {path}")
        return ev
    missing_sets = [s for s in lm_sets if not _has_set(ev, s, max_bytes, context)]
    missing_tasks = [t for t in tasks if t not in ev.get("tasks", {})]
    need_eff = want_eff and "efficiency" not in ev
    if missing_sets or missing_tasks or not ev or (need_eff and not ngram):
        from slmkit.eval import evaluate

        say(f"{run.name}: evaluating {', '.join([*missing_sets, *missing_tasks]) or 'efficiency'}")
        new = evaluate(run, lm=missing_sets, tasks=missing_tasks, limit=limit, efficiency=need_eff and not ngram,
                       max_bytes=max_bytes, context=context, threads=threads, progress=progress)
        # merged, so an earlier efficiency block or other sets survive a partial re-measurement
        ev = {**ev, **new, "lm": {**ev.get("lm", {}), **new["lm"]}, "tasks": {**ev.get("tasks", {}), **new["tasks"]}}
    if need_eff and ngram:
        say(f"{run.name}: measuring n-gram decoding speed")
        ev["efficiency"] = ngram_efficiency(run)
    write_json(path, ev)
    return ev


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
    }


# --- rendering -------------------------------------------------------------------------------------------------------


def _fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if kind == "params":
        return f"{v / 1e6:.2f}M" if v < 1e8 else f"{v / 1e6:.0f}M"
    if kind == "bytes":
        return f"{v / 1e6:.1f} MB" if v >= 1e5 else f"{v / 1e3:.0f} KB"
    if kind == "time":
        return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"
    if kind == "bpb":
        return f"{v:.3f}"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "acc":
        return f"{v:.3f}"
    return str(v)


def _table(rows: list[dict[str, Any]], lm_sets: Sequence[str],
           tasks: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "class", "params", "active", "on disk", "train time",
            *(f"bpb {s}{' (in-domain)' if i == 0 else ' (out-of-domain)'}" for i, s in enumerate(lm_sets)),
            "decode tok/s", "decode bytes/s", "peak RSS MB", *(f"{t} acc" for t in tasks)]
    body = []
    for r in rows:
        marks = "".join(m for m, key in (("†", "front_size"), ("‡", "front_speed")) if r.get(key))
        body.append([
            f"{r['name']}{marks}", r["class"], _fmt(r["params_total"], "params"), _fmt(r["params_active"], "params"),
            _fmt(r["bytes_on_disk"], "bytes"), _fmt(r["train_time_s"], "time"),
            *(_fmt(r["bpb"].get(s), "bpb") for s in lm_sets), _fmt(r["decode_tok_s"], "rate"),
            _fmt(r["decode_bytes_s"], "rate"), _fmt(r["peak_rss_mb"], "rate"),
            *(_fmt((r["tasks"].get(t) or {}).get("acc"), "acc") for t in tasks),
        ])
    return head, body


def _plot(rows: list[dict[str, Any]], path: Path, *, x_key: str, x_label: str, maximize_x: bool, y_set: str,
          front_key: str, title: str) -> bool:
    """Scatter bpb vs `x_key` (log x) coloured by class, the Pareto front joined by a dashed line. False = no points."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI; imported here so `import slmkit` stays light
    import matplotlib.pyplot as plt

    pts = [(r, r[x_key], r["bpb"].get(y_set)) for r in rows]
    pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None and x > 0 and math.isfinite(y)]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for cls in CLASSES:
        sel = [(x, y) for r, x, y in pts if r["class"] == cls]
        if sel:
            ax.scatter(*zip(*sel, strict=True), s=46, color=COLORS[cls], label=cls, zorder=3)
    front = sorted((x, y) for r, x, y in pts if r.get(front_key))
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), "--", color="black", lw=1, alpha=0.6, zorder=2, label="Pareto front")
    for r, x, y in pts:
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                    fontweight="bold" if r.get(front_key) else "normal")
    ax.set_xscale("log")
    ax.set_xlabel(x_label + (" → better" if maximize_x else " (← better)"))
    ax.set_ylabel(f"bits per byte, {y_set} (↓ better)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees a half-drawn plot
    return True


NOTES = [
    "bits per byte (bpb) = total nats / ln 2 / UTF-8 bytes of the scored text: comparable across byte, char, BPE and "
    "imported tokenizers. The first set is in-domain (held out from training), the next out-of-domain.",
    "params: stored numbers (an n-gram model's parameters are its n-gram counts and context keys); active = per token "
    "(MoE counts only the routed experts). on disk = model.safetensors.",
    "train time: optimisation time from the run's meta.json (evaluation and checkpoints excluded); an n-gram's is its "
    "counting time; imported models were not trained here.",
    "decode tok/s and peak RSS: batch-1 generation on this machine (n-gram: `slm compare`'s own generate loop, one "
    "process); timings on a shared machine are noisy. decode bytes/s = tok/s × the in-domain set's bytes per token: "
    "text per second, comparable across tokenizers (the speed plot and front use it).",
    "† on the quality-vs-size Pareto front, ‡ on the quality-vs-speed front (no other model is at least as good on "
    "both axes and better on one).",
]


def _markdown(rows: list[dict[str, Any]], lm_sets: Sequence[str], tasks: Sequence[str], plots: list[str],
              notes: Sequence[str] = NOTES) -> str:
    head, body = _table(rows, lm_sets, tasks)
    lines = ["# slmkit compare", "", f"{len(rows)} models, measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", *(f"![{p}]({p})" for p in plots), "", "Notes:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def _html(rows: list[dict[str, Any]], lm_sets: Sequence[str], tasks: Sequence[str], out: Path,
          plots: list[str], notes: Sequence[str] = NOTES) -> str:
    head, body = _table(rows, lm_sets, tasks)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    imgs = "".join(f'<img alt="{p}" src="data:image/png;base64,{base64.b64encode((out / p).read_bytes()).decode()}">'
                   for p in plots)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:"
             "left}th{background:#f3f3f3}img{max-width:48%;margin:1em 1% 0 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>slmkit compare</title><style>{style}</style>"
            f"</head><body><h1>slmkit compare</h1><table><tr>{th}</tr>{trs}</table>{imgs}<ul>{items}</ul>"
            "</body></html>\n")


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
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure `runs` (eval.json reused where it covers the request) and write the report into `out`. `max_bytes`
    scores every model on the same first N bytes of each set (a 135M model on all 4.5 MB of the Folio takes ~1 h here);
    `context` caps every model's scoring window (SmolLM2's 8192-token windows cost ~5x its 1024-token ones).

    Returns the compare.json dict: {"lm_sets", "tasks", "rows": [...], "pareto": {"size": [...], "speed": [...]}}.

    >>> compare(["runs/ngram-5", "runs/gpt-rope-3m"], "reports/spectrum")  # doctest: +SKIP
    """
    if not runs:
        raise SlmError("give at least one run directory to compare (or --recipe spectrum)")
    if not lm_sets:
        raise SlmError("give at least one held-out text set (--lm), e.g. shakespeare:val")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    for key, x_key, maxi in (("front_size", "params_total", False), ("front_speed", "decode_bytes_s", True)):
        flags = pareto_front([(r[x_key], r["bpb"].get(y_set)) for r in rows], maximize=(maxi, False))
        for r, f in zip(rows, flags, strict=True):
            r[key] = f
    all_tasks = sorted({t for r in rows for t in r["tasks"]})
    plots = []
    if _plot(rows, out / "size.png", x_key="params_total", x_label="parameters (log)", maximize_x=False,
             y_set=y_set, front_key="front_size", title="quality vs size"):
        plots.append("size.png")
    if _plot(rows, out / "speed.png", x_key="decode_bytes_s", x_label="bytes of text generated/s, batch 1 (log)",
             maximize_x=True,
             y_set=y_set, front_key="front_speed", title="quality vs speed"):
        plots.append("speed.png")
    result = {
        "kind": "slmkit-compare/1",
        "lm_sets": list(lm_sets),
        "max_bytes": max_bytes,
        "context": context,
        "tasks": all_tasks,
        "rows": rows,
        "pareto": {"size": [r["name"] for r in rows if r["front_size"]],
                   "speed": [r["name"] for r in rows if r["front_speed"]]},
        "evals": {r["name"]: ev for r, ev in zip(rows, evals, strict=True)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_json(out / "compare.json", result)
    notes = [*NOTES, *([f"bits per byte on the first {max_bytes:,} bytes of each text set (the same text for every "
                        "model)"] if max_bytes else []),
             *([f"scoring windows of at most {context:,} tokens (sliding, stride half the window)"] if context else [])]
    write_bytes(out / "report.md", _markdown(rows, lm_sets, all_tasks, plots, notes).encode())
    write_bytes(out / "report.html", _html(rows, lm_sets, all_tasks, out, plots, notes).encode())
    return result


def print_table(result: dict[str, Any]) -> None:
    """The compare table on the terminal."""
    from rich.table import Table

    from slmkit.runtime import console

    head, body = _table(result["rows"], result["lm_sets"], result["tasks"])
    table = Table(title="slm compare († size front, ‡ speed front)")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in body:
        table.add_row(*row)
    console().print(table)
