"""The models fine-tuning trains and what reads them back: the classifier (a GPT body + a linear head), a frozen int8
base for LoRA, gradient checkpointing, and loading a finetune run (full weights, or base + adapter).

Pooling: the classifier's head reads the mean of the final hidden states over the text's tokens, not the last
token's state. With the body frozen (the cheapest setting on a CPU) the last position of a causal LM holds what it
needs to predict the next token, which says little about a whole article; the mean carries every position's view of
the text and trains a linear head well from the start. Rows are padded on the right and attention is causal, so the
pads never reach a real position and the mean over the text's own tokens is exact.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from slmkit import checkpoint, run
from slmkit.compress.quantize import quantize
from slmkit.errors import SlmError
from slmkit.finetune.data import pad_rows
from slmkit.finetune.lora import add_lora, load_lora_state, merge_lora
from slmkit.infer.neural import _headless
from slmkit.infer.quantized import QuantLinear
from slmkit.model import GPT
from slmkit.runtime import bf16_autocast, set_threads
from slmkit.tokenizer import Tokenizer

# --- training-time transforms --------------------------------------------------------------------------------------


class _FrozenPackedMatmul(torch.autograd.Function):
    """y = layer(x) for a frozen packed (int8) layer, differentiable in x only. The C kernel has no backward, and
    keeping a widened weight from forward would hold a wide copy of every layer until backward (an fp32 or bf16 model's
    worth of memory): each pass widens the weight for its one matmul and drops it. Under bf16 autocast both matmuls
    run in bf16 on the weight rounded as autocast would round the widened one (the fp32 C path is several times slower
    there, and its fp32 outputs would double the activations LoRA keeps)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.bf16 = bf16_autocast(x)
        # a bf16 input takes QuantLinear's widening path (dequantize, round to the input's dtype, F.linear)
        return QuantLinear.forward(layer, x.to(torch.bfloat16) if ctx.bf16 else x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        dtype = torch.bfloat16 if ctx.bf16 else grad.dtype
        dx = grad.to(dtype) @ ctx.layer.dequantized().to(dtype)  # (…, out) @ (out, in)
        return dx.to(ctx.x_dtype), None


def _packed_forward(self: QuantLinear, x: Tensor) -> Tensor:
    return _FrozenPackedMatmul.apply(x, self)


def freeze_int8(model: GPT) -> GPT:
    """Quantize `model`'s linears to int8 (one scale per row: slmkit.compress.quantize) as a frozen base that gradients
    still flow through to the LoRA layers and the head: a quarter of the fp32 weight memory."""
    if model.config.moe_experts:
        raise SlmError("an int8 base is for dense models: a Mixture-of-Experts layer's packed experts pass no "
                       "gradient; use --base-weights fp32")
    quantize(model, "int8")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = types.MethodType(_packed_forward, m)
    return model


def _checkpointed(forward: Any, x: Tensor, cache: Any, layer: int) -> Tensor:
    if cache is not None or not torch.is_grad_enabled():
        return forward(x, cache, layer)
    return torch.utils.checkpoint.checkpoint(forward, x, cache, layer, use_reentrant=False)


def checkpoint_blocks(model: GPT) -> GPT:
    """Gradient checkpointing: each block's activations are recomputed in the backward pass instead of kept, so a
    step holds one block's activations rather than every layer's, for about one more forward pass of compute.
    (Dropout masks are replayed: torch's checkpoint restores the RNG state.)"""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return model


# --- the classifier ------------------------------------------------------------------------------------------------


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each text's ids (BOS first where the tokenizer adds one), cut to `max_len`; never empty."""
    return [ids[:max_len] or [tok.bos_id] for ids in tok.encode_batch(list(texts), bos=tok.add_bos)]


@dataclass
class Prediction:
    label: str
    probs: dict[str, float]  # every label's probability, in the classifier's label order


class Classifier(nn.Module):
    """A GPT body and a linear head over its pooled final hidden states (module docstring: why the mean).

    >>> clf = Classifier.load("runs/bbc-clf")  # doctest: +SKIP
    >>> clf.predict(["The striker scored twice in the second half."])[0].label  # doctest: +SKIP
    'sport'
    """

    def __init__(self, body: GPT, labels: Sequence[str], tokenizer: Tokenizer | None = None,
                 max_len: int | None = None):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=body.config.init_std)
        nn.init.zeros_(self.head.bias)
        self.labels, self.tokenizer = list(labels), tokenizer
        self.max_len = min(max_len or body.config.block_size, body.config.block_size)
        self.meta: dict[str, Any] = {}

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """idx (B, T) padded on the right, lengths (B,) → logits (B, n_labels)."""
        with _headless(self.body):
            hidden, _ = self.body(idx)  # (B, T, C): the normed final states, no vocabulary matmul
        mask = torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]  # (B, T)
        # summed in fp32: a bf16 sum over hundreds of positions would round away the mean's low bits
        pooled = (hidden.float() * mask[..., None]).sum(1) / lengths[:, None].to(torch.float32)  # (B, C)
        return self.head(pooled)

    @classmethod
    def load(cls, path: str | Path, *, threads: int | None = None) -> Classifier:
        """A classifier written by `slm finetune --task classify`: its body (full weights, or base + adapter) and head,
        in eval mode."""
        set_threads(threads)
        path = Path(path)
        meta = run.read_meta(path, kinds=("finetune",))
        if meta.get("task") != "classify":
            raise SlmError(f"{path} was fine-tuned for --task {meta.get('task')}, not classify: it has no labels")
        body, tok, meta = load_finetuned(path)
        clf = cls(body, meta["labels"], tok, max_len=meta["finetune"]["seq_len"])
        head = checkpoint.read_weights(path / "head.safetensors")
        try:
            clf.head.load_state_dict(head)
        except RuntimeError:
            raise SlmError(f"{path / 'head.safetensors'} does not fit {len(clf.labels)} labels over "
                           f"{body.config.n_embd} features; the file is corrupt") from None
        clf.meta = meta
        return clf.eval()

    @torch.no_grad()
    def predict(self, texts: Sequence[str], *, batch_size: int = 16) -> list[Prediction]:
        """The most probable label of each text, with every label's probability."""
        if self.tokenizer is None:
            raise SlmError("this classifier has no tokenizer; load it with Classifier.load(run)")
        was = self.training
        self.eval()
        rows = encode_texts(self.tokenizer, texts, self.max_len)
        probs = torch.empty(len(rows), len(self.labels))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            idx, lengths = pad_rows([rows[j] for j in chunk], self.tokenizer.pad_id)
            probs[chunk] = self(idx, lengths).float().softmax(-1)
        self.train(was)
        return [Prediction(self.labels[int(p.argmax())], dict(zip(self.labels, p.tolist(), strict=True)))
                for p in probs]


