"""`slm compare`'s output: the report directory, the table (terminal, Markdown, self-contained HTML) and the three
trade-off plots — quality against bytes on disk, peak memory and decode speed (size for a device budget is bytes, not
parameters: an n-gram model's "parameters" are counts in a large file; parameters are a column). Everything here
renders a compare.json dict (`slmkit.eval.compare.compare`); nothing measures.

    DIR/meta.json     the run contract's "report" kind: what made the report (slmkit.run)
    DIR/compare.json  the rows, Pareto fronts and every eval.json used
    DIR/report.md, DIR/report.html (PNGs inlined), DIR/size.png, DIR/memory.png, DIR/speed.png
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.eval.pareto import CLASSES
from slmkit.fsutil import write_bytes, write_json
from slmkit.run import KINDS, kind_of, new_meta, write_meta

# (plot file, x key, axis label, larger x is better, Pareto-front key, title); the fronts are compare.FRONTS'
PLOTS = (("size.png", "bytes_on_disk", "bytes on disk (log)", False, "front_size", "quality vs bytes on disk"),
         ("memory.png", "peak_rss_mb", "peak resident memory, MiB, batch-1 decoding (log)", False, "front_memory",
          "quality vs memory"),
         ("speed.png", "decode_bytes_s", "bytes of text generated/s, batch 1 (log)", True, "front_speed",
          "quality vs speed"))
MARKS = (("†", "front_size"), ("§", "front_memory"), ("‡", "front_speed"))

NOTES = [
    "bits per byte (bpb) = total nats / ln 2 / UTF-8 bytes of the scored text: comparable across byte, char, BPE and "
    "imported tokenizers. The first set is in-domain (held out from training), the next out-of-domain.",
    "on disk = model.safetensors (a pruned model's sparse matrices as stored, a quantized model's packed weights); "
    "size is plotted as these bytes, not as parameters. params: stored numbers (an n-gram model's parameters are its "
    "n-gram counts and context keys); active = per token (MoE counts only the routed experts); non-zero = the "
    "weights a pruned model still has.",
    "train time: optimisation time from the run's meta.json (evaluation and checkpoints excluded); an n-gram's is its "
    "counting time; imported models were not trained here.",
    "decode tok/s and peak RSS: batch-1 greedy generation on this machine, every model (n-gram included) timed by the "
    "same harness in a fresh process (peak RSS includes the Python and torch runtime); timings on a shared machine "
    "are noisy. decode bytes/s = tok/s × the in-domain set's bytes per token: text per second, comparable across "
    "tokenizers (the speed plot and front use it).",
    "† on the quality-vs-bytes-on-disk Pareto front, § on the quality-vs-peak-memory front, ‡ on the "
    "quality-vs-speed front (no other model is at least as good on both axes and better on one).",
    "models made from another (slm quantize, prune, factorize, distill; a distilled student's parent is its "
    "teacher): bits/weight of the quantized layers as llama.cpp counts them (scales included); Δbpb vs the parent, "
    "from the parent's row when it is in the table, else (marked *) both models scored on the KL pass's windows; "
    "KL to parent = mean per-token KL divergence from the parent's next-token distribution on the in-domain set "
    "(llama-perplexity --kl-divergence), measured only when both share one tokenizer.",
]


def claim_report_dir(out: str | Path, recipe: dict[str, Any]) -> Path:
    """Make `out` a report directory and record `recipe` (what makes the report) in its meta.json. Allowed: a new or
    empty directory, or a report slmkit wrote before (compare re-run into it; the spectrum recipe resuming, with its
    data-*/ and runs/ inside). Anything else — a run, someone's files — is refused before anything is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlmError(f"{out} is a file, not a directory; choose another --out")
    kind = kind_of(out)
    if out.exists() and any(out.iterdir()) and kind != "report":
        what = KINDS[kind] if kind else "files slmkit did not write"
        raise SlmError(f"refusing to write a report into {out}: it holds {what}; choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, new_meta("report", recipe=recipe))
    return out


def write_report(out: Path, result: dict[str, Any]) -> None:
    """compare.json, the plots, report.md and report.html of a compare.json dict, into the report directory `out`."""
    rows, lm_sets, tasks = result["rows"], result["lm_sets"], result["tasks"]
    y_set = lm_sets[0]
    plots = [name for name, x_key, x_label, maxi, front_key, title in PLOTS
             if _plot(rows, out / name, x_key=x_key, x_label=x_label, maximize_x=maxi, y_set=y_set,
                      front_key=front_key, title=title)]
    for name, *_ in PLOTS:  # an earlier report's plot of an axis this one has no points on would mislead
        if name not in plots:
            (out / name).unlink(missing_ok=True)
    write_json(out / "compare.json", result)
    max_bytes, context = result.get("max_bytes"), result.get("context")
    notes = [*NOTES,
             *([f"bits per byte on the first {max_bytes:,} bytes of each text set (the same text for every model)"]
               if max_bytes else []),
             *([f"scoring windows of at most {context:,} tokens (sliding, stride half the window)"] if context else [])]
    write_bytes(out / "report.md", _markdown(rows, lm_sets, tasks, plots, notes).encode())
    write_bytes(out / "report.html", _html(rows, lm_sets, tasks, out, plots, notes).encode())


def print_table(result: dict[str, Any]) -> None:
    """The compare table on the terminal."""
    from rich.table import Table

    from slmkit.runtime import console

    head, body = _table(result["rows"], result["lm_sets"], result["tasks"])
    table = Table(title="slm compare († bytes-on-disk front, § memory front, ‡ speed front)")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in body:
        table.add_row(*row)
    console().print(table)


def _fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if kind == "params":
        return f"{v / 1e6:.2f}M" if v < 1e8 else f"{v / 1e6:.0f}M"
    if kind == "bytes":
        return f"{v / 1e6:.1f} MB" if v >= 1e5 else f"{v / 1e3:.0f} KB"
    if kind == "time":
        return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"
    if kind in ("bpb", "acc"):
        return f"{v:.3f}"
    if kind == "rate":
        return f"{v:,.0f}"
    return str(v)


def _table(rows: list[dict[str, Any]], lm_sets: Sequence[str],
           tasks: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    # columns only some rows fill appear when one does
    derived = any(r.get("parent") for r in rows)
    nonzero = any(r.get("params_nonzero") is not None for r in rows)
    bits = any(r.get("bits_per_weight") is not None for r in rows)
    head = ["model", "class", "on disk", "peak RSS MiB", "params", "active", *(["non-zero"] if nonzero else []),
            *(["bits/weight"] if bits else []), "train time",
            *(f"bpb {s}{' (in-domain)' if i == 0 else ' (out-of-domain)'}" for i, s in enumerate(lm_sets)),
            *(["Δbpb vs parent", "KL to parent"] if derived else []),
            "decode tok/s", "decode bytes/s", *(f"{t} acc" for t in tasks)]
    body = []
    for r in rows:
        marks = "".join(m for m, key in MARKS if r.get(key))
        body.append([
            f"{r['name']}{marks}", r["class"], _fmt(r["bytes_on_disk"], "bytes"), _fmt(r["peak_rss_mb"], "rate"),
            _fmt(r["params_total"], "params"), _fmt(r["params_active"], "params"),
            *([_fmt(r.get("params_nonzero"), "params")] if nonzero else []),
            *([_fmt(r.get("bits_per_weight"), "bpb")] if bits else []),
            _fmt(r["train_time_s"], "time"),
            *(_fmt(r["bpb"].get(s), "bpb") for s in lm_sets),
            *(_vs_parent(r) if derived else []),
            _fmt(r["decode_tok_s"], "rate"), _fmt(r["decode_bytes_s"], "rate"),
            *(_fmt((r["tasks"].get(t) or {}).get("acc"), "acc") for t in tasks),
        ])
    return head, body


def _vs_parent(r: dict[str, Any]) -> list[str]:
    """The Δbpb and KL cells of a row made from a parent (— for a row that was not, or a value not measured)."""
    if not r.get("parent"):
        return ["—", "—"]
    delta = r.get("bpb_delta_pct")
    star = "*" if r.get("bpb_delta_from") == "kl" else ""
    kl = f"{r['kl']:.4f}" if r.get("kl") is not None else f"— ({r['kl_note']})" if r.get("kl_note") else "—"
    return [f"{delta:+.2f} %{star} ({r['parent_name']})" if delta is not None else f"— ({r['parent_name']})", kl]


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
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=110)
    colors = plt.get_cmap("tab20").colors  # 10 hues, dark then light: the first 10 classes dark, the rest light
    for i, cls in enumerate(CLASSES):
        sel = [(x, y) for r, x, y in pts if r["class"] == cls]
        if sel:
            ax.scatter(*zip(*sel, strict=True), s=46, color=colors[2 * i % 20 + 2 * i // 20], label=cls, zorder=3)
    at = {r["checkpoint"]: (x, y) for r, x, y in pts if r.get("checkpoint")}
    for r, x, y in pts:  # a model made from another: a dotted line from its parent shows what the step bought
        if r.get("parent") in at:
            px, py = at[r["parent"]]
            ax.plot([px, x], [py, y], ":", color="gray", lw=1, zorder=1)
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
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")  # the legend sits right of the axes
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees a half-drawn plot
    return True


def _markdown(rows: list[dict[str, Any]], lm_sets: Sequence[str], tasks: Sequence[str], plots: list[str],
              notes: Sequence[str]) -> str:
    head, body = _table(rows, lm_sets, tasks)
    lines = ["# slmkit compare", "", f"{len(rows)} models, measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", *(f"![{p}]({p})" for p in plots), "", "Notes:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def _html(rows: list[dict[str, Any]], lm_sets: Sequence[str], tasks: Sequence[str], out: Path, plots: list[str],
          notes: Sequence[str]) -> str:
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
