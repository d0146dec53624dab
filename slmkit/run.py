"""The run contract: every stage reads a directory and writes one, and its `meta.json` says what it is and where it
came from. This module is the one place that writes, reads and recognises it.

    {"kind": "train",                  what wrote the directory: one of KINDS
     "schema": "slmkit-meta/2",
     "model_class": "dense",           for model runs: dense | moe | ngram | imported (what `slm compare` groups by)
     "lineage": {"parent": {"path", "kind", "meta_sha256"} | {"path", "sha256"} | null,
                 "recipe": {"stage": "train", ...the settings that made this directory from its parent}},
     "versions": {...}, "created": "...",
     ...the stage's own fields (train: data, model, train, runtime, params, status, result)}

`--overwrite` only ever replaces a directory this contract recognises (`kind_of` is not None) or an empty one:
`check_out` is called by every stage before it writes, so a typo'd `--out ~/src --overwrite` deletes nothing.
Directories written before the schema had a kind (slmkit 0.1's "slmkit-run/1" runs, shard directories, imports)
are still recognised.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.fsutil import write_json
from slmkit.versions import versions

SCHEMA = "slmkit-meta/2"
KINDS = {
    "data": "prepared shards (slm data prepare)",
    "train": "a model trained by slm train",
    "ngram": "an n-gram model counted by slm train --preset ngram-N",
    "import": "a checkpoint imported from GGUF or transformers (slm import)",
    "checkpoint": "one checkpoint inside a run (run/checkpoints/step_N)",
    "report": "an slm compare report",
    "quantize": "a quantized checkpoint (slm quantize)",
    "export": "a model exported for another runtime (slm export: transformers, GGUF, ONNX)",
    "finetune": "a model fine-tuned from another (slm finetune: continued pretraining, LoRA, classify, chat)",
    "distill": "a student model distilled from a teacher (slm distill)",
    "prune": "a pruned model (slm prune: zeroed weights stored sparse, or fewer channels/layers)",
    "factorize": "a model with low-rank factorised projections (slm factorize)",
}
MODEL_KINDS = ("train", "ngram", "import", "checkpoint", "quantize", "finetune", "distill", "prune", "factorize")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def lineage(parent: str | Path | None, recipe: dict[str, Any]) -> dict[str, Any]:
    """The lineage block: the parent directory (or file) this one was made from, pinned by a hash, and the recipe —
    the stage and settings that made it."""
    if parent is None:
        return {"parent": None, "recipe": recipe}
    p = Path(parent).resolve()
    ref: dict[str, Any] = {"path": str(p)}
    kind = kind_of(p) if p.is_dir() else None
    if kind is not None:  # an slmkit directory: pinned by its meta.json, which records its own inputs' hashes
        ref.update(kind=kind, meta_sha256=hashlib.sha256((p / "meta.json").read_bytes()).hexdigest())
    return {"parent": ref, "recipe": recipe}


def new_meta(kind: str, *, parent: str | Path | None = None, recipe: dict[str, Any] | None = None,
             model_class: str | None = None, **fields: Any) -> dict[str, Any]:
    """A meta.json dict for a directory of `kind` made from `parent` by `recipe` (the stage's settings)."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; add it to slmkit.run.KINDS")
    meta: dict[str, Any] = {"kind": kind, "schema": SCHEMA}
    if model_class is not None:
        meta["model_class"] = model_class
    meta["lineage"] = lineage(parent, {"stage": kind, **(recipe or {})})
    return {**meta, **fields, "versions": versions(), "created": now()}


def write_meta(directory: str | Path, meta: dict[str, Any]) -> None:
    """Write `directory/meta.json` atomically (temp file + rename)."""
    write_json(Path(directory) / "meta.json", meta)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _kind(meta: dict[str, Any]) -> str | None:
    kind = meta.get("kind")
    if kind in KINDS:
        return kind
    if kind == "slmkit-run/1":  # slmkit 0.1: trainer and n-gram runs
        return "ngram" if meta.get("model_class") == "ngram" else "train"
    if kind is None and str(meta.get("format", "")).startswith("slmkit-shards/"):
        return "data"
    if kind is None and meta.get("model_class") == "imported":
        return "import"
    if kind is None and "step" in meta and "train" in meta:
        return "checkpoint"
    return None


def kind_of(path: str | Path) -> str | None:
    """What slmkit wrote at `path` (one of KINDS), or None when it is not a directory slmkit recognises as its own."""
    meta = _load(Path(path) / "meta.json")
    return None if meta is None else _kind(meta)


def read_meta(path: str | Path, *, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """meta.json of a directory slmkit wrote, with "kind" filled in for directories from before the schema had one.
    A missing, corrupt or foreign meta.json — or one of another kind than `kinds` — is a one-line error."""
    path = Path(path)
    file = path / "meta.json"
    if not path.exists():
        raise SlmError(f"no such directory: {path}")
    if not file.exists():
        raise SlmError(f"{path} is not an slmkit directory (no meta.json)")
    meta = _load(file)
    if meta is None:
        raise SlmError(f"{file} is not valid JSON; the file is truncated or corrupt")
    kind = _kind(meta)
    if kind is None:
        raise SlmError(f"{file} was not written by slmkit (no known kind)")
    if kinds is not None and kind not in kinds:
        want = " or ".join(KINDS[k] for k in kinds)
        raise SlmError(f"{path} holds {KINDS[kind]}, not {want}")
    return {**meta, "kind": kind}


def model_class(meta: dict[str, Any]) -> str:
    """dense | moe | ngram | imported: recorded by the stage that wrote the model, derived only for old runs."""
    if meta.get("model_class"):
        return meta["model_class"]
    return "moe" if (meta.get("model") or {}).get("moe_experts", 0) else "dense"


def check_out(out: str | Path, *, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> bool:
    """Decide whether a stage may write `out`; True when an existing directory will be replaced.

    Allowed: `out` does not exist, is an empty directory, or (with `overwrite`) is a directory slmkit wrote that is
    not one of this command's `inputs` and does not contain one. Anything else is refused with one line, untouched.
    """
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise SlmError(f"{out} is a file, not a directory; choose another --out")
    if not any(out.iterdir()):
        return False
    if not overwrite:
        raise SlmError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    kind = kind_of(out)
    if kind is None:
        raise SlmError(f"refusing to overwrite {out}: it was not written by slmkit (no slmkit meta.json); "
                       "remove it yourself or choose another --out")
    resolved = out.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if s == resolved or resolved in s.parents:
            raise SlmError(f"refusing to overwrite {out}: this command reads {src} from it; choose another --out")
    return True


def clear_out(out: str | Path, *, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """`check_out`, then remove a replaceable `out` (for stages that fill their directory over time, like training;
    stages that write all at once replace it atomically with `fsutil.atomic_dir` instead)."""
    if check_out(out, overwrite=overwrite, inputs=inputs):
        shutil.rmtree(out)
