"""slmkit model → one GGUF file for llama.cpp (`slm export --format gguf`); the inverse of slmkit.interop.gguf.

Architecture, chosen from the config (anything else is refused with one line naming what has no llama.cpp form):
    llama       RoPE + RMSNorm + SwiGLU (+ GQA). Q and K rows are permuted from slmkit's rotate-half RoPE layout to
                llama.cpp's interleaved pairs (`_permute`, undone by the importer's `_unpermute`). Exact.
    gpt2        learned positions + LayerNorm + GELU, fused q/k/v.
    starcoder2  RoPE + LayerNorm + GELU (slmkit's "GPT-2 block with RoPE"): llama.cpp's NEOX RoPE is rotate-half.
  gpt2 and starcoder2 carry every bias llama.cpp requires, as zeros where slmkit has none. Both are close, not exact:
  llama.cpp's GELU is the tanh approximation read from an fp16 table, slmkit's is erf GELU (the measured gap, and
  llama's exact match: docs/benchmarks.md, "Export into other runtimes"). Shared blocks and a shared FFN are unrolled.
  A head tied to the embedding is omitted (llama.cpp reuses token_embd).

Tokenizer: byte-level BPE (tokenizer.ggml.model "gpt2"; pre-tokenizer "gpt-2", "smollm" or "llama-bpe") with tokens,
token types, merges, special-token roles, add_bos and the chat template. slmkit's byte kind is BPE without merges;
char kind becomes byte-level BPE whose merges rebuild each 1-2-byte character (a merge never crosses a character, so
llama.cpp's pre-split cannot change the result). llama.cpp needs at least one merge, so a tokenizer without merges
gets one between two special tokens, which never applies (BPE symbols start as single characters).

Tensor types: norms, biases and other 1-D tensors stay F32; matrices are `dtype` (F32/F16/BF16) or, with `quant`,
llama.cpp's own mixes: q8_0, q4_0 and q4_k_m follow llama-quant.cpp's llama_tensor_get_type (output / tied embedding
Q6_K, q4_k_m's Q6_K attn_v and ffn_down on a subset of layers, fallbacks for rows not a multiple of 256). gguf 0.19
quantizes Q8_0/Q4_0/Q5_0 but not the K-quants, so Q4_K and Q6_K are ported here from ggml-quants.c's reference
quantize_row_q4_K_ref / quantize_row_q6_K_ref (no importance matrix, what `llama-quantize` does without one).
Weights slmkit already quantized map to the closest GGUF type without a detour through fp32: int4 (any group: a group
is whole 32-weight blocks) is Q4_0 byte for byte, bf16 is BF16; int8 (one fp32 scale per row, no GGUF equivalent) is
dequantized and quantized again (Q8_0, or the `quant` mix). The summary counts both.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as Q
from torch import Tensor, nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer.quantized import INT4_BLOCK, QuantLinear
from slmkit.interop.gguf import _LLAMA3_RE, _TOKEN_CONTROL, _TOKEN_USER_DEFINED
from slmkit.interop.weights import GGUF_QUANTS, check_dtype, dense_model, torch_dtype
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.tokenizer import _bytes_to_unicode

_TOKEN_NORMAL, _TOKEN_UNUSED = 1, 5  # llama.cpp token types (gguf.TokenType)


@dataclass(frozen=True)
class _Arch:
    name: str
    style: tuple[str, str, str]  # the config's (pos, norm, mlp)
    # per block: (GGUF tensor, slmkit module inside the block, rows: None = all, q/k/v of the fused attention
    # projection, gate/up of SwiGLU's fused fc)
    block: tuple[tuple[T, str, str | None], ...]
    zero_bias: bool  # llama.cpp requires every bias of the blocks and norms (zeros where slmkit has none)


_NORMS = ((T.ATTN_NORM, "norm1", None), (T.FFN_NORM, "norm2", None))
_QKV = ((T.ATTN_Q, "attn.qkv", "q"), (T.ATTN_K, "attn.qkv", "k"), (T.ATTN_V, "attn.qkv", "v"),
        (T.ATTN_OUT, "attn.proj", None))
ARCHS = (
    _Arch("llama", ("rope", "rmsnorm", "swiglu"), (*_NORMS, *_QKV, (T.FFN_GATE, "mlp.fc", "gate"),
                                                    (T.FFN_UP, "mlp.fc", "up"), (T.FFN_DOWN, "mlp.proj", None)), False),
    _Arch("gpt2", ("learned", "layernorm", "gelu"), (*_NORMS, (T.ATTN_QKV, "attn.qkv", None),
                                                      (T.ATTN_OUT, "attn.proj", None), (T.FFN_UP, "mlp.fc", None),
                                                      (T.FFN_DOWN, "mlp.proj", None)), True),
    _Arch("starcoder2", ("rope", "layernorm", "gelu"), (*_NORMS, *_QKV, (T.FFN_UP, "mlp.fc", None),
                                                         (T.FFN_DOWN, "mlp.proj", None)), True),
)
GELU_GAP = ("llama.cpp computes GELU with the tanh approximation from an fp16 table; slmkit uses erf GELU, so logits "
            "differ slightly")


def gguf_arch(cfg: ModelConfig) -> _Arch:
    """The llama.cpp architecture that computes what `cfg` describes; SlmError naming what has none."""
    if cfg.attention != "full":
        raise SlmError(f"GGUF export: attention={cfg.attention!r} has no llama.cpp counterpart (it runs full causal "
                       "attention); only attention='full' models export to GGUF")
    if cfg.lowrank:
        raise SlmError(f"GGUF export: low-rank projections (lowrank={cfg.lowrank}) have no llama.cpp counterpart")
    if cfg.moe_experts:
        raise SlmError("GGUF export: Mixture-of-Experts FFNs are not supported (slmkit's router and gates differ from "
                       "llama.cpp's)")
    if cfg.pos in ("sinusoidal", "none"):
        raise SlmError(f"GGUF export: pos={cfg.pos!r} has no llama.cpp counterpart; use learned or rope positions")
    for arch in ARCHS:
        if (cfg.pos, cfg.norm, cfg.mlp) == arch.style:
            return arch
    known = "; ".join(f"{'+'.join(a.style)} ({a.name})" for a in ARCHS)
    raise SlmError(f"GGUF export: pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} matches no llama.cpp architecture; "
                   f"exportable: {known}")


# ---------------------------------------------------------------------------------------------------------------------
# tensors: slmkit modules → named fp32 values (+ the packed bytes of int4 layers)


@dataclass
class _Tensor:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    values: Tensor  # fp32 (rows, cols) or (n,)
    role: str  # what llama.cpp's quantization mix keys on: token_embd, output, pos_embd, attn_v, ffn_down, other
    layer: int = -1
    stored: str = "f32"  # how slmkit holds it: f32, int4, int8, bf16
    packed: tuple[Tensor, Tensor] | None = None  # int4: (weight (rows, cols/2) uint8, scale (rows, cols/group) fp16)


def _permute(n_rows: int, n_head: int) -> Tensor:
    """Row order of llama.cpp's converter permutation (convert_hf_to_gguf.py's LlamaModel.permute): per head, rows
    [first half, second half] of the head dim (rotate-half RoPE) become interleaved pairs (x0, x_{d/2}, x1, ...)."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _rows(cfg: ModelConfig, part: str | None) -> Tensor | None:
    """Row indices of `part` in a fused projection (None: all rows, in order)."""
    if part is None:
        return None
    q, kv, h = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.mlp_hidden  # type: ignore[operator]
    start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, h), "up": (h, h)}[part]
    return torch.arange(start, start + size)


