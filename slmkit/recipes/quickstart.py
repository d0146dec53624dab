"""`slm quickstart`: the whole pipeline in one command, ending in a readable report.

prepare Shakespeare (BPE) → train a few-M-parameter model (GPT-2 blocks with RoPE) for a few minutes → evaluate
in-domain and on the First Folio (out of domain) → sample → write `report.md` with the loss curve.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from slmkit import run
from slmkit.api import LLM
from slmkit.config import ModelConfig, TrainConfig, parse_duration
from slmkit.data import load_meta, load_split, prepare
from slmkit.errors import SlmError
from slmkit.fsutil import write_bytes
from slmkit.metrics import bits_per_byte, lm_loss
from slmkit.runtime import resolve_precision
from slmkit.train import train

PROMPTS = ("ROMEO:", "KING HENRY:\nWhat", "To be, or not to be")
# A minutes-long run wants a high lr and a short warmup; preset choice measured in docs/benchmarks.md (quickstart).
# Muon on the hidden matrices: 2.25 vs 2.48 val bpb for AdamW after 90 s of the same preset (docs/benchmarks.md).
QUICKSTART_TRAIN = dict(optimizer="muon", muon_lr=0.05, lr=3e-3, warmup_steps=30, batch_size=16, eval_interval=100,
                        eval_batches=10, ckpt_interval=200, schedule="cosine", min_lr_ratio=0.05)


def quickstart(
    out: str | Path = "runs/quickstart",
    *,
    corpus: str = "shakespeare",
    tokenizer: str = "bpe:2048",
    preset: str = "gpt-rope-3m",
    max_time: str | float = "4m",
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Run the quickstart into `out` (a previous quickstart there is replaced) and return the report path."""
    out = Path(out)
    console = Console()
    seconds = parse_duration(max_time)
    data_dir = out.parent / f"{out.name}-data"
    # a previous quickstart's run and data are replaced; anything else there is refused before any work
    run.check_out(out, overwrite=True)
    if not _reusable(data_dir, corpus, tokenizer):
        run.check_out(data_dir, overwrite=True)
    if _reusable(data_dir, corpus, tokenizer):
        console.print(f"[dim]reusing prepared data {data_dir}[/]")
    else:
        console.rule(f"1/3 prepare {corpus} with a {tokenizer} tokenizer")
        prepare(corpus, tokenizer, data_dir, overwrite=True, progress=progress)

    console.rule(f"2/3 train {preset} for {seconds:.0f}s")
    tc = TrainConfig(max_time=seconds, threads=threads, **QUICKSTART_TRAIN)
    res = train(data_dir, out, ModelConfig.preset(preset), tc, overwrite=True, progress=progress)

    console.rule("3/3 evaluate and sample")
    llm = LLM.load(out, threads=threads)
    block = llm.config.block_size
    precision = resolve_precision(tc.precision)
    extra = {}
    meta = load_meta(data_dir)
    for split in meta["splits"]:
        if split not in ("train", "val"):
            shard = load_split(data_dir, split)
            loss = lm_loss(llm.model, shard.tokens, block_size=block, max_windows=400, precision=precision)
            extra[split] = (loss, bits_per_byte(loss, shard.bytes_per_token))
    samples = []
    for i, prompt in enumerate(PROMPTS):
        text = llm.generate(prompt, max_new_tokens=120, temperature=0.8, top_p=0.95, seed=i)
        samples.append(prompt + text)
        console.print(f"[bold]{prompt}[/]{text}\n")

    n = llm.model.num_params()
    lines = [
        "# slmkit quickstart report", "",
        f"Corpus `{corpus}` ({meta['tokenizer']['spec']} tokenizer, vocab {meta['tokenizer']['vocab_size']:,}); "
        f"model preset `{preset}`: {n / 1e6:.2f}M parameters "
        f"({llm.model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
        f"{llm.model.flops_per_token() / 1e6:.1f} MFLOP/token (train).", "",
        "| metric | value |", "|---|---|",
        f"| training time | {res.train_time:.0f} s ({res.step} steps, {res.tokens:,} tokens) |",
        f"| wall time | {res.wall_time:.0f} s (training + {res.eval_time:.0f} s evaluation + {res.ckpt_time:.0f} s "
        f"checkpoints + set-up) |",
        f"| throughput | {res.tokens_per_s:,.0f} tokens/s ({tc.threads or 'all'} threads, {precision}) |",
        f"| train loss (last) | {res.train_loss:.3f} nats/token |",
        f"| val loss | {res.val_loss:.3f} nats/token (perplexity {_ppl(res.val_loss)}) |",
        f"| **val bits per byte** | **{res.val_bpb:.3f}** |",
        *(f"| {s} (out of domain) | {lb[0]:.3f} nats/token, {lb[1]:.3f} bpb |" for s, lb in extra.items()), "",
        "![loss curve](loss.png)", "",
        "## Model config", "", "```yaml", *_yaml(llm.config.to_dict()), "```", "",
        "## Train config", "", "```yaml", *_yaml(tc.to_dict()), "```", "",
        "## Samples (temperature 0.8, top-p 0.95)", "",
        *(f"```\n{s}\n```\n" for s in samples),
        f"Continue training: `slm train --resume {out} --max-time 10m`; sample: "
        f"`slm generate {out} --prompt \"ROMEO:\"`.", "",
    ]
    report = out / "report.md"
    write_bytes(report, "\n".join(lines).encode())
    console.print(f"val {res.val_bpb:.3f} bpb · report: {report}")
    return report


def _reusable(data_dir: Path, corpus: str, tokenizer: str) -> bool:
    try:
        meta = load_meta(data_dir)
    except SlmError:
        return False
    return meta.get("source") == corpus and meta["tokenizer"]["spec"] == tokenizer


def _ppl(loss: float) -> str:
    import math

    return f"{math.exp(loss):,.1f}"


def _yaml(d: dict) -> list[str]:
    import yaml

    return yaml.safe_dump(d, sort_keys=False).splitlines()
