"""What fine-tuning reads: labelled texts (classification) and conversations (chat), split and tokenized in memory,
and the sampler that draws padded batches of them.

Labelled corpora: a directory with one subdirectory per label of .txt/.md files (`bbc-news` is one:
`business/001.txt`, ...), or a JSONL file with `text` and `label` on each line. A directory whose top level is
`train/`, `val/` (or `validation/`) and `test/` keeps that split; otherwise the split is stratified — every label
gets the same share of held-out examples — and seeded.

Conversations: a JSONL file (or a directory of them; `train.jsonl`/`val.jsonl` keep their split) with a `messages`
list of {"role", "content"} per line, rendered through the tokenizer's chat template (or the plain one) turn by turn
so the loss mask covers exactly the assistant replies (`render_chat`).

No packing: each conversation or text is its own row of a batch, padded on the right to the longest row. Attention
is causal, so the pads after a row's last token never reach it, and no row sees another's tokens — the leak packing
would have to prevent with a block-diagonal mask and position resets, which every attention kind (local, LSH,
linear, ...) would need to learn. The cost is the compute spent on pads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.data.corpora import Document, iter_documents, source_files, split_documents
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.tokenizer import PLAIN_TEMPLATE

SPLITS = ("train", "val", "test")
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Labelled:
    """Texts with labels, split three ways: train (fitted), val (early stopping, best checkpoint), test (reported).
    `labels` are the classes in a fixed (sorted) order: a label's index is its class id."""

    labels: list[str]
    splits: dict[str, list[tuple[str, int]]]  # split → [(text, class id)]
    source: str
    given: bool  # the split came with the data (train/ val/ test/ folders) rather than being drawn here

    def digest(self) -> str:
        """A hash of every text, label and split: a resumed run checks it still reads the same data."""
        h = hashlib.sha256()
        for split in SPLITS:
            for text, y in self.splits[split]:
                h.update(f"{split}\0{y}\0{len(text)}\0".encode())
                h.update(text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def _label_of(name: str, source: str) -> tuple[str | None, str]:
    """(given split or None, label) of a document named like `sports/199.txt` or `train/sports/199.txt`."""
    parts = name.split("/")
    split = _SPLIT_DIRS.get(parts[0]) if len(parts) > 2 else None
    if split is not None:
        parts = parts[1:]
    if len(parts) < 2:
        raise SlmError(f"labels missing: {source}/{name} is not inside a label directory; put each label's texts in "
                       f"their own folder (DIR/<label>/*.txt), or give JSONL lines with \"text\" and \"label\"")
    return split, parts[0]


def _read_labelled_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlmError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be like "
                               '{"text": "...", "label": "..."}') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SlmError(f'{path}:{lineno}: no string "text" field; each line must be like '
                               '{"text": "...", "label": "..."}')
            label = row.get("label")
            if label is None or isinstance(label, dict | list) or str(label) == "":
                raise SlmError(f'labels missing: {path}:{lineno} has no "label"; each line needs "text" and "label"')
            rows.append((row["text"], str(label)))
    return rows


