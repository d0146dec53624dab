"""`slm`: one table of subcommands, each a thin call into the library with the same argument names.

User errors (`SlmError`) print one line and exit 2; internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError

EXAMPLES = """\
examples:
  slm quickstart                                   # prepare Shakespeare, train ~4 min, sample, write a report
  slm data prepare --corpus shakespeare --tokenizer bpe:4096 --out runs/data/shk
  slm train --data runs/data/shk --preset llama-3m --max-time 5m --out runs/shk-small
  slm generate runs/shk-small --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-p 0.9
  slm train --resume runs/shk-small                # continue exactly where it stopped
  slm import gguf smollm2 --out runs/smollm2       # SmolLM2-135M (installed by the set-up) as a native checkpoint
  slm generate runs/smollm2 --chat --prompt "What is the capital of France?" --temperature 0 --weights int8
  slm eval runs/smollm2 --lm shakespeare:val --task mmlu --limit 20   # bpb + MMLU → runs/smollm2/eval.json
  slm compare runs/shk-small runs/smollm2 --out reports/mine   # side by side: bpb, size, speed, Pareto plots
  slm quantize runs/shk-small --weights int4 --group 32 --out runs/shk-int4   # a packed 4-bit checkpoint
  slm serve runs/smollm2 --weights int8            # OpenAI-compatible API + chat page on http://127.0.0.1:8000
  slm finetune runs/smollm2 --data shakespeare --method lora --max-time 10m --out runs/smollm2-shk   # adapt to a domain
  slm finetune runs/smollm2 --data bbc-news --task classify --max-steps 300 --out runs/bbc-clf
  slm classify runs/bbc-clf "Shares fell sharply in early trading."   # label + probabilities
  slm distill --teacher runs/smollm2 --student llama-3m --data runs/data/shk-smol --max-time 10m --out runs/d3m
"""

MORE_EXAMPLES = """\
  slm quickstart --preset llama-3m --max-time 10m --out runs/qs-llama
  slm data prepare --corpus path/to/notes/ --tokenizer byte --out runs/data/notes   # your own .txt/.md/.jsonl/.parquet
  slm data prepare --corpus bbc-news --tokenizer runs/data/shk/tokenizer.json --out runs/data/bbc   # reuse a tokenizer
  slm train --data runs/data/shk --preset gpt-rope-3m --optimizer muon --max-time 10m --compile --out runs/shk-muon
  slm train --data runs/data/shk --preset llama-3m --set n_layer=8 --set dropout=0.1 --max-steps 2000 --out runs/deep
  slm train --data runs/data/shk --preset ngram-5 --out runs/ngram-5   # Kneser-Ney baseline, counted in seconds
  slm train --resume runs/shk-small --max-time 10m   # continue with a longer budget
  slm generate runs/shk-small --prompt "JULIET:" --temperature 0 --stop "\\n\\n"   # greedy, stop at a blank line
  slm eval runs/shk-small --lm shakespeare:folio --efficiency   # out-of-domain bpb + speed and memory
  slm compare --recipe spectrum --budget 3m --out reports/spectrum   # train a standard set of models, then compare
  slm presets --vocab-size 2048
  slm quantize runs/shk-small --weights int4 --method gptq --out runs/shk-gptq   # calibrated on its training data
  slm quantize runs/smollm2 --weights int8 --out runs/smollm2-int8
  slm eval runs/shk-int4 --kl-to parent   # bpb and KL divergence from the model it was quantized from
  slm prune runs/shk-small --method wanda --sparsity 0.5 --out runs/shk-wanda50   # half the weights zero, stored sparse
  slm prune runs/shk-small --method channels --sparsity 0.3 --heal 5m --out runs/shk-c30   # smaller, faster, healed
  slm factorize runs/shk-small --energy 0.9 --heal 5m --out runs/shk-svd   # truncated SVD into low-rank layers
  slm finetune runs/smollm2 --data chats.jsonl --task chat --lora-rank 16 --max-steps 500 --out runs/smollm2-chat
  slm finetune runs/shk-small --data bbc-news --task classify --method frozen --max-steps 200 --out runs/shk-clf
  slm finetune runs/smollm2 --data runs/data/notes --method full --grad-checkpoint --max-time 30m --out runs/sm-notes
  slm finetune runs/smollm2 --data shakespeare --adapter-only --base-weights int8 --max-time 10m --out runs/sm-lora
  slm finetune --resume runs/smollm2-shk --max-time 20m   # continue with a longer budget
  slm data prepare --corpus shakespeare --tokenizer runs/smollm2/tokenizer.json --out runs/data/shk-smol   # teacher's
  slm distill --teacher runs/smollm2 --student llama-3m --data runs/data/shk-smol --loss fkl --max-time 5m --out runs/df
  slm distill --teacher runs/smollm2 --student runs/d3m --data runs/data/shk-smol --max-steps 500 --out runs/d3m-more
  slm distill --resume runs/d3m --max-time 20m   # continue with a longer budget
"""


def _examples(command: str) -> str | None:
    """The example lines (EXAMPLES + MORE_EXAMPLES) that run `slm <command>`, as a subcommand's --help epilog."""
    words = command.split()
    lines = [line for line in (EXAMPLES + MORE_EXAMPLES).splitlines()
             if line.split()[:1] == ["slm"] and line.split()[1:1 + len(words)] == words]
    return "examples:\n" + "\n".join(lines) if lines else None


# --- handlers: parse → call the library ----------------------------------------------------------------------------


def cmd_data_prepare(a: argparse.Namespace) -> None:
    from slmkit.data import prepare

    out = prepare(a.corpus, a.tokenizer, a.out, val_fraction=a.val_fraction, seed=a.seed, dtype=a.dtype,
                  overwrite=a.overwrite, progress=not a.quiet)
    _print_data_summary(out)


