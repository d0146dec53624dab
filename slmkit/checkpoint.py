"""Checkpoints: plain files, named by step, written atomically, loaded without unpickling.

    run/checkpoints/step_000500/
        model.safetensors   weights (a tied head is stored once)
        config.json         ModelConfig
        tokenizer.json      HF tokenizers format
        meta.json           step, tokens, metrics, data and train config, versions — written last
        optimizer.pt        (resume only) optimizer state + torch RNG: tensors and plain containers, weights_only
        trainer_state.json  (resume only) step, clocks, data-sampler RNG state

A checkpoint directory is assembled under a temporary name and renamed into place, so a reader sees either a complete
checkpoint or none.

A pruned checkpoint (slm prune) stores its mostly-zero matrices sparse — slmkit.compress.sparse writes them and
documents the layout; every loader here reads them back into the dense model (`_sparse_tensors`), so a pruned
checkpoint loads wherever a checkpoint does.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit import run
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.fsutil import atomic_dir, write_json
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

_STEP_DIR = re.compile(r"^step_(\d+)$")
# the sparse layout's tensor-name suffixes (slmkit.compress.sparse)
SPARSE_MASK, SPARSE_COLS, SPARSE_ROWS, SPARSE_VALUES = ".sparse_mask", ".sparse_cols", ".sparse_rows", ".sparse_values"
_BITS = 2 ** torch.arange(8, dtype=torch.uint8)  # bit i of a mask byte: element 8·j + i


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, fp32), its tokenizer and its meta.json."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any]


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").exists()]
    return [p for _, p in sorted(found)]


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (→ its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    if not path.exists():
        raise SlmError(f"no such checkpoint or run directory: {path}")
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise SlmError(f"{path} holds no checkpoint (expected model.safetensors or checkpoints/step_*/)")
    return ckpts[-1]


def _state_dict(model: GPT) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.lm_head.weight is model.tok_emb.weight:  # tied: one tensor (safetensors refuses shared storage)
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save(
    ckpt_dir: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    *,
    optimizer_state: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one of the same name)."""
    ckpt_dir = Path(ckpt_dir)
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        write_model(tmp, model)
        tokenizer.save(tmp / "tokenizer.json")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if trainer_state is not None:
            write_json(tmp / "trainer_state.json", trainer_state)
        run.write_meta(tmp, meta)  # written last: its presence marks a complete checkpoint
    return ckpt_dir