def _module(model: nn.Module, path: str) -> nn.Module:
    return functools.reduce(getattr, path.split("."), model)  # attributes, not get_submodule: a shared FFN is not one


def _weight(mod: nn.Module, dense: nn.Linear, rows: Tensor | None) -> tuple[Tensor, str, tuple[Tensor, Tensor] | None]:
    """The fp32 rows of a linear layer (from the dense model), how slmkit stores it, and for int4 its packed rows."""
    values, stored, packed = dense.weight.detach().float(), "f32", None
    if isinstance(mod, QuantLinear):
        stored = {torch.uint8: "int4", torch.int8: "int8"}.get(mod.weight.dtype, "bf16")
        packed = (mod.weight, mod.scale) if stored == "int4" else None
    if rows is not None:
        values = values[rows]
        packed = None if packed is None else (packed[0][rows], packed[1][rows])
    return values, stored, packed


def _role(t: T) -> str:
    return {T.TOKEN_EMBD: "token_embd", T.OUTPUT: "output", T.POS_EMBD: "pos_embd", T.ATTN_V: "attn_v",
            T.ATTN_QKV: "attn_v", T.FFN_DOWN: "ffn_down"}.get(t, "other")


def _collect(model: GPT, dense: GPT, arch: _Arch) -> list[_Tensor]:
    """Every GGUF tensor of `model`, in llama.cpp's order: embeddings, blocks (unrolled), final norm, head."""
    cfg = dense.config
    out: list[_Tensor] = []

    def add(t: T, layer: int, path: str, part: str | None = None) -> None:
        name, mod, rows = gguf.TENSOR_NAMES[t].format(bid=layer), _module(dense, path), _rows(cfg, part)
        if arch.name == "llama" and part in ("q", "k"):  # into llama.cpp's interleaved RoPE pairs
            rows = rows[_permute(len(rows), cfg.n_head if part == "q" else cfg.n_kv_head)]  # type: ignore[index,arg-type]
        if isinstance(mod, nn.Linear):
            values, stored, packed = _weight(_module(model, path), mod, rows)
            out.append(_Tensor(f"{name}.weight", values, _role(t), layer, stored, packed))
        else:  # a norm
            out.append(_Tensor(f"{name}.weight", mod.weight.detach().float(), "1d"))
        bias = getattr(mod, "bias", None)
        if bias is None and arch.zero_bias and t != T.OUTPUT:  # llama.cpp has no head bias
            bias = torch.zeros(mod.weight.shape[0])
        if bias is not None:
            bias = bias.detach().float()
            out.append(_Tensor(f"{name}.bias", bias if rows is None else bias[rows], "1d"))

    out.append(_Tensor("token_embd.weight", dense.tok_emb.weight.detach().float(), "token_embd"))
    if dense.pos_emb is not None:
        out.append(_Tensor("position_embd.weight", dense.pos_emb.weight.detach().float(), "pos_embd"))
    for i in range(cfg.n_layer):
        for t, path, part in arch.block:
            add(t, i, f"blocks.{i % len(dense.blocks)}.{path}", part)  # shared blocks / FFN: one copy per layer
    add(T.OUTPUT_NORM, -1, "norm_f")
    if not cfg.tie_embeddings:
        add(T.OUTPUT, -1, "lm_head")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# tensor types: llama.cpp's quantization mixes, and the K-quants gguf cannot write


