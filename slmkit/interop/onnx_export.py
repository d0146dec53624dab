"""ONNX export for onnxruntime: a decoder graph whose KV cache is explicit inputs and outputs.

`write_onnx(model, tokenizer, out)` writes into the directory `out`:
- model.onnx (+ model.onnx.data beside it when the weights pass ONNX's 2 GB protobuf limit): inputs `input_ids`
  (B, T) int64 and `past_key_{i}`/`past_value_{i}` (B, nkv, P, hd) for every layer i (P = 0 on the first call);
  outputs `logits` (B, T, V) and `present_key_{i}`/`present_value_{i}` (B, nkv, P+T, hd). B, T and P are dynamic;
  positions continue from P, and the T tokens of a chunk attend causally to the past and to each other.
- tokenizer.json (+ tokenizer_config.json for a pretrained tokenizer) and io.json, which names the inputs and outputs
  with their shapes, the layer/head geometry and the special token ids, so a runtime needs nothing from slmkit.

`OnnxLM(out)` runs such a directory with onnxruntime: full-sequence logits and greedy generation with the cache.

>>> write_onnx(model, tokenizer, Path("exports/shk-onnx"))  # doctest: +SKIP
>>> OnnxLM(Path("exports/shk-onnx")).generate([1, 2, 3], max_new_tokens=20)  # doctest: +SKIP

Shapes: B = batch, T = tokens in this call, P = past tokens, S = P + T, C = n_embd, nh/nkv = query/key heads,
hd = head_dim, g = nh / nkv, V = vocab_size, N = B·T, E = experts, H = expert hidden width.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.checkpoint import model_from_state_dict
from slmkit.errors import SlmError
from slmkit.fsutil import write_json
from slmkit.infer.engine import KEEP
from slmkit.interop.weights import torch_dtype
from slmkit.model import GPT
from slmkit.model.attention import BlockSparseAttention, LocalAttention, project_qkv
from slmkit.model.ffn import MoE, _activate
from slmkit.model.gpt import Attention
from slmkit.tokenizer import Tokenizer

IO_FILE = "io.json"
# ONNX is a protobuf, which cannot exceed 2 GiB: above this the weights go to model.onnx.data beside it
EXTERNAL_DATA_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------------------------------
# the graph


class _Decoder(nn.Module):
    """The GPT's forward with its KV cache as explicit tensors: (input_ids, past_key_0, past_value_0, ...) →
    (logits, present_key_0, present_value_0, ...). It calls the GPT's own submodules (embeddings, norms, q/k/v and
    output projections, RoPE, MLPs), so a shared block or MLP is one set of weights in the graph too; only what
    `KVCache` does in place (a static buffer written at `cache.pos`) is written functionally, as a concatenation."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.config
        T = input_ids.size(1)
        P = past[0].size(2)  # a symbolic size in the graph: positions continue from the past's length
        x = m.tok_emb(input_ids)  # (B, T, C)
        if m.pos_emb is not None:
            x = x + m.pos_emb.weight[P : P + T]
        elif cfg.pos == "sinusoidal":
            x = x + m.pos_table[P : P + T]
        qpos = torch.arange(T, device=x.device) + P  # (T,)
        kpos = torch.arange(P + T, device=x.device)  # (S,)
        presents: list[Tensor] = []
        for i in range(cfg.n_layer):
            block = m.blocks[i % len(m.blocks)]
            y, k, v = _attention(block.attn, block.norm1(x), past[2 * i], past[2 * i + 1], P, qpos, kpos)
            x = x + y
            h = block.norm2(x)
            x = x + (_moe(block.mlp, h) if isinstance(block.mlp, MoE) else block.mlp(h))
            presents += [k, v]
        return m.lm_head(m.norm_f(x)), *presents  # (B, T, V)


def _attention(attn: nn.Module, x: Tensor, past_k: Tensor, past_v: Tensor, P: Any, qpos: Tensor, kpos: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """One attention layer over the past and this chunk: (output (B, T, C), keys and values (B, nkv, S, hd)).

    The scores are written out rather than left to SDPA: the mask is the attention kind's own visibility rule
    (causal for full attention, the window or block pattern for the others) over absolute positions, which is the
    dense path slmkit itself takes for tokens appended to a cache, and it exports to plain MatMul/Softmax ops."""
    B, T, _ = x.shape
    q, k, v = project_qkv(attn, x, P)  # q (B, nh, T, hd), k/v (B, nkv, T, hd) with RoPE at positions P..
    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nkv, S, hd)
    visible = kpos[None, :] <= qpos[:, None] if isinstance(attn, Attention) else attn.visible(qpos, kpos)  # (T, S)
    nkv, hd = attn.nkv, attn.hd
    # grouped-query attention without copying keys: query head h reads key head h // g, as SDPA's enable_gqa does
    qg = q.reshape(B, nkv, -1, T, hd)  # (B, nkv, g, T, hd)
    scores = (qg @ k[:, :, None].transpose(-1, -2)) * hd**-0.5  # (B, nkv, g, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v[:, :, None]  # (B, nkv, g, T, hd)
    y = y.reshape(B, -1, T, hd).transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hd)
    return attn.proj(y), k, v


