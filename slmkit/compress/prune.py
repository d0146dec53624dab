"""Pruning as a transform, and `slm prune`: a run in, a pruned run out.

    slm prune runs/shk --method wanda --sparsity 0.5 --out runs/shk-wanda50        # calibrated on its training data
    slm prune runs/shk --method nm:2:4 --out runs/shk-24
    slm prune runs/shk --method channels --sparsity 0.3 --heal 5m --out runs/shk-c30

Unstructured methods zero single weights of every block linear (attention qkv/proj, MLP fc/proj, low-rank factors,
MoE expert stacks; never the embeddings, the head or MoE routers, which pick the experts) and keep the shapes:

- magnitude: the smallest |W| of each matrix (per layer, as Han et al. and the Wanda reference's magnitude baseline
  compare them — the baseline the issue's anchors measure, so "Wanda vs magnitude" compares like with like).
- wanda (Sun et al. 2023): the smallest |W_ij| · ‖X_j‖₂, X_j the calibration inputs of column j, compared within each
  output row as the paper does (a row's outputs are sums over its inputs, so that is where the scores compete).
  Layers are pruned in forward order, each measured on inputs computed by the already-pruned layers before it; the
  linears of one block are measured together, before any of them is pruned (as the reference code does). An expert
  of an MoE layer is measured on the tokens routed to it (by magnitude if calibration routed none to it).
- nm:N:M (semi-structured, NVIDIA's N:M): N of every M consecutive weights along the input dimension kept, by the
  Wanda score (or `score="magnitude"`); M must divide every input width.

Gradual (`--gradual`, magnitude only): a very sparse model (VSLM, ≥ 90 % zeros) is not pruned at once but during
the healing run, by Zhu & Gupta's cubic schedule (slmkit.compress.heal.CubicSchedule): the model starts dense and the
sparsity rises to `sparsity` over the first three quarters of the --heal budget, masks recomputed every few steps, the
rest of the budget training at the final sparsity.

A pruned checkpoint stores those matrices sparse (slmkit.compress.sparse); loading gives the dense model with its
zeros. Dense kernels would decode it at the parent's speed; the fused C decode step reads a matrix with few enough
non-zeros (kernels.CSR_MAX_DENSITY) as CSR instead, so a very sparse model decodes faster than its parent.

Structured methods remove whole units and give a smaller dense model of an ordinary ModelConfig, so every code path
— the fused C decode included — runs it as it is, faster by the share of weights removed:

- channels: FFN hidden channels (SwiGLU: gate and up rows with the down column; GELU: fc row and proj column), by
  ‖a_j‖₂ · ‖W_proj[:, j]‖₂ — a_j the channel's activations on calibration text: the size of what the channel adds to
  the residual stream. ModelConfig has one `mlp_hidden`, so every layer keeps the same number of channels (its own
  best ones); the count is rounded to a multiple of 32 when the width is one, so the model still quantizes to int4.
- layers: whole blocks, by ShortGPT's block influence 1 − mean cos(x_in, x_out) on calibration text (the blocks that
  change the residual stream least go).
- heads: attention heads, by Σ_t ‖W_o[:, h] y_h,t‖² — how much head h adds to the residual stream over the
  calibration tokens (y_h,t its output at token t; Minitron's activation-based head importance). ModelConfig has one
  n_head and n_kv_head, so every layer keeps the same number (its own best ones), and grouped-query attention stays
  grouped: the kept count is rounded to one that either drops whole KV groups (a key/value head with all its query
  heads; the KV cache shrinks too) or keeps every KV head and the same number of query heads in each group,
  whichever is nearer the request (ties: the one that removes less). The head size stays; the config records it
  (head_size), as the attention is then narrower than n_embd.

For structured methods `sparsity` is the share of the units removed (channels of each FFN, layers, query heads); the
parameters removed follow, and are recorded. Measured on the unpruned model in one calibration pass (Minitron,
ShortGPT).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit import checkpoint, run
from slmkit.compress import sparse
from slmkit.compress.gptq import layer_inputs
from slmkit.compress.heal import CubicSchedule, compare_to_parent, heal_and_compare, heal_data
from slmkit.compress.stage import calibration_tokens, load_parent, write_run
from slmkit.config import parse_duration
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.model.ffn import MLP, MoE

UNSTRUCTURED = ("magnitude", "wanda", "nm")
STRUCTURED = ("channels", "layers", "heads")
SCORES = ("wanda", "magnitude")
ALIGN = 32  # channels are kept in multiples of this (int4 groups and SIMD rows want it)


@dataclass(frozen=True)
class Method:
    """A parsed `--method`: kind (magnitude | wanda | nm | channels | layers | heads), and N:M's n and m."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Method:
        if text in ("magnitude", "wanda", *STRUCTURED):
            return cls(text)
        match = re.fullmatch(r"nm:(\d+):(\d+)", text)
        if match is None:
            raise SlmError(f"--method {text!r} is not one of magnitude, wanda, nm:N:M (e.g. nm:2:4), channels, "
                           f"layers, heads")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise SlmError(f"--method {text}: N:M keeps N of every M weights, so it needs 0 < N < M")
        return cls("nm", n, m)

    def calibrated(self, score: str) -> bool:
        return self.kind in ("wanda", "channels", "layers", "heads") or (self.kind == "nm" and score == "wanda")