# --- reading models back -------------------------------------------------------------------------------------------


@dataclass
class Base:
    """The model a fine-tune starts from: fp32 weights, tokenizer, meta.json, and the directory that pins it."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path  # the checkpoint directory read (a run's latest), or the finetune run


def load_base(path: str | Path) -> Base:
    """A run or checkpoint to fine-tune (trained, imported or fine-tuned), in fp32."""
    path = Path(path)
    kind = run.kind_of(path)
    if kind == "ngram":
        raise SlmError(f"{path} is an n-gram model: it has counts, not weights to fine-tune")
    if kind == "finetune":
        model, tok, meta = load_finetuned(path)
        return Base(model, tok, meta, path)
    ckpt_dir = checkpoint.resolve(path)
    if run.kind_of(ckpt_dir) == "quantize":
        raise SlmError(f"{path} holds packed quantized weights; fine-tune its parent (meta.json lineage) instead — "
                       f"--base-weights int8 trains LoRA over an int8 copy of it")
    ck = checkpoint.load(ckpt_dir)
    run_dir = ckpt_dir.parent.parent
    in_run = ckpt_dir.parent.name == "checkpoints" and run.kind_of(run_dir) is not None
    return Base(ck.model, ck.tokenizer, {**(run.read_meta(run_dir) if in_run else {}), **ck.meta}, ckpt_dir)


def base_pin(path: Path) -> dict[str, Any]:
    """How a finetune run names its base: the path and the hash of its meta.json (slmkit.run.lineage)."""
    return run.lineage(path, {})["parent"]


def pinned_base(meta: dict[str, Any], path: Path) -> Path:
    """The base directory a finetune run's meta.json names, checked to be the one it was trained from."""
    base = meta["base"]
    p = Path(base["path"])
    if not p.exists():
        raise SlmError(f"{path} reads its base from {p}, which is gone; restore the base there (or fine-tune again: "
                       f"a merged run, the default, holds its whole model)")
    if base_pin(p).get("meta_sha256") != base.get("meta_sha256"):
        raise SlmError(f"{path}: its base {p} has changed since it was fine-tuned (its meta.json differs); restore "
                       f"that base, or fine-tune the new one")
    return p


def load_finetuned(path: str | Path) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The language model of a finetune run, as one fp32 GPT (an adapter is merged into its base), its tokenizer and
    meta.json. A classifier's body comes back without its head (`Classifier.load` adds it)."""
    path = Path(path)
    meta = run.read_meta(path, kinds=("finetune",))
    body = (meta.get("artifact") or {}).get("body")
    if body is None:
        raise SlmError(f"{path} has not written a model yet (it stopped before finishing); continue it with "
                       f"slm finetune --resume {path}")
    tok = Tokenizer.load(path / "tokenizer.json")
    if body == "full":
        return checkpoint.read_model(path), tok, meta
    model = load_base(pinned_base(meta, path)).model
    if body == "adapter":
        a = meta["adapter"]
        add_lora(model, rank=a["rank"], alpha=a["alpha"], targets=a["targets"], layers=a.get("layers"))
        load_lora_state(model, checkpoint.read_weights(path / "adapter.safetensors"), str(path))
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)  # add_lora froze the base: a loaded model is an ordinary one
    return model.eval(), tok, meta