def _moe(moe: MoE, x: Tensor) -> Tensor:
    """MoE.forward as a dense computation: every expert runs on every token and the output is the gate-weighted sum,
    with zero gates for experts a token did not choose (or that dropped it at capacity). E× the FLOPs of the routed
    forward, but no data-dependent shapes (the per-expert split sizes), which ONNX graphs cannot hold."""
    B, T, C = x.shape
    xf = x.reshape(-1, C)  # (N, C)
    N = xf.size(0)
    probs = torch.softmax(moe.router(xf).float(), dim=-1)  # (N, E)
    top_p, top_e = probs.topk(moe.k, dim=-1)  # (N, k)
    gates = top_p if moe.k == 1 else top_p / top_p.sum(-1, keepdim=True)  # (N, k)
    chosen = F.one_hot(top_e, moe.E).to(gates.dtype)  # (N, k, E)
    if moe.capacity_factor is not None:
        # an expert keeps its first `cap` assignments in (token, slot) order, as the stable sort in MoE.forward does;
        # cap in float64 and MoE.forward's order of operations, so ceil() rounds exactly as Python's math.ceil does
        cap = torch.ceil(moe.capacity_factor * torch.tensor(N, dtype=torch.float64) * moe.k / moe.E)
        rank = chosen.reshape(-1, moe.E).cumsum(0).reshape(N, moe.k, moe.E)  # 1 for an expert's first assignment
        chosen = chosen * (rank <= cap).to(gates.dtype)
    weight = (chosen * gates[..., None]).sum(1).to(x.dtype)  # (N, E)
    h = torch.einsum("nc,ech->neh", xf, moe.fc)  # (N, E, H or 2H)
    if moe.fc_bias is not None:
        h = h + moe.fc_bias
    h = torch.einsum("neh,ehc->nec", _activate(h, moe.swiglu), moe.proj)  # (N, E, C)
    if moe.proj_bias is not None:
        h = h + moe.proj_bias
    return (h * weight[..., None]).sum(1).view(B, T, C)


