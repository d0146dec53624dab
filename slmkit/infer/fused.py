"""The fused decode step: one C call per generated token for dense transformers (kernels.c `slm_decode_step`).

`FusedDecoder.for_model(model, cache)` returns None when the model is outside what the C step implements — attention
other than full or sliding-window, low-rank layers, non-fp32 parameters, a batch > 1 cache — and the engine then
decodes through PyTorch, which computes the same function (tests compare the two on every supported configuration).
Dense and Mixture-of-Experts FFNs are both covered, and every KV cache storage (fp32, bf16, int8: KVCache).
Linear layers may be fp32 `nn.Linear` or int8/int4/bf16 `QuantLinear`, expert stacks fp32 parameters or int8/int4/bf16
`QuantExperts` (slmkit.compress.quantize), mixed freely; the C step reads the packed weights in place.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from slmkit.infer import kernels
from slmkit.infer.quantized import QuantExperts, QuantLinear
from slmkit.model.ffn import MoE
from slmkit.model.gpt import GPT, KVCache

POS_KINDS = {"none": 0, "learned": 1, "sinusoidal": 1, "rope": 2}
KV_KINDS = {"fp32": 0, "bf16": 1, "int8": 2}  # kernels.c KV_F32, KV_BF16, KV_INT8


def _linear(mod: nn.Module) -> kernels.Mat | None:
    if isinstance(mod, QuantLinear):
        return kernels.mat(mod.weight, mod.scale, mod.bias)
    if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.is_contiguous():
        return kernels.mat(mod.weight.detach(), None, None if mod.bias is None else mod.bias.detach())
    return None


class FusedDecoder:
    """Decode one token per call: `logits = dec(token, pos)` writes position `pos`'s keys/values into the cache and
    returns the (V,) fp32 logits of the next token (a buffer reused by the next call). The caller advances cache.pos."""

    def __init__(self, lib: ctypes.CDLL, model: GPT, cache: KVCache, cm: kernels.Model, layers: ctypes.Array,
                 keep: list):
        self._lib, self.model, self.cache, self._cm, self._layers, self._keep = lib, model, cache, cm, layers, keep
        self.logits = torch.empty(model.config.vocab_size, dtype=torch.float32)

    @classmethod
    def for_model(cls, model: nn.Module, cache: KVCache) -> FusedDecoder | None:
        if not isinstance(model, GPT) or not kernels.available():
            return None
        cfg = model.config
        if cfg.attention not in ("full", "local") or cfg.lowrank or cfg.pos not in POS_KINDS:
            return None
        if model.tok_emb.weight.dtype != torch.float32 or cache.dtype != torch.float32 or cache.k[0].size(0) != 1:
            return None
        keep: list = [cache]  # every tensor whose address the C structs hold
        layers = (kernels.Layer * cfg.n_layer)()
        for i in range(cfg.n_layer):
            block = model.blocks[i % len(model.blocks)]
            moe = block.mlp if isinstance(block.mlp, MoE) else None
            ffn = [kernels.Mat(), kernels.Mat()] if moe else [_linear(block.mlp.fc), _linear(block.mlp.proj)]
            mats = [_linear(block.attn.qkv), _linear(block.attn.proj), *ffn]
            if any(m is None for m in mats) or not all(c.is_contiguous() for c in (cache.k[i], cache.v[i])):
                return None
            n1, n2 = block.norm1, block.norm2
            keep += [n1, n2]
            scales = (cache.k_scale[i].data_ptr(), cache.v_scale[i].data_ptr()) if cache.kv == "int8" else (None, None)
            layers[i] = kernels.Layer(n1.weight.data_ptr(), _bias(n1), n2.weight.data_ptr(), _bias(n2), *mats,
                                      cache.k[i].data_ptr(), cache.v[i].data_ptr(), *scales)
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
        C, nh, nkv, hd, H = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden
        E = cfg.moe_experts
        scratch = {name: torch.zeros(n) for name, n in (("x", C), ("xb", C), ("qkv", (nh + 2 * nkv) * hd), ("att", C),
                                                         ("hb", 2 * H), ("scores", nh * cache.max_len), ("eo", C),
                                                         ("ew", max(1, 2 * E)))}
        scratch["esel"] = torch.zeros(max(1, E), dtype=torch.int32)
        acts = kernels._Scratch(1, max(C, H))
        keep += [model, scratch, acts]
        pos_table = model.pos_emb.weight if model.pos_emb is not None else getattr(model, "pos_table", None)
        rotary = model.blocks[0].attn.rotary
        cm = kernels.Model(
            cfg.n_layer, C, nh, nkv, hd, H, cache.max_len, cfg.norm == "rmsnorm", cfg.mlp == "swiglu",
            POS_KINDS[cfg.pos], cfg.attn_window if cfg.attention == "local" else 0, KV_KINDS[cache.kv], cfg.norm_eps,
            model.tok_emb.weight.data_ptr(), None if pos_table is None else pos_table.data_ptr(),
            None if rotary is None else rotary.cos.data_ptr(), None if rotary is None else rotary.sin.data_ptr(),
            model.norm_f.weight.data_ptr(), _bias(model.norm_f), head, layers,
            *(scratch[n].data_ptr() for n in ("x", "xb", "qkv", "att", "hb", "scores")), acts.acts,
            *(scratch[n].data_ptr() for n in ("eo", "ew", "esel")),
        )
        return cls(kernels._lib, model, cache, cm, layers, keep)  # type: ignore[arg-type]

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if not 0 <= pos < self.cache.max_len:
            raise ValueError(f"position {pos} is outside the cache of {self.cache.max_len}")
        self._lib.slm_decode_step(ctypes.byref(self._cm), token, pos, self.logits.data_ptr(), torch.get_num_threads())
        return self.logits


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