def load_labelled(source: str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Labelled:
    """Read a labelled corpus (see the module docstring) and split it. A drawn split is stratified and seeded: per
    label, sorted by name, shuffled with `seed`, round(n·fraction) examples (at least one) to val and to test.
    `test_fraction=0` reports on val. The same arguments give the same split on any machine (bench/finetune.py
    scores its TF-IDF baseline on it).

    >>> data = load_labelled("bbc-news", seed=0)  # doctest: +SKIP
    >>> data.labels  # doctest: +SKIP
    ['business', 'entertainment', 'politics', 'sport', 'tech']
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise SlmError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) (val > 0) "
                       f"and together below 1")
    path = Path(source)
    by_split: dict[str | None, list[tuple[str, str, str]]] = {}  # given split → [(name, text, label)]
    if path.is_file() and path.suffix.lower() == ".jsonl":
        for i, (text, label) in enumerate(_read_labelled_jsonl(path)):
            by_split.setdefault(None, []).append((f"{i:09d}", text, label))
    else:
        source_files(source)  # a missing path or unknown corpus is reported before anything is read
        if path.is_file():
            raise SlmError(f"{source}: a labelled corpus is a directory with one folder per label, or a .jsonl file "
                           f"with \"text\" and \"label\" on each line")
        for doc in iter_documents(source):
            split, label = _label_of(doc.name, source)
            by_split.setdefault(split, []).append((doc.name, doc.text, label))
    if None in by_split and len(by_split) > 1:
        stray = by_split[None][0][0]
        raise SlmError(f"{source}: {stray} lies outside the train/val/test folders the other texts are in")
    given = None not in by_split
    if given:
        if "train" not in by_split:
            raise SlmError(f"{source} has {'/'.join(k for k in by_split if k)} folders but no train/ folder")
        held = by_split.get("val") or by_split.get("test") or []
        if not held:
            raise SlmError(f"{source} has a train/ folder but no val/ or test/ folder to hold out")
        splits = {"train": by_split["train"], "val": by_split.get("val") or held, "test": by_split.get("test") or held}
    else:
        splits = _stratified(by_split[None], seed, val_fraction, test_fraction)
    labels = sorted({label for _, _, label in splits["train"]})
    if len(labels) < 2:
        raise SlmError(f"{source} has a single class ({labels[0] if labels else 'none'}): a classifier needs at "
                       f"least two labels")
    for split in ("test", "val"):  # test first: a lone held-out folder serves as both, and test names it
        unseen = sorted({label for _, _, label in splits[split]} - set(labels))
        if unseen:
            raise SlmError(f"label {unseen[0]!r} appears in the {split} split of {source} but never in train; a "
                           f"classifier cannot predict a label it was not trained on — add training examples of it")
    ids = {label: i for i, label in enumerate(labels)}
    return Labelled(labels, {s: [(text, ids[label]) for _, text, label in rows] for s, rows in splits.items()},
                    source, given)


def _stratified(rows: list[tuple[str, str, str]], seed: int, val_fraction: float,
                test_fraction: float) -> dict[str, list[tuple[str, str, str]]]:
    by_label: dict[str, list[tuple[str, str, str]]] = {}
    for row in sorted(rows):
        by_label.setdefault(row[2], []).append(row)
    if len(by_label) < 2:
        raise SlmError(f"a single class ({next(iter(by_label), 'none')}): a classifier needs at least two labels")
    need = 2 + (test_fraction > 0)
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) < need:
            raise SlmError(f"label {label!r} has {len(group)} example(s); each label needs at least {need} (train, "
                           f"validation{', test' if need == 3 else ''})")
        order = rng.permutation(len(group))
        n_val = max(1, round(len(group) * val_fraction))
        n_test = max(1, round(len(group) * test_fraction)) if test_fraction > 0 else 0
        n_val = min(n_val, len(group) - n_test - 1)  # at least one left to train on
        picked = [group[i] for i in order]
        out["val"] += picked[:n_val]
        out["test"] += picked[n_val:n_val + n_test]
        out["train"] += picked[n_val + n_test:]
    if test_fraction == 0:
        out["test"] = out["val"]
    return out


# --- conversations -----------------------------------------------------------------------------------------------


def render_chat(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether the loss is on it (an assistant reply's token).

    The template is rendered once per assistant turn — the prompt before it (with the generation prompt, as a server
    would send it) and the conversation through it — and the text each adds is encoded on its own: the prompt part
    unmasked, the reply part masked. Encoding the parts separately tokenizes the prompt exactly as generation will
    see it. The model's own template ends a reply with its end-of-turn token, which is in the reply part, so the model
    learns to stop; the plain template (`slmkit.tokenizer.tokenizer.PLAIN_TEMPLATE`, for tokenizers without one) has
    none, so an EOS is appended to each reply. Turns after the last reply carry no loss and are dropped.
    """
    own = bool(tok.chat_template)
    template = tok.chat_template if own else PLAIN_TEMPLATE
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:k], add_generation_prompt=True, template=template)
        full = tok.apply_chat_template(messages[: k + 1], add_generation_prompt=False, template=template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise SlmError("the chat template does not render a conversation as a growing prefix (turn by turn), so "
                           "the assistant replies cannot be located; fine-tune with --task lm on rendered text")
        for text, on in ((prompt[len(done):], False), (full[len(prompt):], True)):
            part = tok.encode(text, bos=not ids and tok.add_bos, specials=own)
            ids += part
            mask += [on] * len(part)
        if not own:
            ids.append(tok.eos_id)
            mask.append(True)
        done = full
    return ids, mask


def _conversation(row: Any, where: str) -> list[dict[str, str]]:
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise SlmError(f'{where}: no "messages" list; each line must be like {{"messages": [{{"role": "user", '
                       f'"content": "..."}}, {{"role": "assistant", "content": "..."}}]}}')
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SlmError(f'{where}: each message needs a string "role" and "content"')
    if not any(m["role"] == "assistant" for m in msgs):
        raise SlmError(f"{where}: the conversation has no assistant turn; the loss is on assistant replies, so each "
                       f"conversation needs at least one")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


@dataclass
class Conversations:
    """Tokenized conversations per split: rows of (ids, mask), each at most `max_len` tokens."""

    splits: dict[str, list[tuple[list[int], list[bool]]]]
    source: str
    truncated: int  # conversations cut to max_len tokens (replies past the cut carry no loss)
    dropped: int  # conversations whose first reply starts past max_len: nothing to learn from

    def digest(self) -> str:
        h = hashlib.sha256()
        for split in ("train", "val"):
            for ids, mask in self.splits[split]:
                h.update(f"{split}\0".encode() + np.asarray(ids, np.int64).tobytes() + bytes(mask))
        return h.hexdigest()


def load_chat(source: str, tok: Tokenizer, *, max_len: int, seed: int = 0, val_fraction: float = 0.1) -> Conversations:
    """Read conversations (a .jsonl file or a directory of them), split them by a seeded hash of their position (as
    `slm data prepare` splits documents; `train.jsonl`/`val.jsonl` keep their split), render and tokenize them."""
    path = Path(source)
    files = [(p, n) for p, n in source_files(source) if p.suffix.lower() == ".jsonl"]
    if not files:
        raise SlmError(f"{source}: chat data is JSONL, one conversation per line ({{\"messages\": [...]}})")
    docs, where = [], {}
    for p, name in files:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    # a lone file's rows are named by line only: a file called train.jsonl must still be split
                    doc = Document(f"{lineno:09d}" if path.is_file() else f"{name}:{lineno}", line)
                    docs.append(doc)
                    where[doc.name] = f"{p}:{lineno}"
    if not docs:
        raise SlmError(f"{source} holds no conversations")
    splits: dict[str, list[tuple[list[int], list[bool]]]] = {"train": [], "val": []}
    truncated = dropped = 0
    for split, doc in split_documents(docs, seed, val_fraction):
        try:
            row = json.loads(doc.text)
        except json.JSONDecodeError as e:
            raise SlmError(f"{where[doc.name]}: invalid JSON ({e.msg})") from None
        ids, mask = render_chat(tok, _conversation(row, where[doc.name]))
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):  # position 0 is never a target
            dropped += 1
            continue
        splits[split].append((ids, mask))
    for split in ("train", "val"):
        if not splits[split]:
            raise SlmError(f"{source}: no conversation left in the {split} split (too few rows, or every reply starts "
                           f"past {max_len} tokens: raise --seq-len)")
    return Conversations(splits, source, truncated, dropped)


# --- batches -------------------------------------------------------------------------------------------------------


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids → (idx (B, T) padded on the right with `pad_id`, lengths (B,))."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return idx, torch.as_tensor([len(r) for r in rows], dtype=torch.long)


class RowSampler:
    """`batch_size` random row indices per call (with replacement, like the trainer's random windows); its RNG state
    is part of the checkpoint, so a resumed run draws the batches the uninterrupted one would have."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.B = n_rows, batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> np.ndarray:
        return self.rng.integers(0, self.n, size=self.B)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
