"""`slm export`: a run (trained, imported, quantized) → the formats other runtimes load.

- hf: a transformers directory (`AutoModelForCausalLM.from_pretrained(dir)`, no custom code) — slmkit.interop.hf_export
- gguf: a GGUF file for llama.cpp — slmkit.interop.gguf_export
- onnx: a decoder graph with past keys/values for onnxruntime — slmkit.interop.onnx_export

Every export is a directory with a meta.json (kind "export", lineage to the run it came from) beside the format's
files, written under a temporary name and renamed when complete, so nothing half-written is ever left at `--out`.
Models with quantized weights (slm quantize) are exported dequantized for hf and onnx; gguf keeps int4 group-32
weights as Q4_0 without a detour through fp32 (the two layouts are the same bytes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.fsutil import atomic_dir
from slmkit.interop.weights import GGUF_QUANTS, check_dtype, dense_model
from slmkit.model import GPT
from slmkit.run import check_out, lineage, model_class, new_meta, write_meta
from slmkit.tokenizer import Tokenizer

FORMATS = ("hf", "gguf", "onnx")
GGUF_FILE = "model.gguf"


def export_model(model: Any, tokenizer: Tokenizer, parent: str | Path | None, fmt: str, out: str | Path, *,
                 dtype: str = "f32", quant: str | None = None, overwrite: bool = False,
                 parent_meta: dict[str, Any] | None = None) -> Path:
    """Write `model` (a GPT, fp32 or quantized) with its tokenizer as `fmt` into the directory `out`, with a meta.json
    whose lineage points at `parent` (the run or checkpoint it was loaded from). `slmkit.api.LLM.export` and `slm
    export` call this; every check runs before anything is written."""
    if fmt not in FORMATS:
        raise SlmError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_dtype(dtype)
    if quant is not None:
        if fmt != "gguf":
            raise SlmError(f"--quant is for gguf ({', '.join(GGUF_QUANTS)}); {fmt} exports take --dtype")
        if quant not in GGUF_QUANTS:
            raise SlmError(f"--quant {quant!r} is not one of {', '.join(GGUF_QUANTS)}")
    if not isinstance(model, GPT):
        raise SlmError("only transformer models export; an n-gram model has no weights another runtime could load")
    check_out(out, overwrite=overwrite, inputs=() if parent is None else (parent,))
    recipe = {"format": fmt, "dtype": dtype, "quant": quant}
    start = time.perf_counter()
    with atomic_dir(out, overwrite) as tmp:
        if fmt == "hf":
            from slmkit.interop.hf_export import write_hf

            info = write_hf(dense_model(model), tokenizer, tmp, dtype=dtype)
        elif fmt == "gguf":
            from slmkit.interop.gguf_export import write_gguf

            info = write_gguf(model, tokenizer, tmp / GGUF_FILE, dtype=dtype, quant=quant,
                              extra={"slmkit.lineage": json.dumps(lineage(parent, {"stage": "export", **recipe}))})
        else:
            from slmkit.interop.onnx_export import write_onnx

            info = write_onnx(dense_model(model), tokenizer, tmp, dtype=dtype)
        meta = new_meta("export", parent=parent, recipe=recipe,
                        model_class=model_class(parent_meta or {"model": model.config.to_dict()}),
                        export={**info, **describe(tmp)}, export_time=round(time.perf_counter() - start, 2))
        write_meta(tmp, meta)
    return Path(out)


def describe(path: Path) -> dict[str, Any]:
    """Files and bytes of an export directory (for meta.json and the CLI's summary)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "meta.json")
    return {"files": [str(p.relative_to(path)) for p in files], "bytes": sum(p.stat().st_size for p in files)}
