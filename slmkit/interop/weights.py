"""What every exporter needs from a model: its weights as plain fp32 tensors (quantized layers dequantized), and the
export dtypes."""

from __future__ import annotations

import torch
from torch import nn

from slmkit.checkpoint import model_from_state_dict
from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantExperts, QuantLinear
from slmkit.model import GPT

DTYPES = ("f32", "f16", "bf16")
GGUF_QUANTS = ("q8_0", "q4_0", "q4_k_m")  # llama.cpp's names; slmkit.interop.gguf_export writes them


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear | QuantExperts) for m in model.modules())


def dense_model(model: GPT) -> GPT:
    """An fp32 GPT computing what `model` computes: its quantized layers (QuantLinear, QuantExperts) dequantized back
    into plain weights; `model` itself if it has none. A head that was tied to the embedding before quantizing holds
    its own rounded copy (slmkit.compress.quantize), so the dense model unties it."""
    if not is_quantized(model):
        return model
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if not isinstance(owner, QuantLinear | QuantExperts):
            sd[name] = t.float()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            sd[f"{name}.weight"] = mod.dequantized()
            if mod.bias is not None:
                sd[f"{name}.bias"] = mod.bias.float()
        elif isinstance(mod, QuantExperts):
            sd[name] = mod.dequantized().contiguous()  # the MoE's (E, in, out) parameter
    cfg = model.config
    if cfg.tie_embeddings and isinstance(model.lm_head, QuantLinear):
        cfg = cfg.replace(tie_embeddings=False)
    return model_from_state_dict(cfg, sd, "the quantized model")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise SlmError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def torch_dtype(dtype: str) -> torch.dtype:
    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[check_dtype(dtype)]