_BASE = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k_m": Q.Q4_K}
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}  # llama-quant.cpp's tensor_type_fallback
_FILE_TYPE = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "f32": gguf.LlamaFileType.ALL_F32,
              "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}


def _block_size(t: Q) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def _more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_type(role: str, layer: int, n_layer: int, cols: int, quant: str, tied: bool) -> Q:
    """The type llama.cpp's llama_tensor_get_type picks for a matrix of the `quant` mix (no importance matrix)."""
    base = _BASE[quant]
    t = base
    if role == "output" or (tied and role == "token_embd"):  # the head reads every token: more bits
        t = Q.Q8_0 if base == Q.Q8_0 or cols % _block_size(base) else Q.Q6_K
    elif quant == "q4_k_m" and role in ("attn_v", "ffn_down") and _more_bits(layer, n_layer):
        t = Q.Q6_K
    if cols % _block_size(t):
        t = _FALLBACK.get(t, Q.F16)
        if cols % _block_size(t):
            t = Q.F16  # llama.cpp: "must use F16 due to unusual shape"
    return t


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in fp32, as ggml's loops do (numpy's reduce sums pairwise)."""
    return np.cumsum(a, axis=-1, dtype=np.float32)[..., -1]


_f = np.float32


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on rows x (B, n) with weights w: the (scale, -min) of the affine grid L·scale + min
    with L in [0, nmax] that minimises the weighted squared error over nstep+1 candidate scales. → scale, -min, L.
    Every step is fp32 in ggml's order (np.rint is its nearest_int, round half to even), so the bytes match
    llama-quantize's (tested)."""
    mn, mx = np.minimum(x.min(-1), 0).astype(_f), x.max(-1)
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)
    flat = mx == mn
    iscale = _f(nmax) / np.where(flat, 1, mx - mn)
    scale = _f(1) / iscale
    L = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    err = _seq_sum(w * (scale[:, None] * L + mn[:, None] - x) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in range(nstep + 1):
            iscale = (_f(rmin) + _f(rdelta) * _f(s) + _f(nmax)) / np.where(flat, 1, mx - mn)  # min moves as it improves
            La = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            sum_l, sum_l2, sum_xl = _seq_sum(w * La), _seq_sum(w * La * La), _seq_sum(w * La * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale, this_min = np.where(pos, sum_xl / sum_l2, this_scale), np.where(pos, 0, this_min).astype(_f)
            cur = _seq_sum(w * (this_scale[:, None] * La + this_min[:, None] - x) ** 2)
            better = (D > 0) & (cur < err) & ~flat
            L, err = np.where(better[:, None], La, L), np.where(better, cur, err)
            scale, mn = np.where(better, this_scale, scale), np.where(better, this_min, mn)
    return np.where(flat, 0, scale).astype(_f), (-mn).astype(_f), np.where(flat[:, None], 0, L)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: (rows, cols) fp32 → Q4_K blocks (rows, cols/256·144) uint8. A 256-weight super-block
    holds 8 sub-blocks of 32 with 6-bit scales and mins on an fp16 d/dmin: w ≈ d·sc·q − dmin·m, q in [0, 15]."""
    b = x.astype(_f).reshape(-1, 8, 32)
    nb = len(b)
    av_x = np.sqrt(_seq_sum(b * b) / _f(32))
    w = av_x[..., None] + np.abs(b)
    scales, mins, L = _make_qkx2(b.reshape(-1, 32), w.reshape(-1, 32), 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale, max_min = np.maximum(scales.max(-1), 0), np.maximum(mins.max(-1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, _f(63) / max_scale, 0).astype(_f)
        inv_min = np.where(max_min > 0, _f(63) / max_min, 0).astype(_f)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales).astype(np.int64).astype(np.uint8))
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins).astype(np.int64).astype(np.uint8))
    sc = np.zeros((nb, 12), np.uint8)  # 6-bit scales/mins: 0-3 low bits in bytes 0-7, 4-7 split over 8-11 + top bits
    sc[:, 0:4], sc[:, 4:8] = ls[:, :4], lm[:, :4]
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    d, dmin = (max_scale / _f(63)).astype(np.float16), (max_min / _f(63)).astype(np.float16)
    dj = d.astype(_f)[:, None] * ls.astype(_f)  # re-round every weight on the grid the stored scales give
    dm = dmin.astype(_f)[:, None] * lm.astype(_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lq = np.clip(np.rint((b + dm[..., None]) / dj[..., None]), 0, 15)
    L = np.where(dj[..., None] != 0, Lq, L).astype(np.uint8).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)  # 64 weights per 32 bytes: low nibbles, then high
    out = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), sc, qs], axis=1)
    return out.reshape(x.shape[0], -1)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(rmse_type=1, no weights) on rows x (B, n): a symmetric scale (the row's extreme on
    -nmax, then 18 nudges keeping the best x²-weighted fit) and L = q + nmax with q in [-nmax, nmax-1]."""
    ext = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    zero = np.abs(ext) < _f(1e-15)
    ext = np.where(zero, 1, ext).astype(_f)
    w = x * x

    def attempt(iscale: np.ndarray):
        q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return q + nmax, _seq_sum(w * x * q), _seq_sum(w * q * q)

    L, sumlx, suml2 = attempt(_f(-nmax) / ext)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, 0).astype(_f)
        best = scale * sumlx
        for s in (*range(-9, 0), *range(1, 10)):
            La, sumlx, suml2 = attempt(-(_f(nmax) + _f(0.1) * _f(s)) / ext)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], La, L)
            scale = np.where(better, sumlx / suml2, scale).astype(_f)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, 0, scale).astype(_f), np.where(zero[:, None], 0, L)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: (rows, cols) fp32 → Q6_K blocks (rows, cols/256·210) uint8. 16 sub-blocks of 16 with an
    int8 scale each on an fp16 d: w ≈ d·sc·q, q in [-32, 31] (low 4 bits in ql, high 2 in qh)."""
    b = x.astype(_f).reshape(-1, 16, 16)
    nb = len(b)
    scales, L = _make_qx(b.reshape(-1, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    ext = np.take_along_axis(scales, np.abs(scales).argmax(-1)[:, None], -1)[:, 0]
    zero = np.abs(ext) < _f(1e-15)
    iscale = _f(-128) / np.where(zero, 1, ext).astype(_f)
    d = (_f(1) / iscale).astype(np.float16)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    dj = d.astype(_f)[:, None] * sc.astype(_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lq = np.clip(np.rint(b / dj[..., None]), -32, 31) + 32
    L = np.where(dj[..., None] != 0, Lq, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # halves × quarters × 32
    lo, hi = L & 0xF, L >> 4
    ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0  # an all-zero super-block is all-zero bytes
    return out.reshape(x.shape[0], -1)


def int4_as_q4_0(weight: Tensor, scale: Tensor) -> np.ndarray:
    """slmkit int4 (packed (N, K/2) uint8 in Q4_0's nibble order, fp16 scale per group of 32/64/128) → Q4_0 blocks
    (N, K/32·18): each 32-weight block is its group's fp16 scale followed by its 16 packed bytes, unchanged."""
    n, half = weight.shape
    blocks = half * 2 // INT4_BLOCK
    d = scale.half().repeat_interleave(blocks // scale.shape[1], dim=1)  # a group of 64/128 is 2/4 blocks
    out = torch.cat([d.contiguous().view(torch.uint8).view(n, blocks, 2), weight.view(n, blocks, 16)], dim=-1)
    return out.reshape(n, blocks * 18).numpy()


def _encode(t: _Tensor, qtype: Q) -> np.ndarray:
    """t's values (or packed int4 bytes) in `qtype`: the array GGUFWriter.add_tensor takes (with raw_dtype)."""
    if qtype == Q.Q4_0 and t.packed is not None:
        return int4_as_q4_0(*t.packed)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        v = t.values.to(torch_dtype({Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16"}[qtype]))
        return v.view(torch.int16).numpy().view(np.uint8) if qtype == Q.BF16 else v.numpy()
    x = t.values.numpy()
    if qtype in (Q.Q4_K, Q.Q6_K):
        fn, step = (_q4_k if qtype == Q.Q4_K else _q6_k), max(1, 2**20 // x.shape[1])
        # in chunks of ~1M weights: the scale search holds a dozen temporaries the size of its input
        return np.concatenate([fn(x[i : i + step]) for i in range(0, len(x), step)])
    return gguf.quants.quantize(x, qtype)


def _choose(t: _Tensor, dtype: str, quant: str | None, n_layer: int, tied: bool) -> tuple[Q, str | None]:
    """The GGUF type of `t`, and how a weight slmkit already quantized got there (None for float weights)."""
    if t.values.dim() == 1:
        return Q.F32, None
    if t.stored == "int4":
        return Q.Q4_0, "same bytes"  # exact whatever `quant` asks: any other type would round a second time
    float_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]
    if t.role == "pos_embd":  # llama.cpp never quantizes position embeddings
        return float_type, None
    if quant is None:
        kept = {"bf16": (Q.BF16, "same values"), "int8": (Q.Q8_0, "dequantized, requantized")}
        return kept.get(t.stored, (float_type, None))
    qtype = quant_type(t.role, t.layer, n_layer, t.values.shape[1], quant, tied)
    return qtype, None if t.stored == "f32" else "dequantized, requantized"


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer


def _byte_level(p: dict[str, Any] | None, regex: bool) -> bool:
    return p is not None and p["type"] == "ByteLevel" and p.get("use_regex", True) == regex and \
        not p.get("add_prefix_space", False)


def _pre(d: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (the inverse of the importer's table)."""
    p = d.get("pre_tokenizer")
    if _byte_level(p, True):
        return "gpt-2"
    parts = p.get("pretokenizers", []) if p and p["type"] == "Sequence" else []
    if len(parts) == 2 and parts[0]["type"] == "Digits" and parts[0].get("individual_digits") and \
            _byte_level(parts[1], True):
        return "smollm"
    if len(parts) == 2 and parts[0]["type"] == "Split" and parts[0]["pattern"].get("Regex") == _LLAMA3_RE and \
            parts[0].get("behavior") == "Isolated" and not parts[0].get("invert") and _byte_level(parts[1], False):
        return "llama-bpe"
    raise SlmError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(p)[:120]} has no llama.cpp counterpart "
                   "(known: GPT-2 byte-level, SmolLM digits + byte-level, Llama-3 split + byte-level)")


def _char_merges(chars: list[str]) -> list[str]:
    """Byte-level merges that rebuild each 2-byte character of a char vocabulary; refuses longer characters."""
    enc = _bytes_to_unicode()
    merges = []
    for c in chars:
        b = c.encode("utf-8")
        if len(b) > 2:
            raise SlmError(f"GGUF export: the char tokenizer holds {c!r}, {len(b)} UTF-8 bytes; as byte-level BPE it "
                           "would need merges through pieces that are not tokens, which a GGUF reader built on HF "
                           "tokenizers (slmkit's importer) rejects; only 1- and 2-byte characters export: use a byte "
                           "or bpe tokenizer")
        if len(b) == 2:
            merges.append(f"{enc[b[0]]} {enc[b[1]]}")
    return merges


def tokenizer_metadata(tok: Tokenizer, n_vocab: int) -> dict[str, Any]:
    """The tokenizer.ggml.* values of `tok` for a model with `n_vocab` embedding rows: tokens, types, merges, pre,
    special-token ids, add_bos, chat template. SlmError for what llama.cpp cannot tokenize the same way."""
    d = json.loads(tok.to_str())
    model, enc = d["model"], _bytes_to_unicode()
    if d.get("normalizer") is not None:
        raise SlmError(f"GGUF export: the tokenizer's normalizer {d['normalizer']['type']} has no llama.cpp "
                       "counterpart for byte-level BPE")
    tokens: list[str | None] = [None] * max(n_vocab, tok.vocab_size)
    types = [_TOKEN_NORMAL] * len(tokens)
    if tok.kind == "char":
        vocab = {"".join(enc[b] for b in c.encode("utf-8")): i for c, i in model["vocab"].items()}
        merges, pre = _char_merges(list(model["vocab"])), "gpt-2"  # merges stay inside a character: any split works
    else:
        if model["type"] != "BPE" or model.get("byte_fallback") or model.get("dropout") or \
                model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise SlmError("GGUF export: only byte-level BPE tokenizers (and slmkit's byte and char kinds) export")
        vocab = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        pre = "gpt-2" if tok.kind == "byte" else _pre(d)
        if model.get("ignore_merges") and pre != "llama-bpe":
            raise SlmError("GGUF export: a tokenizer with ignore_merges exports only with the Llama-3 pre-tokenizer")
    for text, i in vocab.items():
        tokens[i] = text
    for a in d.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = _TOKEN_CONTROL if a["special"] else _TOKEN_USER_DEFINED
    missing = [i for i, t in enumerate(tokens[: tok.vocab_size]) if t is None]
    if missing:
        raise SlmError(f"GGUF export: the tokenizer has no token with id {missing[0]}; llama.cpp needs ids 0..n-1")
    if tok.vocab_size > n_vocab:
        raise SlmError(f"GGUF export: the tokenizer has {tok.vocab_size} tokens but the model only {n_vocab} rows")
    for i in range(tok.vocab_size, n_vocab):  # embedding rows no token uses (convert_hf_to_gguf.py's padding)
        tokens[i], types[i] = f"[PAD{i}]", _TOKEN_UNUSED
    if not merges:  # llama.cpp refuses a "gpt2" vocabulary without merges; two specials never meet as BPE symbols
        merges = [f"{tokens[tok.bos_id]} {tokens[tok.eos_id]}"]
    unk = (tok.config or {}).get("unk_token")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "bos": tok.bos_id, "eos": tok.eos_id,
            "pad": tok.pad_id, "unk": vocab.get(unk) if isinstance(unk, str) else None, "add_bos": tok.add_bos,
            "chat_template": tok.chat_template}


def _write_tokenizer(w: gguf.GGUFWriter, m: dict[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(m["pre"])
    w.add_token_list(m["tokens"])
    w.add_token_types(m["types"])
    w.add_token_merges(m["merges"])
    w.add_bos_token_id(m["bos"])
    w.add_eos_token_id(m["eos"])
    w.add_pad_token_id(m["pad"])
    if m["unk"] is not None:
        w.add_unk_token_id(m["unk"])
    w.add_add_bos_token(m["add_bos"])
    if m["chat_template"]:
        w.add_chat_template(m["chat_template"])


# ---------------------------------------------------------------------------------------------------------------------
# the file


def _write_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, arch: _Arch) -> None:
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)  # type: ignore[arg-type]
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)  # type: ignore[arg-type]
    w.add_vocab_size(cfg.vocab_size)
    if arch.style[1] == "rmsnorm":
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    if cfg.pos == "rope":
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_size is not None:  # heads were pruned: llama.cpp reads the head size from these, not n_embd / n_head
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


@torch.no_grad()
def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path, *, dtype: str = "f32", quant: str | None = None,
               name: str = "slmkit", extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Write one GGUF file at `path` (the caller writes it inside a temporary directory and renames it into place).

    `dtype` (f32/f16/bf16) is the type of the float matrices; `quant` (q8_0/q4_0/q4_k_m) applies llama.cpp's
    quantization mix instead. Weights slmkit already quantized keep their closest GGUF type (module docstring).
    `extra`: string key/values added to the metadata (the caller puts lineage under its own key). Returns a summary:
    {"arch": "llama", "tensor_types": {"Q4_0": 42, "F32": 13}, "bits_per_weight": 4.6, "from_quantized": {...}, ...}.

    >>> write_gguf(LLM.load("runs/llama").model, tok, Path("model.gguf"), quant="q4_k_m")
    """
    check_dtype(dtype)
    if quant is not None and quant not in GGUF_QUANTS:
        raise SlmError(f"GGUF quant {quant!r} is not one of {', '.join(GGUF_QUANTS)}")
    arch = gguf_arch(model.config)
    dense = dense_model(model)  # fp32 values; int4 layers keep their bytes in `model`
    cfg = dense.config
    tok_meta = tokenizer_metadata(tokenizer, cfg.vocab_size)  # every check runs before anything is written
    tensors = _collect(model, dense, arch)

    w = gguf.GGUFWriter(str(path), arch.name)
    w.add_name(name)
    _write_hparams(w, cfg, arch)
    _write_tokenizer(w, tok_meta)
    types: Counter[str] = Counter()
    from_quantized: Counter[str] = Counter()
    n_params = n_bytes = 0
    for t in tensors:
        qtype, how = _choose(t, dtype, quant, cfg.n_layer, cfg.tie_embeddings)
        data = _encode(t, qtype)
        w.add_tensor(t.name, data, raw_dtype=qtype)
        types[qtype.name] += 1
        if how is not None:
            from_quantized[f"{t.stored}→{qtype.name} ({how})"] += 1
        n_params, n_bytes = n_params + t.values.numel(), n_bytes + data.nbytes
    file_type = quant or ("q4_0" if types["Q4_0"] else "q8_0" if types["Q8_0"] else dtype)
    w.add_file_type(_FILE_TYPE[file_type])
    if any(gguf.GGML_QUANT_SIZES[Q[k]][0] > 1 for k in types):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    summary: dict[str, Any] = {"arch": arch.name, "tensor_types": dict(types), "params": n_params,
                               "bits_per_weight": round(8 * n_bytes / n_params, 3), "tokenizer_pre": tok_meta["pre"]}
    if from_quantized:
        summary["from_quantized"] = dict(from_quantized)
    if arch.style[2] == "gelu":
        summary["gap"] = GELU_GAP
    return summary