def write_model(directory: str | Path, model: GPT) -> None:
    """model.safetensors + config.json into an existing directory (`save` writes them inside a whole checkpoint)."""
    directory = Path(directory)
    save_file(_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save(directory / "config.json")


def read_model(directory: str | Path) -> GPT:
    """The model of what `write_model` (or slmkit.compress.sparse.write_model) wrote (config.json +
    model.safetensors), in eval mode, fp32; sparse-stored matrices are decoded to dense ones."""
    directory = Path(directory)
    cfg = ModelConfig.load(directory / "config.json")
    weights = directory / "model.safetensors"
    sd = read_weights(weights)
    return model_from_state_dict(cfg, sd, str(weights), prepare=_sparse_tensors(sd, str(weights))).eval()


def _sparse_tensors(sd: dict[str, torch.Tensor], origin: str) -> Callable[[GPT], None] | None:
    """For a state dict with sparse-stored tensors, the `prepare` step that decodes them in place (the still-empty
    model gives their shapes); None when there are none."""
    keys = [k[: -len(SPARSE_VALUES)] for k in sd if k.endswith(SPARSE_VALUES)]
    stray = [k for k in sd if k.endswith((SPARSE_MASK, SPARSE_COLS, SPARSE_ROWS)) and
             k[: k.rindex(".sparse_")] not in keys]
    if not keys and not stray:
        return None

    def densify(model: GPT) -> None:
        shapes = {k: t.shape for k, t in model.state_dict().items()}
        if stray:
            raise SlmError(f"{origin}: {stray[0]} has no values; the file is truncated or tampered — prune the parent "
                           f"again")
        for key in keys:
            if key not in shapes:
                raise SlmError(f"{origin}: sparse tensor {key} does not belong to this model; the file is truncated "
                               f"or tampered — prune the parent again")
            sd[key] = decode_sparse(sd, key, shapes[key], f"{origin}: {key}")

    return densify


def decode_sparse(sd: dict[str, torch.Tensor], key: str, shape: torch.Size | tuple[int, ...],
                  name: str = "") -> torch.Tensor:
    """The dense fp32 tensor `key` of `shape` from its sparse parts in `sd` (removed from it): a bitmask, or column
    indices and row counts, with the values; parts that do not fit `shape` are an SlmError."""
    values = sd.pop(key + SPARSE_VALUES)
    n = math.prod(shape)
    if values.dim() != 1 or values.numel() > n:
        raise SlmError(f"{name}: {values.numel()} sparse values do not fit {list(shape)}")
    values = values.float()
    if key + SPARSE_MASK in sd:
        mask = sd.pop(key + SPARSE_MASK)
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (n + 7) // 8:
            raise SlmError(f"{name}: a sparse mask of {mask.numel()} bytes does not describe {list(shape)}")
        keep = ((mask[:, None] & _BITS) != 0).view(-1)
        if keep[n:].any() or int(keep.sum()) != values.numel():
            raise SlmError(f"{name}: the sparse mask marks {int(keep.sum())} elements for {values.numel()} values")
        out = torch.zeros(n, dtype=torch.float32)
        out[keep[:n]] = values
        return out.view(shape)
    cols, counts = sd.pop(key + SPARSE_COLS, None), sd.pop(key + SPARSE_ROWS, None)
    rows, width = n // shape[-1] if shape else 1, shape[-1] if shape else 1
    if cols is None or counts is None or cols.dtype != torch.uint16 or counts.dtype != torch.int32 or \
            cols.shape != values.shape or counts.shape != (rows,) or int(counts.sum()) != values.numel() or \
            bool((counts < 0).any()):
        raise SlmError(f"{name}: the sparse column indices and row counts do not describe {values.numel()} values of "
                       f"{list(shape)}")
    cols = cols.to(torch.int64)
    if cols.numel() and int(cols.max()) >= width:
        raise SlmError(f"{name}: a sparse column index is outside the {width} columns")
    row = torch.repeat_interleave(torch.arange(rows), counts.to(torch.int64))
    out = torch.zeros(n, dtype=torch.float32)
    out[row * width + cols] = values
    return out.view(shape)


def load(path: str | Path) -> Checkpoint:
    """Load a checkpoint (or a run's latest) for inference. Never unpickles: safetensors + JSON only."""
    ckpt = resolve(path)
    model = read_model(ckpt)
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return Checkpoint(ckpt, model, tokenizer, read_json(ckpt / "meta.json"))


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], origin: str,
                          prepare: Callable[[GPT], None] | None = None) -> GPT:
    """A GPT of `cfg` holding exactly the tensors of `sd` (a tied head may be absent), adopted rather than copied: the
    model is built on the meta device, so there is no random init and a 135M model's load peaks at its size, not twice
    it. Derived buffers (RoPE tables, sinusoidal positions) are computed afterwards. `prepare(model)` may swap modules
    of the still-empty model first (a quantized checkpoint installs its packed layers: slmkit.compress.stage)."""
    with torch.device("meta"):
        model = GPT(cfg)
    if prepare is not None:
        prepare(model)
    _fill(model, sd, origin, assign=True)
    model.build_buffers()
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise SlmError(f"{origin} does not fill the model ({', '.join(empty[:3])} missing)")
    return model


def load_weights(model: GPT, file: Path) -> None:
    """Copy the weights of `file` into `model` (same config; resume), strictly."""
    _fill(model, read_weights(file), str(file), assign=False)


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise SlmError(f"cannot read weights {file}: {e} — the file is truncated or corrupt; "
                       f"use an earlier checkpoint of the run") from None


def _fill(model: GPT, sd: dict[str, torch.Tensor], origin: str, *, assign: bool) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=assign)
    tied = model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear)  # a quantized head has its own copy
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise SlmError(f"weights {origin} do not match the model config: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    if assign and tied:  # assign replaced tok_emb.weight: tie the head to the new tensor again
        model.lm_head.weight = model.tok_emb.weight


def load_train_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer_state, trainer_state) for resuming; weights_only=True refuses anything but tensors and containers."""
    try:
        opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SlmError(f"{ckpt} has no optimizer.pt, so training cannot resume from it") from None
    except Exception as e:  # torch raises several types for truncated zip archives
        raise SlmError(f"cannot read {ckpt / 'optimizer.pt'}: {e}; the file is truncated or corrupt") from None
    return opt, read_json(ckpt / "trainer_state.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SlmError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise SlmError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt") from None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