def _print_data_summary(out: Path) -> None:
    from rich.table import Table

    from slmkit.data import load_meta
    from slmkit.runtime import console

    meta = load_meta(out)
    table = Table(title=f"{out}  ({meta['tokenizer']['spec']}, vocab {meta['tokenizer']['vocab_size']:,})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(col, justify="right")
    for name, s in meta["splits"].items():
        table.add_row(name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", f"{s['bytes_per_token']:.3f}")
    console().print(table)


def cmd_data_corpora(a: argparse.Namespace) -> None:
    from slmkit.data import BUILTIN_CORPORA

    for name, c in BUILTIN_CORPORA.items():
        splits = ", ".join(["train", "val", *c.extra])
        print(f"{name:12s} {c.about}\n{'':12s} splits: {splits}; package: {c.dist}=={c.version}")


def _configs(a: argparse.Namespace) -> tuple[Any, Any]:
    from slmkit.config import ModelConfig, TrainConfig, coerce_overrides

    if a.model_config and a.preset:
        raise SlmError("give --preset or --model-config, not both")
    model = ModelConfig.load(a.model_config) if a.model_config else ModelConfig.preset(a.preset or DEFAULT_PRESET)
    train = TrainConfig.load(a.train_config) if a.train_config else TrainConfig()
    flags = {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k, None) is not None}
    model_sets, train_sets = _split_sets(a.set, ModelConfig, TrainConfig, "; `slm presets` lists the models")
    model = model.replace(**coerce_overrides(ModelConfig, model_sets))
    train = train.replace(**flags, **coerce_overrides(TrainConfig, train_sets))
    return model, train


def _split_sets(pairs: list[str] | None, first: Any, second: Any, hint: str = "") -> tuple[list[str], list[str]]:
    """`--set field=value` pairs sorted to the config class that has the field (`first` wins a name both have); an
    unknown field is a one-line error with the nearest names."""
    fields1, fields2 = first().to_dict(), second().to_dict()
    out: tuple[list[str], list[str]] = ([], [])
    for pair in pairs or []:
        key = pair.partition("=")[0].strip()
        if key not in fields1 and key not in fields2:
            near = difflib.get_close_matches(key, [*fields1, *fields2], n=3)
            raise SlmError(f"--set {pair}: no {first.__name__} or {second.__name__} field {key!r}"
                           + (f"; did you mean {', '.join(near)}?" if near else hint))
        out[0 if key in fields1 else 1].append(pair)
    return out


DEFAULT_PRESET = "llama-3m"
# n-gram baselines are counted, not trained: `--preset ngram-5`, or `--preset ngram --set order=N --set discount=0.75`
NGRAM_PRESETS = {"ngram": 5, "ngram-3": 3, "ngram-5": 5, "ngram-7": 7}


def _train_ngram(a: argparse.Namespace) -> None:
    from slmkit.checkpoint import read_json
    from slmkit.config import coerce_overrides
    from slmkit.model.ngram import NgramConfig, train_ngram

    if a.resume or not a.data or not a.out:
        raise SlmError("an n-gram preset needs --data DIR and --out DIR (n-gram runs cannot --resume)")
    opts = {"order": NGRAM_PRESETS[a.preset], "discount": "modified",
            **coerce_overrides(NgramConfig, [s for s in a.set or [] if s.partition("=")[0] in ("order", "discount")])}
    other = [s for s in a.set or [] if s.partition("=")[0] not in ("order", "discount")]
    if other:
        raise SlmError(f"n-gram presets take only --set order=N and --set discount=modified|0.75, not {other[0]!r}")
    out = train_ngram(a.data, a.out, opts["order"], opts["discount"], overwrite=a.overwrite, progress=not a.quiet)
    r = read_json(out / "meta.json")["result"]
    print(f"finished: {opts['order']}-gram counted from {r['tokens']:,} tokens in {r['train_time']:.1f}s; "
          f"val loss {r['val_loss']:.4f} nats/token, {r['val_bpb']:.4f} bpb → {out}")


def cmd_train(a: argparse.Namespace) -> None:
    if a.preset in NGRAM_PRESETS:
        return _train_ngram(a)
    from slmkit.config import TrainConfig
    from slmkit.run import read_meta
    from slmkit.train import train

    if a.resume:
        # a resumed run keeps its recipe: only the budget and threads may change (TrainConfig.RESUMABLE)
        fixed = [f"--{k.replace('_', '-')}" for k in ("data", "out", "preset", "model_config", "train_config", "set",
                                                       "overwrite") if getattr(a, k)]
        fixed += [f"--{k.replace('_', '-')}" for k in TRAIN_FLAGS
                  if getattr(a, k, None) is not None and k not in TrainConfig.RESUMABLE]
        if fixed:
            raise SlmError(f"--resume continues {a.resume} with its own data, model and recipe, so {', '.join(fixed)} "
                           f"cannot be given with it; only --max-time, --max-steps and --threads can change")
        flags = {k: getattr(a, k) for k in TrainConfig.RESUMABLE if getattr(a, k, None) is not None}
        saved = TrainConfig.from_dict(read_meta(a.resume, kinds=("train",))["train"])
        result = train(None, a.resume, train_config=saved.replace(**flags) if flags else None, resume=True,
                       progress=not a.quiet)
    else:
        if not a.data or not a.out:
            raise SlmError("slm train needs --data DIR and --out DIR (or --resume RUN)")
        model, tc = _configs(a)
        result = train(a.data, a.out, model, tc, overwrite=a.overwrite, progress=not a.quiet)
    first = result.first_step_time
    warm = f", incl. a {first:.0f}s first step: one-off warm-up/compile" if first > 2 else ""
    print(f"{result.status}: step {result.step}, {result.tokens:,} tokens; {result.train_time:.0f}s training "
          f"({result.tokens_per_s:,.0f} tok/s{warm}) + {result.eval_time:.0f}s evaluation + {result.ckpt_time:.0f}s "
          f"checkpoints = {result.wall_time:.0f}s wall; val loss {result.val_loss:.4f} nats/token, "
          f"{result.val_bpb:.4f} bpb → {result.run_dir}")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed in a shell → the characters (a shell cannot pass a newline in quotes
    comfortably); any other backslash stays as it is. Not unicode_escape: that would mangle non-ASCII text."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def cmd_generate(a: argparse.Namespace) -> None:
    from slmkit.api import LLM
    from slmkit.sampling import SamplingParams

    # every user error surfaces before the first byte of output: after the echoed prompt it would read "hislm: error"
    SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed)
    for flag, value in (("--num-samples", a.num_samples), ("--threads", a.threads)):
        if value is not None and value < 1:
            raise SlmError(f"{flag}={value} must be >= 1")
    stop = [unescape(s) for s in a.stop or ()]
    if "" in stop:
        raise SlmError("--stop needs a non-empty string (an empty one would stop before the first token)")
    llm = LLM.load(a.run, threads=a.threads, weights=a.weights, kv_cache=a.kv_cache)
    kwargs = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  repetition_penalty=a.repetition_penalty, stop=stop, seed=a.seed, chat=a.chat)
    for _ in range(a.num_samples):
        pieces = llm.stream(a.prompt, **kwargs)
        first = next(pieces, "")  # encodes the prompt: an unknown character or a missing chat template fails here
        sys.stdout.write(a.prompt + ("\n" if a.chat else "") + first)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if a.num_samples > 1:
            sys.stdout.write("-" * 40 + "\n")
            kwargs["seed"] = None if a.seed is None else kwargs["seed"] + 1


