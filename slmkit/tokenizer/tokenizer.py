"""`Tokenizer`: one wrapper over HF `tokenizers` for the byte, char and byte-level BPE kinds.

`tokenizer.json` is the only on-disk format, so `tokenizers.Tokenizer.from_file` and transformers'
`PreTrainedTokenizerFast(tokenizer_file=...)` read our files unchanged. The kind is not stored as an extra field
(`tokenizers` rejects unknown keys); it is read back from the file's shape:

- byte: BPE model whose vocab is the 256 ByteLevel characters with id == byte value, no merges.
- char: WordLevel model over single characters (ids in sorted character order), Split-per-character pre-tokenizer.
- bpe: byte-level BPE with merges; its spec is `bpe:<vocab_size>` (a small corpus can stop short of the N asked for).

Pretrained tokenizers (imported from GGUF or a transformers checkpoint) keep their own specials; their roles (bos, eos,
pad), whether a BOS is prepended, and the chat template live beside tokenizer.json in `tokenizer_config.json`, under
the key names transformers uses, so an exported directory needs no conversion.

The specials `<|bos|>`, `<|eos|>`, `<|pad|>` of slmkit's own tokenizers always take the last three ids. They are
produced only by id (`encode(..., bos=True)`): a literal "<|bos|>" inside text is encoded as ordinary text, so
documents cannot forge a document boundary and `decode(encode(s)) == s` holds for every string. (transformers, loading
the same file, does match literal special strings in text — that setting, `encode_special_tokens`, is not stored in
tokenizer.json.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from slmkit.errors import SlmError
from slmkit.fsutil import write_bytes

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
MAX_VOCAB = 1_000_000
CONFIG_FILE = "tokenizer_config.json"
# The chat template of a model without one of its own (everything trained here): "User: …" / "Assistant: …" lines.
# It lives here, under both the server that prompts with it and fine-tuning that trains on it, so both render alike.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")
# End-of-turn / end-of-text specials of common pretrained vocabularies: generation stops at any of them.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, the alphabet of the ByteLevel pre-tokenizer and decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


_CHAR_BYTE = {c: b for b, c in _bytes_to_unicode().items()}  # also the byte kind's vocab: token char → id == byte


def _byte_level(tk: tokenizers.Tokenizer, use_regex: bool = True) -> tokenizers.Tokenizer:
    # add_prefix_space=False: a prefix space would break decode(encode(s)) == s.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tk.decoder = decoders.ByteLevel()
    return tk


def _parse_spec(spec: str) -> tuple[str, int | None]:
    kind, _, n = spec.partition(":")
    if kind in ("byte", "char") and not n:
        return kind, None
    if kind == "bpe":
        if not n.isdigit():
            raise SlmError(f"tokenizer spec {spec!r} needs a vocab size, e.g. bpe:4096")
        lo = 256 + len(SPECIALS)
        if not lo <= int(n) <= MAX_VOCAB:
            raise SlmError(f"tokenizer spec {spec!r}: vocab size must be in [{lo}, {MAX_VOCAB:_}] (bytes + specials)")
        return kind, int(n)
    raise SlmError(f"unknown tokenizer spec {spec!r}; use byte, char, bpe:N (e.g. bpe:4096) or a tokenizer.json path")


class Tokenizer:
    """Text ↔ token ids. Build with `train`, `load` or `from_str`; ids `vocab_size-3..-1` are bos, eos, pad.

    >>> tok = Tokenizer.train("byte", [])
    >>> tok.encode("hé", bos=True), tok.vocab_size
    ([256, 104, 195, 169], 259)
    """

    kind: str
    spec: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    sha256: str

    def __init__(
        self, tk: tokenizers.Tokenizer, origin: str = "tokenizer", config: dict[str, Any] | None = None
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`. `config` (a pretrained tokenizer's tokenizer_config.json) names its specials;
        without it the tokenizer must be one of slmkit's own (byte / char / bpe with the <|bos|> specials)."""
        # Runtime-only switch (not saved): literal special strings in text are plain text, never control tokens.
        tk.encode_special_tokens = True
        self._tk = tk
        self._tk_specials: tokenizers.Tokenizer | None = None
        self._json = tk.to_str(pretty=True)
        self.sha256 = hashlib.sha256(self._json.encode()).hexdigest()
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.config = dict(config) if config is not None else None
        parsed = json.loads(self._json)
        model = parsed["model"]
        self._special_ids = frozenset(t["id"] for t in parsed.get("added_tokens", []) if t.get("special"))
        if config is None:
            ids = [tk.token_to_id(s) for s in SPECIALS]
            for s, i in zip(SPECIALS, ids, strict=True):
                if i is None:
                    raise SlmError(f"{origin} is not an slmkit tokenizer: it has no {s} token "
                                   f"(a pretrained tokenizer needs its {CONFIG_FILE} beside it)")
            self.bos_id, self.eos_id, self.pad_id = ids
            self.add_bos, self.chat_template = True, None
        else:
            self.bos_id, self.eos_id, self.pad_id = self._config_ids(config, origin)
            self.add_bos = bool(config.get("add_bos_token", False))
            self.chat_template = config.get("chat_template")
        ends = {self.eos_id, *(i for t in _END_TOKENS if (i := tk.token_to_id(t)) is not None)}
        self.stop_ids = frozenset(ends | ({self.bos_id} if config is None else set()))
        if model["type"] == "WordLevel" and config is None:
            self.kind = self.spec = "char"
            self._chars = frozenset(model["vocab"])
        elif model["type"] == "BPE" and not model["merges"] and model["vocab"] == _CHAR_BYTE:
            self.kind = self.spec = "byte"
        elif model["type"] == "BPE" and (config is None or set("".join(model["vocab"])) <= _CHAR_BYTE.keys()):
            self.kind, self.spec = "bpe", f"bpe:{self.vocab_size}"
        else:
            raise SlmError(f"{origin}: unsupported tokenizer model {model['type']!r}; slmkit reads byte, char and "
                           "byte-level BPE tokenizers")
        if config is not None:
            self.spec = f"pretrained:{self.vocab_size}"

    def _config_ids(self, config: dict[str, Any], origin: str) -> tuple[int, int, int]:
        def role(key: str) -> int | None:
            tok = config.get(key)
            if isinstance(tok, dict):  # transformers may store AddedToken dicts
                tok = tok.get("content")
            if tok is None:
                return None
            i = self._tk.token_to_id(tok)
            if i is None:
                raise SlmError(f"{origin}: {CONFIG_FILE} names {key}={tok!r}, which is not in the vocabulary")
            return i

        eos = role("eos_token")
        if eos is None:
            raise SlmError(f"{origin}: {CONFIG_FILE} must name an eos_token")
        bos = role("bos_token")
        pad = role("pad_token")
        return (eos if bos is None else bos), eos, (eos if pad is None else pad)

    def __repr__(self) -> str:
        return f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]!r})"

    @classmethod
    def train(cls, spec: str, texts: Iterable[str]) -> Tokenizer:
        """Build a tokenizer from `spec` ("byte" | "char" | "bpe:N", N counting the specials), streaming `texts`.

        >>> Tokenizer.train("bpe:300", ["abab abab"] * 10).kind
        'bpe'
        """
        kind, n = _parse_spec(spec)
        if kind == "byte":  # nothing to learn: `texts` is not read
            tk = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=_CHAR_BYTE, merges=[])), use_regex=False)
        elif kind == "char":
            chars: set[str] = set()
            for text in texts:
                chars.update(text)
            if not chars:
                raise SlmError("cannot train a char tokenizer on empty text")
            tk = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(sorted(chars))}, unk_token=None))
            tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newlines too
            tk.decoder = decoders.Fuse()  # concatenate: the default decoder would join tokens with spaces
        else:
            assert n is not None
            tk = _byte_level(tokenizers.Tokenizer(models.BPE()))
            # Specials are added after training so they take the last ids, as for byte and char.
            trainer = trainers.BpeTrainer(
                vocab_size=n - len(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
            )
            tk.train_from_iterator(texts, trainer)
        tk.add_special_tokens(list(SPECIALS))
        return cls(tk)

    @classmethod
    def from_str(cls, json_text: str, config: dict[str, Any] | None = None) -> Tokenizer:
        """Parse the text of a tokenizer.json written by `to_str`/`save` (+ a pretrained tokenizer's config)."""
        return cls._parse(json_text, "tokenizer", config)

    @classmethod
    def _parse(cls, json_text: str, origin: str, config: dict[str, Any] | None = None) -> Tokenizer:
        try:
            tk = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SlmError(f"{origin} is not a valid tokenizer.json ({msg}); re-create it with "
                           "`slm data prepare`") from None
        return cls(tk, origin, config)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer.json file. `Tokenizer.load("data/tokenizer.json")`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SlmError(f"tokenizer file not found: {path}") from None
        except IsADirectoryError:
            raise SlmError(f"{path} is a directory; pass the tokenizer.json file inside it") from None
        except UnicodeDecodeError:
            raise SlmError(f"{path} is not a valid tokenizer.json (not UTF-8 text)") from None
        config = None
        if (side := path.with_name(CONFIG_FILE)).exists():
            try:
                config = json.loads(side.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SlmError(f"{side} is not valid JSON ({e}); the file is truncated or corrupt") from None
        return cls._parse(text, str(path), config)

    def to_str(self) -> str:
        """The canonical tokenizer.json text; `sha256` is its hash."""
        return self._json

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (+ tokenizer_config.json beside it for a pretrained tokenizer); the file's
        sha256 equals `self.sha256`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, self._json.encode())
        if self.config is not None:
            write_bytes(path.with_name(CONFIG_FILE), (json.dumps(self.config, indent=2) + "\n").encode())

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            template: str | None = None) -> str:
        """Render chat `messages` ([{"role": ..., "content": ...}]) with the tokenizer's Jinja chat template (or
        `template`, e.g. the server's plain template for a model without one), as transformers does; encode the
        result with `specials=True`.

        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        template = template or self.chat_template
        if not template:
            raise SlmError("this tokenizer has no chat template (only imported chat models carry one)")
        import jinja2.sandbox  # a template comes from a model file: render it sandboxed

        def raise_exception(message: str) -> None:  # what HF templates call to refuse a conversation
            raise jinja2.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        cfg = self.config or {}
        try:
            return env.from_string(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
                bos_token=cfg.get("bos_token", ""), eos_token=cfg.get("eos_token", ""))
        except jinja2.TemplateError as e:
            raise SlmError(f"the chat template refused these messages: {e}") from None

    def encode(self, text: str, bos: bool = False, specials: bool = False) -> list[int]:
        """Token ids of `text`; no specials unless `bos=True` (then `bos_id` comes first) or `specials=True` (special
        strings in the text, e.g. a rendered chat template's <|im_start|>, become their control tokens)."""
        return self.encode_batch([text], bos=bos, specials=specials)[0]

    def encode_batch(self, texts: list[str], bos: bool = False, specials: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel in the Rust encoder."""
        if specials:
            if self._tk_specials is None:
                self._tk_specials = tokenizers.Tokenizer.from_str(self._json)  # encode_special_tokens off: matched
            out = [e.ids for e in self._tk_specials.encode_batch_fast(texts, add_special_tokens=False)]
        elif self.kind == "byte":
            # ids are the UTF-8 bytes by construction; skipping the Rust pipeline is ~30x faster (tests check parity).
            try:
                out = [list(t.encode("utf-8")) for t in texts]
            except UnicodeEncodeError as e:
                raise SlmError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        else:
            try:
                out = [e.ids for e in self._tk.encode_batch_fast(texts, add_special_tokens=False)]
            except Exception as e:
                raise self._encode_error(texts) or e from None
        if bos:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def _encode_error(self, texts: list[str]) -> SlmError | None:
        """Explain a failed encode in user terms; None = not a user error."""
        for text in texts:
            if not isinstance(text, str):
                return None
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return SlmError(f"text is not valid Unicode ({e.reason} at character {e.start})")
            if self.kind == "char":
                missing = next((c for c in text if c not in self._chars), None)
                if missing is not None:
                    return SlmError(
                        f"character {missing!r} is not in the char tokenizer's vocabulary: a char tokenizer only knows "
                        "the characters of its training corpus; use a byte or bpe tokenizer for open text"
                    )
        return None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, specials included as their strings; `decode(encode(s)) == s`."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token `id` stands for (b"" for specials); concatenate them to decode a stream."""
        if id in (self.bos_id, self.eos_id, self.pad_id) or id in self._special_ids:
            return b""
        token = self._tk.id_to_token(id)
        if token is None:
            raise IndexError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        if self.kind == "char" or not all(c in _CHAR_BYTE for c in token):  # char vocab, or a plain added token
            return token.encode("utf-8")
        return bytes(_CHAR_BYTE[c] for c in token)