def check_request(method: Method, sparsity: float | None, score: str, calib: object, gradual: bool = False,
                  healing: bool = False) -> None:
    """The request's own consistency, checked before any work (`calib`: whatever names the calibration data;
    `healing`: whether a heal budget was given)."""
    if score not in SCORES:
        raise SlmError(f"--score {score!r} is not one of {', '.join(SCORES)}")
    if method.kind == "nm":
        if sparsity is not None:
            raise SlmError(f"N:M sets the sparsity itself ({method.n}:{method.m} keeps {method.n} of {method.m}); "
                           f"drop --sparsity")
    elif sparsity is None:
        raise SlmError(f"--method {method.kind} needs --sparsity S, the share to remove, in [0, 1)")
    elif not (isinstance(sparsity, int | float) and 0 <= sparsity < 1):
        raise SlmError(f"--sparsity {sparsity} must be in [0, 1): the share of weights (or units) removed")
    if calib is not None and not method.calibrated(score):
        raise SlmError(f"--calib is for calibrated methods (wanda, nm with the wanda score, channels, layers, heads); "
                       f"{method.kind} needs none")
    if gradual and method.kind != "magnitude":
        raise SlmError(f"--gradual prunes by magnitude while healing; use --method magnitude, not {method.kind}")
    if gradual and not healing:
        raise SlmError("--gradual prunes during healing, so it needs a budget: add --heal DURATION (e.g. --heal 5m)")


def prune_model(model: GPT, method: str, sparsity: float | None = None, *, calib: Tensor | None = None,
                score: str = "wanda") -> GPT:
    """Prune `model` by `method` ("magnitude", "wanda", "nm:N:M", "channels", "layers", "heads") removing the share
    `sparsity` (None for N:M), calibrated on the token ids `calib` (B, T) where the method measures activations;
    `score` ranks N:M groups ("wanda" or "magnitude"). Unstructured methods zero weights in place and return
    `model`; structured ones return a new, smaller GPT (the module docstring says what each removes and how).

    >>> pruned = prune_model(model, "wanda", 0.5, calib=calib_ids)
    >>> smaller = prune_model(model, "channels", 0.3, calib=calib_ids)
    """
    return _prune(model, Method.parse(method), sparsity, calib, score)[0]


def _prune(model: GPT, m: Method, sparsity: float | None, calib: Tensor | None,
           score: str) -> tuple[GPT, dict[str, Any]]:
    """prune_model, and a record of what was removed (for meta.json)."""
    check_request(m, sparsity, score, None)
    if m.calibrated(score):
        _check_calib(model, calib, m.kind)
    elif calib is not None:
        raise SlmError("pruning by |W| alone needs no calibration data; drop calib")
    s = sparsity or 0.0  # N:M's is its own
    if m.kind in UNSTRUCTURED:
        return _unstructured(model, m, s, calib)
    return {"channels": _channels, "layers": _layers, "heads": _heads}[m.kind](model, s, calib)  # type: ignore[arg-type]