def cmd_quantize(a: argparse.Namespace) -> None:
    from slmkit.compress.stage import bits_text, quantize_run
    from slmkit.run import read_meta

    out = quantize_run(a.run, a.out, weights=a.weights, group=a.group, method=a.method, calib=a.calib,
                       calib_samples=a.calib_samples, calib_len=a.calib_len, overwrite=a.overwrite)
    meta = read_meta(out)
    q = meta["quantization"]
    size = (out / "model.safetensors").stat().st_size
    group = f" group {q['group']}" if q["group"] else ""
    print(f"quantized {a.run} to {q['weights']}{group} ({q['method']}) in {meta['quantize_time']:.1f}s: "
          f"{bits_text(meta['storage'])}; model.safetensors {size / 1e6:.1f} MB → {out}")


def _compressed_summary(out: Path, meta: dict[str, Any], what: str) -> None:
    """The lines `slm prune`/`slm factorize` print: parameters and file size against the parent's, the heal, and
    the quick comparison with the parent on its held-out data."""
    parent = Path(meta["lineage"]["parent"]["path"])
    n, n0 = meta["counts"]["total"], meta["parent_counts"]["total"]
    mb, mb0 = ((d / "model.safetensors").stat().st_size / 1e6 for d in (out, parent))
    nonzero = f", {meta['nonzero'] / 1e6:.2f}M non-zero" if meta.get("nonzero", n) != n else ""
    print(f"{what}: {n / 1e6:.2f}M parameters{nonzero} (parent {n0 / 1e6:.2f}M); model.safetensors {mb:.1f} MB "
          f"(parent {mb0:.1f} MB) → {out}")
    if meta.get("heal"):
        h = meta["heal"]
        print(f"healed {h['steps']} steps in {h['seconds']:.0f}s: val {h['before']['val_bpb']:.4f} → "
              f"{meta['quality']['val_bpb']:.4f} bpb")
    if meta.get("quality"):
        q = meta["quality"]
        print(f"on {q['tokens']:,} held-out tokens: {q['val_bpb']:.4f} bpb (parent {q['parent_val_bpb']:.4f}), KL to "
              f"the parent {q['kl_to_parent']:.4f} nats/token; slm eval {out} --kl-to parent measures more")


def cmd_prune(a: argparse.Namespace) -> None:
    from slmkit.compress.prune import prune_run
    from slmkit.run import read_meta

    out = prune_run(a.run, a.out, method=a.method, sparsity=a.sparsity, score=a.score, calib=a.calib,
                    calib_samples=a.calib_samples, calib_len=a.calib_len, heal=a.heal, heal_data_dir=a.heal_data,
                    heal_kl=a.heal_kl, heal_lr=a.heal_lr, gradual=a.gradual, overwrite=a.overwrite,
                    progress=not a.quiet)
    meta = read_meta(out)
    p = meta["pruning"]
    if p["structure"] == "unstructured":
        how = f"{100 * p['sparsity']:.1f} % of the block weights zeroed, stored {meta['storage']['format']}"
    else:
        field, unit = {"channels": ("mlp_hidden", "FFN channels"), "layers": ("n_layer", "layers"),
                       "heads": ("n_head", "attention heads")}[p["structure"]]
        how = f"{unit} {p[field][0]} → {p[field][1]}"
        if p["structure"] == "heads" and p["n_kv_head"][0] != p["n_kv_head"][1]:
            how += f", KV heads {p['n_kv_head'][0]} → {p['n_kv_head'][1]}"
    _compressed_summary(out, meta, f"pruned {a.run} by {a.method} in {meta['prune_time']:.1f}s ({how})")


def cmd_factorize(a: argparse.Namespace) -> None:
    from slmkit.compress.factorize import factorize_run
    from slmkit.run import read_meta

    out = factorize_run(a.run, a.out, rank=a.rank, energy=a.energy, heal=a.heal, heal_data_dir=a.heal_data,
                        heal_kl=a.heal_kl, heal_lr=a.heal_lr, overwrite=a.overwrite, progress=not a.quiet)
    meta = read_meta(out)
    f = meta["factorization"]
    least = min(f["energy_kept"].values())
    _compressed_summary(out, meta, f"factorised {a.run} to rank {f['rank']} in {meta['factorize_time']:.1f}s "
                                   f"({f['layers']} layers, each keeping ≥ {100 * least:.1f} % of its Σσ²)")


def _finetune_configs(a: argparse.Namespace) -> tuple[Any, Any]:
    from slmkit.config import TrainConfig, coerce_overrides
    from slmkit.finetune import FinetuneConfig, default_train_config

    ft_sets, train_sets = _split_sets(a.set, FinetuneConfig, TrainConfig)
    flags = {k: getattr(a, k) for k in FINETUNE_FLAGS if getattr(a, k, None) is not None}
    if a.lora_targets is not None:
        flags["lora_targets"] = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    if a.adapter_only:
        flags["merge"] = False
    fc = FinetuneConfig.from_dict({**flags, **coerce_overrides(FinetuneConfig, ft_sets)})
    train_flags = {k: getattr(a, k) for k in FINETUNE_TRAIN_FLAGS if getattr(a, k, None) is not None}
    tc = default_train_config(fc.method).replace(**train_flags, **coerce_overrides(TrainConfig, train_sets))
    return fc, tc


