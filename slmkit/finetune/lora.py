"""LoRA (Hu et al. 2021) as a transform on slmkit's GPT: `add_lora(model, rank=8) -> model`, `merge_lora(model)`.

Each targeted linear y = W x + b becomes y = W x + b + (alpha / r) · B A dropout(x), with A (r, in) drawn like
nn.Linear's weight and B (out, r) zero, so at initialisation the model computes exactly what the base does; only A
and B are trained, the base stays frozen. `merge_lora` folds B A into W and puts plain nn.Linear layers back, so a
merged model is an ordinary GPT (fused decoding, quantization, export all apply).

Our own ~100 lines rather than `peft`: peft imports transformers at import time (seconds and hundreds of MB for
every `slm finetune`, against DESIGN's "the core never imports heavy extras"), wraps the model in its own class
(state-dict keys become `base_model.model.…`, which our checkpoints, importers and exporters would each have to
strip), and knows nothing of slmkit's packed QuantLinear, which LoRA over an int8 base needs. What peft would add
beyond plain LoRA (DoRA, IA3, prompt tuning) is out of scope here.

Targets are module roles, "attn.<name>" or "mlp.<name>" for the linears inside the blocks (attention: qkv and proj,
or qv for LSH; MLP: fc and proj; a shared MLP counts as mlp); "attn" or "mlp" alone take all of that part.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantLinear
from slmkit.model.ffn import LowRankLinear, MoE
from slmkit.runtime import bf16_autocast

DEFAULT_TARGETS = ("attn", "mlp")


class _FrozenLoRA(torch.autograd.Function):
    """y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ over a frozen bf16 W, as one autograd node with its backward written out.

    What autograd would run for LoRALinear's formula, less its extra passes over the (…, out) and (…, in) tensors: the
    low-rank product accumulates into the base output inside its GEMM (addmm_) instead of a separate add, and the two
    input gradients (through W and through A) into one buffer the same way; no gradient is formed for the frozen W,
    and none for x when nothing below needs it. x and W are bf16; A and B are the fp32 masters, rounded once here
    (their gradients come back in fp32).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float) -> Tensor:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        x2 = x.reshape(-1, x.size(-1))
        h = (x2 @ a16.t()) * scaling  # (N, r)
        y = F.linear(x2, w, bias).addmm_(h, b16.t())
        ctx.save_for_backward(x2, h, w, a16, b16)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, w, a16, b16 = ctx.saved_tensors
        gy = gy.reshape(-1, gy.size(-1)).to(torch.bfloat16)
        need_x, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        gh = (gy @ b16) * ctx.scaling  # (N, r): the gradient of x Aᵀ
        ga = (gh.t() @ x2).float() if need_a else None  # (r, in)
        # (out, r), formed as (r, out): the faster GEMM layout here
        gb = (h.t() @ gy).float().t().contiguous() if need_b else None
        gx = (gy @ w).addmm_(gh, a16).view(ctx.x_shape) if need_x else None
        return gx, None, None, ga, gb, None


class LoRALinear(nn.Module):
    """A frozen `base` linear (nn.Linear or an int8 QuantLinear) plus a trainable rank-r update.

    x (..., in) → base(x) + scaling · (dropout(x) @ Aᵀ) @ Bᵀ, scaling = alpha / r.
    """

    def __init__(self, base: nn.Linear | QuantLinear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        ref = base.weight if isinstance(base, nn.Linear) else base.scale
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=ref.device))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=ref.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's init (the paper's "random Gaussian")
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self._rounded: tuple[tuple[int, int], Tensor] | None = None  # the base weight in bf16, for autocast (_base)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if isinstance(base, nn.Linear) and not base.weight.requires_grad and bf16_autocast(x):
            # Under bf16 autocast every matmul here would round its fp32 operands to bf16 again: x once per matmul,
            # and the frozen weight on every call (autocast caches only the casts of weights that require grad),
            # a visible share of a LoRA step (docs/benchmarks.md, fine-tuning). Round x once, and the weight once
            # into a kept copy: the same bits autocast would use. The fp32 weight stays the master (merges and saves
            # read it).
            x = x.to(torch.bfloat16)
            w = base.weight
            key = (w.data_ptr(), w._version)
            if self._rounded is None or self._rounded[0] != key:
                self._rounded = (key, w.detach().to(torch.bfloat16))
            bias = None if base.bias is None else base.bias.to(torch.bfloat16)
            if isinstance(self.dropout, nn.Identity):
                return _FrozenLoRA.apply(x, self._rounded[1], bias, self.lora_a, self.lora_b, self.scaling)
            y = F.linear(x, self._rounded[1], bias)
        else:
            y = base(x)
        # two thin matmuls (x·Aᵀ is (…, r)): never the (out, in) product B·A, which would cost a full weight per step;
        # the scaling goes on the (…, r) middle, not on the (…, out) result
        return y + F.linear(F.linear(self.dropout(x), self.lora_a) * self.scaling, self.lora_b)

    def delta(self) -> Tensor:
        """The update to the base weight, scaling · B A (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def merged(self) -> nn.Linear:
        """An nn.Linear computing what this layer computes (up to float rounding), the base weight plus the update.
        An int8 base is widened first: the merge goes into fp32 weights, never back into rounded ones."""
        base = self.base
        w = base.weight.detach() if isinstance(base, nn.Linear) else base.dequantized()
        bias = base.bias
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w.float() + self.delta().float())
            if bias is not None:
                lin.bias.copy_(bias.detach())
        return lin

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _role(name: str) -> str:
    """"blocks.3.attn.qkv" → "attn.qkv"; "shared_mlp.fc" → "mlp.fc"."""
    parent, _, child = name.rpartition(".")
    part = parent.rpartition(".")[2]
    return f"{'mlp' if part == 'shared_mlp' else part}.{child}"


def _matches(role: str, targets: Sequence[str]) -> bool:
    return any(role == t or role.startswith(t + ".") for t in targets)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every projection inside the blocks (attention and MLP), whatever its kind."""
    for name, mod in model.named_modules():
        # an MoE router (C × E) is left alone: it picks the experts, and its width is the number of experts
        if name.startswith(("blocks.", "shared_mlp.")) and _role(name).split(".")[0] in ("attn", "mlp") \
                and isinstance(mod, nn.Linear | QuantLinear | LowRankLinear) and not name.endswith(".router"):
            yield name, mod


