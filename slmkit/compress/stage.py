"""`slm quantize`: a run in, a quantized checkpoint out — packed integer weights on disk, loaded without fp32 copies.

    slm quantize runs/shk --weights int4 --group 32 --out runs/shk-int4
    slm generate runs/shk-int4 --prompt "ROMEO:"        # every consumer loads it directly

A quantized checkpoint is an ordinary checkpoint directory (config.json, tokenizer.json, meta.json of kind "quantize"
with the lineage: parent checkpoint, method, group, calibration set and size) whose model.safetensors holds, for each
quantized layer, its packed `weight` and `scale` (slmkit.infer.quantized explains the int8 and int4 layouts) in place
of the fp32 weight; embeddings, norms and biases stay fp32. `load_quantized` builds the model on the meta device and
installs the packed tensors as they are read, so no fp32 copy of a quantized layer ever exists.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slmkit import checkpoint, run
from slmkit.compress import sparse
from slmkit.compress.quantize import quantize
from slmkit.config import ModelConfig
from slmkit.data import load_split
from slmkit.data.textsets import resolve_text_set
from slmkit.errors import SlmError
from slmkit.fsutil import atomic_dir
from slmkit.infer.quantized import INT4_GROUPS, QuantExperts, QuantLinear, WeightDtype
from slmkit.model import GPT
from slmkit.model.ffn import MoE
from slmkit.tokenizer import Tokenizer

METHODS = ("rtn", "gptq", "awq")
CALIBRATED = ("gptq", "awq")


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear | QuantExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantExperts)}


def storage(model: nn.Module) -> dict[str, Any]:
    """Sizes of a quantized model: weights in quantized layers, their bytes (packed weights + scales) and the bits per
    weight as llama.cpp reports them; and the bytes of everything kept in fp32 (embeddings, norms, biases)."""
    n_weights = q_bytes = 0
    for m in quantized_modules(model).values():
        E, K, N = m.shape if isinstance(m, QuantExperts) else (1, m.in_features, m.out_features)
        n_weights += E * K * N
        q_bytes += m.weight.numel() * m.weight.element_size() + m.scale.numel() * m.scale.element_size()
    quantized = {id(t) for m in quantized_modules(model).values() for t in (m.weight, m.scale)}
    other = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in quantized}
    kept = sum(t.numel() * t.element_size() for t in other.values() if not t.is_meta)
    return {"quantized_weights": n_weights, "quantized_bytes": q_bytes,
            "bits_per_weight": round(8 * q_bytes / n_weights, 4) if n_weights else None, "fp32_bytes": kept}


def calibration_tokens(meta: dict[str, Any], tokenizer: Tokenizer, calib: str | None, *, samples: int,
                       seq_len: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """(samples, seq_len) token windows for a calibrated method, and a record of where they came from: `calib` names
    held-out text like `slm eval --lm` (`shakespeare:train`, `notes/`), else a seeded sample of the run's own training
    shards (`meta["data"]`)."""
    if calib is None:
        data = meta.get("data")
        if not data or not Path(data).exists():
            raise SlmError("this model has no training data of its own here: name calibration text with --calib, "
                           "e.g. --calib shakespeare:train or --calib path/to/notes/")
        tokens = load_split(data, "train").tokens
        about: dict[str, Any] = {"source": str(data), "split": "train"}
    else:
        texts, about = resolve_text_set(calib)
        ids: list[int] = []
        for batch in (texts[i:i + 256] for i in range(0, len(texts), 256)):
            for row in tokenizer.encode_batch(batch, bos=tokenizer.add_bos):
                ids.extend(row)
        tokens = np.asarray(ids, dtype=np.int64)
    if len(tokens) < seq_len + 1:
        raise SlmError(f"calibration text has {len(tokens)} tokens, fewer than one window of {seq_len}; give more")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=samples)
    windows = np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts])
    return torch.from_numpy(windows), {**about, "samples": samples, "seq_len": seq_len, "seed": seed,
                                       "tokens": samples * seq_len}


def quantize_run(
    src: str | Path,
    out: str | Path,
    *,
    weights: WeightDtype = "int8",
    group: int = 32,
    method: str = "rtn",
    calib: str | None = None,
    calib_samples: int = 128,
    calib_len: int = 256,
    overwrite: bool = False,
) -> Path:
    """Quantize the checkpoint (or run's latest) at `src` and write a quantized checkpoint to `out`. Returns `out`.

    `weights`: int8 (one scale per row) or int4 (one fp16 scale per `group` of 32/64/128 weights). `method`: rtn
    (round-to-nearest), gptq or awq (int4 only; calibrated on `calib_samples` windows of `calib_len` tokens from
    `calib`, default the run's own training data).

    >>> quantize_run("runs/shk", "runs/shk-int4", weights="int4", group=32, method="gptq")  # doctest: +SKIP
    """
    if weights not in ("int8", "int4"):
        raise SlmError(f"--weights {weights!r}: a quantized checkpoint holds int8 or int4 weights (bf16 is a load-time "
                       "choice: slm generate --weights bf16)")
    if method not in METHODS:
        raise SlmError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if method in CALIBRATED and weights != "int4":
        raise SlmError(f"--method {method} calibrates 4-bit weights; use --weights int4 (int8 is round-to-nearest)")
    if weights == "int4" and group not in INT4_GROUPS:
        raise SlmError(f"--group {group} is not supported; use one of {', '.join(map(str, INT4_GROUPS))}")
    for name, value in (("calib_samples", calib_samples), ("calib_len", calib_len)):
        if value < 1:
            raise SlmError(f"{name}={value} must be >= 1")
    ck, parent_meta = load_parent(src, out, overwrite=overwrite, action="quantize")
    ckpt_dir = ck.path
    model, cal_about = ck.model, None
    n = model.num_params  # the fp32 model's counts, for reports (packed weights are buffers, not parameters)
    counts = {"total": n(), "active": n(active=True), "non_embedding": n(non_embedding=True)}
    t0 = time.perf_counter()
    if method in CALIBRATED:
        seq_len = min(calib_len, model.config.block_size)
        tokens, cal_about = calibration_tokens(parent_meta, ck.tokenizer, calib, samples=calib_samples,
                                               seq_len=seq_len)
        quantize(model, weights, group=group, method=method, calib=tokens)
    else:
        if calib is not None:
            raise SlmError("--calib is for calibrated methods (--method gptq or awq); round-to-nearest needs none")
        quantize(model, weights, group=group)
    seconds = time.perf_counter() - t0
    recipe = {"weights": weights, "group": group if weights == "int4" else None, "method": method,
              "calibration": cal_about}
    meta = run.new_meta("quantize", parent=ckpt_dir, model_class=run.model_class(parent_meta), recipe=recipe,
                        quantization=recipe, storage=storage(model), quantize_time=round(seconds, 3), counts=counts,
                        params=parent_meta.get("params"), data=parent_meta.get("data"),
                        data_meta=parent_meta.get("data_meta"))
    return write_run(out, lambda tmp: checkpoint.write_model(tmp, model), ck.tokenizer, meta)


def load_parent(src: str | Path, out: str | Path, *, overwrite: bool,
                action: str) -> tuple[checkpoint.Checkpoint, dict[str, Any]]:
    """The fp32 checkpoint at `src` (a run's latest) that a compression stage will `action` into `out`, and its
    meta.json over its run's (where the training data and params are recorded). Refuses an n-gram model, a
    quantized checkpoint (its fp32 weights are gone) and an `out` that may not be written (slmkit.run.check_out),
    before anything is read. A pruned checkpoint's sparse tensors are decoded."""
    src, out = Path(src), Path(out)
    if run.kind_of(src) == "ngram":
        raise SlmError(f"{src} is an n-gram model: it has counts, not weights to {action}")
    ckpt_dir = checkpoint.resolve(src)
    if run.kind_of(ckpt_dir) == "quantize":
        raise SlmError(f"{src} is already quantized; {action} its parent (meta.json lineage) instead")
    run.check_out(out, overwrite=overwrite, inputs=(src,))
    ck = sparse.load(ckpt_dir)
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    parent_meta = {**(run.read_meta(run_dir) if run_dir != ckpt_dir and run.kind_of(run_dir) else {}), **ck.meta}
    return ck, parent_meta


def write_run(out: Path, write_model: Callable[[Path], object], tokenizer: Tokenizer, meta: dict[str, Any]) -> Path:
    """A compressed checkpoint directory: `write_model(dir)` writes the weights and config.json, then the tokenizer
    and meta.json; assembled under a temporary name and renamed into place (replacing what check_out allowed)."""
    with atomic_dir(out, overwrite=True) as tmp:
        write_model(tmp)
        tokenizer.save(tmp / "tokenizer.json")
        run.write_meta(tmp, meta)
    return Path(out)


def load_quantized(ckpt: str | Path) -> GPT:
    """The model of a quantized checkpoint directory, its packed layers installed as read (no fp32 copy of them).
    Shapes, dtypes and scales are checked against the config: a truncated or tampered file is refused, never
    mis-decoded."""
    ckpt = Path(ckpt)
    cfg = ModelConfig.load(ckpt / "config.json")
    group = run.read_meta(ckpt, kinds=("quantize",))["quantization"]["group"]
    file = ckpt / "model.safetensors"
    sd = checkpoint.read_weights(file)
    return checkpoint.model_from_state_dict(cfg, sd, str(file), prepare=lambda m: _install(m, sd, str(file), group))


def _install(model: GPT, sd: dict[str, torch.Tensor], origin: str, group: int | None) -> None:
    """Swap the meta model's layers for the packed ones `sd` holds (a layer is quantized when it has a `scale`);
    int4 layers must have the `group` meta.json records."""
    def bad(msg: str) -> SlmError:
        return SlmError(f"{origin}: {msg}; the file is truncated or tampered — quantize the parent again")

    for name, mod in list(model.named_modules()):
        if isinstance(mod, MoE):
            for part in ("fc", "proj"):
                key = f"{name}.{part}"
                if f"{key}.scale" in sd:
                    E, K, N = getattr(mod, part).shape
                    _check_packed(sd, key, (E, N, K), group, bad)
                    delattr(mod, part)
                    setattr(mod, part, QuantExperts(sd[f"{key}.weight"], sd[f"{key}.scale"]))
        for child_name, child in list(mod.named_children()):
            key = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and f"{key}.scale" in sd:
                _check_packed(sd, key, (child.out_features, child.in_features), group, bad)
                bias = sd.get(f"{key}.bias")
                if (bias is None) != (child.bias is None):
                    raise bad(f"{key}.bias is {'missing' if bias is None else 'unexpected'}")
                setattr(mod, child_name, QuantLinear(sd[f"{key}.weight"], sd[f"{key}.scale"], bias))
    stray = [k for k, t in sd.items() if t.dtype in (torch.int8, torch.uint8) and not k.endswith(".weight")]
    unscaled = [k for k, t in sd.items() if t.dtype in (torch.int8, torch.uint8) and k.endswith(".weight")
                and f"{k[:-len('.weight')]}.scale" not in sd]
    if stray or unscaled:
        raise bad(f"integer tensor {(stray + unscaled)[0]} has no scale")


def _check_packed(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], group: int | None, bad: Any) -> None:
    """`key.weight`/`key.scale` are a valid int8 (weight (..., N, K) int8, scale (..., N) fp32) or int4 (weight
    (..., N, K/2) uint8, scale (..., N, K/group) fp16) pair for an fp32 matrix of `shape` (..., N, K)."""
    w, s = sd.get(f"{key}.weight"), sd[f"{key}.scale"]
    if w is None:
        raise bad(f"{key}.weight is missing")
    *lead, N, K = shape
    if w.dtype == torch.int8:
        ok = tuple(w.shape) == (*lead, N, K) and s.dtype == torch.float32 and tuple(s.shape) == (*lead, N)
    elif w.dtype == torch.uint8:
        ok = (group is not None and K % group == 0 and tuple(w.shape) == (*lead, N, K // 2)
              and s.dtype == torch.float16 and tuple(s.shape) == (*lead, N, K // group))
    elif w.dtype == torch.bfloat16:
        ok = tuple(w.shape) == (*lead, N, K) and tuple(s.shape) == (*lead, N)
    else:
        ok = False
    if not ok or not torch.isfinite(s.float()).all():
        raise bad(f"{key} holds {w.dtype} {list(w.shape)} with scales {s.dtype} {list(s.shape)}, which is not a "
                  f"quantized {list(shape)} matrix")


def bits_text(st: dict[str, Any]) -> str:
    """'4.50 bits/weight, 7.2 MB packed + 1.1 MB fp32' for a storage() record."""
    mb = 1e6
    bpw = st.get("bits_per_weight")
    head = f"{bpw:.2f} bits/weight" if bpw is not None and math.isfinite(bpw) else "no quantized layers"
    return f"{head}, {st['quantized_bytes'] / mb:.1f} MB packed + {st['fp32_bytes'] / mb:.1f} MB fp32"
