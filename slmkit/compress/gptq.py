"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
calibrated 4-bit weights in the same int4 storage format as round-to-nearest (slmkit.infer.quantized: Q4_0 blocks,
one fp16 scale per group), so the same kernels and checkpoints serve both.

Each linear's weights are rounded one input column at a time; the rounding error of a column is spread over the
columns not yet rounded so that the layer's output on the calibration inputs X moves as little as possible — the
optimal update under the loss ‖XWᵀ − XŴᵀ‖², whose Hessian is H = 2·XᵀX/n. Layers are quantized sequentially in forward
order, each seeing inputs computed by the already-quantized layers before it (the paper's "true sequential" variant).

>>> gptq(model, calib_ids, group=32)   # calib_ids: (B, T) token ids, e.g. 128 windows of 256 tokens
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from slmkit.compress.rtn import round_to_nearest
from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantLinear, int4_round, int4_scales, pack_int4, quantize_int4
from slmkit.model import GPT
from slmkit.model.ffn import MoE

CHUNK = 8  # calibration sequences per forward: bounds the activations held at once, not the result


@torch.no_grad()
def gptq(model: GPT, calib: Tensor, *, group: int = 32, damp: float = 0.01, block: int = 128,
         act_order: bool = False, progress: Callable[[int, int], None] | None = None) -> GPT:
    """Quantize every nn.Linear of `model` in place to int4 by GPTQ on the calibration token ids `calib` (B, T);
    returns the model.

    Replaced like `quantize(model, "int4")`: every nn.Linear becomes a QuantLinear (the head too, with its own copy when
    tied to the embedding, which stays fp32); MoE routers stay fp32. MoE expert stacks are rounded to nearest (each
    expert sees only its routed tokens and the stacks have no per-expert hook point; RTN keeps them simple and exact
    to the format). A module shared between layers (share_blocks, share_mlp) is quantized with the inputs of its
    first use. `damp`: fraction of the mean Hessian diagonal added to it; `block`: columns per lazy batch update (a
    multiple of `group`); `act_order`: round columns in decreasing order of their Hessian diagonal, with each group's
    scale fixed beforehand from the unchanged weights (groups must stay contiguous in storage). `progress(done, total)`
    is told after each layer and the head.

    >>> gptq(LLM.load("runs/shk").model, calib_ids, group=32)  # doctest: +SKIP
    """
    check_calibrated(model, calib, group)
    if not damp > 0:
        raise SlmError(f"GPTQ damp={damp} must be > 0 (a fraction of the mean Hessian diagonal, e.g. 0.01)")
    if block < 1 or block % group:
        raise SlmError(f"GPTQ block={block} must be a positive multiple of group={group}")
    opts = dict(group=group, damp=damp, block=block, act_order=act_order)
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    for done, (_layer, run, xs) in enumerate(layer_inputs(model, calib), 1):
        for mod in called(model, run, xs[0]):
            if isinstance(mod, nn.Linear) and id(mod) not in routers:
                q, scale, _ = gptq_weight(mod.weight, input_stats(mod, run, xs)[0], **opts)
                replace(model, mod, QuantLinear(pack_int4(q), scale, mod.bias))
            elif isinstance(mod, MoE) and isinstance(mod.fc, nn.Parameter):
                round_to_nearest(mod, "int4", group)  # the expert stacks; the router is left fp32
        if progress is not None:
            progress(done, model.config.n_layer + 1)
    return model


def layer_inputs(model: GPT, calib: Tensor) -> Iterator[tuple[nn.Module, Callable[[Tensor], Tensor], list[Tensor]]]:
    """Walk `model` in forward order for a calibrated transform: for each layer, (block, run, xs) with run(x) applying
    that layer and xs the calibration hidden states entering it, (b, T, C) per CHUNK of rows of `calib`; last, the
    head: (norm_f, x ↦ lm_head(norm_f(x)), xs). The next layer's inputs are computed after the caller has rewritten
    this one, so each layer sees what the already-transformed layers before it produce. Run it under torch.no_grad().
    Leaves the model in eval mode, and clears the routing records the calibration passes leave in MoE models."""
    model.eval().requires_grad_(False)
    xs: list[Tensor] = []

    def grab(_mod: nn.Module, args: tuple) -> None:
        xs.append(args[0])
        raise _Stop

    # the model's own embedding code (positions, dropout off) runs, and stops at the first block
    handle = model.blocks[0].register_forward_pre_hook(grab)
    try:
        for ids in calib.long().split(CHUNK):
            _until_stop(model, ids)
    finally:
        handle.remove()
    for i in range(model.config.n_layer):
        layer = model.blocks[i % len(model.blocks)]

        def run(x: Tensor, layer: nn.Module = layer, i: int = i) -> Tensor:
            return layer(x, None, i)

        yield layer, run, xs
        xs = [run(x) for x in xs]
    yield model.norm_f, lambda x: model.lm_head(model.norm_f(x)), xs
    if model._moe_calls is not None:
        model._moe_calls.clear()


def input_stats(lin: nn.Module, run: Callable[[Tensor], object], xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Statistics of the inputs X (n, K) that `lin` receives while `run(x)` runs for x in xs: the Hessian
    H = 2·XᵀX/n (K, K) in fp64, and the mean |x| of each input channel (K,).

    fp64: the sum runs over all calibration tokens and feeds a Cholesky factorization; in fp32 the small eigenvalues
    the damping is meant to protect drown in rounding. Each forward stops once `lin` has its input."""
    K = lin.in_features
    H, absum, n = torch.zeros(K, K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), 0

    def hook(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        nonlocal n
        x = args[0].reshape(-1, K).double()
        H.addmm_(x.T, x)
        absum.add_(x.abs().sum(0))
        n += x.shape[0]
        raise _Stop

    handle = lin.register_forward_pre_hook(hook)
    try:
        for x in xs:
            _until_stop(run, x)
    finally:
        handle.remove()
    return H * (2.0 / max(n, 1)), absum / max(n, 1)


def gptq_weight(w: Tensor, H: Tensor, *, group: int = 32, damp: float = 0.01, block: int = 128,
                act_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one weight matrix w (N, K) under input Hessian H (K, K) → (q (N, K) int8 in [-8, 7], scales
    (N, K/group) fp16, the fp32 weights q·scale the error feedback used). pack_int4(q) and the scales are the int4
    storage format; dequantizing them gives exactly the third result.

    Follows the reference fasterquant (IST-DASLab/gptq): dead inputs (diag H = 0) get weight 0; H + damp·mean(diag H)·I
    is inverted through Cholesky and the upper Cholesky factor of H⁻¹ drives the updates; columns go in blocks of
    `block`, with the error of each column applied to the rest of its block at once and to later blocks in one matmul
    per block. Two choices differ: a group's scale (`int4_scales`, the format's rule) is taken from the weights as
    updated by every earlier column, the block's own included (the reference reads the copy that lacks updates from
    inside the current block); and act_order uses static groups (the reference's `static_groups`), as the format has
    no per-column group index."""
    N, K = w.shape
    W = w.detach().float().clone()
    H = H.detach().double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = torch.empty(N, K // group, dtype=torch.float16)
    perm = torch.arange(K)
    if act_order:
        scale = int4_scales(W, group)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise SlmError(f"GPTQ: a layer's input Hessian is not positive definite with damp={damp}; raise damp, e.g. 0.1")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # (K, K) upper

    q = torch.empty(N, K, dtype=torch.int8)
    Q = torch.empty(N, K)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (N, b), (b, b)
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % group == 0:  # a group starts: its grid from the weights as they are now
                scale[:, col // group] = int4_scales(W1[:, i : i + group], group)[:, 0]
            s = scale[:, perm[col] // group, None]  # (N, 1) fp16
            qc = int4_round(W1[:, i : i + 1], s, 1)  # (N, 1): the format's rounding rule, one column
            Qc = qc.float() * s.float()
            err = (W1[:, i : i + 1] - Qc) / Hinv1[i, i]  # (N, 1)
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
            q[:, col : col + 1], Q[:, col : col + 1] = qc, Qc
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm)
        q, Q = q[:, inv], Q[:, inv]
    return q, scale, Q


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def check_calibrated(model: nn.Module, calib: Tensor, group: int) -> None:
    """What a calibrated int4 transform needs from its inputs, checked before any work."""
    if not isinstance(model, GPT):
        raise SlmError(f"calibrated quantization needs a slmkit GPT transformer, not {type(model).__name__}")
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype.is_floating_point or calib.numel() == 0:
        raise SlmError("calibration data must be a (batch, tokens) tensor of token ids")
    V, ctx = model.config.vocab_size, model.config.block_size
    if calib.shape[1] > ctx:
        raise SlmError(f"calibration windows of {calib.shape[1]} tokens exceed the model's context of {ctx}")
    if calib.min() < 0 or calib.max() >= V:
        raise SlmError(f"calibration token ids must be in [0, {V}) for this model's vocabulary")
    widths = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    widths |= {m.fc.shape[1] for m in model.modules() if isinstance(m, MoE)}
    widths |= {m.proj.shape[1] for m in model.modules() if isinstance(m, MoE)}
    for K in sorted(widths):
        quantize_int4(torch.zeros(1, K), group)  # the format's own message for a group it does not take, before work


def _until_stop(fn: Callable, *args) -> None:
    with contextlib.suppress(_Stop):
        fn(*args)


def called(model: nn.Module, run: Callable[[Tensor], object], x: Tensor) -> list[nn.Module]:
    """The modules of `model` that `run(x)` calls, in the order of their first call."""
    order: dict[int, nn.Module] = {}

    def seen(mod: nn.Module, _args: tuple) -> None:  # returns None: a pre-hook's return value would replace the input
        order.setdefault(id(mod), mod)

    handles = [m.register_forward_pre_hook(seen) for m in model.modules()]
    try:
        run(x)
    finally:
        for h in handles:
            h.remove()
    return list(order.values())


def replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is a child (a shared module can have several parents)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)
