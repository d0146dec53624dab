"""The Python API: `LLM.load(path).generate("...")`.

>>> from slmkit import LLM
>>> llm = LLM.load("runs/shk-small")
>>> print(llm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=0))
>>> for piece in llm.stream("JULIET:", max_new_tokens=50):
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from slmkit import checkpoint
from slmkit.compress import sparse
from slmkit.compress.quantize import WeightDtype, quantize
from slmkit.compress.stage import load_quantized
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.finetune.model import load_finetuned
from slmkit.infer.neural import NeuralLM
from slmkit.interop.export import export_model
from slmkit.model.ngram import NgramLM
from slmkit.model.protocol import LanguageModel, ParamCounts
from slmkit.run import kind_of, read_meta
from slmkit.runtime import release_freed_memory, set_threads
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.stream import TextStream


class LLM:
    """A language model with its tokenizer, ready to generate text.

    `lm` is the model behind the `slmkit.model.protocol.LanguageModel` protocol (the transformer's adapter or the
    n-gram model): what evaluation and timing use. `meta` is the model's meta.json (a checkpoint's over its run's),
    `path` the directory whose weights were read.
    """

    def __init__(self, model: LanguageModel | Any, tokenizer: Tokenizer, meta: dict[str, Any] | None = None,
                 path: Path | None = None):
        # a bare transformer (checkpoint.load(...).model, a GPT built in Python) gets its adapter here
        self.lm: LanguageModel = model if isinstance(model, LanguageModel) else NeuralLM(model)
        self.tokenizer, self.meta, self.path = tokenizer, meta or {}, path

    @classmethod
    def load(cls, path: str | Path, *, threads: int | None = None, weights: WeightDtype = "fp32",
             kv_cache: str = "fp32") -> LLM:
        """Load a checkpoint directory, a run directory (its latest checkpoint), an n-gram run or a fine-tuned run
        (`slm finetune`; one that kept only its LoRA adapter is loaded as its base + the adapter, merged).

        weights: "int8", "int4" (group 32) or "bf16" quantize the linear layers in memory after loading
        (slmkit.compress.quantize): fewer bytes read per generated token, so faster decoding (docs/benchmarks.md). A
        checkpoint written by `slm quantize` is loaded packed, as it is, with no fp32 copy; one written by `slm prune`
        has its sparse matrices decoded into the dense model.
        kv_cache: how generation stores keys and values, "fp32", "bf16" or "int8" (slmkit.model.gpt.KVCache): a
        narrower cache decodes faster at long contexts and changes the logits slightly.
        """
        set_threads(threads)
        path = Path(path)
        if kind_of(path) == "ngram":  # counted by slm train --preset ngram-N: no torch weights
            if weights != "fp32":
                raise SlmError(f"{path} is an n-gram model: it has no weights to quantize; drop --weights")
            if kv_cache != "fp32":
                raise SlmError(f"{path} is an n-gram model: it has no KV cache; drop --kv-cache")
            return cls(NgramLM.load(path), Tokenizer.load(path / "tokenizer.json"), read_meta(path), path)
        if kind_of(path) == "finetune":  # slm finetune wrote it: full weights, or an adapter merged into its base
            model, tok, meta = load_finetuned(path)
            lm = NeuralLM(model, meta.get("model_class"), kv_cache=kv_cache)
            quantize(lm.module, weights)
            return cls(lm, tok, meta, path)
        ckpt_dir = checkpoint.resolve(path)
        if kind_of(ckpt_dir) == "quantize":  # slm quantize wrote it: packed weights, installed without an fp32 copy
            meta = read_meta(ckpt_dir)
            if weights != "fp32":
                raise SlmError(f"{path} is already quantized ({meta['quantization']['weights']}); drop --weights")
            lm = NeuralLM(load_quantized(ckpt_dir), meta.get("model_class"), params=ParamCounts(**meta["counts"]),
                          kv_cache=kv_cache)
            return cls(lm, Tokenizer.load(ckpt_dir / "tokenizer.json"), meta, ckpt_dir)
        ckpt = sparse.load(ckpt_dir)  # checkpoint.load, with a pruned checkpoint's sparse matrices decoded
        run_dir = ckpt.path.parent.parent  # run/checkpoints/step_N → run
        in_run = ckpt.path.parent.name == "checkpoints" and kind_of(run_dir) is not None
        meta = {**(read_meta(run_dir) if in_run else {}), **ckpt.meta}
        lm = NeuralLM(ckpt.model, meta.get("model_class"), kv_cache=kv_cache)
        quantize(lm.module, weights)
        if weights != "fp32":
            release_freed_memory()  # the fp32 weights just replaced
        return cls(lm, ckpt.tokenizer, meta, ckpt.path)

    @property
    def model(self) -> Any:
        """The model object itself, for code that needs more than the protocol: the transformer's nn.Module (to
        quantize, export or time its forward) or the n-gram model."""
        return getattr(self.lm, "module", self.lm)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        chat: bool = False,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is generated.

        Generation ends at `max_new_tokens`, at the tokenizer's EOS/end-of-turn tokens (and, for slmkit's own
        tokenizers, at a BOS, which marks the start of a new document), or
        just before the first occurrence of any `stop` string (which is not yielded). `chat=True` sends `prompt` as a
        user message through the tokenizer's chat template (models imported with one) and yields the reply.
        """
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        tok = self.tokenizer
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok.encode(text, bos=tok.add_bos, specials=True)
        else:
            ids = tok.encode(prompt, bos=tok.add_bos) or [tok.bos_id]  # at least one token to condition on
        text = TextStream(tok, stop)  # whole characters only; nothing that may become a stop string
        # stop ids: EOS and end-of-turn tokens; for slmkit's own tokenizers also BOS, which starts a new document
        for nxt in self.lm.generate(ids, params, stop_ids=tuple(tok.stop_ids)):
            if nxt in tok.stop_ids or nxt == tok.pad_id:
                break
            if piece := text.push(nxt):
                yield piece
            if text.stopped:
                return
        if piece := text.flush():
            yield piece

    def generate(self, prompt: str, **kwargs: Any) -> str:
        """The continuation of `prompt` as one string (same arguments as `stream`)."""
        return "".join(self.stream(prompt, **kwargs))

    def export(self, fmt: str, out: str | Path, *, dtype: str = "f32", quant: str | None = None,
               overwrite: bool = False) -> Path:
        """Write this model for another runtime into the directory `out` (slmkit.interop.export): "hf" (transformers'
        `from_pretrained(out)`), "gguf" (`out/model.gguf` for llama.cpp; `quant` q8_0, q4_0 or q4_k_m) or "onnx"
        (`out/model.onnx` with past keys/values, for onnxruntime). `dtype` f32, f16 or bf16.

        >>> LLM.load("runs/shk-small").export("gguf", "exports/shk-gguf", quant="q8_0")  # doctest: +SKIP
        """
        return export_model(self.model, self.tokenizer, self.path, fmt, out, dtype=dtype, quant=quant,
                            overwrite=overwrite, parent_meta=self.meta)
