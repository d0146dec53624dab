"""Pruning and low-rank factorisation against their parents (issue 15), every row measured in the same run as its
parent with slmkit's eval: bits per byte in- and out-of-domain (Δ % against the parent), KL to the parent, bytes on
disk, parameters (non-zero for unstructured), batch-1 decode tokens/s and its ratio to the parent's.

Unstructured, one-shot (no healing): magnitude and Wanda at --sparsity (default 50 %) and N:M (2:4, Wanda and
magnitude scores) — on a model trained here (`--preset`, default llama-30m, Shakespeare BPE 2048 for --train-time,
cached like bench/quantize.py's parents, or `--run DIR`) and on SmolLM2-135M imported from the installed GGUF (as
bench/decode.py does; it has no training data here, so it calibrates on --smollm2-calib text). The issue's target:
Wanda's Δbpb at most half of magnitude's at the same sparsity.

Structured, on the trained model: FFN channels and whole layers, each sized to remove --structured (default 30 %) of
the parameters, then healed for --heal (default 5m) distilled from the parent; attention heads (--head-share of them,
default 50 %: heads alone hold too few of the parameters to remove 30 %), and a truncated-SVD factorisation at
--energy, healed the same (`--structured-rows` picks). The target, for the rows that remove --structured of the
parameters: decode ≥ 1.25× the parent's with Δbpb ≤ +5 %, the decode ratio read from batch-1 decode timed
interleaved (parent and rows taking turns, as for the VSLM below).

Very sparse (VSLM), on the trained model: magnitude pruning to --vslm-sparsity (default 90 %) gradually during a
--vslm-heal run (Zhu & Gupta's cubic schedule, `slm prune --gradual`), stored sparse with fp32 and with bf16 values;
beside it a dense model of the same family with about as many parameters as the VSLM has non-zeros, trained from
scratch for the parent's training time plus the heal (the same compute clock). Batch-1 decode speed of the fused C step
(CSR kernels for the sparse matrices) is also timed interleaved in this process, parent and VSLM alternating, so the
ratio does not depend on what else the machine did in between. The targets: file ≤ 0.25× the parent's, batch-1 decode
≥ 1.5× faster; who wins on bpb against the dense model of equal non-zeros is reported.
`--csr-sweep` times the CSR product against the dense fp32 one on the parent's matrix shapes over densities, one
matrix at a time (so in cache: it understates what CSR saves when a whole model streams from memory).

    python bench/prune.py                                       # the issue's tables (about an hour on 2 cores)
    python bench/prune.py --run runs/mine --no-smollm2 --heal 2m
    python bench/prune.py --smoke                               # seconds: a tiny model, tiny settings
    python bench/prune.py --only-vslm --vslm-heal 10m           # just the very sparse table
    python bench/prune.py --only-structured --run runs/mine     # just the structured table
    python bench/prune.py --only-structured --structured-rows heads --run runs/mine
    python bench/prune.py --csr-sweep                           # CSR vs dense matrix products, seconds

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


def measure(path: Path, label: str, sets: list[str], a: argparse.Namespace, parent: bool,
            kl: bool = True) -> dict[str, Any]:
    """One row; `kl=False` for a model that is not a child of the table's parent (no KL column)."""
    from slmkit.eval import evaluate

    ev = evaluate(path, lm=sets, efficiency=True, threads=a.threads, max_bytes=a.max_bytes, context=1024,
                  kl_to=None if parent or not kl else "parent")
    meta = json.loads((Path(ev["model"]["path"]) / "meta.json").read_text())
    return {"label": label, "bpb": {s: ev["lm"][s]["bpb"] for s in sets},
            "kl": 0.0 if parent else ev["kl"][sets[0]]["kl_mean"] if kl else None,
            "mb": ev["model"]["bytes_on_disk"] / 1e6,
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
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        print(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {nz} | {r['mb']:.2f} | {r['mb'] / base['mb']:.2f} | "
              f"{cells} | {kl} | {r['decode']:,.1f} | {r['decode'] / base['decode']:.2f}x | {heal} |")


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
    plans = {"channels": (f"channels {100 * channel_share:.0f} % + heal", prune_run,
                          dict(method="channels", sparsity=channel_share, calib_samples=a.calib_samples)),
             "layers": (f"layers {100 * layer_share:.0f} % + heal", prune_run,
                        dict(method="layers", sparsity=layer_share, calib_samples=a.calib_samples)),
             "heads": (f"heads {100 * a.head_share:.0f} % + heal", prune_run,
                       dict(method="heads", sparsity=a.head_share, calib_samples=a.calib_samples)),
             "svd": (f"SVD energy {a.energy} + heal", factorize_run, dict(energy=a.energy))}
    paths = {"parent": parent}
    for label, fn, kw in (plans[name] for name in a.structured_rows):
        out = paths[label] = fn(parent, work / label.split()[0], heal=a.heal, overwrite=True, progress=False, **kw)
        rows.append(measure(out, label, sets, a, parent=False))
    speed = interleaved(paths, a)
    for r in rows:
        r["decode_interleaved"] = speed[r["label"]]
    return rows


def print_interleaved(rows: list[dict]) -> None:
    """The interleaved decode line: each row's tokens/s and its ratio to the first row's (the parent's)."""
    ref = rows[0]["decode_interleaved"]
    print(f"\nbatch-1 decode of the fused C step, interleaved ({len(rows)} models taking turns): " + ", ".join(
        f"{r['label']} {r['decode_interleaved']:,.1f} tok/s ({r['decode_interleaved'] / ref:.2f}x)" for r in rows))


def structured_verdict(rows: list[dict], sets: list[str]) -> None:
    base, s = rows[0], sets[0]
    ref = base["decode_interleaved"]
    print_interleaved(rows)
    for r in rows[1:]:
        speed, dbpb = r["decode_interleaved"] / ref, 100 * (r["bpb"][s] / base["bpb"][s] - 1)
        if r["label"].split()[0] in ("channels", "layers"):  # the rows sized to remove --structured of the parameters
            met = "met" if speed >= 1.25 and dbpb <= 5 else "not met"
            print(f"{r['label']}: decode {speed:.2f}x, Δbpb {dbpb:+.2f} % on {s} (target ≥ 1.25x with ≤ +5 %: {met})")
        else:
            print(f"{r['label']}: decode {speed:.2f}x, Δbpb {dbpb:+.2f} % on {s}")


def decode_tok_s(model: Any, tokens: int, threads: int) -> float:
    """Batch-1 tokens/s of the fused C decode step alone (greedy, after a 16-token prefill), as generation runs it."""
    import time

    import torch

    from slmkit.infer.fused import FusedDecoder

    torch.set_num_threads(threads)
    n = min(tokens, model.config.block_size - 17)
    cache = model.new_cache(1, model.config.block_size)
    with torch.inference_mode():
        logits = model(torch.arange(16)[None] % model.config.vocab_size, cache=cache)[0][0, -1]
        dec = FusedDecoder.for_model(model, cache)
        if dec is None:
            raise SystemExit("the fused C decode step is unavailable here (no C compiler?): nothing to time")
        t0 = time.perf_counter()
        for _ in range(n):
            logits = dec(int(logits.argmax()), cache.pos)
            cache.pos += 1
        return n / (time.perf_counter() - t0)


def interleaved(paths: dict[str, Path], a: argparse.Namespace) -> dict[str, float]:
    """Median batch-1 decode tokens/s of each model, the models taking turns for --rounds rounds."""
    import statistics

    from slmkit import checkpoint

    models = {k: checkpoint.load(p).model for k, p in paths.items()}
    for m in models.values():  # warm-up: builds the C views (CSR for the sparse matrices) and the caches
        decode_tok_s(m, 8, a.threads)
    runs: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.rounds):
        for k, m in models.items():
            runs[k].append(decode_tok_s(m, a.decode_tokens, a.threads))
    return {k: statistics.median(v) for k, v in runs.items()}


