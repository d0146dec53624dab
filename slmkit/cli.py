"""`slm`: one table of subcommands, each a thin call into the library with the same argument names.

User errors (`SlmError`) print one line and exit 2; internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
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
"""


# --- handlers: parse → call the library ----------------------------------------------------------------------------


def cmd_data_prepare(a: argparse.Namespace) -> None:
    from slmkit.data import prepare

    out = prepare(a.corpus, a.tokenizer, a.out, val_fraction=a.val_fraction, seed=a.seed, dtype=a.dtype,
                  overwrite=a.overwrite, progress=not a.quiet)
    _print_data_summary(out)


def _print_data_summary(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from slmkit.data import load_meta

    meta = load_meta(out)
    table = Table(title=f"{out}  ({meta['tokenizer']['spec']}, vocab {meta['tokenizer']['vocab_size']:,})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(col, justify="right")
    for name, s in meta["splits"].items():
        table.add_row(name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", f"{s['bytes_per_token']:.3f}")
    Console().print(table)


def cmd_data_corpora(a: argparse.Namespace) -> None:
    from slmkit.data import BUILTIN_CORPORA

    for name, c in BUILTIN_CORPORA.items():
        splits = ", ".join(["train", "val", *c.extra])
        print(f"{name:12s} {c.about}\n{'':12s} splits: {splits}; package: {c.dist}=={c.version}")


def _configs(a: argparse.Namespace) -> tuple[Any, Any]:
    from slmkit.config import ModelConfig, TrainConfig, coerce_overrides

    model = ModelConfig.load(a.model_config) if a.model_config else ModelConfig.preset(a.preset)
    train = TrainConfig.load(a.train_config) if a.train_config else TrainConfig()
    flags = {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k, None) is not None}
    model_sets, train_sets = [], []
    for pair in a.set or []:
        key = pair.partition("=")[0]
        (model_sets if key in ModelConfig.__dataclass_fields__ else train_sets).append(pair)
    model = model.replace(**coerce_overrides(ModelConfig, model_sets))
    train = train.replace(**flags, **coerce_overrides(TrainConfig, train_sets))
    return model, train


def cmd_train(a: argparse.Namespace) -> None:
    from slmkit.config import TrainConfig
    from slmkit.train import train

    if a.resume:
        from slmkit.checkpoint import read_json

        meta_path = Path(a.resume) / "meta.json"
        if not meta_path.exists():
            raise SlmError(f"cannot resume: {a.resume} is not a run directory (no meta.json)")
        saved = TrainConfig.from_dict(read_json(meta_path)["train"])
        flags = {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k, None) is not None}
        result = train(None, a.resume, train_config=saved.replace(**flags) if flags else None, resume=True,
                       progress=not a.quiet)
    else:
        if not a.data or not a.out:
            raise SlmError("slm train needs --data DIR and --out DIR (or --resume RUN)")
        model, tc = _configs(a)
        result = train(a.data, a.out, model, tc, overwrite=a.overwrite, progress=not a.quiet)
    print(f"{result.status}: step {result.step}, {result.tokens:,} tokens in {result.train_time:.0f}s "
          f"({result.tokens_per_s:,.0f} tok/s); val loss {result.val_loss:.4f} nats/token, {result.val_bpb:.4f} bpb "
          f"→ {result.run_dir}")


def cmd_generate(a: argparse.Namespace) -> None:
    from slmkit.api import LLM

    llm = LLM.load(a.run, threads=a.threads)
    kwargs = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  repetition_penalty=a.repetition_penalty, stop=a.stop or (), seed=a.seed)
    for _ in range(a.num_samples):
        sys.stdout.write(a.prompt)
        for piece in llm.stream(a.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if a.num_samples > 1:
            sys.stdout.write("-" * 40 + "\n")
            kwargs["seed"] = None if a.seed is None else kwargs["seed"] + 1


def cmd_presets(a: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from slmkit.config import PRESETS, ModelConfig
    from slmkit.model import GPT

    table = Table(title=f"model presets (params at vocab {a.vocab_size:,})")
    for col in ("preset", "pos/norm/mlp", "layers", "d", "heads", "kv", "context", "params", "non-emb", "MFLOP/token"):
        table.add_column(col, justify="right")
    for name in PRESETS:
        cfg = ModelConfig.preset(name, vocab_size=a.vocab_size)
        m = GPT(cfg)
        table.add_row(name, f"{cfg.pos}/{cfg.norm}/{cfg.mlp}", str(cfg.n_layer), str(cfg.n_embd),
                      str(cfg.n_head), str(cfg.n_kv_head), str(cfg.block_size), f"{m.num_params() / 1e6:.2f}M",
                      f"{m.num_params(non_embedding=True) / 1e6:.2f}M", f"{m.flops_per_token() / 1e6:.1f}")
    Console().print(table)


def cmd_quickstart(a: argparse.Namespace) -> None:
    from slmkit.quickstart import quickstart

    quickstart(a.out, corpus=a.corpus, tokenizer=a.tokenizer, preset=a.preset, max_time=a.max_time,
               threads=a.threads, progress=not a.quiet)


# --- the table ------------------------------------------------------------------------------------------------------

TRAIN_FLAGS = {
    "max_steps": dict(type=int, help="stop after this many optimizer steps"),
    "max_time": dict(type=str, help="stop after this much training time, e.g. 90s, 5m, 1h"),
    "lr": dict(type=float, help="peak learning rate"),
    "batch_size": dict(type=int, help="sequences per micro-batch"),
    "grad_accum": dict(type=int, help="micro-batches per optimizer step"),
    "optimizer": dict(choices=["adamw", "sgd"]),
    "schedule": dict(choices=["cosine", "wsd", "constant"], help="lr shape after warmup"),
    "warmup_steps": dict(type=int),
    "precision": dict(choices=["auto", "bf16", "fp32"], help="auto = bf16 autocast only where the CPU has native bf16"),
    "threads": dict(type=int, help="torch threads (default: all cores available)"),
    "seed": dict(type=int),
    "eval_interval": dict(type=int, help="steps between validation evals"),
    "ckpt_interval": dict(type=int, help="steps between checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    from slmkit.config import PRESETS

    p = argparse.ArgumentParser(prog="slm", description="Build, train and sample small language models on CPU.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], None], help: str, parent: Any = sub) -> Any:
        sp = parent.add_parser(name, help=help, description=help)
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
    dp = add("prepare", cmd_data_prepare, "tokenize a corpus into memory-mapped train/val shards", data)
    dp.add_argument("--corpus", default="shakespeare",
                    help="built-in name (shakespeare, bbc-news) or a .txt/.md/.jsonl/.parquet file or directory")
    dp.add_argument("--tokenizer", default="bpe:4096", help="byte | char | bpe:N | path/to/tokenizer.json")
    dp.add_argument("--out", required=True)
    dp.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    dp.add_argument("--seed", type=int, default=0, help="seed of the document-level split")
    dp.add_argument("--dtype", choices=["uint16", "uint32"], help="token width (default: smallest that fits)")
    dp.add_argument("--overwrite", action="store_true")
    dp.add_argument("--quiet", action="store_true")
    add("corpora", cmd_data_corpora, "list built-in corpora", data)

    t = add("train", cmd_train, "train a model on prepared shards (or --resume a run)")
    t.add_argument("--data", help="prepared data directory (slm data prepare)")
    t.add_argument("--out", help="run directory to create")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    t.add_argument("--preset", default="llama-3m", choices=list(PRESETS), help="model preset (default llama-3m)")
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
    g.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--threads", type=int)

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
