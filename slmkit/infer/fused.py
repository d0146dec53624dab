"""The fused decode step: one C call per step (kernels.c `slm_decode_batch`) feeds one token to one sequence
(`FusedDecoder`), or one token to each of several sequences of a batch cache, each at its own position
(`BatchDecoder`, continuous batching).

`for_model(model, cache)` returns None when the model is outside what the C step implements — non-fp32 parameters,
a layer it does not read (e.g. an unmerged LoRA adapter), and for FusedDecoder a batch > 1 cache — and the caller then
decodes through PyTorch, which computes the same function (tests compare the two on every supported configuration).

Every attention kind of slmkit.model is covered, each computing what the PyTorch forward computes for a token appended
to the cache (slmkit.model.attention):
- full, sliding-window local and block-sparse attention: the cached keys/values under the kind's visibility rule;
- linear attention (Performer FAVOR+): the recurrent state the cache keeps instead of keys/values (KVCache.state,
  updated in place by both paths), one position at a time, so each row of a prompt chunk reads the state of the rows
  before it. The state sums every token a sequence was given: its positions must come in order, each once (position
  0 starts afresh; a position > 0 given again is counted twice, where cached keys/values would be overwritten);
- LSH attention (Reformer): the cached keys are hashed again each step, as the PyTorch cached path does, and a query
  sees the last `attn_window` keys of its own key's bucket in each round — a rule over earlier tokens only, so
  decoding token by token is the function of the full forward. The C and PyTorch hashes can differ only where two
  rotated projections of a key tie to within fp32 rounding.

Low-rank layers (`lowrank`: W = B·A) are two matmuls, A then B. Dense and Mixture-of-Experts FFNs are both covered,
and every KV cache storage (fp32, bf16, int8: KVCache; LSH attention takes fp32 only). Linear layers (a low-rank
layer's factors too) may be fp32 `nn.Linear` or int8/int4/bf16 `QuantLinear`, expert stacks fp32 parameters or
int8/int4/bf16 `QuantExperts` (slmkit.compress.quantize), mixed freely; the C step reads the packed weights in place.
An fp32 linear that pruning left mostly zeros is read as CSR (its non-zeros and their columns: `_sparse`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Self

import torch
from torch import nn

from slmkit import kernels
from slmkit.infer.quantized import QuantExperts, QuantLinear
from slmkit.model.ffn import LowRankLinear, MoE
from slmkit.model.gpt import GPT, KVCache

POS_KINDS = {"none": 0, "learned": 1, "sinusoidal": 1, "rope": 2}
ATTENTION_KINDS = {"full": 0, "local": 0, "blocksparse": 1, "linear": 2, "lsh": 3}  # kernels.c ATT_DENSE, ...
KV_KINDS = {"fp32": 0, "bf16": 1, "int8": 2}  # kernels.c KV_F32, KV_BF16, KV_INT8


def _linear(mod: nn.Module) -> kernels.Mat | None:
    if isinstance(mod, QuantLinear):
        return kernels.mat(mod.weight, mod.scale, mod.bias)
    if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.is_contiguous():
        return _sparse(mod) or kernels.mat(mod.weight.detach(), None, None if mod.bias is None else mod.bias.detach())
    return None


def _factors(mod: nn.Module) -> tuple[kernels.Mat, kernels.Mat] | None:
    """A projection's C views as (first factor, second): a low-rank layer's A and B (y = B A x), else (an empty Mat,
    the layer); None when either is outside what _linear reads."""
    if isinstance(mod, LowRankLinear):
        a, b = _linear(mod.a), _linear(mod.b)
        return None if a is None or b is None else (a, b)
    w = _linear(mod)
    return None if w is None else (kernels.Mat(), w)


def _sparse(mod: nn.Linear) -> kernels.Mat | None:
    """The CSR view of a pruned fp32 layer whose share of non-zeros is at most kernels.CSR_MAX_DENSITY (faster than
    the dense kernel there), else None; cached on the module until its weight changes, like _experts."""
    w = mod.weight
    key = (w.data_ptr(), w._version, None if mod.bias is None else (mod.bias.data_ptr(), mod.bias._version))
    cached = getattr(mod, "_fused_csr", None)
    if cached is None or cached[0] != key:
        view = None
        if w.shape[1] <= 65536 and kernels.density(w) <= kernels.CSR_MAX_DENSITY:
            view = kernels.csr(w, mod.bias)
        cached = (key, view)
        object.__setattr__(mod, "_fused_csr", cached)  # a plain attribute: not a buffer, never saved
    return None if cached[1] is None else cached[1][0]


class _Step:
    """The C step for `model` decoding into `cache`: the kernels.c Model struct with scratch for as many sequences
    as the cache holds, and every tensor whose address it holds (they live as long as this object)."""

    def __init__(self, model: GPT, cache: KVCache, cm: kernels.Model, keep: list, rows: int):
        self._lib: ctypes.CDLL = kernels._lib  # type: ignore[assignment]
        self.model, self.cache, self._cm, self._keep = model, cache, cm, keep
        self.rows = rows  # the most token rows one call takes: the scratch is sized for them
        # positions index the cache and the position tables (RoPE, learned, sinusoidal), both of this many rows
        self._max_pos = min(cache.max_len, model.config.block_size)

    @classmethod
    def _build(cls, model: nn.Module, cache: KVCache, rows: int | None = None) -> Self | None:
        """rows: the most token rows one call takes (scratch is sized for them); default one per cache sequence."""
        if not isinstance(model, GPT) or not kernels.available():
            return None
        cfg = model.config
        if cfg.attention not in ATTENTION_KINDS or cfg.pos not in POS_KINDS:
            return None
        if model.tok_emb.weight.dtype != torch.float32 or cache.dtype != torch.float32:
            return None
        keep: list = [cache]
        layers = (kernels.Layer * cfg.n_layer)()
        for i in range(cfg.n_layer):
            block = model.blocks[i % len(model.blocks)]
            moe = block.mlp if isinstance(block.mlp, MoE) else None
            attn = block.attn
            ffn = [(kernels.Mat(), kernels.Mat())] * 2 if moe else [_factors(block.mlp.fc), _factors(block.mlp.proj)]
            pairs = [_factors(attn.qv if cfg.attention == "lsh" else attn.qkv), _factors(attn.proj), *ffn]
            if any(p is None for p in pairs) or not all(c.is_contiguous() for c in (cache.k[i], cache.v[i])):
                return None
            firsts, mats = zip(*pairs, strict=True)
            n1, n2 = block.norm1, block.norm2
            keep += [n1, n2]
            scales = (cache.k_scale[i].data_ptr(), cache.v_scale[i].data_ptr()) if cache.kv == "int8" else (None, None)
            layers[i] = kernels.Layer(n1.weight.data_ptr(), _bias(n1), n2.weight.data_ptr(), _bias(n2), *mats,
                                      cache.k[i].data_ptr(), cache.v[i].data_ptr(), *scales)
            layers[i].qkv_a, layers[i].proj_a, layers[i].fc_a, layers[i].down_a = firsts
            # the attention kinds' own tensors: linear attention's features and the cache's recurrent state; LSH's
            # rotations, copied as (R, buckets/2, hd) when the step is built so that each projection of a key is a
            # contiguous dot product (fixed random buffers, never trained)
            if cfg.attention == "linear":
                state = cache.state[i]
                if not all(t.is_contiguous() and t.dtype == torch.float32 for t in (attn.features, *state)):
                    return None
                layers[i].feat, layers[i].ls, layers[i].lz = (t.data_ptr() for t in (attn.features, *state))
            elif cfg.attention == "lsh":
                rot = attn.rotations.detach().float().transpose(1, 2).contiguous()
                keep.append(rot)
                layers[i].rot = rot.data_ptr()
            if moe is not None:
                router = _linear(moe.router)
                if router is None:
                    return None
                fc, down = _experts(moe)
                keep += [fc, down]
                layers[i].E, layers[i].k, layers[i].router = moe.E, moe.k, router
                layers[i].efc, layers[i].edown = fc, down
        head = _linear(model.lm_head)
        if head is None:
            return None
        rows = rows or cache.k[0].size(0)
        C, nh, nkv, hd, H = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden
        E, k = cfg.moe_experts, cfg.moe_top_k if cfg.moe_experts else 0
        # kernels.c Model: per-row sizes; MoE buffers stay one element for dense models
        sizes = {"x": C, "xb": C, "qkv": (nh + 2 * nkv) * hd, "att": nh * hd, "hb": 2 * H, "ha": H,
                 "scores": nh * cache.max_len, "ew": E, "eg": k, "xe": k * C, "eo": k * C, "lr": cfg.lowrank}
        scratch = {name: torch.zeros(max(1, rows * n)) for name, n in sizes.items()}
        scratch |= {name: torch.zeros(max(1, rows * k), dtype=torch.int32) for name in ("esel", "epair", "eplace")}
        scratch["estart"] = torch.zeros(E + 1, dtype=torch.int32)
        acts = kernels._Scratch(rows, max(C, H, nh * hd))
        keep += [model, layers, scratch, acts]
        pos_table = model.pos_emb.weight if model.pos_emb is not None else getattr(model, "pos_table", None)
        rotary = model.blocks[0].attn.rotary
        cm = kernels.Model(
            cfg.n_layer, C, nh, nkv, hd, H, cache.max_len, cfg.norm == "rmsnorm", cfg.mlp == "swiglu",
            POS_KINDS[cfg.pos], cfg.attn_window if cfg.attention == "local" else 0, KV_KINDS[cache.kv], cfg.norm_eps,
            model.tok_emb.weight.data_ptr(), None if pos_table is None else pos_table.data_ptr(),
            None if rotary is None else rotary.cos.data_ptr(), None if rotary is None else rotary.sin.data_ptr(),
            model.norm_f.weight.data_ptr(), _bias(model.norm_f), head, layers,
            *(scratch[n].data_ptr() for n in kernels.MODEL_SCRATCH), acts.acts,
            *(scratch[n].data_ptr() for n in kernels.MOE_SCRATCH),
        )
        cm.attn, cm.lr = ATTENTION_KINDS[cfg.attention], scratch["lr"].data_ptr()
        cm.bs_block, cm.bs_global, cm.bs_summary = cfg.attn_block, cfg.attn_global, cfg.attn_summary
        cm.lin_feats, cm.lsh_rounds, cm.lsh_buckets, cm.lsh_keys = (cfg.linear_features, cfg.lsh_hashes,
                                                                     cfg.lsh_buckets, cfg.attn_window)
        return cls(model, cache, cm, keep, rows)


class FusedDecoder(_Step):
    """Decode one token per call: `logits = dec(token, pos)` writes position `pos`'s keys/values into the cache and
    returns the (V,) fp32 logits of the next token (a buffer reused by the next call). The caller advances cache.pos.
    The cache holds one sequence (a batch-1 cache, or `KVCache.slot(b)` of a larger one)."""

    def __init__(self, model: GPT, cache: KVCache, cm: kernels.Model, keep: list, rows: int):
        super().__init__(model, cache, cm, keep, rows)
        self.logits = torch.empty(model.config.vocab_size, dtype=torch.float32)

    @classmethod
    def for_model(cls, model: nn.Module, cache: KVCache) -> FusedDecoder | None:
        return cls._build(model, cache) if cache.k[0].size(0) == 1 else None

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if not 0 <= pos < self._max_pos:
            raise ValueError(f"position {pos} is outside the cache of {self._max_pos}")
        self._lib.slm_decode_step(ctypes.byref(self._cm), token, pos, self.logits.data_ptr(), torch.get_num_threads())
        return self.logits


class BatchDecoder(_Step):
    """Continuous batching: one C call advances any subset of the sequences of a batch-S cache, every sequence at
    its own position, and reads each weight once for all of them. Batch-1 decoding is bound by that weight traffic,
    so a step of n sequences costs much less than n steps of one.

    `logits = dec(tokens, slots, positions)` feeds tokens[i] at position positions[i] of the sequence in cache slot
    slots[i], writes those keys/values into the cache, and returns the (n, V) fp32 next-token logits, row i for
    slots[i]: a view of a buffer the next call overwrites (copy what must outlive it). Each row's logits are those
    that FusedDecoder gives for its sequence alone. A slot may take several consecutive positions in one call — a
    chunk of its prompt, prefilled in the same pass over the weights as the other sequences' next tokens: every
    key and value of a call is stored before any row attends. The caller keeps the positions (e.g. in the
    `cache.slot(b)` views' `.pos`) and advances them. One call at a time: the calls share their scratch buffers.
    `logits_rows`: the rows whose logits to return, in that order ((len(logits_rows), V)); the others skip the final
    norm and the LM head — a prompt chunk needs only its last row's.

    rows: the most rows one call takes (default: one per cache sequence; more to prefill alongside decoding).

    >>> cache = model.new_cache(8, 512)
    >>> dec = BatchDecoder.for_model(model, cache, rows=8 + 64)
    >>> logits = dec([17, 4, 9, 9], slots=[3, 0, 5, 5], positions=[12, 40, 0, 1])  # (4, V); slot 5 is prefilling
    >>> logits = dec([5, 6, 1, 2, 3], slots=[3, 0, 5, 5, 5], positions=[13, 41, 2, 3, 4], logits_rows=[0, 1, 4])
    """

    def __init__(self, model: GPT, cache: KVCache, cm: kernels.Model, keep: list, rows: int):
        super().__init__(model, cache, cm, keep, rows)
        self.batch_size = cache.k[0].size(0)  # S: the cache's sequences
        self.logits = torch.empty(self.rows, model.config.vocab_size, dtype=torch.float32)
        # tokens, positions, slots and the rows that want logits, for the C call
        self._args = [(ctypes.c_int * self.rows)() for _ in range(4)]

    @classmethod
    def for_model(cls, model: nn.Module, cache: KVCache, rows: int | None = None) -> BatchDecoder | None:
        if rows is not None and rows < 1:
            raise ValueError(f"rows={rows} must be >= 1")
        return cls._build(model, cache, rows)

    def __call__(self, tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int],
                 logits_rows: Sequence[int] | None = None) -> torch.Tensor:
        n = len(tokens)
        if not len(slots) == len(positions) == n:
            raise ValueError(f"got {n} tokens, {len(slots)} slots and {len(positions)} positions: give one of each "
                             "per sequence")
        if n > self.rows:
            raise ValueError(f"{n} rows in one step, but this step was built for at most {self.rows}")
        if len(set(zip(slots, positions, strict=True))) != n:
            raise ValueError(f"slots {list(slots)} at positions {list(positions)} repeat a (slot, position) pair")
        cfg = self.model.config
        for name, values, limit, why in (
            ("slot", slots, self.batch_size, f"the cache holds {self.batch_size} sequences"),
            ("position", positions, self._max_pos, f"cache length {self.cache.max_len}, context {cfg.block_size}"),
            ("token", tokens, cfg.vocab_size, "the vocabulary"),
        ):
            bad = next((v for v in values if not 0 <= v < limit), None)
            if bad is not None:
                raise ValueError(f"{name} {bad} is outside 0..{limit - 1} ({why})")
        if logits_rows is not None and (len(logits_rows) > n or any(not 0 <= r < n for r in logits_rows)):
            raise ValueError(f"logits_rows {list(logits_rows)}: at most {n} of the rows 0..{n - 1}")
        if n == 0:
            return self.logits[:0]
        tok, pos, slot, out = self._args
        tok[:n], pos[:n], slot[:n] = tokens, positions, slots
        n_out = n if logits_rows is None else len(logits_rows)
        if logits_rows is not None:
            out[:n_out] = logits_rows
        self._lib.slm_decode_batch(ctypes.byref(self._cm), n, tok, pos, slot, self.logits.data_ptr(),
                                   torch.get_num_threads(), None if logits_rows is None else out, n_out)
        return self.logits[:n_out]


def _experts(moe: MoE) -> tuple[ctypes.Array, ctypes.Array]:
    """C views of an MoE layer's experts, cached on the module until its weights change. A quantized stack
    (QuantExperts) already holds each expert as (out, in) rows: viewed in place. An fp32 parameter stack is
    (E, in, out) for `x @ fc[e]`, so each expert is transposed once into a copy."""
    stacks = (moe.fc, moe.proj)
    packed = [s.weight if isinstance(s, QuantExperts) else s for s in stacks]
    key = tuple((t.data_ptr(), t._version) for t in packed)
    cached = getattr(moe, "_fused_experts", None)
    if cached is None or cached[0] != key:
        tensors, mats = [], []
        for stack, bias in zip(stacks, (moe.fc_bias, moe.proj_bias), strict=True):
            with torch.no_grad():
                if isinstance(stack, QuantExperts):
                    ws, scales = list(stack.weight), list(stack.scale)  # views: (N, K) rows of each expert
                else:
                    ws, scales = [stack[e].detach().T.contiguous().float() for e in range(moe.E)], [None] * moe.E
                bs = [None] * moe.E if bias is None else [b.detach().float().contiguous() for b in bias]
            tensors.append((ws, scales, bs))
            mats.append((kernels.Mat * moe.E)(*(kernels.mat(*wsb) for wsb in zip(ws, scales, bs, strict=True))))
        cached = (key, tensors, tuple(mats))
        object.__setattr__(moe, "_fused_experts", cached)  # a plain attribute: not a buffer, never saved
    return cached[2]


def _bias(norm: nn.Module) -> int | None:
    b = getattr(norm, "bias", None)
    return None if b is None else b.data_ptr()
