"""slmkit → transformers: `write_hf` writes a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no custom code, computing the same logits.

Each config maps to the one stock class that computes exactly what slmkit computes; anything else is refused with one
line naming what has no equivalent (never a model that would compute different logits):

    positions, norm, mlp            full attention          local (sliding window)   MoE (top-k >= 2)
    rope, rmsnorm, swiglu (Llama)   LlamaForCausalLM        MistralForCausalLM*      MixtralForCausalLM*
    rope, rmsnorm, gelu             ArceeForCausalLM        -                        -
    rope, layernorm, gelu           Starcoder2ForCausalLM   Starcoder2ForCausalLM    -
    rope, layernorm, swiglu         StableLmForCausalLM*    -                        -
    learned, layernorm, gelu (GPT-2)  GPT2LMHeadModel       -                        -
    sinusoidal/none, layernorm, gelu  GPT2LMHeadModel       -                        -
    (* only without biases: those classes have none)

Why these classes: all use HF Llama's rotate-half RoPE, as slmkit does, and separate q/k/v projections with native
grouped-query attention (GPT-NeoX, the other RoPE + LayerNorm + GELU class, packs q/k/v per head and has neither GQA
nor a sliding window). A sliding window of w keys is transformers' `sliding_window=w` (key visible iff
q − w < k ≤ q, as in attention.py). GELU is the exact erf form on both sides (transformers' "gelu"). Where the stock
class always has a bias slmkit's layer lacks (LayerNorm in Starcoder2/StableLM/GPT-2, every GPT-2 projection), the
bias is written as zeros. GPT-2 has no grouped-query attention: each key/value head is copied to the query heads that
share it, which computes the same attention. GPT-2's learned position table holds slmkit's sinusoidal table, or zeros
for a model without positions (fine-tuning in transformers would then train what slmkit keeps fixed). Shared FFNs and
shared blocks are unrolled (the weights copied into every layer). Dropout is a training setting, exported as 0.

The tokenizer files: tokenizer.json is slmkit's (an HF `tokenizers` file), with a post-processor that prepends BOS
exactly when slmkit does (`Tokenizer.add_bos`: always for slmkit's own tokenizers), so `AutoTokenizer(text)` gives
the ids slmkit trains and generates on. slmkit's own tokenizers never read special tokens from text, so they are
exported with `split_special_tokens` (a literal "<|eos|>" in text stays text in transformers too); imported chat
tokenizers keep transformers' default, which their chat templates need (slmkit encodes rendered templates with
`specials=True`, the same rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import processors
from torch import Tensor

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.hf import LLAMA_ATTN as _ATTN
from slmkit.interop.hf import LLAMA_LAYER
from slmkit.interop.weights import dense_model, torch_dtype
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

# (positions, norm, mlp) → transformers class for full attention, for sliding-window attention
_DENSE: dict[tuple[str, str, str], tuple[str, str | None]] = {
    ("rope", "rmsnorm", "swiglu"): ("LlamaForCausalLM", "MistralForCausalLM"),
    ("rope", "rmsnorm", "gelu"): ("ArceeForCausalLM", None),
    ("rope", "layernorm", "gelu"): ("Starcoder2ForCausalLM", "Starcoder2ForCausalLM"),
    ("rope", "layernorm", "swiglu"): ("StableLmForCausalLM", None),
    ("learned", "layernorm", "gelu"): ("GPT2LMHeadModel", None),
    # GPT-2's learned table can hold any fixed table: the sinusoids, or zeros for no positions
    ("sinusoidal", "layernorm", "gelu"): ("GPT2LMHeadModel", None),
    ("none", "layernorm", "gelu"): ("GPT2LMHeadModel", None),
}
_NO_BIAS = {"MistralForCausalLM", "StableLmForCausalLM", "MixtralForCausalLM"}  # classes whose projections have none
_ATTENTION_NAMES = {"linear": "Performer (linear) attention", "lsh": "slmkit's causal LSH attention",
                    "blocksparse": "block-sparse attention"}
_POSITIONS = {"rope": "RoPE", "learned": "learned positions", "sinusoidal": "sinusoidal positions",
              "none": "no positions"}


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what a model of `cfg` computes; SlmError (one line naming what has
    no equivalent) otherwise.

    >>> hf_architecture(ModelConfig.preset("gpt-rope-3m"))
    'Starcoder2ForCausalLM'
    """

    def refuse(what: str) -> NoReturn:
        raise SlmError(f"{what} has no transformers equivalent, so the model cannot be exported as --format hf")

    if cfg.attention in _ATTENTION_NAMES:
        refuse(_ATTENTION_NAMES[cfg.attention])
    if cfg.lowrank:
        refuse(f"a low-rank factorised projection (lowrank={cfg.lowrank})")
    style = (cfg.pos, cfg.norm, cfg.mlp)
    described = f"{_POSITIONS[cfg.pos]}, {cfg.norm} and a {cfg.mlp} MLP"
    if cfg.moe_experts:
        if style != ("rope", "rmsnorm", "swiglu") or cfg.bias:
            refuse(f"a Mixture-of-Experts model with {described}{' and biases' * cfg.bias} (Mixtral's: RoPE, "
                   "rmsnorm, swiglu, no biases)")
        if cfg.moe_top_k == 1:
            refuse("top-1 MoE gating by the router probability (Mixtral renormalises the gate to 1)")
        if cfg.moe_capacity_factor is not None:
            refuse(f"MoE token dropping (moe_capacity_factor={cfg.moe_capacity_factor})")
        return "MixtralForCausalLM"
    if style not in _DENSE:
        refuse(f"a model with {described}")
    full, local = _DENSE[style]
    arch = local if cfg.attention == "local" else full
    if arch is None:
        refuse(f"sliding-window attention in a model with {described}")
    if cfg.bias and arch in _NO_BIAS:
        refuse(f"a model with {described}, biases{' and sliding-window attention' * (arch != full)}")
    if cfg.head_size is not None and arch == "GPT2LMHeadModel":
        refuse(f"GPT-2 with {cfg.n_head} heads of {cfg.head_size} (GPT-2 derives the head size as n_embd / n_head; "
               f"heads were pruned)")
    return arch


