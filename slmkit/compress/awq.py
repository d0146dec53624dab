"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"): scale
each input channel of a linear by s = mean|x|^α before round-to-nearest int4, so channels that carry large
activations are rounded on a finer relative grid, and divide the op that produces the input by s so the model
computes the same function. α is searched per linear on a grid to minimise the layer's output error on calibration
inputs. The weights end in the same int4 format as RTN and GPTQ (slmkit.infer.quantized).

A scale is used only where dividing the producing op by it is exact, so the model keeps its structure (no extra
multiply per layer):
    attention qkv (or LSH qv)  ← the norm before it (norm1)
    attention proj             ← the value rows of qkv, when every query head has its own value head (n_kv_head =
                                 n_head; with GQA a value channel feeds several heads' channels)
    MLP fc                     ← norm2
    MLP proj, SwiGLU           ← the "up" half of fc (silu(gate)·up is linear in up)
    lm_head                    ← norm_f (a head tied to the embedding gets its own copy first)
Rounded to nearest without a scale: MLP proj after GELU (not homogeneous), MoE experts and routers, low-rank factors,
a module shared between layers by share_mlp (one fc behind several norms), and any layer whose producer is not one of
the above. AWQ's weight-clipping search is not done: the format fixes each group's scale to its largest weight.

>>> awq(model, calib_ids, group=32)   # calib_ids: (B, T) token ids
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from slmkit.compress.gptq import check_calibrated, input_stats, layer_inputs
from slmkit.compress.rtn import round_to_nearest
from slmkit.errors import SlmError
from slmkit.infer.quantized import dequantize, quantize_int4
from slmkit.model import GPT
from slmkit.model.ffn import MLP

Fold = tuple[nn.Linear, Callable[[Tensor], None]]  # a linear, and how to divide its input's producer by s


@torch.no_grad()
def awq(model: GPT, calib: Tensor, *, group: int = 32, grid: int = 20) -> GPT:
    """Quantize `model` in place to int4 by AWQ on the calibration token ids `calib` (B, T); returns the model.

    Each scaled linear's α is chosen from 0, 1/grid, .., (grid-1)/grid (α = 0 is plain RTN, so on the calibration
    inputs no linear gets worse) with its inputs as the model computes them; then every weight is rounded to nearest
    (`quantize(model, "int4")`), so what is replaced and what stays fp32 is as there. The module docstring lists which
    layers are scaled.

    >>> awq(LLM.load("runs/shk").model, calib_ids, group=32)  # doctest: +SKIP
    """
    check_calibrated(model, calib, group)
    if grid < 1:
        raise SlmError(f"AWQ grid={grid} must be >= 1 (the number of exponents α tried)")
    seen: set[int] = set()
    for layer, run, xs in layer_inputs(model, calib):
        if id(layer) in seen:  # a block shared between layers (share_blocks): scaled at its first use
            continue
        seen.add(id(layer))
        for lin, divide in _folds(model, layer):
            H, mean_abs = input_stats(lin, run, xs)
            s = awq_scale(lin.weight, H, mean_abs, group=group, grid=grid)
            lin.weight.mul_(s)
            divide(s)
    return round_to_nearest(model, "int4", group)


def awq_scale(w: Tensor, H: Tensor, mean_abs: Tensor, *, group: int = 32, grid: int = 20) -> Tensor:
    """The per-input-channel scale s (K,) for weights w (N, K) that minimises the output error of rounding w·s to the
    int4 grid and dividing by s again, ‖X(W − Ŵ)ᵀ‖² = n/2·tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = 2·XᵀX/n (`input_stats`), over
    s = mean|x|^α / √(max·min) for α on the grid (the reference's search; the normalisation centres s around 1).

    The error is measured through H rather than X: K×K is smaller than the calibration tokens × K."""
    W = w.detach().float()
    Hf = H.float()
    best, best_err = torch.ones_like(mean_abs, dtype=torch.float32), float("inf")
    for r in range(grid):
        s = mean_abs.float().pow(r / grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        D = W - dequantize(*quantize_int4(W * s, group)) / s  # (N, K)
        err = float(((D @ Hf) * D).sum())
        if err < best_err:
            best, best_err = s, err
    return best


def _folds(model: GPT, layer: nn.Module) -> list[Fold]:
    """The linears of `layer` (a Block, or norm_f for the head) with an exact place to put 1/s, in forward order."""
    if layer is model.norm_f:
        head = model.lm_head
        if head.weight is model.tok_emb.weight:  # tied: scaling the head's columns must not touch the embedding
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        return [(head, _into_norm(model.norm_f))]
    folds: list[Fold] = []
    attn, mlp = layer.attn, layer.mlp
    inp = attn.qkv if hasattr(attn, "qkv") else getattr(attn, "qv", None)
    if type(inp) is nn.Linear and layer.norm1.weight is not None:
        folds.append((inp, _into_norm(layer.norm1)))
        proj = getattr(attn, "proj", None)
        if type(proj) is nn.Linear and getattr(attn, "nkv", attn.nh) == attn.nh:
            folds.append((proj, _into_rows(inp, -proj.in_features, None)))  # v: the last C rows of qkv / qv
    if isinstance(mlp, MLP) and mlp is not model.shared_mlp and type(mlp.fc) is nn.Linear:
        if layer.norm2.weight is not None:
            folds.append((mlp.fc, _into_norm(layer.norm2)))
        if mlp.swiglu and type(mlp.proj) is nn.Linear:
            folds.append((mlp.proj, _into_rows(mlp.fc, mlp.proj.in_features, None)))  # up: the second half of fc
    return folds


def _into_norm(norm: nn.Module) -> Callable[[Tensor], None]:
    def divide(s: Tensor) -> None:
        norm.weight.div_(s)
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s)

    return divide


def _into_rows(lin: nn.Linear, start: int, stop: int | None) -> Callable[[Tensor], None]:
    """Divide output rows start:stop of `lin` (and their bias) by s: the producer of the next linear's input."""

    def divide(s: Tensor) -> None:
        lin.weight[start:stop].div_(s[:, None])
        if lin.bias is not None:
            lin.bias[start:stop].div_(s)

    return divide