def _check_calib(model: GPT, calib: Tensor | None, kind: str) -> None:
    if calib is None:
        raise SlmError(f"--method {kind} measures activations: it needs calibration token ids (batch, tokens)")
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype.is_floating_point or calib.numel() == 0:
        raise SlmError("calibration data must be a (batch, tokens) tensor of token ids")
    V, ctx = model.config.vocab_size, model.config.block_size
    if calib.shape[1] > ctx or calib.min() < 0 or calib.max() >= V:
        raise SlmError(f"calibration windows must be at most {ctx} tokens of ids in [0, {V}) for this model")


# --- unstructured --------------------------------------------------------------------------------------------------


def prunable(model: GPT) -> dict[str, tuple[nn.Module, str]]:
    """The weights unstructured pruning touches, by state-dict key: (module, attribute) of every block nn.Linear and
    MoE expert stack; not the head, the embeddings or MoE routers. A shared module appears once."""
    skip = {id(model.lm_head)} | {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in skip:
            out[f"{name}.weight"] = (mod, "weight")
        elif isinstance(mod, MoE):
            if not isinstance(mod.fc, nn.Parameter):
                raise SlmError("this model's experts are quantized; prune its fp32 parent")
            out[f"{name}.fc"], out[f"{name}.proj"] = (mod, "fc"), (mod, "proj")
    return out


def _matrix(mod: nn.Module, attr: str) -> Tensor:
    """The weight as (..., out, in), a view: nn.Linear stores (out, in); an MoE stack (E, in, out) for x @ fc[e]."""
    w = getattr(mod, attr)
    return w.detach() if isinstance(mod, nn.Linear) else w.detach().transpose(-1, -2)


def _keep_per_row(metric: Tensor, s: float) -> Tensor:
    """True for all but the int(s · K) lowest-scoring entries of each row (..., K); ties go to the earlier index."""
    k = int(s * metric.shape[-1])
    keep = torch.ones_like(metric, dtype=torch.bool)
    if k:
        keep.scatter_(-1, metric.argsort(dim=-1, stable=True)[..., :k], False)
    return keep


def _keep_nm(metric: Tensor, n: int, m: int) -> Tensor:
    """True for the n highest-scoring of every m consecutive entries along the last dim."""
    *lead, N, K = metric.shape
    groups = metric.reshape(*lead, N, K // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view(metric.shape)


class _ExpertInputs(nn.Module):
    """Stands in for an MoE weight stack while calibrating: computes x @ stack[e] (MoE calls a module stack as
    stack(x, e), as it calls a quantized one) and sums the squares of each expert's inputs, (E, in)."""

    def __init__(self, stack: Tensor):
        super().__init__()
        self.stack = stack
        self.sumsq = torch.zeros(stack.shape[0], stack.shape[1], dtype=torch.float64)

    def forward(self, x: Tensor, e: int) -> Tensor:
        self.sumsq[e] += x.double().square().sum(0)
        return x @ self.stack[e]


@contextlib.contextmanager
def _input_sumsq(targets: list[tuple[nn.Module, str]]) -> Iterator[dict[tuple[int, str], Tensor]]:
    """Σ x_j² over every token each target's column j sees while the block runs inside the context: (in,) for a
    linear, (E, in) for an expert stack; keyed by (id(module), attribute), complete when the context exits."""
    sums: dict[tuple[int, str], Tensor] = {}
    handles, swapped = [], []
    for mod, attr in targets:
        if isinstance(mod, nn.Linear):
            acc = sums[(id(mod), attr)] = torch.zeros(mod.in_features, dtype=torch.float64)

            def hook(_m: nn.Module, args: tuple[Tensor, ...], acc: Tensor = acc) -> None:
                acc += args[0].reshape(-1, acc.numel()).double().square().sum(0)

            handles.append(mod.register_forward_pre_hook(hook))
        else:
            stack = getattr(mod, attr)
            rec = _ExpertInputs(stack)
            delattr(mod, attr)  # a parameter slot cannot take a module
            setattr(mod, attr, rec)
            swapped.append((mod, attr, stack, rec))
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()
        for mod, attr, stack, rec in swapped:
            delattr(mod, attr)
            setattr(mod, attr, stack)
            sums[(id(mod), attr)] = rec.sumsq


def _unstructured(model: GPT, m: Method, s: float, calib: Tensor | None) -> tuple[GPT, dict[str, Any]]:
    targets = prunable(model)
    if m.kind == "nm":
        for key, (mod, attr) in targets.items():
            K = _matrix(mod, attr).shape[-1]
            if K % m.m:
                raise SlmError(f"nm:{m.n}:{m.m}: M={m.m} does not divide the input width {K} of {key}; choose an M "
                               f"that divides every width (e.g. 4 or 8)")

    def prune(key: str, norms: Tensor | None) -> None:
        mod, attr = targets[key]
        w = _matrix(mod, attr)  # (..., N, K), a view of the parameter
        metric = w.abs()
        if norms is not None:  # Wanda: |W_ij| · ‖X_j‖; a matrix that saw no calibration input falls back to |W|
            norms = norms.sqrt().float()
            norms = torch.where(norms.sum(-1, keepdim=True) > 0, norms, 1.0)
            metric = metric * norms.unsqueeze(-2)
        if m.kind == "nm":
            keep = _keep_nm(metric, m.n, m.m)
        elif m.kind == "wanda":
            keep = _keep_per_row(metric, s)
        else:  # magnitude: one threshold per matrix (per expert for a stack)
            keep = _keep_per_row(metric.flatten(-2), s).view(metric.shape)
        w.mul_(keep)

    with torch.no_grad():
        if calib is None:
            for key in targets:
                prune(key, None)
        else:
            done: set[str] = set()
            for layer, run_layer, xs in layer_inputs(model, calib):
                if layer is model.norm_f:  # the head's turn: never pruned
                    continue
                # the block's own modules and a shared FFN (held by GPT.shared_mlp, not by the block)
                mods = {id(x) for x in [*layer.modules(), *layer.mlp.modules()]}
                here = [k for k, (mod, _) in targets.items() if id(mod) in mods and k not in done]
                with _input_sumsq([targets[k] for k in here]) as sums:
                    for x in xs:
                        run_layer(x)
                for key in here:  # a shared module is pruned with the inputs of its first use
                    mod, attr = targets[key]
                    prune(key, sums[(id(mod), attr)])
                    done.add(key)
    per_layer = {k: round(float((getattr(mod, attr) == 0).float().mean()), 6) for k, (mod, attr) in targets.items()}
    zeros = sum(int((getattr(mod, attr) == 0).sum()) for mod, attr in targets.values())
    total = sum(getattr(mod, attr).numel() for mod, attr in targets.values())
    return model, {"structure": "unstructured", "sparsity": zeros / total if total else 0.0, "pruned_weights": total,
                   "layers": per_layer}


# --- structured ----------------------------------------------------------------------------------------------------


def _walk_scores(model: GPT, calib: Tensor, channels: bool = False, heads: bool = False) -> dict[str, Tensor]:
    """One calibration pass over the unpruned model: per layer the mean cosine similarity of the block's input and
    output (key "cos", (n_layer,)); if `channels`, per MLP (by module name) Σ a_j² of its hidden activations (the
    proj's inputs); if `heads`, per attention module (by name) (nh,) Σ over tokens of ‖W_o[:, h] y_h‖², what each
    head adds to the residual stream (y_h: the head's output entering the output projection). A shared module sums
    over every layer that uses it."""
    names = {id(mod): name for name, mod in model.named_modules()}
    sums: dict[str, Tensor] = {}
    cos = torch.zeros(model.config.n_layer, dtype=torch.float64)

    def head_hook(_m: nn.Module, args: tuple[Tensor, ...], acc: Tensor, gram: Tensor) -> None:
        y = args[0].float().reshape(-1, *gram.shape[:2])  # (N, nh, hd)
        acc += torch.einsum("nhd,hde,nhe->h", y, gram, y).double()

    with torch.no_grad():
        for i, (layer, run_layer, xs) in enumerate(layer_inputs(model, calib)):
            if layer is model.norm_f:
                continue
            mlp, attn = layer.mlp, layer.attn
            ctx = _input_sumsq([(mlp.proj, "weight")]) if channels else contextlib.nullcontext({})
            handle = None
            if heads:
                w = attn.proj.weight.detach().float().view(-1, attn.nh, attn.hd)  # (C, nh, hd)
                gram = torch.einsum("chd,che->hde", w, w)  # (nh, hd, hd): ‖W_h y‖² = yᵀ W_hᵀ W_h y, no (N, nh, C)
                acc = sums.setdefault(names[id(attn)], torch.zeros(attn.nh, dtype=torch.float64))
                handle = attn.proj.register_forward_pre_hook(functools.partial(head_hook, acc=acc, gram=gram))
            n = 0
            try:
                with ctx as got:
                    for x in xs:
                        y = run_layer(x)
                        cos[i] += F.cosine_similarity(x.double(), y.double(), dim=-1).sum()
                        n += x.shape[0] * x.shape[1]
            finally:
                if handle is not None:
                    handle.remove()
            cos[i] /= n
            if channels:
                key = names[id(mlp)]
                sums[key] = sums.get(key, 0) + got[(id(mlp.proj), "weight")]
    return {**sums, "cos": cos}


def _rebuild(model: GPT, cfg_changes: dict[str, Any], sd: dict[str, Tensor]) -> GPT:
    """A GPT of model.config with `cfg_changes` holding the tensors `sd`, through the same code that loads every
    checkpoint (so the result is exactly what a reload of it gives)."""
    cfg = model.config.replace(**cfg_changes)
    return checkpoint.model_from_state_dict(cfg, sd, "the pruned model").eval()


def _channels(model: GPT, s: float, calib: Tensor) -> tuple[GPT, dict[str, Any]]:
    cfg = model.config
    if cfg.moe_experts or cfg.lowrank:
        raise SlmError("--method channels prunes dense FFNs of nn.Linear layers; this model's FFNs are "
                       f"{'Mixture-of-Experts' if cfg.moe_experts else 'low-rank factorised'} — use magnitude or wanda")
    H = cfg.mlp_hidden
    keep = round((1 - s) * H)
    if H % ALIGN == 0 and keep >= ALIGN:
        keep = ALIGN * round(keep / ALIGN)
    if keep < 1:
        raise SlmError(f"--sparsity {s} would remove all {H} FFN channels; give a smaller share")
    sumsq = _walk_scores(model, calib, channels=True)
    sd = checkpoint._state_dict(model)
    for name, mlp in model.named_modules():
        if not isinstance(mlp, MLP):
            continue
        # what channel j adds to the residual stream, over the calibration tokens: ‖a_j‖ · ‖W_proj[:, j]‖
        score = sumsq[name].sqrt().float() * mlp.proj.weight.detach().norm(dim=0)
        idx = score.topk(keep).indices.sort().values  # kept in their original order
        rows = torch.cat([idx, idx + H]) if mlp.swiglu else idx  # SwiGLU's fc holds gate rows, then up rows
        for key, t in (("fc.weight", mlp.fc.weight), ("fc.bias", mlp.fc.bias)):
            if t is not None:
                sd[f"{name}.{key}"] = t.detach().index_select(0, rows)
        sd[f"{name}.proj.weight"] = mlp.proj.weight.detach().index_select(1, idx)
    pruned = _rebuild(model, {"mlp_hidden": keep}, sd)
    return pruned, {"structure": "channels", "mlp_hidden": [H, keep], "removed_share": 1 - keep / H}


def _layers(model: GPT, s: float, calib: Tensor) -> tuple[GPT, dict[str, Any]]:
    cfg = model.config
    if cfg.share_blocks:
        raise SlmError(f"--method layers removes blocks, but this model cycles {cfg.share_blocks} shared blocks over "
                       f"{cfg.n_layer} layers; prune channels or weights instead")
    L = cfg.n_layer
    drop = round(s * L)
    if drop >= L:
        raise SlmError(f"--sparsity {s} would remove all {L} layers; give a smaller share")
    influence = 1 - _walk_scores(model, calib, channels=False)["cos"]  # ShortGPT's block influence, (L,)
    kept = sorted(influence.argsort(descending=True)[: L - drop].tolist())
    sd = {}
    for key, t in checkpoint._state_dict(model).items():
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if match is None:
            sd[key] = t
        elif int(match[1]) in kept:
            sd[f"blocks.{kept.index(int(match[1]))}.{match[2]}"] = t
    pruned = _rebuild(model, {"n_layer": L - drop}, sd)
    return pruned, {"structure": "layers", "n_layer": [L, L - drop], "removed_share": drop / L, "kept_layers": kept,
                    "block_influence": [round(float(b), 6) for b in influence]}


def _head_shape(nh: int, nkv: int, s: float) -> tuple[int, int]:
    """(query heads, KV heads) kept when removing the share `s` of `nh` query heads in `nkv` groups (docstring)."""
    g = nh // nkv
    options = {(g * k, k) for k in range(1, nkv + 1)} | {(nkv * j, nkv) for j in range(1, g + 1)}
    target = (1 - s) * nh
    return min(options, key=lambda o: (abs(o[0] - target), -o[0], -o[1]))


def _heads(model: GPT, s: float, calib: Tensor) -> tuple[GPT, dict[str, Any]]:
    cfg = model.config
    if cfg.attention == "lsh" or cfg.lowrank:
        raise SlmError("--method heads prunes the fused q/k/v projection of nn.Linear layers; this model's attention "
                       f"is {'LSH (shared queries and keys)' if cfg.attention == 'lsh' else 'low-rank factorised'} — "
                       "prune channels, layers or weights instead")
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    g = nh // nkv  # type: ignore[operator]
    if (1 - s) * nh < 0.5:
        raise SlmError(f"--sparsity {s} would remove all {nh} attention heads; give a smaller share")
    keep_q, keep_kv = _head_shape(nh, nkv, s)  # type: ignore[arg-type]
    record = {"structure": "heads", "n_head": [nh, keep_q], "n_kv_head": [nkv, keep_kv],
              "removed_share": 1 - keep_q / nh}
    if keep_q == nh:
        return _rebuild(model, {}, checkpoint._state_dict(model)), record
    scores = _walk_scores(model, calib, heads=True)
    sd = checkpoint._state_dict(model)
    kept_heads = {}
    for name, score in scores.items():
        if name == "cos":
            continue
        per_group = score.view(nkv, g)  # type: ignore[arg-type]
        if keep_kv < nkv:  # whole groups: a KV head with its query heads
            groups = per_group.sum(1).topk(keep_kv).indices.sort().values
            q = [int(k) * g + j for k in groups for j in range(g)]
        else:  # every group keeps its own best query heads
            groups = torch.arange(nkv)
            q = [int(k) * g + int(j) for k in groups for j in per_group[k].topk(keep_q // nkv).indices.sort().values]
        kept_heads[name] = q
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q]
                         + [torch.arange((nh + k) * hd, (nh + k + 1) * hd) for k in groups.tolist()]
                         + [torch.arange((nh + nkv + k) * hd, (nh + nkv + k + 1) * hd) for k in groups.tolist()])
        for key in ("qkv.weight", "qkv.bias"):
            if f"{name}.{key}" in sd:
                sd[f"{name}.{key}"] = sd[f"{name}.{key}"].index_select(0, rows)
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q])
        sd[f"{name}.proj.weight"] = sd[f"{name}.proj.weight"].index_select(1, cols)
    pruned = _rebuild(model, {"n_head": keep_q, "n_kv_head": keep_kv, "head_size": hd}, sd)
    return pruned, {**record, "kept_heads": kept_heads}