def equal_nonzero_config(parent_cfg: Any, nonzero: int, vocab: int) -> Any:
    """The parent's family (norm, FFN, positions) at the depth and width whose parameter count is closest to
    `nonzero`: the dense model a VSLM's non-zeros could have been instead."""
    import torch

    from slmkit.model import GPT

    best = None
    for n_layer in range(2, parent_cfg.n_layer + 1, 2):
        for width in range(64, parent_cfg.n_embd + 1, 32):
            heads = width // 64 if width % 64 == 0 else width // 32  # heads of 64 (or 32) dimensions
            kv = heads // 2 if parent_cfg.n_kv_head < parent_cfg.n_head and heads % 2 == 0 else heads
            cfg = parent_cfg.replace(n_layer=n_layer, n_embd=width, n_head=heads, n_kv_head=kv, mlp_hidden=None,
                                     vocab_size=vocab)
            with torch.device("meta"):
                n = GPT(cfg).num_params()
            if best is None or abs(n - nonzero) < abs(best[0] - nonzero):
                best = (n, cfg)
    return best[1]  # type: ignore[index]


def vslm(parent: Path, work: Path, sets: list[str], a: argparse.Namespace) -> list[dict]:
    from slmkit import checkpoint
    from slmkit.compress.prune import prune_run
    from slmkit.config import TrainConfig, parse_duration
    from slmkit.recipes.quickstart import QUICKSTART_TRAIN
    from slmkit.run import kind_of, read_meta
    from slmkit.train import train

    pct = f"{100 * a.vslm_sparsity:.0f} %"
    sparse = prune_run(parent, work / "vslm", method="magnitude", sparsity=a.vslm_sparsity, gradual=True,
                       heal=a.vslm_heal, overwrite=True, progress=False)
    sparse16 = prune_run(sparse, work / "vslm-bf16", method="magnitude", sparsity=a.vslm_sparsity, values="bf16",
                         overwrite=True, progress=False)  # the same zeros (already pruned), values stored bf16
    pmeta, smeta = read_meta(parent), read_meta(sparse)
    cfg = checkpoint.load(parent).model.config
    dense_cfg = equal_nonzero_config(cfg, smeta["nonzero"], cfg.vocab_size)
    trained = (pmeta.get("result") or {}).get("train_time") or pmeta.get("train_time") or \
        parse_duration(a.train_time)
    seconds = trained + smeta["heal"]["seconds"]
    dense = CACHE / f"vslm-dense-{dense_cfg.n_layer}x{dense_cfg.n_embd}-{seconds:.0f}s"
    if not (kind_of(dense) == "train" and read_meta(dense).get("status") == "finished"):
        tc = TrainConfig(**{**QUICKSTART_TRAIN, "max_time": seconds, "threads": a.threads})
        train(smeta["data"], dense, dense_cfg, tc, overwrite=True, progress=False)
    rows = [measure(parent, "parent", sets, a, parent=True),
            measure(sparse, f"VSLM {pct} gradual, fp32 values", sets, a, parent=False),
            measure(sparse16, f"VSLM {pct}, bf16 values", sets, a, parent=False),
            measure(dense, f"dense {dense_cfg.n_layer}x{dense_cfg.n_embd}, equal non-zeros, {seconds:.0f} s",
                    sets, a, parent=False, kl=False)]
    rows[2]["kl_to_fp32_values"] = rows[2].pop("kl")  # its parent is the fp32-valued VSLM: the rounding's cost
    rows[2]["kl"] = None
    speed = interleaved({"parent": parent, "vslm": sparse, "vslm_bf16": sparse16, "dense": dense}, a)
    for r, k in zip(rows, speed, strict=True):
        r["decode_interleaved"] = speed[k]
    return rows


