"""transformers ↔ slmkit for Llama-architecture checkpoints: the config and weight-name mapping, and `import_hf`.

slmkit's Llama-style model is transformers' `LlamaForCausalLM` with two fusions: q/k/v share one matrix
(`attn.qkv`, rows q then k then v) and gate/up share one (`mlp.fc`, rows gate then up). RoPE uses the same
rotate-half layout, so no permutation is needed here (GGUF files are different: see gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer


def llama_config_from_hf(hc: dict[str, Any], origin: str) -> ModelConfig:
    """ModelConfig of a transformers LlamaConfig dict (config.json); anything slmkit would compute differently is an
    error, never silently ignored."""
    arch = hc.get("model_type")
    if arch != "llama":
        raise SlmError(f"{origin}: model_type {arch!r} is not supported; slmkit imports Llama-architecture models")
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise SlmError(f"{origin}: rope scaling {rope.get('rope_type')!r} is not supported (only plain RoPE)")
    checks = {"hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None)}
    for key, allowed in checks.items():
        if hc.get(key) not in allowed:
            raise SlmError(f"{origin}: {key}={hc.get(key)!r} is not supported (needs {allowed[0]!r})")
    n_embd, n_head = hc["hidden_size"], hc["num_attention_heads"]
    head_size = hc.get("head_dim")  # a separate head size (e.g. a model whose heads were pruned), else derived
    if head_size == n_embd // n_head and n_embd % n_head == 0:
        head_size = None
    return ModelConfig(
        vocab_size=hc["vocab_size"], block_size=hc.get("max_position_embeddings", 2048),
        n_layer=hc["num_hidden_layers"],
        n_head=n_head, n_kv_head=hc.get("num_key_value_heads") or n_head, n_embd=n_embd, head_size=head_size,
        mlp="swiglu",
        mlp_hidden=hc["intermediate_size"], norm="rmsnorm", norm_eps=float(hc.get("rms_norm_eps", 1e-6)), pos="rope",
        rope_theta=float(rope.get("rope_theta", hc.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hc.get("tie_word_embeddings", False)), bias=False, dropout=0.0,
    )


LLAMA_ATTN = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
              "attn.qkv": "self_attn.q_proj self_attn.k_proj self_attn.v_proj", "attn.proj": "self_attn.o_proj"}
# slmkit block tensor → its transformers Llama name(s) in layer i: a fused slmkit tensor (q/k/v, gate/up) is the
# concatenation of these along its rows, in this order (the importer here, the exporter in hf_export.py)
LLAMA_LAYER = {**LLAMA_ATTN, "mlp.fc": "mlp.gate_proj mlp.up_proj", "mlp.proj": "mlp.down_proj"}


def llama_state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, origin: str) -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM weight names → slmkit's (fusing q/k/v and gate/up), as fp32."""

    def get(name: str) -> torch.Tensor:
        if name not in sd:
            raise SlmError(f"{origin}: weight {name!r} is missing")
        return sd[name].float()

    out = {"tok_emb.weight": get("model.embed_tokens.weight"), "norm_f.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layer):
        for ours, theirs in LLAMA_LAYER.items():
            out[f"blocks.{i}.{ours}.weight"] = torch.cat([get(f"model.layers.{i}.{n}.weight") for n in theirs.split()])
    return out


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        f = src / name
        if not f.exists():
            if name == "model.safetensors" and any(src.glob("*.bin")):
                raise SlmError(f"{src} holds only pickle (.bin) weights; slmkit reads safetensors only — convert "
                               "them with transformers' save_pretrained(safe_serialization=True)")
            raise SlmError(f"{f} not found")
        try:
            sd |= load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise SlmError(f"cannot read {f}: {e} — the file is truncated or corrupt") from None
    return sd


def read_hf_tokenizer(src: Path) -> Tokenizer:
    """tokenizer.json + the special-token roles and chat template of tokenizer_config.json (or chat_template.jinja)."""
    tj = src / "tokenizer.json"
    if not tj.exists():
        raise SlmError(f"{src} has no tokenizer.json (slmkit reads fast tokenizers only)")
    tc_path = src / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    config: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = tc.get(key)
        config[key] = v.get("content") if isinstance(v, dict) else v
    if config["eos_token"] is None:
        gen = src / "generation_config.json"
        ids = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
        raise SlmError(f"{tc_path} names no eos_token (generation_config eos id: {ids}); add \"eos_token\" to it")
    config["add_bos_token"] = bool(tc.get("add_bos_token", False))
    template = tc.get("chat_template")
    if template is None and (src / "chat_template.jinja").exists():
        template = (src / "chat_template.jinja").read_text()
    config["chat_template"] = template
    return Tokenizer._parse(tj.read_text(encoding="utf-8"), str(tj), {k: v for k, v in config.items() if v is not None})


def import_hf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Turn a local transformers Llama checkpoint directory (config.json + safetensors + tokenizer.json) into a native
    slmkit checkpoint at `out`. Returns `out`.

    >>> import_hf("SmolLM2-135M-Instruct/", "runs/smollm2-hf")
    """
    from slmkit.interop.gguf import save_imported

    src = Path(src)
    if not (src / "config.json").exists():
        raise SlmError(f"{src} is not a transformers checkpoint directory (no config.json)")
    hc = json.loads((src / "config.json").read_text())
    cfg = llama_config_from_hf(hc, str(src / "config.json"))
    sd = llama_state_dict_from_hf(_read_weights(src), cfg, str(src))
    tok = read_hf_tokenizer(src)
    source = {"format": "hf", "source": str(src.resolve()), "architecture": "llama",
              "name": hc.get("_name_or_path") or src.name}
    return save_imported(out, cfg, sd, tok, source, overwrite=overwrite)