def add_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_TARGETS, layers: int | None = None) -> nn.Module:
    """Wrap the targeted linears of `model` (a GPT) in `LoRALinear`, freeze every other parameter, and return the
    model. Only the LoRA factors require grad afterwards. `layers`: adapt only the top `layers` blocks (None: all);
    the backward pass then stops below them, so a step costs less (docs/benchmarks.md, fine-tuning).

    >>> add_lora(model, rank=8, alpha=16, targets=["attn.qkv", "mlp"], layers=15)  # doctest: +SKIP
    """
    if rank < 1:
        raise SlmError(f"LoRA rank {rank} must be >= 1")
    if not 0 <= dropout < 1:
        raise SlmError(f"LoRA dropout {dropout} must be in [0, 1)")
    targets = list(targets)
    if not targets:
        raise SlmError("give at least one LoRA target module (e.g. attn, mlp, attn.qkv, mlp.fc)")
    found = list(_candidates(model))
    if layers is not None:
        blocks = getattr(model, "blocks", None)
        n = 0 if blocks is None else len(blocks)
        if blocks is None or n != model.config.n_layer or any(name.startswith("shared_mlp.") for name, _ in found):
            raise SlmError("LoRA on the top layers only needs a model whose blocks are its own (this one shares "
                           "layers across depth); leave out --lora-layers")
        if not 1 <= layers <= n:
            raise SlmError(f"--lora-layers {layers}: this model has {n} blocks; give 1 to {n}")
        found = [(name, m) for name, m in found if int(name.split(".")[1]) >= n - layers]
    roles = sorted({_role(n) for n, _ in found})
    chosen = [(n, m) for n, m in found if _matches(_role(n), targets)]
    for t in targets:
        if not any(_matches(_role(n), [t]) for n, _ in chosen):
            moe = " (a Mixture-of-Experts layer's experts are stacked weights, not linears)" \
                if any(isinstance(m, MoE) for m in model.modules()) else ""
            raise SlmError(f"LoRA target {t!r} matches no linear layer of this model; its block linears are "
                           f"{', '.join(roles) or 'none'}{moe}")
    for name, mod in chosen:
        if isinstance(mod, LowRankLinear):
            raise SlmError(f"{name} is a low-rank factorised layer, not a dense one; LoRA wraps dense linears — "
                           f"fine-tune this model with --method full, or target other modules")
        if rank > min(mod.in_features, mod.out_features):
            raise SlmError(f"LoRA rank {rank} is larger than the layer {name} ({mod.in_features} → "
                           f"{mod.out_features}); use a rank of at most {min(mod.in_features, mod.out_features)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(mod, rank, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put plain nn.Linear layers back; returns the model."""
    for name, mod in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, mod.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter: each LoRA layer's A and B by name ("blocks.0.attn.qkv.lora_a"), what an adapter file holds."""
    return {f"{n}.{k}": getattr(m, k).detach().contiguous() for n, m in lora_layers(model).items()
            for k in ("lora_a", "lora_b")}


def load_lora_state(model: nn.Module, state: dict[str, Tensor], origin: str) -> None:
    """Copy an adapter (`lora_state`) into a model that `add_lora` wrapped the same way; a mismatch is one line."""
    want = {k: v.shape for k, v in lora_state(model).items()}
    got = {k: v.shape for k, v in state.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise SlmError(f"adapter {origin} does not fit the model (e.g. {diff[0]}); the base or the LoRA settings "
                       f"differ from the ones it was trained with")
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in state.items():
            name, _, k = key.rpartition(".")
            getattr(layers[name], k).copy_(value)