def vslm_verdict(rows: list[dict], sets: list[str]) -> None:
    base, sp, sp16, dense = rows
    print_interleaved(rows)
    for r in (sp, sp16):
        size, speed = r["mb"] / base["mb"], r["decode_interleaved"] / base["decode_interleaved"]
        print(f"{r['label']}: file {size:.3f}x the parent's (target ≤ 0.25: {'met' if size <= 0.25 else 'not met'}), "
              f"batch-1 decode {speed:.2f}x (target ≥ 1.5: {'met' if speed >= 1.5 else 'not met'})")
    print(f"bf16 values cost KL {sp16['kl_to_fp32_values']:.5f} nats/token against the fp32-valued VSLM")
    s = sets[0]
    winner = "the VSLM" if sp["bpb"][s] < dense["bpb"][s] else "the dense model"
    print(f"equal non-zeros on {s}: VSLM {sp['bpb'][s]:.4f} vs dense {dense['bpb'][s]:.4f} bpb — {winner} wins")


def csr_sweep(a: argparse.Namespace) -> None:
    """Dense fp32 vs CSR (fp32 and bf16 values) products on the parent preset's matrix shapes, over densities, at 1
    and 8 activation rows: the ratio dense time / CSR time (> 1: CSR faster)."""
    import ctypes
    import time

    import torch

    from slmkit import kernels
    from slmkit.config import ModelConfig

    torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("the C kernels are unavailable here")
    cfg = ModelConfig.preset(a.preset)
    C, H, hd = cfg.n_embd, cfg.mlp_hidden, cfg.head_dim
    shapes = {"qkv": ((cfg.n_head + 2 * cfg.n_kv_head) * hd, C), "proj": (C, C),
              "fc": ((2 if cfg.mlp == "swiglu" else 1) * H, C), "down": (C, H)}

    def timed(m: Any, x: torch.Tensor, y: torch.Tensor, scratch: Any) -> float:
        lib, best = kernels._lib, float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(a.sweep_reps):
                lib.slm_matmul(ctypes.byref(m), x.data_ptr(), x.shape[0], y.data_ptr(),  # type: ignore[union-attr]
                               ctypes.byref(scratch.acts), a.threads)
            best = min(best, (time.perf_counter() - t0) / a.sweep_reps)
        return best

    print(f"\n### CSR vs dense fp32 products, {a.preset} shapes, {a.threads} threads (dense µs / CSR µs)\n")
    print("| matrix | rows M | density | dense µs | CSR fp32 | CSR bf16 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in shapes.items():
        for M in (1, 8):
            x = torch.randn(M, K, generator=g)
            y = torch.empty(M, N)
            scratch = kernels._Scratch(M, K)
            for d in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5):
                w = torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) < d)
                dense = timed(kernels.mat(w), x, y, scratch)
                c32, _k1 = kernels.csr(w, values=torch.float32)
                c16, _k2 = kernels.csr(w, values=torch.bfloat16)
                t32, t16 = timed(c32, x, y, scratch), timed(c16, x, y, scratch)
                print(f"| {name} {N}x{K} | {M} | {d:.2f} | {1e6 * dense:.1f} | {dense / t32:.2f}x | "
                      f"{dense / t16:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained run to prune (default: train --preset here)")
    ap.add_argument("--preset", default="llama-30m")
    ap.add_argument("--train-time", default="30m")
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured share (default 0.5)")
    ap.add_argument("--structured", type=float, default=0.3, help="share of parameters removed (default 0.3)")
    ap.add_argument("--heal", default="5m", help="healing budget of each structured row (default 5m)")
    ap.add_argument("--energy", type=float, default=0.9, help="SVD row: Σσ² kept per layer (default 0.9)")
    ap.add_argument("--head-share", type=float, default=0.5, help="heads row: share of heads removed (default 0.5)")
    ap.add_argument("--structured-rows", nargs="*", choices=("channels", "layers", "heads", "svd"),
                    default=["channels", "layers", "heads", "svd"],
                    help="the structured table's rows (default all; none: skip the table)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--smollm2-calib", default="shakespeare:train", help="SmolLM2's calibration text")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 table (its evals take the longest)")
    ap.add_argument("--sets", nargs="+", default=SETS, help="held-out text sets, in-domain first")
    ap.add_argument("--max-bytes", type=int, default=200_000, help="bytes of each text set scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="where the pruned runs go (default: a temporary directory)")
    ap.add_argument("--vslm-sparsity", type=float, default=0.9, help="the very sparse model's zeros (default 0.9)")
    ap.add_argument("--vslm-heal", default="10m", help="the gradual pruning run's budget (default 10m)")
    ap.add_argument("--no-vslm", action="store_true", help="skip the very sparse table")
    ap.add_argument("--only-vslm", action="store_true", help="only the very sparse table")
    ap.add_argument("--only-structured", action="store_true", help="only the structured and low-rank table")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved decode timing: rounds (default 5)")
    ap.add_argument("--decode-tokens", type=int, default=256, help="tokens per timed decode (default 256)")
    ap.add_argument("--csr-sweep", action="store_true", help="only time CSR vs dense products over densities")
    ap.add_argument("--sweep-reps", type=int, default=200, help="--csr-sweep: products per timing")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny model and settings, to check it runs")
    a = ap.parse_args()
    if a.csr_sweep:
        csr_sweep(a)
        return

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
            a.no_smollm2, a.vslm_heal, a.rounds, a.decode_tokens = True, "5s", 2, 64
        parent = Path(a.run) if a.run else parent_run(a.preset, a.train_time, a.threads)
        # the first decode of a session builds/loads the C kernels: not a cost any row should carry
        LLM.load(parent, threads=a.threads).generate("The", max_new_tokens=4, temperature=0)
        print(f"CPU: {cpu_model()}; {a.threads} threads; slmkit {slmkit.__version__}; parent {parent}; first "
              f"{a.max_bytes:,} bytes of each set, context ≤ 1024")
        results: dict[str, Any] = {}
        if not a.no_vslm and not a.only_structured:
            rows = vslm(parent, work / "vslm", a.sets, a)
            table(f"Very sparse: {100 * a.vslm_sparsity:.0f} % by gradual magnitude pruning over {a.vslm_heal}, vs "
                  f"the parent and a dense model of equal non-zeros: {parent.name}", rows, a.sets)
            vslm_verdict(rows, a.sets)
            results["vslm"] = rows
        if a.only_vslm:
            print(json.dumps({"cpu": cpu_model(), "args": {k: str(v) for k, v in vars(a).items()}, **results}),
                  file=sys.stderr)
            return
        if not a.only_structured:
            rows = unstructured(parent, work / "trained", a.sets, a, calib=None)
            table(f"Unstructured, one-shot: {parent.name}", rows, a.sets)
            wanda_vs_magnitude(rows, a.sets, a.sparsity)
            results["trained_unstructured"] = rows
        if not a.no_smollm2 and not a.only_structured:
            _, sm = smollm2(CACHE)
            rows = unstructured(sm, work / "smollm2", a.sets, a, calib=a.smollm2_calib)
            table("Unstructured, one-shot: SmolLM2-135M", rows, a.sets)
            wanda_vs_magnitude(rows, a.sets, a.sparsity)
            results["smollm2_unstructured"] = rows
        if a.structured_rows:
            rows = structured(parent, work / "structured", a.sets, a)
            table(f"Structured ({100 * a.structured:.0f} % of the parameters) and low-rank, healed {a.heal}: "
                  f"{parent.name}", rows, a.sets)
            structured_verdict(rows, a.sets)
            results["structured"] = rows
        print(json.dumps({"cpu": cpu_model(), "args": {k: str(v) for k, v in vars(a).items()}, **results}),
              file=sys.stderr)


if __name__ == "__main__":
    main()
