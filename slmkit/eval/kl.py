"""How far a compressed model's predictions moved from its parent's: per-token KL divergence over held-out text.

    KL(P‖Q) = Σ_v P(v) · (log P(v) − log Q(v)),  P = the parent's next-token distribution, Q = the compressed model's

averaged over every scored token of the text (the same sliding windows as bits per byte), as `llama-perplexity
--kl-divergence` reports it, with its median, 99th percentile and maximum, and how often both models' most likely
token agree ("same top" in llama.cpp). Bits per byte says how much worse a quantized model got on average; KL says how
much its output distribution changed, which bpb can hide (errors that cancel on average still change samples).
Both models' bits per byte on the same windows come with it, so a compressed model's Δbpb is known even when its
parent is not otherwise evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.api import LLM
from slmkit.errors import SlmError
from slmkit.eval.lm import default_stride, encode_documents, sliding_windows


@torch.no_grad()
def kl_divergence(model: LLM, parent: LLM, texts: Sequence[str], *, context: int | None = None,
                  stride: int | None = None) -> dict[str, Any]:
    """KL(parent ‖ model) per scored token of `texts` (nats): {"kl_mean", "kl_median", "kl_p99", "kl_max",
    "top1_agree", "tokens", "bpb", "parent_bpb", "bytes", ...}, `bpb` and `parent_bpb` the two models' bits per byte
    on these windows (the smaller context of the two). Both must be transformers over the same tokenizer (a compressed
    model and its parent, a distilled student and its teacher)."""
    a, b = getattr(model.lm, "module", None), getattr(parent.lm, "module", None)
    if a is None or b is None:
        raise SlmError("KL divergence compares two transformers' distributions; an n-gram model has no parent to "
                       "compare with")
    if model.tokenizer.sha256 != parent.tokenizer.sha256:
        raise SlmError("the model and its parent tokenize differently, so their next-token distributions do not "
                       "compare; KL needs the parent it was compressed from")
    if a.config.vocab_size != b.config.vocab_size:
        raise SlmError(f"the model has {a.config.vocab_size} output ids and its parent {b.config.vocab_size}: their "
                       f"next-token distributions do not compare")
    T = min(context or a.config.block_size, a.config.block_size, b.config.block_size)
    stride = stride or default_stride(T)
    kls, agree, nats, parent_nats, n_bytes = [], 0, 0.0, 0.0, 0
    a.eval(), b.eval()
    for doc in encode_documents(parent.tokenizer, texts):
        n_bytes += doc.bytes
        prev = 1
        for s, e in sliding_windows(len(doc.ids), T, stride):
            n = e - prev
            prev = e
            x = torch.tensor(doc.ids[s:e - 1])[None]  # (1, L): the inputs whose last n positions predict new targets
            logp = F.log_softmax(b(x)[0][0, -n:].float(), dim=-1)  # (n, V) the parent
            logq = F.log_softmax(a(x)[0][0, -n:].float(), dim=-1)
            y = torch.tensor(doc.ids[e - n:e])[:, None]  # (n, 1) the targets, as bits per byte scores them
            nats -= float(logq.gather(-1, y).double().sum())
            parent_nats -= float(logp.gather(-1, y).double().sum())
            kls.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0).double().numpy())  # ≥ 0 up to rounding
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    if not kls:
        raise SlmError("no text to compare on: every document is shorter than two tokens")
    k = np.concatenate(kls)
    return {"kl_mean": float(k.mean()), "kl_median": float(np.median(k)), "kl_p99": float(np.quantile(k, 0.99)),
            "kl_max": float(k.max()), "top1_agree": agree / len(k), "tokens": len(k), "context": T,
            "stride": stride, "bpb": nats / math.log(2) / n_bytes, "parent_bpb": parent_nats / math.log(2) / n_bytes,
            "bytes": n_bytes}
