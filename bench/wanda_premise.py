"""Why Wanda beats magnitude pruning on one model and not on another (issue 15's Wanda target), in one run per model:

1. The premise: Wanda scores |W_ij|·‖X_j‖, which only differs from |W_ij| where a few input features j carry
   outsized activations. For every prunable linear, the spread of its input-feature norms ‖X_j‖ (max / median over j,
   on --tokens tokens of Shakespeare) — summarised as the median, 90th percentile and max over the linears.
2. The comparison group: Wanda (the paper's, and `slm prune --method wanda`) keeps the best half of each output row;
   magnitude keeps the best half of each matrix. The same Wanda score with magnitude's per-matrix group separates
   what the activation factor buys from what the per-row group costs. Held-out bpb of magnitude, Wanda per row and
   Wanda per matrix at --sparsity, each against the parent (Δ and the ratio to magnitude's Δ).

    python bench/wanda_premise.py --run ~/.cache/slmkit-bench/quant-parent-llama-10m-15m
    python bench/wanda_premise.py --run runs/smollm2 --calib shakespeare:train --no-prune    # just the spread

Markdown on stdout with the CPU model; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_model


def feature_spread(run: Path, tokens: int) -> list[float]:
    """max/median of ‖X_j‖ for every prunable linear of `run` (what Wanda weighs), on the first `tokens` tokens of
    Shakespeare; the sums of squares come from the same hooks `slm prune` calibrates with."""
    import torch

    from slmkit import checkpoint
    from slmkit.compress.prune import _input_sumsq, prunable
    from slmkit.data.corpora import iter_documents

    ck = checkpoint.load(run)
    model = ck.model.eval()
    text = "\n".join(d.text for d in iter_documents("shakespeare"))[: 20 * tokens]
    ids = torch.tensor(ck.tokenizer.encode(text)[: tokens // 256 * 256]).view(-1, 256)
    with torch.no_grad(), _input_sumsq(list(prunable(model).values())) as sq:
        for row in ids:
            model(row[None])
    return sorted((v.sqrt().max() / v.sqrt().median()).item() for v in sq.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the model (a run or checkpoint)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib", help="calibration text for Wanda (default: the run's own training data)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--set", default="shakespeare:val", help="held-out text scored")
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens for the input-norm spread")
    ap.add_argument("--no-prune", action="store_true", help="only the spread")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    spread = feature_spread(a.run, a.tokens)
    print(f"CPU: {cpu_model()}; {a.threads} threads; {a.run}\n")
    print(f"input-feature norm spread (max/median) over {len(spread)} prunable linears: median "
          f"{statistics.median(spread):.1f}, p90 {spread[int(0.9 * len(spread))]:.1f}, max {spread[-1]:.1f}")
    if a.no_prune:
        return

    from slmkit.compress import prune as P
    from slmkit.eval import evaluate

    def bpb(path: Path) -> float:
        return evaluate(path, lm=[a.set], threads=a.threads, max_bytes=a.max_bytes, context=1024)["lm"][a.set]["bpb"]

    by_row = P._keep_per_row

    def by_matrix(metric: torch.Tensor, s: float) -> torch.Tensor:  # magnitude's group: one threshold per matrix
        return by_row(metric.flatten(-2), s).view(metric.shape)

    rows = {"parent": bpb(a.run)}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, keep in (("magnitude", "magnitude", by_row), ("Wanda, per row", "wanda", by_row),
                                    ("Wanda, per matrix", "wanda", by_matrix)):
            P._keep_per_row = keep  # only the Wanda branch calls it on an unflattened (N, K) score
            try:
                out = P.prune_run(a.run, Path(tmp) / method, method=method, sparsity=a.sparsity, calib=a.calib,
                                  calib_samples=a.calib_samples, overwrite=True)
            finally:
                P._keep_per_row = by_row
            rows[label] = bpb(out)
    base, dm = rows["parent"], rows["magnitude"] - rows["parent"]
    print(f"\n| {100 * a.sparsity:.0f} % | bpb {a.set} | Δ | Δ / magnitude's |\n|---|---|---|---|")
    for label, v in rows.items():
        ratio = f"{(v - base) / dm:.2f}" if label != "parent" and dm else ""
        print(f"| {label} | {v:.4f} | {v - base:+.4f} | {ratio} |")


if __name__ == "__main__":
    main()
