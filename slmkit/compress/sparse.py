"""Sparse storage for pruned checkpoints: what unstructured pruning buys on disk, in safetensors (never pickle).

A matrix stored sparse replaces its `NAME` tensor in model.safetensors with two:

    NAME.sparse_mask    uint8 (ceil(numel / 8),)  one bit per element of NAME in row-major order, bit i of byte j is
                                                  element 8·j + i (little-endian bits); 1 = stored
    NAME.sparse_values  same dtype as NAME (nnz,)  the stored elements, row-major

The shape is the model's (config.json): the loader checks the mask's length and that it marks exactly as many elements
as there are values, so a truncated or tampered file is refused rather than mis-read. At a density d a matrix costs
d·32 + 1 bits per weight instead of 32; a matrix is written sparse only where that is smaller
(density d below 31/32). A bitmask beats int16 column indices (d·48 bits) at every density a pruned
model has, and decodes with one vectorised scatter.

Loading restores the dense model: `read_model` gives an ordinary fp32 GPT whose pruned weights are zeros, for every
consumer (generate, eval, quantize, heal). Zeros do not make dense CPU kernels faster; a sparse decode kernel would
read this layout directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from slmkit import checkpoint
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer

MASK, VALUES = ".sparse_mask", ".sparse_values"
FORMAT = "slmkit-sparse/1 (bitmask + values)"
_BITS = 2 ** torch.arange(8, dtype=torch.uint8)  # bit i of a mask byte: element 8·j + i


def encode(t: Tensor) -> tuple[Tensor, Tensor]:
    """(mask, values) of `t`: the bitmask of its non-zero elements and those elements, both row-major."""
    flat = t.detach().reshape(-1)
    keep = flat != 0
    bits = torch.cat([keep, keep.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    return (bits * _BITS).sum(1, dtype=torch.uint8), flat[keep].contiguous()


def decode(mask: Tensor, values: Tensor, shape: torch.Size | tuple[int, ...], name: str = "") -> Tensor:
    """The dense tensor of `shape` that `encode` stored as (mask, values); a mask that does not fit is an SlmError."""
    n = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (n + 7) // 8 or values.dim() != 1:
        raise SlmError(f"{name}: a sparse mask of {mask.numel()} bytes does not describe {list(shape)}")
    keep = ((mask[:, None] & _BITS) != 0).view(-1)
    if keep[n:].any() or int(keep.sum()) != values.numel():
        raise SlmError(f"{name}: the sparse mask marks {int(keep.sum())} elements for {values.numel()} values")
    out = torch.zeros(n, dtype=values.dtype)
    out[keep[:n]] = values
    return out.view(shape)


def sparse_bytes(t: Tensor) -> int:
    """Bytes of `t` in the sparse layout: one bit per element plus its non-zero elements."""
    return (t.numel() + 7) // 8 + int((t != 0).sum()) * t.element_size()


def _sparse_keys(sd: dict[str, Tensor], names: set[str]) -> list[str]:
    """The tensors of `names` that the sparse layout stores in fewer bytes than the dense one."""
    return [k for k in names if sparse_bytes(sd[k]) < sd[k].numel() * sd[k].element_size()]


def storage(model: GPT, names: set[str]) -> dict[str, object]:
    """What `write_model(…, names)` stores sparse: the layout, how many tensors, and their bytes sparse vs dense."""
    sd = checkpoint._state_dict(model)
    keys = _sparse_keys(sd, names)
    return {"format": FORMAT if keys else "dense", "sparse_tensors": len(keys),
            "sparse_bytes": sum(sparse_bytes(sd[k]) for k in keys),
            "dense_bytes": sum(sd[k].numel() * sd[k].element_size() for k in keys)}


def write_model(directory: str | Path, model: GPT, names: set[str]) -> None:
    """model.safetensors + config.json like `checkpoint.write_model`, with the tensors `names` (state-dict keys)
    stored sparse where that is smaller."""
    directory = Path(directory)
    sd = checkpoint._state_dict(model)
    for key in _sparse_keys(sd, names):
        t = sd.pop(key)
        sd[key + MASK], sd[key + VALUES] = encode(t)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt", "sparse": FORMAT})
    model.config.save(directory / "config.json")


def read_model(directory: str | Path) -> GPT:
    """The fp32 model of a checkpoint directory, its sparse tensors (if any) decoded to dense ones; a checkpoint with
    none loads exactly as `checkpoint.read_model` does."""
    directory = Path(directory)
    cfg = ModelConfig.load(directory / "config.json")
    file = directory / "model.safetensors"
    sd = checkpoint.read_weights(file)
    if not any(k.endswith(MASK) for k in sd):
        return checkpoint.model_from_state_dict(cfg, sd, str(file)).eval()

    def densify(model: GPT) -> None:  # the still-empty (meta) model gives the shapes
        shapes = {k: t.shape for k, t in model.state_dict().items()}
        for key in [k[: -len(MASK)] for k in sd if k.endswith(MASK)]:
            if key not in shapes or key + VALUES not in sd:
                raise SlmError(f"{file}: sparse tensor {key} does not belong to this model; the file is truncated or "
                               f"tampered — prune the parent again")
            sd[key] = decode(sd.pop(key + MASK), sd.pop(key + VALUES), shapes[key], f"{file}: {key}")

    return checkpoint.model_from_state_dict(cfg, sd, str(file), prepare=densify).eval()


def load(path: str | Path) -> checkpoint.Checkpoint:
    """`checkpoint.load` for any checkpoint (or a run's latest) — a pruned one's sparse tensors decoded."""
    ckpt = checkpoint.resolve(path)
    return checkpoint.Checkpoint(ckpt, read_model(ckpt), Tokenizer.load(ckpt / "tokenizer.json"),
                                 checkpoint.read_json(ckpt / "meta.json"))