# --- the stage: a run in, a pruned run out -------------------------------------------------------------------------


def _counts(model: GPT) -> dict[str, int]:
    n = model.num_params
    return {"total": n(), "active": n(active=True), "non_embedding": n(non_embedding=True),
            "nonzero": sum(int((p != 0).sum()) for p in model.parameters())}


def prune_run(
    src: str | Path,
    out: str | Path,
    *,
    method: str,
    sparsity: float | None = None,
    score: str = "wanda",
    calib: str | None = None,
    calib_samples: int = 128,
    calib_len: int = 256,
    heal: str | float | None = None,
    heal_steps: int | None = None,
    heal_data_dir: str | Path | None = None,
    heal_kl: float = 0.5,
    heal_lr: float = 1e-3,
    gradual: bool = False,
    values: str = "fp32",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Prune the checkpoint (or run's latest) at `src` and write the pruned checkpoint to `out`. Returns `out`.

    `method`, `sparsity`, `score`: as `prune_model`. Calibrated methods read `calib_samples` windows of `calib_len`
    tokens of `calib` (text named like `slm eval --lm`; default: the run's own training data). `heal` (a duration,
    e.g. "5m") and/or `heal_steps` then train the pruned model distilled from the parent (slmkit.compress.heal) on
    `heal_data_dir` (default: the parent's training data), with `heal_kl` the KL share of the loss and `heal_lr` the
    peak learning rate; pruned weights stay zero. `gradual` (magnitude only, with a heal budget): prune during the
    healing run by the cubic schedule instead of once before it. `values`: "fp32" or "bf16", how the sparse matrices'
    non-zeros are stored (bf16: half their bytes, the weights rounded; the recorded quality is the rounded model's).

    >>> prune_run("runs/shk", "runs/shk-w50", method="wanda", sparsity=0.5)  # doctest: +SKIP
    >>> prune_run("runs/shk", "runs/shk-vslm", method="magnitude", sparsity=0.9, gradual=True,
    ...           heal="5m")  # doctest: +SKIP
    >>> prune_run("runs/shk", "runs/shk-c30", method="channels", sparsity=0.3, heal="5m")  # doctest: +SKIP
    """
    m = Method.parse(method)
    heal_time = parse_duration(heal)
    healing = heal_time is not None or heal_steps is not None
    check_request(m, sparsity, score, calib, gradual, healing)
    if values not in sparse.VALUE_DTYPES:
        raise SlmError(f"values={values!r} is not one of {', '.join(sparse.VALUE_DTYPES)}")
    for name, value in (("calib_samples", calib_samples), ("calib_len", calib_len)):
        if value < 1:
            raise SlmError(f"{name}={value} must be >= 1")
    ck, parent_meta = load_parent(src, out, overwrite=overwrite, action="prune")
    data = heal_data(parent_meta, ck.tokenizer.sha256, heal_data_dir, required=healing)
    model, cal_about, tokens = ck.model, None, None
    parent_counts = _counts(model)
    if m.calibrated(score):
        tokens, cal_about = calibration_tokens(parent_meta, ck.tokenizer, calib, samples=calib_samples,
                                               seq_len=min(calib_len, model.config.block_size))
    parent = copy.deepcopy(model) if data is not None else None  # teacher and reference: pruning works in place
    t0 = time.perf_counter()
    schedule = CubicSchedule(sparsity) if gradual else None  # type: ignore[arg-type]  # checked: a float
    # gradual: the model enters healing dense (zero sparsity pruned), the schedule prunes it as it trains
    model, record = _prune(model, m, 0.0 if gradual else sparsity, tokens, score)
    prune_time = time.perf_counter() - t0
    sparse_keys = set(record["layers"]) if record["structure"] == "unstructured" else set()
    params = dict(model.named_parameters())
    after = heal_and_compare(model, parent, data, max_time=heal_time, max_steps=heal_steps, kl_weight=heal_kl,
                             lr=heal_lr, keep_zeros=[params[k] for k in sorted(sparse_keys)], schedule=schedule,
                             progress=progress)
    if gradual:  # the record of what healing pruned (the schedule ends at exactly `sparsity` per matrix)
        _, record = _unstructured(model, m, 0.0, None)
    if values != "fp32" and sparse_keys:  # measure the model as it is stored
        sparse.round_values(model, sparse_keys, values)
        if after["quality"] is not None:
            after["quality"] = compare_to_parent(model, parent, data)  # type: ignore[arg-type]
    counts = _counts(model)
    recipe = {"method": method, "sparsity": sparsity, "score": score if m.kind == "nm" else None, "gradual": gradual,
              "values": values,
              "calibration": cal_about,
              "heal": {"time": heal_time, "steps": heal_steps, "kl_weight": heal_kl, "lr": heal_lr,
                       "data": str(data)} if healing else None}
    meta = run.new_meta("prune", parent=ck.path, model_class=run.model_class(parent_meta), recipe=recipe,
                        pruning={**record, "method": method, "requested": sparsity},
                        storage=sparse.storage(model, sparse_keys, values),
                        counts={k: counts[k] for k in ("total", "active", "non_embedding")},
                        nonzero=counts["nonzero"], parent_counts=parent_counts, prune_time=round(prune_time, 3),
                        **after, params={k: counts[k] for k in ("total", "active", "non_embedding")},
                        data=parent_meta.get("data"), data_meta=parent_meta.get("data_meta"))
    return write_run(Path(out), lambda tmp: sparse.write_model(tmp, model, sparse_keys, values), ck.tokenizer, meta)
