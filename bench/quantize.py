"""Quantization quality and cost: one fp32 model (the peer every row is measured against, in the same run) and its
quantized checkpoints — method × bits × group → bpb in- and out-of-domain, Δbpb %, KL to the fp32 parent, MB on
disk, bits per weight, decode tok/s and peak RSS (batch 1, fresh process).

Quality must be measured on weights that are not already 4-bit (the shipped SmolLM2 is a Q4_1 GGUF), so the parent is
trained here: `--preset` on Shakespeare (BPE 2048) for `--train-time`, cached under ~/.cache/slmkit-bench and reused
when the same preset and budget were trained before (or give `--run DIR`).

    python bench/quantize.py --preset llama-10m --train-time 25m      # the issue's quality table
    python bench/quantize.py --run runs/mine --methods rtn gptq --groups 32 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE

SETS = ("shakespeare:val", "shakespeare:folio")


def parent_run(preset: str, train_time: str, threads: int) -> Path:
    from slmkit.config import ModelConfig, TrainConfig
    from slmkit.data import prepare
    from slmkit.recipes.quickstart import QUICKSTART_TRAIN
    from slmkit.run import kind_of, read_meta
    from slmkit.train import train

    data = CACHE / "shakespeare-bpe2048"
    if kind_of(data) != "data":
        prepare("shakespeare", "bpe:2048", data, overwrite=True, progress=False)
    out = CACHE / f"quant-parent-{preset}-{train_time}"
    if kind_of(out) == "train" and read_meta(out).get("status") == "finished":
        return out
    tc = TrainConfig(**{**QUICKSTART_TRAIN, "max_time": train_time, "threads": threads})
    train(data, out, ModelConfig.preset(preset), tc, overwrite=True, progress=False)
    return out


def row(path: Path, label: str, threads: int, max_bytes: int, kl: bool) -> dict:
    from slmkit.eval import evaluate

    ev = evaluate(path, lm=list(SETS), efficiency=True, threads=threads, max_bytes=max_bytes, context=1024,
                  kl_to="parent" if kl else None)
    meta = json.loads((Path(ev["model"]["path"]) / "meta.json").read_text())
    return {"label": label, "bpb": {s: ev["lm"][s]["bpb"] for s in SETS},
            "kl": ev["kl"][SETS[0]]["kl_mean"] if kl else 0.0,
            "top1": ev["kl"][SETS[0]]["top1_agree"] if kl else 1.0,
            "mb": ev["model"]["bytes_on_disk"] / 1e6,
            "bpw": (meta.get("storage") or {}).get("bits_per_weight") or 32.0,
            "decode": ev["efficiency"]["decode_tok_s"], "prefill": ev["efficiency"]["prefill_tok_s"],
            "rss": ev["efficiency"]["peak_rss_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an fp32 run or checkpoint to quantize (default: train --preset here)")
    p.add_argument("--preset", default="llama-10m")
    p.add_argument("--train-time", default="25m")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=250_000, help="bytes of each text set scored")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch

    from slmkit.compress.stage import quantize_run
    from slmkit.errors import SlmError

    torch.set_num_threads(a.threads)
    parent = Path(a.run) if a.run else parent_run(a.preset, a.train_time, a.threads)
    rows = [row(parent, "fp32 (parent)", a.threads, a.max_bytes, kl=False)]
    with tempfile.TemporaryDirectory() as tmp:
        out = quantize_run(parent, Path(tmp) / "int8", weights="int8")
        rows.append(row(out, "int8 rtn", a.threads, a.max_bytes, kl=True))
        for method in a.methods:
            for g in a.groups:
                try:
                    out = quantize_run(parent, Path(tmp) / f"int4-{method}-{g}", weights="int4", group=g,
                                       method=method, calib_samples=a.calib_samples)
                except SlmError as e:  # e.g. a group that does not divide this model's widths
                    print(f"skipped int4 {method} g{g}: {e}")
                    continue
                rows.append(row(out, f"int4 {method} g{g}", a.threads, a.max_bytes, kl=True))
    base = rows[0]["bpb"]
    print(f"parent: {parent}  ({a.threads} threads, first {a.max_bytes:,} bytes of each set, context ≤ 1024)")
    print("| weights | bits/w | MB | bpb val | Δ val | bpb folio | Δ folio | KL | same top-1 | decode tok/s | "
          "prefill tok/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = {s: 100 * (r["bpb"][s] / base[s] - 1) for s in SETS}
        print(f"| {r['label']} | {r['bpw']:.2f} | {r['mb']:.2f} | {r['bpb'][SETS[0]]:.4f} | {d[SETS[0]]:+.2f} % | "
              f"{r['bpb'][SETS[1]]:.4f} | {d[SETS[1]]:+.2f} % | {r['kl']:.4f} | {100 * r['top1']:.1f} % | "
              f"{r['decode']:,.0f} | {r['prefill']:,.0f} | {r['rss']:,.0f} |")


if __name__ == "__main__":
    main()