def cmd_finetune(a: argparse.Namespace) -> None:
    from slmkit.config import TrainConfig
    from slmkit.finetune import FinetuneConfig, finetune
    from slmkit.run import read_meta

    if a.resume:
        # a resumed run keeps its base, data and recipe: only the budget, threads and patience may change
        keep = (*TrainConfig.RESUMABLE, *FinetuneConfig.RESUMABLE)
        fixed = [f"--{k.replace('_', '-')}" for k in ("run", "data", "out", "set", "overwrite", "adapter_only",
                                                       "lora_targets", *FINETUNE_FLAGS, *FINETUNE_TRAIN_FLAGS)
                 if getattr(a, k, None) not in (None, False) and k not in keep]
        if fixed:
            raise SlmError(f"--resume continues {a.resume} with its own base, data and recipe, so {', '.join(fixed)} "
                           "cannot be given with it; only --max-time, --max-steps, --threads and --patience can change")
        meta = read_meta(a.resume, kinds=("finetune",))
        flags = {k: getattr(a, k) for k in TrainConfig.RESUMABLE if getattr(a, k, None) is not None}
        tc = TrainConfig.from_dict(meta["train"]).replace(**flags) if flags else None
        fc = FinetuneConfig.from_dict(meta["finetune"]).replace(patience=a.patience) if a.patience else None
        result = finetune(None, None, a.resume, fc, tc, resume=True, progress=not a.quiet)
    else:
        if not a.run or not a.data or not a.out:
            raise SlmError("slm finetune needs the model RUN, --data and --out (or --resume RUN)")
        fc, tc = _finetune_configs(a)
        result = finetune(a.run, a.data, a.out, fc, tc, overwrite=a.overwrite, progress=not a.quiet)
    r = result
    moved = ", ".join(f"{k} {r.before[k]:.4f} → {r.best[k]:.4f}" for k in r.best if k in r.before)
    test = "; test " + ", ".join(f"{k} {v:.4f}" for k, v in r.test.items()) if r.test else ""
    print(f"{r.status}: step {r.step}, {r.tokens:,} tokens in {r.train_time:.0f}s ({r.tokens_per_s:,.0f} tok/s) + "
          f"{r.eval_time:.0f}s evaluation; val {moved} (kept: step {r.best_step}){test}; trained "
          f"{r.trainable_params:,} of {r.total_params:,} params; peak RSS {r.peak_rss_mb:,.0f} MB → {r.run_dir}")


def cmd_classify(a: argparse.Namespace) -> None:
    from slmkit.finetune import Classifier

    clf = Classifier.load(a.run, threads=a.threads)
    texts = [unescape(t) for t in a.text]
    for p in clf.predict(texts):
        ranked = sorted(p.probs.items(), key=lambda kv: -kv[1])[: a.top]
        print(f"{p.label}\t" + "  ".join(f"{label} {prob:.3f}" for label, prob in ranked))