# ---------------------------------------------------------------------------------------------------------------------
# weights: slmkit names → transformers names


_TOP = {"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"}
_NORMS = ("norm1", "norm2", "norm_f")
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@dataclass(frozen=True)
class _Layout:
    """Where one transformers class keeps each slmkit tensor."""

    model_type: str
    layer: dict[str, str]  # slmkit block tensor → its transformers name(s) in layer i
    layers: str = "model.layers."  # prefix of layer i
    top: dict[str, str] = field(default_factory=lambda: dict(_TOP))  # embeddings, final norm, head
    bias: tuple[str, ...] = ()  # slmkit tensors the class always gives a bias (zeros where slmkit has none)
    gpt2: bool = False  # linear weights stored transposed (Conv1D), one key/value head per query head (no GQA)


_LAYOUTS = {
    "LlamaForCausalLM": _Layout("llama", LLAMA_LAYER),
    "MistralForCausalLM": _Layout("mistral", LLAMA_LAYER),
    "MixtralForCausalLM": _Layout("mixtral", _ATTN),  # + the experts, _moe
    "ArceeForCausalLM": _Layout("arcee", {**_ATTN, "mlp.fc": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}),
    "Starcoder2ForCausalLM": _Layout("starcoder2", {**_ATTN, "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"},
                                     bias=_NORMS),
    "StableLmForCausalLM": _Layout("stablelm", LLAMA_LAYER, bias=_NORMS),
    "GPT2LMHeadModel": _Layout(
        "gpt2", {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"},
        layers="transformer.h.", bias=_NORMS + _LINEARS, gpt2=True,
        top={"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "norm_f": "transformer.ln_f",
             "lm_head": "lm_head"},
    ),
}


def _with_biases(params: dict[str, Tensor], bases: tuple[str, ...]) -> dict[str, Tensor]:
    """`params` plus a zero bias for each of `bases` that has a weight but no bias."""
    out = dict(params)
    for base in bases:
        if f"{base}.weight" in params and f"{base}.bias" not in params:
            w = params[f"{base}.weight"]
            out[f"{base}.bias"] = w.new_zeros(w.size(0))  # Linear weights are (out, in), norm weights (C,)
    return out


def _state_dict(model: GPT, arch: str) -> dict[str, Tensor]:
    """The weights of `model` under the names (and splits) transformers' `arch` loads: views of the model's tensors
    (unrolled layers share them)."""
    cfg, lay = model.config, _LAYOUTS[arch]
    nh, nkv, hd, H = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden
    split = {"attn.qkv": [nh * hd, nkv * hd, nkv * hd], "mlp.fc": [H, H]}
    sd: dict[str, Tensor] = {}
    # named_parameters yields a tied head once (as tok_emb), so a tied model writes no lm_head, as transformers expects
    top = {n: p for n, p in model.named_parameters() if not n.startswith(("blocks.", "shared_mlp."))}
    for name, t in _with_biases(top, lay.bias).items():
        base, kind = name.rsplit(".", 1)
        sd[f"{lay.top[base]}.{kind}"] = t
    if lay.gpt2 and cfg.pos != "learned":  # the fixed table in GPT-2's learned one
        fixed = model.pos_table if cfg.pos == "sinusoidal" else torch.zeros(cfg.block_size, cfg.n_embd)
        sd[lay.top["pos_emb"] + ".weight"] = fixed
    for i in range(cfg.n_layer):
        block = model.blocks[i % len(model.blocks)]  # shared blocks are unrolled: the same weights in every layer
        # a shared FFN is not a submodule of its blocks (GPT.shared_mlp owns it): collect it by hand
        params = {**dict(block.mlp.named_parameters(prefix="mlp")), **dict(block.named_parameters())}
        prefix = f"{lay.layers}{i}."
        if arch == "MixtralForCausalLM":
            sd |= _moe(params, prefix, H)
            params = {k: v for k, v in params.items() if not k.startswith("mlp.")}
        for name, t in _with_biases(params, lay.bias).items():
            base, kind = name.rsplit(".", 1)
            if lay.gpt2 and base == "attn.qkv" and nkv < nh:  # copy each kv head to the query heads sharing it
                q, k, v = t.split(split[base])
                k, v = (x.unflatten(0, (nkv, hd)).repeat_interleave(nh // nkv, 0).flatten(0, 1) for x in (k, v))
                t = torch.cat([q, k, v])
            names = lay.layer[base].split()
            parts = t.split(split[base]) if len(names) > 1 else (t,)
            for hf, part in zip(names, parts, strict=True):
                sd[f"{prefix}{hf}.{kind}"] = part.t() if lay.gpt2 and part.dim() == 2 else part  # Conv1D: (in, out)
    return sd


def _moe(params: dict[str, Tensor], prefix: str, H: int) -> dict[str, Tensor]:
    """slmkit's stacked experts (fc (E, C, 2H): gate then up columns; proj (E, H, C)) as Mixtral's per-expert w1
    (gate), w3 (up), w2 (down), the layout transformers converts on load."""
    fc, proj = params["mlp.fc"], params["mlp.proj"]
    p = prefix + "block_sparse_moe."
    sd = {p + "gate.weight": params["mlp.router.weight"]}
    for e in range(fc.size(0)):
        sd[f"{p}experts.{e}.w1.weight"] = fc[e, :, :H].t()
        sd[f"{p}experts.{e}.w3.weight"] = fc[e, :, H:].t()
        sd[f"{p}experts.{e}.w2.weight"] = proj[e].t()
    return sd


# ---------------------------------------------------------------------------------------------------------------------
# config.json


def _config(cfg: ModelConfig, arch: str, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json of `arch` for a model of `cfg`."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    window = cfg.attn_window if cfg.attention == "local" else None
    d: dict[str, Any] = {
        "architectures": [arch], "model_type": _LAYOUTS[arch].model_type, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        "dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
        "initializer_range": cfg.init_std, "use_cache": True,
    }
    if arch == "GPT2LMHeadModel":
        return d | {
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
            "n_positions": cfg.block_size, "activation_function": "gelu", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        }
    # rope_theta at the top level as well: transformers 4.x reads it there, 5.x reads rope_parameters
    d |= {"hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
          "max_position_embeddings": cfg.block_size, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
          "hidden_act": "silu" if cfg.mlp == "swiglu" else "gelu", "attention_dropout": 0.0}
    if arch == "Starcoder2ForCausalLM":
        return d | {"norm_epsilon": cfg.norm_eps, "use_bias": cfg.bias, "sliding_window": window,
                    "residual_dropout": 0.0, "embedding_dropout": 0.0}
    if arch == "StableLmForCausalLM":
        rope["partial_rotary_factor"] = 1.0  # StableLM's default rotates a quarter of each head
        return d | {"layer_norm_eps": cfg.norm_eps, "partial_rotary_factor": 1.0, "use_qkv_bias": False,
                    "qk_layernorm": False, "use_parallel_residual": False, "hidden_dropout": 0.0}
    d["rms_norm_eps"] = cfg.norm_eps
    if arch in ("LlamaForCausalLM", "ArceeForCausalLM"):
        return d | {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    if arch == "MixtralForCausalLM":
        d |= {"num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
              "router_jitter_noise": 0.0, "output_router_logits": False}
    return d | {"sliding_window": window}


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer files


def _token(tokenizer: Tokenizer, key: str, id: int) -> str:
    named = (tokenizer.config or {}).get(key)
    if isinstance(named, dict):  # transformers may store AddedToken dicts
        named = named.get("content")
    return named if isinstance(named, str) else tokenizer.decode([id])


def _tokenizer_files(tokenizer: Tokenizer, max_length: int) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) for transformers: BOS added as slmkit adds it."""
    bos = _token(tokenizer, "bos_token", tokenizer.bos_id)
    tk = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    if (tk.encode("").ids[:1] == [tokenizer.bos_id]) != tokenizer.add_bos:
        # transformers adds specials through the post-processor (its add_bos_token is not honoured by every
        # tokenizer class); make it prepend BOS exactly when slmkit does
        single, pair = ("$A:0", "$A:0 $B:1") if not tokenizer.add_bos else (f"{bos} $A:0", f"{bos} $A:0 {bos}:1 $B:1")
        special = [(bos, tokenizer.bos_id)] if tokenizer.add_bos else []
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    own = tokenizer.config is None
    tc = {k: v for k, v in (tokenizer.config or {}).items() if k != "chat_template" and v is not None}
    tc |= {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
        "eos_token": _token(tokenizer, "eos_token", tokenizer.eos_id),
        "pad_token": _token(tokenizer, "pad_token", tokenizer.pad_id),
        "add_bos_token": tokenizer.add_bos, "add_eos_token": False, "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,  # decode(encode(s)) == s, as in slmkit
        "split_special_tokens": own,
    }
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    return tk.to_str(pretty=True), tc


def _generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: generation stops at every id slmkit stops at (eos first)."""
    stops = [tokenizer.eos_id, *sorted(tokenizer.stop_ids - {tokenizer.eos_id})]
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
            "pad_token_id": tokenizer.pad_id}


# ---------------------------------------------------------------------------------------------------------------------


def write_hf(model: GPT, tokenizer: Tokenizer, out: Path, *, dtype: str = "f32") -> dict[str, Any]:
    """Write config.json, model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json into
    `out` (an existing, empty directory; the caller renames it into place). Weights are stored as `dtype` ("f32",
    "f16", "bf16"). Returns what was written: {"architecture": "LlamaForCausalLM", "model_type": "llama", ...}.

    >>> write_hf(ck.model, ck.tokenizer, Path("export.tmp"), dtype="bf16")["architecture"]
    'LlamaForCausalLM'
    """
    dt = torch_dtype(dtype)
    cfg = model.config
    arch = hf_architecture(cfg)  # before any work: a refusal leaves `out` empty
    model = dense_model(model)
    # each tensor its own contiguous copy: unrolled layers share storage, which safetensors refuses
    sd = {k: v.detach().to(dt, copy=True).contiguous() for k, v in _state_dict(model, arch).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok_json, tok_config = _tokenizer_files(tokenizer, cfg.block_size)
    files = {"config.json": _config(model.config, arch, tokenizer, dtype),
             "generation_config.json": _generation_config(tokenizer), "tokenizer_config.json": tok_config}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    return {"architecture": arch, "model_type": _LAYOUTS[arch].model_type, "dtype": dtype,
            "layers_unrolled": bool(cfg.share_mlp or cfg.share_blocks)}
