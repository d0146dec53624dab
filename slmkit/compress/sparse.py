"""Sparse storage for pruned checkpoints: what unstructured pruning buys on disk, in safetensors (never pickle).

A matrix stored sparse replaces its `NAME` tensor in model.safetensors with its non-zero elements and where they are,
in one of two layouts, whichever is smaller for that matrix:

    bitmask     NAME.sparse_mask    uint8 (ceil(numel / 8),)  one bit per element of NAME in row-major order, bit i of
                                                              byte j is element 8·j + i (little-endian bits); 1 = stored
    indices     NAME.sparse_cols    uint16 (nnz,)             the column (last dim) of each stored element
                NAME.sparse_rows    int32 (rows,)             how many elements each row (all dims but the last) stores
    both        NAME.sparse_values  fp32 or bf16 (nnz,)       the stored elements, row-major

The shape is the model's (config.json): the loader (slmkit.checkpoint.decode_sparse) checks that the parts describe
exactly that many values, so a truncated or tampered file is refused rather than mis-read. At a density d and v bits
per value a matrix costs d·v + 1 bits per weight as a bitmask, d·(v + 16) + (a row count per row) as indices: the
bitmask is smaller down to d = 1/16 (93.75 % sparsity), the indices beyond. A matrix is written sparse only where
that beats the dense bytes.

Values are fp32, or bf16 (`values="bf16"`, half the bytes, the weights rounded to 8 bits of mantissa: the pruning
stage measures what that costs against the parent). A matrix whose values are all bf16 numbers already is stored bf16
either way: nothing is lost.

Loading restores the dense model: `slmkit.checkpoint.read_model` (so `checkpoint.load`, `LLM.load` and every stage)
gives an ordinary fp32 GPT whose pruned weights are zeros. The fused C decode step then reads a matrix with few enough
non-zeros as CSR (slmkit.infer.fused), not as its dense zeros.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from slmkit import checkpoint
from slmkit.checkpoint import SPARSE_COLS as COLS
from slmkit.checkpoint import SPARSE_MASK as MASK
from slmkit.checkpoint import SPARSE_ROWS as ROWS
from slmkit.checkpoint import SPARSE_VALUES as VALUES
from slmkit.errors import SlmError
from slmkit.model import GPT

FORMAT = "slmkit-sparse/2 (bitmask or column indices + values)"
VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def encode(t: Tensor) -> tuple[Tensor, Tensor]:
    """(mask, values) of `t`: the bitmask of its non-zero elements and those elements, both row-major."""
    flat = t.detach().reshape(-1)
    keep = flat != 0
    bits = torch.cat([keep, keep.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    return (bits * _BITS).sum(1, dtype=torch.uint8), flat[keep].contiguous()


def encode_indices(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cols, row counts, values) of `t` (last dim ≤ 65536): each non-zero element's column and the elements, row-major,
    and how many each row holds."""
    rows = t.detach().reshape(-1, t.shape[-1])
    keep = rows != 0
    cols = keep.nonzero()[:, 1].to(torch.uint16)
    return cols, keep.sum(1, dtype=torch.int32), rows[keep].contiguous()


def decode(mask: Tensor, values: Tensor, shape: torch.Size | tuple[int, ...], name: str = "") -> Tensor:
    """The dense fp32 tensor of `shape` that `encode` stored as (mask, values); a mask that does not fit is an
    SlmError."""
    return checkpoint.decode_sparse({"t" + MASK: mask, "t" + VALUES: values}, "t", shape, name)


def _value_dtype(t: Tensor, values: str) -> torch.dtype:
    if values not in VALUE_DTYPES:
        raise SlmError(f"sparse values={values!r} is not one of {', '.join(VALUE_DTYPES)}")
    exact = t.dtype == torch.float32 and bool((t.contiguous().view(torch.int32) & 0xFFFF).eq(0).all())
    return torch.bfloat16 if exact else VALUE_DTYPES[values]


def layout(t: Tensor, values: str = "fp32") -> tuple[str, int]:
    """How `t` is stored — "bitmask", "indices" or "dense" — and its bytes that way."""
    n, nnz, width = t.numel(), int((t != 0).sum()), t.shape[-1] if t.dim() else 1
    v = torch.tensor([], dtype=_value_dtype(t, values)).element_size()
    options = {"dense": n * t.element_size(), "bitmask": (n + 7) // 8 + nnz * v}
    if t.dim() and width <= 65536:
        options["indices"] = 2 * nnz + 4 * (n // width) + nnz * v
    best = min(options, key=options.__getitem__)
    return best, options[best]


def sparse_bytes(t: Tensor) -> int:
    """Bytes of `t` stored sparse with fp32 values, in the smaller layout."""
    return layout(t)[1]


def storage(model: GPT, names: set[str], values: str = "fp32") -> dict[str, object]:
    """What `write_model(…, names, values)` stores sparse: the layout, how many tensors (in each layout), their bytes
    sparse vs dense and the values' dtype."""
    sd = checkpoint._state_dict(model)
    how = {k: layout(sd[k], values) for k in names}
    sparse = {k: v for k, v in how.items() if v[0] != "dense"}
    return {"format": FORMAT if sparse else "dense", "sparse_tensors": len(sparse),
            "bitmask_tensors": sum(v[0] == "bitmask" for v in sparse.values()),
            "index_tensors": sum(v[0] == "indices" for v in sparse.values()), "values": values,
            "sparse_bytes": sum(v[1] for v in sparse.values()),
            "dense_bytes": sum(sd[k].numel() * sd[k].element_size() for k in sparse)}


def write_model(directory: str | Path, model: GPT, names: set[str], values: str = "fp32") -> None:
    """model.safetensors + config.json like `checkpoint.write_model`, with the tensors `names` (state-dict keys)
    stored sparse where that is smaller, their values as `values` ("fp32" or "bf16")."""
    directory = Path(directory)
    sd = checkpoint._state_dict(model)
    for key in names:
        how, _ = layout(sd[key], values)
        if how == "dense":
            continue
        t = sd.pop(key)
        dtype = _value_dtype(t, values)
        if how == "bitmask":
            sd[key + MASK], vals = encode(t)
        else:
            sd[key + COLS], sd[key + ROWS], vals = encode_indices(t)
        sd[key + VALUES] = vals.to(dtype).contiguous()
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt", "sparse": FORMAT})
    model.config.save(directory / "config.json")


def round_values(model: GPT, names: set[str], values: str) -> None:
    """Round the tensors `names` of `model` in place to what `write_model(…, values)` stores (bf16: to bf16)."""
    if VALUE_DTYPES.get(values, torch.float32) == torch.float32:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in names:
            params[key].copy_(params[key].to(VALUE_DTYPES[values]).float())


def read_model(directory: str | Path) -> GPT:
    """`checkpoint.read_model`, which decodes sparse tensors itself (kept for callers of this module)."""
    return checkpoint.read_model(directory)


def load(path: str | Path) -> checkpoint.Checkpoint:
    """`checkpoint.load`, which decodes sparse tensors itself (kept for callers of this module)."""
    return checkpoint.load(path)