def _distill_configs(a: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The student (a preset name, its ModelConfig when --set changes model fields, or a run), DistillConfig and
    TrainConfig of `slm distill`'s flags."""
    from slmkit.config import PRESETS, ModelConfig, TrainConfig, coerce_overrides
    from slmkit.distill import DistillConfig

    fields = DistillConfig().to_dict()
    dc_sets = [s for s in a.set or [] if s.partition("=")[0].strip() in fields]
    model_sets, train_sets = _split_sets([s for s in a.set or [] if s not in dc_sets], ModelConfig, TrainConfig,
                                         "; `slm presets` lists the models")
    flags = {k: getattr(a, k) for k in DISTILL_FLAGS if getattr(a, k, None) is not None}
    dc = DistillConfig.from_dict({**flags, **coerce_overrides(DistillConfig, dc_sets)})
    train_flags = {k: getattr(a, k) for k in DISTILL_TRAIN_FLAGS if getattr(a, k, None) is not None}
    tc = TrainConfig().replace(**train_flags, **coerce_overrides(TrainConfig, train_sets))
    student: Any = a.student
    if model_sets:
        if a.student not in PRESETS:
            raise SlmError(f"--set {model_sets[0]} changes a model preset; --student {a.student} is a run, whose "
                           f"model is fixed")
        student = ModelConfig.preset(a.student).replace(**coerce_overrides(ModelConfig, model_sets))
    return student, dc, tc


def cmd_distill(a: argparse.Namespace) -> None:
    from slmkit.config import TrainConfig
    from slmkit.distill import distill
    from slmkit.run import read_meta

    if a.resume:
        # a resumed run keeps its teacher, student, data, cache and recipe: only the budget and threads may change
        fixed = [f"--{k.replace('_', '-')}" for k in ("teacher", "student", "data", "out", "cache", "set", "overwrite",
                                                       *DISTILL_FLAGS, *DISTILL_TRAIN_FLAGS)
                 if getattr(a, k, None) not in (None, False) and k not in TrainConfig.RESUMABLE]
        if fixed:
            raise SlmError(f"--resume continues {a.resume} with its own teacher, student, data and recipe, so "
                           f"{', '.join(fixed)} cannot be given with it; only --max-time, --max-steps and --threads "
                           f"can change")
        flags = {k: getattr(a, k) for k in TrainConfig.RESUMABLE if getattr(a, k, None) is not None}
        saved = TrainConfig.from_dict(read_meta(a.resume, kinds=("distill",))["train"])
        res = distill(None, None, None, a.resume, train_config=saved.replace(**flags) if flags else None, resume=True,
                      progress=not a.quiet)
    else:
        if not a.teacher or not a.student or not a.data or not a.out:
            raise SlmError("slm distill needs --teacher RUN, --student PRESET|RUN, --data DIR and --out DIR (or "
                           "--resume RUN)")
        student, dc, tc = _distill_configs(a)
        res = distill(a.teacher, student, a.data, a.out, dc, tc, cache=a.cache, overwrite=a.overwrite,
                      progress=not a.quiet)
    r = res.train
    print(f"{r.status}: step {r.step}, {r.tokens:,} tokens ({res.epochs:.2f} passes over the cached windows); "
          f"{r.train_time:.0f}s training ({r.tokens_per_s:,.0f} tok/s) + {r.eval_time:.0f}s evaluation, teacher "
          f"cache {res.teacher_time:.0f}s ({res.cache}); val loss {r.val_loss:.4f} nats/token, {r.val_bpb:.4f} bpb "
          f"→ {r.run_dir}")


def cmd_export(a: argparse.Namespace) -> None:
    from slmkit.api import LLM
    from slmkit.run import check_out, read_meta

    check_out(a.out, overwrite=a.overwrite, inputs=(a.run,))  # before the model is read
    out = LLM.load(a.run).export(a.format, a.out, dtype=a.dtype, quant=a.quant, overwrite=a.overwrite)
    info = read_meta(out)["export"]
    print(f"exported {a.run} as {a.format} ({info.get('architecture') or info.get('arch') or ''}, "
          f"{info['bytes'] / 1e6:.1f} MB: {', '.join(info['files'][:4])}) → {out}")


def cmd_serve(a: argparse.Namespace) -> None:
    from slmkit.serve import serve

    serve(a.run, host=a.host, port=a.port, weights=a.weights, kv_cache=a.kv_cache, api_key=a.api_key,
          max_batch=a.max_batch, ctx=a.ctx, threads=a.threads, max_queue=a.max_queue, max_tokens=a.max_tokens,
          timeout=a.timeout, max_body=a.max_body, model_name=a.model_name, log_level=a.log_level)


def cmd_import(a: argparse.Namespace) -> None:
    from slmkit.checkpoint import load
    from slmkit.interop import import_gguf, import_hf

    out = (import_gguf if a.import_cmd == "gguf" else import_hf)(a.source, a.out, overwrite=a.overwrite)
    ck = load(out)
    c = ck.model.config
    print(f"imported {ck.meta['imported'].get('name') or a.source}: {ck.model.num_params():,} params, "
          f"{c.n_layer} layers, d={c.n_embd}, {c.n_head}/{c.n_kv_head} heads, context {c.block_size}, "
          f"vocab {c.vocab_size:,} → {out}")


def cmd_eval(a: argparse.Namespace) -> None:
    from slmkit.eval import evaluate, metrics_table
    from slmkit.fsutil import write_json
    from slmkit.runtime import console

    lm = a.lm if a.lm is not None else ([] if a.task else None)  # None: the run's own held-out split
    metrics = evaluate(a.run, lm=lm, tasks=a.task or [], shots=a.shots, limit=a.limit, efficiency=a.efficiency,
                       threads=a.threads, progress=not a.quiet, stride=a.stride, context=a.context,
                       max_bytes=a.max_bytes, weights=a.weights, kl_to=a.kl_to)
    out = Path(a.out) if a.out else Path(a.run) / "eval.json"
    write_json(out, metrics)
    console().print(metrics_table(metrics))
    print(f"wrote {out}")


def cmd_compare(a: argparse.Namespace) -> None:
    from slmkit.eval.compare import DEFAULT_SETS, compare
    from slmkit.eval.report import print_table
    from slmkit.recipes.spectrum import run_recipe

    common = dict(tasks=a.task or (), limit=a.limit, efficiency=not a.no_efficiency, threads=a.threads,
                  progress=not a.quiet)
    for key in ("max_bytes", "context"):  # the recipe has its own defaults
        if getattr(a, key) is not None or not a.recipe:
            common[key] = getattr(a, key)
    if a.recipe:
        result = run_recipe(a.out, recipe=a.recipe, budget=a.budget, corpus=a.corpus, lm_sets=a.lm,
                            extra_runs=a.runs, **common)
    else:
        result = compare(a.runs, a.out, lm_sets=a.lm or DEFAULT_SETS, **common)
    print_table(result)
    print(f"wrote {Path(a.out) / 'report.md'}, report.html, compare.json")


def cmd_presets(a: argparse.Namespace) -> None:
    from rich.table import Table

    from slmkit.config import PRESETS, ModelConfig
    from slmkit.model import GPT
    from slmkit.runtime import console

    table = Table(title=f"model presets (params at vocab {a.vocab_size:,}; byte-* presets at their 259)")
    for col in ("preset", "pos/norm/mlp", "variant", "L", "d", "h/kv", "ctx", "params", "active", "non-emb",
                "MFLOP/tok"):
        table.add_column(col, justify="right")
    for name in PRESETS:
        # a preset that fixes its vocabulary (byte-level) is shown at that vocabulary
        cfg = ModelConfig.preset(name, **({} if "vocab_size" in PRESETS[name] else {"vocab_size": a.vocab_size}))
        m = GPT(cfg)
        norm = {"layernorm": "ln", "rmsnorm": "rms"}[cfg.norm]
        table.add_row(name, f"{cfg.pos}/{norm}/{cfg.mlp}", cfg.variant(), str(cfg.n_layer), str(cfg.n_embd),
                      f"{cfg.n_head}/{cfg.n_kv_head}", str(cfg.block_size), f"{m.num_params() / 1e6:.2f}M",
                      f"{m.num_params(active=True) / 1e6:.2f}M", f"{m.num_params(non_embedding=True) / 1e6:.2f}M",
                      f"{m.flops_per_token() / 1e6:.1f}")
    console().print(table)


def cmd_quickstart(a: argparse.Namespace) -> None:
    from slmkit.recipes.quickstart import quickstart

    quickstart(a.out, corpus=a.corpus, tokenizer=a.tokenizer, preset=a.preset, max_time=a.max_time,
               threads=a.threads, progress=not a.quiet)


# --- the table ------------------------------------------------------------------------------------------------------

TRAIN_FLAGS = {
    "max_steps": dict(type=int, help="stop after this many optimizer steps"),
    "max_time": dict(type=str, help="stop after this much training time, e.g. 90s, 5m, 1h"),
    "lr": dict(type=float, help="peak learning rate (with --optimizer muon: of embeddings, head, norms)"),
    "muon_lr": dict(type=float, help="peak learning rate of the hidden matrices with --optimizer muon"),
    "batch_size": dict(type=int, help="sequences per micro-batch"),
    "grad_accum": dict(type=int, help="micro-batches per optimizer step"),
    "optimizer": dict(choices=["adamw", "sgd", "muon"],
                      help="muon: Muon on the hidden matrices + AdamW on the rest (fewest steps to a loss)"),
    "schedule": dict(choices=["cosine", "wsd", "constant"], help="lr shape after warmup"),
    "warmup_steps": dict(type=int),
    "precision": dict(choices=["auto", "bf16", "fp32"], help="auto = bf16 autocast only where the CPU has native bf16"),
    "threads": dict(type=int, help="torch threads (default: all cores available)"),
    "seed": dict(type=int),
    "compile": dict(action="store_const", const=True,
                    help="torch.compile the model: ~5-30%% more tokens/s at nanoGPT size after a one-off compile "
                         "(~30 s cold, ~3 s once cached); worth it for runs of more than a few minutes"),
    "eval_interval": dict(type=int, help="steps between validation evals"),
    "ckpt_interval": dict(type=int, help="steps between checkpoints"),
}


# TrainConfig fields `slm finetune` takes as flags (the rest via --set); FinetuneConfig fields it takes as flags
FINETUNE_TRAIN_FLAGS = ("max_steps", "max_time", "lr", "batch_size", "grad_accum", "schedule", "warmup_steps",
                        "precision", "threads", "seed", "eval_interval", "ckpt_interval")
FINETUNE_FLAGS = ("task", "method", "lora_rank", "lora_alpha", "lora_dropout", "lora_plus", "lora_layers",
                  "base_weights", "seq_len", "patience", "val_fraction", "grad_checkpoint")
# DistillConfig fields `slm distill` takes as flags; TrainConfig fields (all of slm train's but --compile)
DISTILL_FLAGS = ("loss", "alpha", "temperature", "top_k", "hidden_match", "windows")
DISTILL_TRAIN_FLAGS = tuple(k for k in TRAIN_FLAGS if k != "compile")


def build_parser() -> argparse.ArgumentParser:
    from slmkit.config import PRESETS

    p = argparse.ArgumentParser(prog="slm", description="Build, train and sample small language models on CPU.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], None], help: str, parent: Any = sub, group: str = "") -> Any:
        sp = parent.add_parser(name, help=help, description=help, epilog=_examples(f"{group} {name}"),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    q = add("quickstart", cmd_quickstart, "prepare Shakespeare, train a small model for a few minutes, sample, report")
    q.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    q.add_argument("--corpus", default="shakespeare")
    q.add_argument("--tokenizer", default="bpe:2048")
    q.add_argument("--preset", default="gpt-rope-3m", choices=list(PRESETS))
    q.add_argument("--max-time", default="4m", help="training budget (default: 4m)")
    q.add_argument("--threads", type=int)
    q.add_argument("--quiet", action="store_true", help="no progress bars")

    data_parser = sub.add_parser("data", help="prepare corpora into token shards")
    data = data_parser.add_subparsers(dest="data_cmd", required=True, metavar="COMMAND")
    dp = add("prepare", cmd_data_prepare, "tokenize a corpus into memory-mapped train/val shards", data, "data")
    dp.add_argument("--corpus", default="shakespeare",
                    help="built-in name (shakespeare, bbc-news) or a .txt/.md/.jsonl/.parquet file or directory")
    dp.add_argument("--tokenizer", default="bpe:4096", help="byte | char | bpe:N | path/to/tokenizer.json")
    dp.add_argument("--out", required=True)
    dp.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    dp.add_argument("--seed", type=int, default=0, help="seed of the document-level split")
    dp.add_argument("--dtype", choices=["uint16", "uint32"], help="token width (default: smallest that fits)")
    dp.add_argument("--overwrite", action="store_true")
    dp.add_argument("--quiet", action="store_true")
    add("corpora", cmd_data_corpora, "list built-in corpora", data, "data")

    t = add("train", cmd_train, "train a model on prepared shards (or --resume a run)")
    t.add_argument("--data", help="prepared data directory (slm data prepare)")
    t.add_argument("--out", help="run directory to create")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    t.add_argument("--preset", choices=[*PRESETS, *NGRAM_PRESETS],
                   help="model preset (default llama-3m); ngram-3/5/7 count a Kneser-Ney baseline instead")
    t.add_argument("--model-config", help="ModelConfig YAML/JSON file (instead of --preset)")
    t.add_argument("--train-config", help="TrainConfig YAML/JSON file; flags below override it")
    for name, kw in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, **kw)
    t.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any ModelConfig/TrainConfig field, e.g. --set n_layer=8 --set dropout=0.1")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    g = add("generate", cmd_generate, "sample text from a run or checkpoint, streamed to the terminal")
    g.add_argument("run", help="run directory (uses its latest checkpoint) or checkpoint directory")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append",
                   help="stop before this string (repeatable; \\n, \\t, \\r and \\\\ are read as escapes)")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template (imported chat models)")
    g.add_argument("--threads", type=int)
    g.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4"], default="fp32",
                   help="quantize the linear layers in memory after loading: int8/int4/bf16 read ~4x/~7x/2x fewer "
                        "bytes per token (faster on CPU); `slm quantize` writes a quantized checkpoint instead")
    g.add_argument("--kv-cache", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="store the attention keys/values as fp32, bf16 (half the bytes) or int8 (a quarter): past ~1k "
                        "tokens of context the cache is most of what each token reads (docs/benchmarks.md)")

    qz = add("quantize", cmd_quantize, "write a quantized checkpoint (int8, or int4 by round-to-nearest/GPTQ/AWQ)")
    qz.add_argument("run", help="run or checkpoint directory to quantize (native or imported)")
    qz.add_argument("--weights", choices=["int8", "int4"], default="int8",
                    help="int8: one scale per row (~1 byte/weight); int4: one fp16 scale per group (4.5 bits at 32)")
    qz.add_argument("--group", type=int, default=32, choices=[32, 64, 128], help="int4: weights per scale (default 32)")
    qz.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn",
                    help="rtn: round to nearest; gptq/awq (int4): calibrated on --calib text to lose less quality")
    qz.add_argument("--calib", metavar="SET",
                    help="calibration text, named like slm eval --lm (default: the run's own training data)")
    qz.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    qz.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    qz.add_argument("--out", required=True, help="checkpoint directory to create")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing --out that slmkit wrote")

    pn = add("prune", cmd_prune, "prune a model: zero weights (stored sparse) or remove FFN channels, heads or "
                                 "layers")
    pn.add_argument("run", help="run or checkpoint directory to prune (native or imported)")
    pn.add_argument("--method", required=True, metavar="METHOD",
                    help="magnitude | wanda | nm:N:M (keep N of every M inputs, e.g. nm:2:4): zeros in the matrices; "
                         "channels | heads | layers: a smaller dense model that decodes faster")
    pn.add_argument("--sparsity", type=float,
                    help="share removed, in [0, 1): of each matrix's weights (magnitude, wanda), of the FFN channels "
                         "(channels), of the attention heads (heads; rounded to keep GQA groups whole) or of the "
                         "layers (layers); N:M sets its own")
    pn.add_argument("--score", choices=["wanda", "magnitude"], default="wanda",
                    help="what ranks the weights of an N:M group (default wanda: |W| x input norm)")
    pn.add_argument("--calib", metavar="SET",
                    help="calibration text for wanda/nm/channels/heads/layers, named like slm eval --lm (default: the "
                         "run's own training data)")
    pn.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    pn.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    pn.add_argument("--gradual", action="store_true",
                    help="magnitude only: prune during the --heal run, the sparsity rising on Zhu & Gupta's cubic "
                         "schedule (for very sparse models, e.g. --sparsity 0.9)")
    fz = add("factorize", cmd_factorize, "replace each block projection by its truncated SVD (low-rank layers)")
    fz.add_argument("run", help="run or checkpoint directory to factorise (native or imported)")
    rank = fz.add_mutually_exclusive_group(required=True)
    rank.add_argument("--rank", type=int, help="rank of every factorised projection")
    rank.add_argument("--energy", type=float,
                      help="the smallest rank keeping this share of every layer's squared singular values, e.g. 0.9")
    for sp in (pn, fz):
        sp.add_argument("--heal", metavar="DURATION",
                        help="then train the smaller model for this long (e.g. 5m), distilled from its parent")
        sp.add_argument("--heal-data", metavar="DIR",
                        help="data to heal on, prepared with the model's tokenizer (default: the parent's own)")
        sp.add_argument("--heal-kl", type=float, default=0.5,
                        help="share of the healing loss that is KL to the parent's logits; the rest is "
                             "cross-entropy on the text (default 0.5)")
        sp.add_argument("--heal-lr", type=float, default=1e-3, help="peak learning rate of healing (default 1e-3)")
        sp.add_argument("--out", required=True, help="checkpoint directory to create")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing --out that slmkit wrote")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    ft = add("finetune", cmd_finetune,
             "adapt a model to a corpus (lm), a labelled corpus (classify) or conversations (chat): full or LoRA")
    ft.add_argument("run", nargs="?", help="the model to fine-tune: run, checkpoint, imported or fine-tuned model")
    ft.add_argument("--data", help="lm: a corpus (shakespeare, bbc-news, a path) or a data directory prepared with the "
                                   "model's tokenizer; classify: bbc-news, DIR/<label>/*.txt or JSONL text/label; "
                                   "chat: JSONL with a messages list per line")
    ft.add_argument("--out", help="run directory to create")
    ft.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    ft.add_argument("--task", choices=["lm", "classify", "chat"], help="default lm (continued pretraining)")
    ft.add_argument("--method", choices=["lora", "full", "frozen"],
                    help="lora (default): low-rank adapters on a frozen base; full: every weight; frozen (classify): "
                         "the head only")
    ft.add_argument("--lora-rank", type=int, help="rank of the LoRA update (default 8)")
    ft.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha/rank (default 16)")
    ft.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0)")
    ft.add_argument("--lora-plus", type=float, metavar="RATIO",
                    help="LoRA+: the zero-initialised B factors learn at RATIO x the lr, A at the lr (default 1: "
                         "plain LoRA; an A/B is in docs/benchmarks.md)")
    ft.add_argument("--lora-targets", metavar="LIST",
                    help="comma-separated modules: attn, mlp, attn.qkv, attn.proj, mlp.fc, mlp.proj (default attn,mlp)")
    ft.add_argument("--lora-layers", type=int, metavar="N",
                    help="adapt only the top N blocks (default: all): the backward pass stops below them, so steps "
                         "are faster and lighter; what it costs in quality is measured in docs/benchmarks.md")
    ft.add_argument("--adapter-only", action="store_true",
                    help="write only what was trained (LoRA adapter, head) + the lineage to the base, not the merged "
                         "model; the base must stay where it is")
    ft.add_argument("--base-weights", choices=["fp32", "int8"],
                    help="int8: LoRA/frozen over an int8 copy of the base (a quarter of the weight memory)")
    ft.add_argument("--seq-len", type=int, help="tokens per training row (default 256; at most the model's context)")
    ft.add_argument("--patience", type=int, help="stop after N evaluations without a better val loss (default 5)")
    ft.add_argument("--val-fraction", type=float, help="share held out for early stopping (default 0.1)")
    ft.add_argument("--grad-checkpoint", action="store_const", const=True,
                    help="recompute activations in the backward pass: less memory, ~1/3 more compute")
    for name in FINETUNE_TRAIN_FLAGS:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, **TRAIN_FLAGS[name])
    ft.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="override any FinetuneConfig/TrainConfig field, e.g. --set head_lr=3e-3 --set test_fraction=0")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing --out that slmkit wrote")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")

    cl = add("classify", cmd_classify, "label texts with a classifier written by slm finetune --task classify")
    cl.add_argument("run", help="the classifier's run directory")
    cl.add_argument("text", nargs="+", help="texts to label (\\n, \\t are read as escapes)")
    cl.add_argument("--top", type=int, default=5, help="probabilities shown per text (default 5)")
    cl.add_argument("--threads", type=int)

    ds = add("distill", cmd_distill,
             "train a student model on a teacher's next-token distributions (knowledge distillation)")
    ds.add_argument("--teacher", metavar="RUN", help="the teacher: a run, checkpoint, imported or fine-tuned model")
    ds.add_argument("--student", metavar="PRESET|RUN",
                    help="a model preset, built with the teacher's vocabulary (--set changes its fields), or a run to "
                         "continue from; either way it shares the teacher's tokenizer")
    ds.add_argument("--data", help="a data directory prepared with the teacher's tokenizer (slm data prepare "
                                   "--tokenizer TEACHER/tokenizer.json)")
    ds.add_argument("--out", help="run directory to create")
    ds.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    ds.add_argument("--loss", choices=["fkl", "rkl", "mix"],
                    help="fkl: KL(teacher||student); rkl: KL(student||teacher); mix (default): alpha x fkl + "
                         "(1 - alpha) x hard-label cross-entropy. KL terms are scaled by T^2")
    ds.add_argument("--alpha", type=float, help="mix: weight of the KL term (default 0.5)")
    ds.add_argument("--temperature", type=float, help="softens both distributions (default 1)")
    ds.add_argument("--top-k", type=int, help="teacher tokens cached per position (default 64)")
    ds.add_argument("--hidden-match", action="store_const", const=True,
                    help="also match the final hidden states through a learned projection (caches the teacher's)")
    ds.add_argument("--windows", type=int,
                    help="train windows to cache and train on (default: every non-overlapping window)")
    ds.add_argument("--cache", metavar="DIR",
                    help="teacher cache directory (default DATA/teacher-cache/<key>: every student of the same "
                         "teacher, data and settings reuses it)")
    for name in DISTILL_TRAIN_FLAGS:
        ds.add_argument("--" + name.replace("_", "-"), dest=name, **TRAIN_FLAGS[name])
    ds.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="override a DistillConfig, TrainConfig or (for a preset student) ModelConfig field, e.g. "
                         "--set hidden_weight=0.1 --set n_layer=4")
    ds.add_argument("--overwrite", action="store_true", help="replace an existing --out that slmkit wrote")
    ds.add_argument("--quiet", action="store_true", help="no progress bars")

    imp_parser = sub.add_parser("import", help="turn a GGUF file or transformers checkpoint into an slmkit checkpoint")
    imp = imp_parser.add_subparsers(dest="import_cmd", required=True, metavar="FORMAT")
    for fmt, what, src_help in (
        ("gguf", "a llama.cpp GGUF file (Llama architecture; F32/F16/BF16/Q4_0/Q4_1/Q5_x/Q8_0/K-quants)",
         "the .gguf file, or `smollm2` for the installed SmolLM2-135M-Instruct (Q4_1)"),
        ("hf", "a local transformers Llama checkpoint (config.json + safetensors + tokenizer.json)",
         "the checkpoint directory"),
    ):
        ip = add(fmt, cmd_import, f"import {what}", imp, "import")
        ip.add_argument("source", help=src_help)
        ip.add_argument("--out", required=True, help="checkpoint directory to create")
        ip.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    ex = add("export", cmd_export,
             "write a model for another runtime: transformers (hf), llama.cpp (gguf), onnxruntime (onnx)")
    ex.description = (
        "Export a run, checkpoint, imported or quantized model into a directory another runtime loads:\n"
        "  hf    config.json + model.safetensors + tokenizer files: AutoModelForCausalLM.from_pretrained(OUT)\n"
        "  gguf  OUT/model.gguf with its tokenizer: llama-cli -m OUT/model.gguf (--quant q8_0|q4_0|q4_k_m)\n"
        "  onnx  OUT/model.onnx, a decoder with past keys/values inputs and outputs, for onnxruntime\n"
        "Each export holds a meta.json with lineage to what it came from. Architectures another runtime cannot\n"
        "compute exactly (e.g. Performer attention) are refused rather than exported approximately.\n\n"
        "  slm export runs/shk-small --format hf --out exports/shk-hf\n"
        "  slm export runs/shk-small --format gguf --quant q8_0 --out exports/shk-gguf")
    ex.formatter_class = argparse.RawDescriptionHelpFormatter
    ex.add_argument("run", help="run directory (latest checkpoint), checkpoint, imported or quantized model")
    ex.add_argument("--format", required=True, choices=["hf", "gguf", "onnx"], help="the target runtime's format")
    ex.add_argument("--out", required=True, help="directory to create")
    ex.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32", help="tensor type (default f32)")
    ex.add_argument("--quant", choices=["q8_0", "q4_0", "q4_k_m"],
                    help="gguf only: llama.cpp quantization of the matrices (an int4 group-32 model is already Q4_0)")
    ex.add_argument("--overwrite", action="store_true", help="replace an --out that slmkit wrote")

    sv = add("serve", cmd_serve, "serve a model over OpenAI's HTTP API (continuous batching) with a web chat page")
    sv.description = (
        "Serve a run over OpenAI's HTTP API: GET /v1/models, POST /v1/chat/completions and /v1/completions\n"
        "(streamed as server-sent events with \"stream\": true), GET /health, and a chat page at /.\n"
        "Requests join and leave one running batch between decode steps (--max-batch at once, the rest queue);\n"
        "each slot holds --ctx tokens of prompt + completion. Speeds: docs/benchmarks.md.\n\n"
        "  slm serve runs/smollm2 --weights int8 --max-batch 8      # then open http://127.0.0.1:8000/\n"
        "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "       -d '{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'")
    sv.add_argument("run", help="run directory (latest checkpoint), checkpoint, imported or quantized model")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4"], default="fp32",
                    help="quantize the linear layers in memory first: fewer bytes per step, faster decoding")
    sv.add_argument("--kv-cache", choices=["fp32", "bf16", "int8"], default="fp32",
                    help="how the KV cache stores keys/values: narrower holds more slots in the same memory")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--ctx", type=int,
                    help="tokens per request, prompt + completion (default: the model's context, at most 2048)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a slot before new ones get HTTP 429 (default 64)")
    sv.add_argument("--max-tokens", type=int, default=4096,
                    help="cap on a request's max_tokens; larger asks get HTTP 400 (default 4096)")
    sv.add_argument("--timeout", type=float, default=600.0,
                    help="seconds a request may take; it then ends with finish_reason 'length' (default 600)")
    sv.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SLM_API_KEY)")
    sv.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    sv.add_argument("--threads", type=int,
                    help="CPU threads for decoding (default: the cores less one, which the HTTP side needs)")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    ev = add("eval", cmd_eval, "measure a run: bits per byte on held-out text, multiple-choice tasks, efficiency")
    ev.add_argument("run", help="run directory (latest checkpoint), checkpoint directory or n-gram run")
    ev.add_argument("--lm", action="append", metavar="SET",
                    help="held-out text: shakespeare:val, shakespeare:folio, bbc-news:val, PATH or PATH:val "
                         "(repeatable; default: the val split of the text the run was trained on, unless --task is "
                         "given; an imported model must name its sets)")
    ev.add_argument("--task", action="append", metavar="TASK", help="multiple-choice task: mmlu or a task YAML file")
    ev.add_argument("--shots", type=int, default=0, help="few-shot examples per question (default 0)")
    ev.add_argument("--limit", type=int, help="at most N questions per subject (quick runs)")
    ev.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: half the context)")
    ev.add_argument("--context", type=int, help="longest context in tokens (default: the model's block size)")
    ev.add_argument("--max-bytes", type=int, help="score only the first N bytes of each text set (quick runs)")
    ev.add_argument("--efficiency", action="store_true", help="also measure speed, memory and size")
    ev.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4"], default="fp32",
                    help="quantize the linear layers first (measure a compressed model)")
    ev.add_argument("--kl-to", metavar="DIR|parent",
                    help="also the per-token KL divergence from a reference model on each text set (parent: the one "
                         "this model was quantized from, per its meta.json)")
    ev.add_argument("--threads", type=int)
    ev.add_argument("--out", help="metrics JSON to write (default: RUN/eval.json)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    cp = add("compare", cmd_compare, "compare runs: bpb in- and out-of-domain, size, speed, Pareto plots → report")
    cp.add_argument("runs", nargs="*", metavar="RUN", help="run, checkpoint or n-gram run directories")
    cp.add_argument("--out", required=True,
                    help="report directory: new, empty or an earlier report (report.md, report.html, compare.json, "
                         "*.png, meta.json)")
    cp.add_argument("--lm", action="append", metavar="SET",
                    help="held-out text sets, first = in-domain (default: shakespeare:val, shakespeare:folio)")
    cp.add_argument("--task", action="append", metavar="TASK", help="also run a multiple-choice task (e.g. mmlu)")
    cp.add_argument("--limit", type=int, help="at most N questions per task subject")
    cp.add_argument("--max-bytes", type=int,
                    help="score every model on the first N bytes of each text set (recipe default: 250000)")
    cp.add_argument("--context", type=int,
                    help="score every model with windows of at most N tokens (recipe default: 1024)")
    cp.add_argument("--no-efficiency", action="store_true", help="skip decode speed / memory measurements")
    cp.add_argument("--recipe", choices=["spectrum"], help="first train a standard set of models into --out")
    cp.add_argument("--budget", default="3m", help="recipe: training time per neural model (default 3m)")
    cp.add_argument("--corpus", default="shakespeare", help="recipe: corpus to train and evaluate on")
    cp.add_argument("--threads", type=int)
    cp.add_argument("--quiet", action="store_true", help="no progress bars")

    pr = add("presets", cmd_presets, "list model presets with parameter counts and FLOPs per token")
    pr.add_argument("--vocab-size", type=int, default=4096)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except SlmError as e:
        print(f"slm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `slm generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
