"""The maths of `slm compare`: which models are on the Pareto front, and which class of model a row is.

>>> pareto_front([(1, 3), (2, 2), (3, 3), (2, 2)])
[True, True, False, True]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# what the spectrum report groups models by: how they were built (trained from scratch with one architecture, counted,
# imported) or, for a model made from another, how it was made
CLASSES = ("n-gram", "super-tiny", "small dense", "MoE", "sliding-window", "block-sparse", "Performer (linear)",
           "Reformer (LSH)", "shared-FFN", "low-rank", "very sparse", "pruned", "quantized", "distilled",
           "imported pretrained")
VERY_SPARSE = 0.9  # the share of zero weights from which a pruned model is a very sparse language model (VSLM)
ATTENTION = {"local": "sliding-window", "blocksparse": "block-sparse", "linear": "Performer (linear)",
             "lsh": "Reformer (LSH)"}
MADE_BY = {"quantize": "quantized", "prune": "pruned", "distill": "distilled"}  # factorize: low-rank, by its config


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


def classify(model_class: str | None, config: dict[str, Any], tokenizer: str | None, params_total: int | None, *,
             kind: str | None = None, sparsity: float | None = None) -> str:
    """One of CLASSES, from meta.json's "model_class", the model config, the run `kind` that made it from a parent
    (quantize, prune, factorize, distill; None for a model built from scratch) and its share of zero weights.

    >>> classify("dense", {"attention": "lsh"}, "bpe:2048", 3_000_000)
    'Reformer (LSH)'
    >>> classify("dense", {}, "bpe:2048", 3_000_000, kind="prune", sparsity=0.95)
    'very sparse'
    """
    if model_class == "ngram":
        return "n-gram"
    if model_class == "imported":
        return "imported pretrained"
    # to the percent: pruning int(s · K) weights of each row or matrix leaves a measured share a hair under s
    if sparsity is not None and round(sparsity, 2) >= VERY_SPARSE:
        return "very sparse"
    if kind in MADE_BY:
        return MADE_BY[kind]
    if (config.get("moe_experts") or 0) > 1 or model_class == "moe":
        return "MoE"
    if config.get("attention", "full") in ATTENTION:
        return ATTENTION[config["attention"]]
    if config.get("share_mlp") or config.get("share_blocks"):
        return "shared-FFN"
    if config.get("lowrank"):
        return "low-rank"
    if tokenizer == "byte" and params_total is not None and params_total < 1_000_000:
        return "super-tiny"
    return "small dense"