def _check_exportable(model: GPT) -> None:
    # linear attention decodes from a recurrent state and LSH from hash buckets, not from a keys/values cache
    if not all(isinstance(b.attn, Attention | LocalAttention | BlockSparseAttention) for b in model.blocks):
        raise SlmError(f"ONNX export does not support attention={model.config.attention!r} "
                       "(supported: full, local, blocksparse)")


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def write_onnx(model: GPT, tokenizer: Tokenizer, out: Path, *, dtype: str = "f32") -> dict[str, Any]:
    """Write model.onnx (+ model.onnx.data when large), tokenizer.json (+ tokenizer_config.json) and io.json into
    the existing, empty directory `out`; return a summary (exporter, opset, dtype, external data, notes).

    `model` is an fp32 GPT (quantized models are dequantized first: slmkit.interop.weights.dense_model); `dtype`
    f32 or f16 is the dtype of the graph's weights, cache and logits (bf16 is refused: onnxruntime's CPU provider
    cannot run it). Full, sliding-window and block-sparse attention export; linear and LSH attention, whose cache is
    not plain keys and values, are refused with one line.

    >>> write_onnx(GPT(ModelConfig.preset("gpt-0.8m", vocab_size=65)), tok, Path("out"))  # doctest: +SKIP
    {'format': 'onnx', 'exporter': 'torch.onnx dynamo', 'opset': 20, 'dtype': 'f32', 'external_data': False, ...}
    """
    tdtype = torch_dtype(dtype)
    _check_exportable(model)
    if dtype == "bf16":
        # checked with onnxruntime 1.32: its CPU provider has no bf16 MatMul or Add, so the session would not load
        raise SlmError("onnxruntime's CPU provider cannot run a bf16 graph (no bf16 MatMul/Add kernels); export "
                       "--dtype f16 for half the size, or f32")
    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs both, and says so only deep inside a traceback)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SlmError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    cfg = model.config
    # torch.export rebinds Python attributes of the modules it traces (MoE's shared `calls` list: found by a test), so
    # it traces a new GPT holding the same weight tensors (no copy at f32); .to() converts that one, not the caller's
    src = model_from_state_dict(cfg, model.state_dict(), "the model").to(tdtype)
    dec = _Decoder(src).eval()  # eval: no dropout in the graph
    inputs, outputs = _names(cfg.n_layer)
    # example sizes all different and > 1: torch.export specialises a dimension whose example size is 0 or 1 (the
    # graph still runs with P = 0 and T = 1: tested), and may read two equal example sizes as one symbol
    B, T, P = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    past = [torch.zeros(B, cfg.n_kv_head, P, cfg.head_dim, dtype=tdtype) for _ in range(2 * cfg.n_layer)]
    batch, seq, plen = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: plen} for _ in past))  # (input_ids, *past)
    external = sum(p.numel() * p.element_size() for p in dec.parameters()) > EXTERNAL_DATA_BYTES
    # the exporter's warnings (torchvision not installed, renamed axes) are about torch internals, not the model
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(dec, (ids, *past), dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=shapes, optimize=True, verbose=False)
    program.save(out / "model.onnx", external_data=external)
    tokenizer.save(out / "tokenizer.json")
    odtype = {"f32": "float32", "f16": "float16"}[dtype]
    kv_shape = ["batch", cfg.n_kv_head, "past", cfg.head_dim]
    io = {
        "inputs": {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64"},
                   **{n: {"shape": kv_shape, "dtype": odtype} for n in inputs[1:]}},
        "outputs": {"logits": {"shape": ["batch", "seq", cfg.vocab_size], "dtype": odtype},
                    **{n: {"shape": [*kv_shape[:2], "past + seq", cfg.head_dim], "dtype": odtype}
                       for n in outputs[1:]}},
        "n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "context": cfg.block_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "stop_ids": sorted(tokenizer.stop_ids), "dtype": dtype,
    }
    write_json(out / IO_FILE, io)
    notes = []
    if cfg.moe_experts:
        notes.append(f"MoE layers run all {cfg.moe_experts} experts on every token and weight the chosen "
                     f"{cfg.moe_top_k} (the same function, {cfg.moe_experts / cfg.moe_top_k:g}x the expert FLOPs)")
    if cfg.attention != "full":
        notes.append(f"{cfg.attention} attention runs as a mask over the full cache (the same function, "
                     "full attention's cost)")
    return {"format": "onnx", "exporter": "torch.onnx dynamo", "opset": _opset(program), "dtype": dtype,
            "external_data": external, "io": IO_FILE, "notes": notes}


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _opset(program: Any) -> int | None:
    return next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)


# ---------------------------------------------------------------------------------------------------------------------
# running


class OnnxLM:
    """An exported directory run by onnxruntime on the CPU: token ids in, logits or token ids out.

    >>> OnnxLM(Path("exports/shk-onnx")).logits([1, 2, 3]).shape  # doctest: +SKIP
    (3, 65)
    """

    def __init__(self, directory: Path, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SlmError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None

        directory = Path(directory)
        self.io = json.loads((directory / IO_FILE).read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(directory / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.dtype = np.dtype(self.io["inputs"][self.inputs[1]]["dtype"])

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        io = self.io
        return [np.zeros((batch, io["n_kv_head"], 0, io["head_dim"]), self.dtype) for _ in self.inputs[1:]]

    def run(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) int64 and the past → logits (B, T, V) as float32 and the present (the next call's past)."""
        if past[0].shape[2] + ids.shape[1] > self.io["context"]:
            raise SlmError(f"{past[0].shape[2]} past + {ids.shape[1]} new tokens exceed the model's context of "
                           f"{self.io['context']}")
        logits, *present = self.session.run(None, dict(zip(self.inputs, [ids.astype(np.int64), *past], strict=True)))
        return logits.astype(np.float32), present

    def logits(self, ids: list[int]) -> np.ndarray:
        """(T, V) float32 logits of a full sequence (no past)."""
        return self.run(np.array([ids]), self.empty_past())[0][0]

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding with the cache graph: the prompt in one call, then one token per call. Past the context the
        cache is rebuilt from the newest tokens exactly as slmkit.infer.engine.generate does, so the tokens match."""
        if not ids:
            raise SlmError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
        block = self.io["context"]
        n_keep = max(1, math.floor(KEEP * block))
        ids = list(ids)
        pending, past, out = ids[-block:], self.empty_past(), []
        for _ in range(max_new_tokens):
            if past[0].shape[2] + len(pending) > block:
                pending, past = ids[-n_keep:], self.empty_past()
            logits, past = self.run(np.array([pending]), past)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            pending = [nxt]
        return out
