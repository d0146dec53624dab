"""Pruning and low-rank factorisation against their parents (issue 15), every row measured in the same run as its
parent with slmkit's eval: bits per byte in- and out-of-domain (Δ % against the parent), KL to the parent, bytes on
disk, parameters (non-zero for unstructured), batch-1 decode tokens/s and its ratio to the parent's.

Unstructured, one-shot (no healing): magnitude and Wanda at --sparsity (default 50 %) and N:M (2:4, Wanda and
magnitude scores) — on a model trained here (`--preset`, default llama-30m, Shakespeare BPE 2048 for --train-time,
cached like bench/quantize.py's parents, or `--run DIR`) and on SmolLM2-135M imported from the installed GGUF (as
bench/decode.py does; it has no training data here, so it calibrates on --smollm2-calib text). The issue's target:
Wanda's Δbpb at most half of magnitude's at the same sparsity.

Structured, on the trained model: FFN channels and whole layers, each sized to remove --structured (default 30 %) of
the parameters, then healed for --heal (default 5m) distilled from the parent; and a truncated-SVD factorisation at
--energy, healed the same. The target: decode ≥ 1.25× the parent's with Δbpb ≤ +5 %.

    python bench/prune.py                                       # the issue's tables (about an hour on 2 cores)
    python bench/prune.py --run runs/mine --no-smollm2 --heal 2m
    python bench/prune.py --smoke                               # seconds: a tiny model, tiny settings

Markdown on stdout with the CPU model; the figures go to docs/benchmarks.md.
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

SETS = ["shakespeare:val", "shakespeare:folio"]


def measure(path: Path, label: str, sets: list[str], a: argparse.Namespace, parent: bool) -> dict[str, Any]:
    from slmkit.eval import evaluate

    ev = evaluate(path, lm=sets, efficiency=True, threads=a.threads, max_bytes=a.max_bytes, context=1024,
                  kl_to=None if parent else "parent")
    meta = json.loads((Path(ev["model"]["path"]) / "meta.json").read_text())
    return {"label": label, "bpb": {s: ev["lm"][s]["bpb"] for s in sets},
            "kl": 0.0 if parent else ev["kl"][sets[0]]["kl_mean"], "mb": ev["model"]["bytes_on_disk"] / 1e6,
            "params": (meta.get("counts") or {}).get("total") or ev["model"]["params_total"],
            "nonzero": meta.get("nonzero"), "decode": ev["efficiency"]["decode_tok_s"],
            "heal": (meta.get("heal") or {}).get("seconds")}


def table(title: str, rows: list[dict[str, Any]], sets: list[str]) -> None:
    base = rows[0]
    print(f"\n### {title}\n")
    heads = " | ".join(f"bpb {s} | Δ" for s in sets)
    print(f"| model | params | non-zero | MB | ratio | {heads} | KL | decode tok/s | ratio | heal s |")
    print("|---|---|---|---|---|" + "---|---|" * len(sets) + "---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r['bpb'][s]:.4f} | {100 * (r['bpb'][s] / base['bpb'][s] - 1):+.2f} %" for s in sets)
        nz = f"{r['nonzero'] / 1e6:.2f}M" if r["nonzero"] is not None else "-"
        heal = f"{r['heal']:.0f}" if r["heal"] else "-"
        print(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {nz} | {r['mb']:.2f} | {r['mb'] / base['mb']:.2f} | "
              f"{cells} | {r['kl']:.4f} | {r['decode']:,.1f} | {r['decode'] / base['decode']:.2f}x | {heal} |")


def wanda_vs_magnitude(rows: list[dict[str, Any]], sets: list[str], sparsity: float) -> None:
    by = {r["label"]: r for r in rows}
    base = rows[0]["bpb"][sets[0]]
    mag, wanda = (by.get(f"{m} {100 * sparsity:.0f} %") for m in ("magnitude", "wanda"))
    if mag and wanda:
        dm, dw = mag["bpb"][sets[0]] - base, wanda["bpb"][sets[0]] - base
        verdict = "met" if dw <= dm / 2 else "not met"
        print(f"\nWanda Δbpb {dw:+.4f} vs magnitude {dm:+.4f} on {sets[0]}: ratio {dw / dm:.2f} (target ≤ 0.5: "
              f"{verdict})" if dm else "\nmagnitude lost nothing here; no ratio")


def unstructured(parent: Path, work: Path, sets: list[str], a: argparse.Namespace, calib: str | None) -> list[dict]:
    from slmkit.compress.prune import prune_run

    rows = [measure(parent, "parent", sets, a, parent=True)]
    plans = [(f"magnitude {100 * a.sparsity:.0f} %", dict(method="magnitude", sparsity=a.sparsity)),
             (f"wanda {100 * a.sparsity:.0f} %", dict(method="wanda", sparsity=a.sparsity, calib=calib)),
             ("2:4 wanda", dict(method="nm:2:4", calib=calib)),
             ("2:4 magnitude", dict(method="nm:2:4", score="magnitude"))]
    for label, kw in plans:
        out = prune_run(parent, work / label.replace(" ", "-").replace("%", "pct").replace(":", "-"),
                        calib_samples=a.calib_samples, overwrite=True, **kw)
        rows.append(measure(out, label, sets, a, parent=False))
    return rows


def structured(parent: Path, work: Path, sets: list[str], a: argparse.Namespace) -> list[dict]:
    from slmkit import checkpoint
    from slmkit.compress.factorize import factorize_run
    from slmkit.compress.prune import prune_run

    model = checkpoint.load(parent).model
    cfg, total = model.config, model.num_params()
    # shares of units that remove --structured of the parameters: a SwiGLU channel is 3·C weights per layer (2·C
    # GELU); a layer is all of one block's parameters
    per_channel = (3 if cfg.mlp == "swiglu" else 2) * cfg.n_embd * cfg.n_layer
    channel_share = min(0.95, a.structured * total / (per_channel * cfg.mlp_hidden))
    block = (model.num_params(non_embedding=True) - sum(p.numel() for p in model.norm_f.parameters())) / cfg.n_layer
    layer_share = min(0.9, a.structured * total / (block * cfg.n_layer))
    rows = [measure(parent, "parent", sets, a, parent=True)]
    plans = [(f"channels {100 * channel_share:.0f} % + heal", prune_run,
              dict(method="channels", sparsity=channel_share, calib_samples=a.calib_samples)),
             (f"layers {100 * layer_share:.0f} % + heal", prune_run,
              dict(method="layers", sparsity=layer_share, calib_samples=a.calib_samples)),
             (f"SVD energy {a.energy} + heal", factorize_run, dict(energy=a.energy))]
    for label, fn, kw in plans:
        out = fn(parent, work / label.split()[0], heal=a.heal, overwrite=True, progress=False, **kw)
        rows.append(measure(out, label, sets, a, parent=False))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained run to prune (default: train --preset here)")
    ap.add_argument("--preset", default="llama-30m")
    ap.add_argument("--train-time", default="30m")
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured share (default 0.5)")
    ap.add_argument("--structured", type=float, default=0.3, help="share of parameters removed (default 0.3)")
    ap.add_argument("--heal", default="5m", help="healing budget of each structured row (default 5m)")
    ap.add_argument("--energy", type=float, default=0.9, help="SVD row: Σσ² kept per layer (default 0.9)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--smollm2-calib", default="shakespeare:train", help="SmolLM2's calibration text")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 table (its evals take the longest)")
    ap.add_argument("--sets", nargs="+", default=SETS, help="held-out text sets, in-domain first")
    ap.add_argument("--max-bytes", type=int, default=200_000, help="bytes of each text set scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="where the pruned runs go (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny model and settings, to check it runs")
    a = ap.parse_args()

    import torch

    import slmkit
    from bench.decode import smollm2
    from bench.quantize import parent_run
    from slmkit import LLM

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        if a.smoke:
            a.preset, a.train_time, a.heal, a.calib_samples, a.max_bytes = "llama-0.8m", "20s", "3s", 8, 5_000
            a.no_smollm2 = True
        parent = Path(a.run) if a.run else parent_run(a.preset, a.train_time, a.threads)
        # the first decode of a session builds/loads the C kernels: not a cost any row should carry
        LLM.load(parent, threads=a.threads).generate("The", max_new_tokens=4, temperature=0)
        print(f"CPU: {cpu_model()}; {a.threads} threads; slmkit {slmkit.__version__}; parent {parent}; first "
              f"{a.max_bytes:,} bytes of each set, context ≤ 1024")
        rows = unstructured(parent, work / "trained", a.sets, a, calib=None)
        table(f"Unstructured, one-shot: {parent.name}", rows, a.sets)
        wanda_vs_magnitude(rows, a.sets, a.sparsity)
        results = {"trained_unstructured": rows}
        if not a.no_smollm2:
            _, sm = smollm2(CACHE)
            rows = unstructured(sm, work / "smollm2", a.sets, a, calib=a.smollm2_calib)
            table("Unstructured, one-shot: SmolLM2-135M", rows, a.sets)
            wanda_vs_magnitude(rows, a.sets, a.sparsity)
            results["smollm2_unstructured"] = rows
        rows = structured(parent, work / "structured", a.sets, a)
        table(f"Structured ({100 * a.structured:.0f} % of the parameters) and low-rank, healed {a.heal}: "
              f"{parent.name}", rows, a.sets)
        results["structured"] = rows
        print(json.dumps({"cpu": cpu_model(), "args": {k: str(v) for k, v in vars(a).items()}, **results}),
              file=sys.stderr)


if __name__ == "__main__":
    main()
