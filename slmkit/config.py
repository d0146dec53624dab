"""Typed configuration: `ModelConfig` (architecture) and `TrainConfig` (optimisation), with named presets.

Configs are plain dataclasses. YAML/JSON files are their serialised form; CLI flags override single fields. Every
field is validated in `__post_init__` with a message naming the field and the allowed values.

>>> cfg = ModelConfig.preset("gpt-0.8m", vocab_size=65)
>>> cfg.n_layer, cfg.n_embd
(4, 128)
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import tomllib
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self, Union, get_args, get_origin, get_type_hints

import yaml

from slmkit.errors import SlmError

Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu"]
Pos = Literal["learned", "sinusoidal", "rope", "none"]
Optimizer = Literal["adamw", "sgd", "muon"]
Schedule = Literal["cosine", "wsd", "constant"]
Precision = Literal["auto", "bf16", "fp32"]
AttentionKind = Literal["full", "local", "blocksparse", "linear", "lsh"]


def _check_choice(obj: Any, name: str, kind: Any) -> None:
    allowed = get_args(kind)
    if getattr(obj, name) not in allowed:
        raise SlmError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r} is invalid; allowed: {', '.join(allowed)}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SlmError(msg)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class _BadValue(ValueError):
    pass


def _describe(tp: Any) -> str:
    """A field type in words, for error messages: 'an integer', 'a number or none', 'one of gelu, swiglu'."""
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in sorted(get_args(tp), key=lambda a: a is type(None)))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}.get(
        tp, "a mapping" if get_origin(tp) is dict else "a list" if get_origin(tp) is list else str(tp))


def _convert(tp: Any, value: Any) -> Any:
    """`value` as field type `tp`. Strings are read as text for non-string types (`--set lr=1e-3`, and YAML 1.1, which
    loads `lr: 1e-3` as the string '1e-3'); anything else must already have the type (a bool is not an integer)."""
    text = isinstance(value, str)
    if tp is Any:
        return value
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (text and value.strip().lower() in ("none", "null", "~"))):
            return None
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):  # numbers before text
            try:
                return _convert(arg, value)
            except _BadValue:
                continue
        raise _BadValue
    if get_origin(tp) is Literal:
        if value in get_args(tp):
            return value
        raise _BadValue
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        raise _BadValue
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(value.strip()) if text else _no()
        except ValueError:
            raise _BadValue from None
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value.strip()) if text else _no()
        except ValueError:
            raise _BadValue from None
    if tp is str:
        if text:
            return value
        raise _BadValue
    if get_origin(tp) in (dict, list):
        parsed = yaml.safe_load(value) if text else value
        if isinstance(parsed, get_origin(tp)):
            return parsed
        raise _BadValue
    raise _BadValue


def _no() -> Any:
    raise _BadValue


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def convert_field(cls: type, name: str, value: Any, *, origin: str = "") -> Any:
    """`value` converted to the declared type of `cls.name`; a wrong type is a one-line error naming the field."""
    types_ = _field_types(cls)
    if name not in types_:
        raise SlmError(f"unknown {cls.__name__} field {name!r}; known: {', '.join(sorted(types_))}")
    try:
        return _convert(types_[name], value)
    except _BadValue:
        where = f"{origin}: " if origin else ""
        raise SlmError(f"{where}{cls.__name__}.{name} takes {_describe(types_[name])}, not {value!r}") from None


class _Serializable:
    """Dict/YAML/TOML round-trip shared by the config dataclasses: values are converted to each field's declared type
    (a wrong type names the field); unknown keys are an error, not silently dropped."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.init}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, origin: str = "") -> Self:
        d = {k: v for k, v in d.items() if k != "derived"}  # written by to_dict for the record; recomputed here
        known = set(_field_types(cls))
        unknown = sorted(set(d) - known)
        if unknown:
            raise SlmError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: convert_field(cls, k, v, origin=origin) for k, v in d.items()})

    def replace(self, **overrides: Any) -> Self:
        """A copy with some fields changed (validated again; derived fields are derived again)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def save(self, path: str | Path) -> None:
        from slmkit.fsutil import write_bytes

        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(self.to_dict())
        write_bytes(path, text.encode())

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file of field: value."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SlmError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SlmError(f"cannot read config {path}: {e}") from None
        try:
            if path.suffix == ".json":
                d = json.loads(text)
            elif path.suffix == ".toml":
                d = tomllib.loads(text)
            else:
                d = yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
            raise SlmError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise SlmError(f"config {path} must hold a mapping of field: value")
        return cls.from_dict(d, origin=str(path))


@dataclass
class ModelConfig(_Serializable):
    """Architecture of one transformer. GPT-2 style and Llama style are two settings of the same fields.

    GPT-2 style: pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True.
    Llama style: pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head < n_head (GQA), bias=False.
    """

    vocab_size: int = 256
    block_size: int = 256  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    n_embd: int = 128
    head_size: int | None = None  # None = n_embd / n_head; set when heads were pruned (attention width != n_embd)
    mlp: Mlp = "gelu"
    mlp_hidden: int | None = None  # None = 4*n_embd (gelu) or 8/3*n_embd rounded up to 32 (swiglu)
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    pos: Pos = "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    # attention kind (slmkit/model/attention.py); each kind reads only its own parameters below
    attention: AttentionKind = "full"
    attn_window: int = 64  # local: keys per query (t-w+1..t); lsh: most recent same-bucket keys per query
    attn_block: int = 32  # blocksparse: block size b (a query sees its own and the previous block)
    attn_global: int = 1  # blocksparse: the first g positions are visible to every later query
    attn_summary: int = 1  # blocksparse: the last c positions of each block are visible to every later block
    linear_features: int = 64  # linear (Performer FAVOR+): random features m
    linear_redraw: int = 0  # linear: redraw the features every n training forward passes (0 = never)
    lsh_buckets: int = 8  # lsh: buckets per hash round (even)
    lsh_hashes: int = 2  # lsh: hash rounds
    # feed-forward: Mixture-of-Experts when moe_experts > 0 (then mlp_hidden is the width of one expert)
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss per MoE layer (trained on, never reported)
    moe_capacity_factor: float | None = None  # None = no token dropping
    # parameter sharing and factorisation
    share_mlp: bool = False  # one FFN module used by every block (MobiLlama)
    share_blocks: int = 0  # >0: this many unique blocks, cycled over the n_layer layers (layer i uses block i % n)
    lowrank: int = 0  # >0: attention and MLP projections factorised as rank-r products (W ≈ B·A)
    # fields given as None and computed from the others (n_kv_head, mlp_hidden): to_dict() writes them back as None,
    # so a changed n_embd or n_head derives them again instead of carrying a stale value into the copy
    _derived: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, kind in (("mlp", Mlp), ("norm", Norm), ("pos", Pos), ("attention", AttentionKind)):
            _check_choice(self, name, kind)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"ModelConfig.{name}={v!r} must be a positive integer")
        if self.head_size is None:
            _check(
                self.n_embd % self.n_head == 0,
                f"ModelConfig.n_head={self.n_head} must divide n_embd={self.n_embd} (try n_head in "
                f"{[h for h in range(1, 33) if self.n_embd % h == 0][-4:]})",
            )
        else:
            _check(isinstance(self.head_size, int) and self.head_size > 0,
                   f"ModelConfig.head_size={self.head_size!r} must be a positive integer or None (n_embd / n_head)")
        derived = []
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
            derived.append("n_kv_head")
        _check(
            self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
            f"ModelConfig.n_kv_head={self.n_kv_head} must be a positive divisor of n_head={self.n_head}",
        )
        _check(self.pos != "rope" or self.head_dim % 2 == 0,
               f"ModelConfig: pos='rope' needs an even head_dim, got {self.head_dim}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == "gelu" else 32 * math.ceil(8 * self.n_embd / 3 / 32)
            derived.append("mlp_hidden")
        self._derived = tuple(derived)
        _check(self.mlp_hidden > 0, f"ModelConfig.mlp_hidden={self.mlp_hidden} must be positive")
        _check(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout={self.dropout} must be in [0, 1)")
        _check(self.norm_eps > 0 and self.init_std > 0, "ModelConfig.norm_eps and init_std must be positive")
        self._check_spectrum()

    def _check_spectrum(self) -> None:
        """Attention-kind, MoE, sharing and low-rank fields: each checked only when its feature is on."""
        for name in ("attn_window", "attn_block", "linear_features", "lsh_buckets", "lsh_hashes"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"ModelConfig.{name}={v!r} must be a positive integer")
        for name in ("attn_global", "attn_summary", "linear_redraw", "moe_experts", "share_blocks", "lowrank"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"ModelConfig.{name}={v!r} must be an integer >= 0")
        T = self.block_size
        if self.attention in ("local", "lsh"):
            _check(self.attn_window <= T, f"ModelConfig.attn_window={self.attn_window} must be <= block_size={T} "
                                          f"(a window as long as the context is just attention='full')")
        if self.attention == "blocksparse":
            _check(self.attn_block <= T, f"ModelConfig.attn_block={self.attn_block} must be <= block_size={T}")
            _check(self.attn_global < T, f"ModelConfig.attn_global={self.attn_global} must be < block_size={T}")
            _check(self.attn_summary <= self.attn_block,
                   f"ModelConfig.attn_summary={self.attn_summary} must be <= attn_block={self.attn_block}")
        if self.attention == "lsh":
            _check(self.lsh_buckets >= 2 and self.lsh_buckets % 2 == 0,
                   f"ModelConfig.lsh_buckets={self.lsh_buckets} must be an even number >= 2")
            _check(self.n_kv_head == self.n_head, f"ModelConfig: attention='lsh' shares queries and keys, so "
                                                  f"n_kv_head={self.n_kv_head} must equal n_head={self.n_head}")
        if self.moe_experts:
            _check(self.moe_experts >= 2, f"ModelConfig.moe_experts={self.moe_experts} must be 0 (dense) or >= 2")
            _check(isinstance(self.moe_top_k, int) and 1 <= self.moe_top_k <= self.moe_experts,
                   f"ModelConfig.moe_top_k={self.moe_top_k} must be in [1, moe_experts={self.moe_experts}]")
            _check(self.moe_aux_loss_coef >= 0, f"ModelConfig.moe_aux_loss_coef={self.moe_aux_loss_coef} must be >= 0")
            _check(self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
                   f"ModelConfig.moe_capacity_factor={self.moe_capacity_factor} must be > 0 or None (no dropping)")
            _check(not self.lowrank, "ModelConfig: lowrank applies to dense projections; use moe_experts=0 or "
                                     "lowrank=0")
        if self.share_blocks:
            _check(self.share_blocks <= self.n_layer,
                   f"ModelConfig.share_blocks={self.share_blocks} must be <= n_layer={self.n_layer} (0 = no sharing)")
        if self.lowrank:
            lo = min(self.n_embd, self.mlp_hidden)
            _check(self.lowrank < lo, f"ModelConfig.lowrank={self.lowrank} must be < min(n_embd, mlp_hidden)={lo}: "
                                      f"a factorisation that is not smaller than the layer saves nothing")

    def to_dict(self) -> dict[str, Any]:
        """The fields as given (derived ones as None) plus a "derived" record of the values they resolved to."""
        d = super().to_dict()
        for name in self._derived:
            d[name] = None
        if self._derived:
            d["derived"] = {name: getattr(self, name) for name in self._derived}
        return d

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated attention heads, n_head · head_dim: n_embd unless heads were pruned."""
        return self.n_head * self.head_dim

    def variant(self) -> str:
        """Short label of the spectrum features in use, e.g. 'local w64', 'moe 8/top2', 'shared ffn' (else 'dense')."""
        parts = {
            "full": [], "local": [f"local w{self.attn_window}"], "linear": [f"linear m{self.linear_features}"],
            "blocksparse": [f"sparse b{self.attn_block}"], "lsh": [f"lsh {self.lsh_buckets}x{self.lsh_hashes}"],
        }[self.attention]
        if self.moe_experts:
            parts.append(f"moe {self.moe_experts}/top{self.moe_top_k}")
        if self.share_mlp:
            parts.append("shared ffn")
        if self.share_blocks:
            parts.append(f"{self.share_blocks} blocks")
        if self.lowrank:
            parts.append(f"rank {self.lowrank}")
        return ", ".join(parts) or "dense"

    @staticmethod
    def presets() -> dict[str, dict[str, Any]]:
        return dict(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, with optional field overrides (typically `vocab_size` from the data)."""
        if name not in PRESETS:
            raise SlmError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


_GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
_LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True)

# Sizes are non-embedding parameters (12·L·d² for GPT-2 style); embeddings add vocab·d on top.
PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU config for char-level Shakespeare: 4 layers, 4 heads, 128 dims, context 64.
    "gpt-0.8m": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=64),
    # GPT-2 block + RoPE: fastest to a given char-level loss on 2 CPU cores (docs/benchmarks.md, time_to_loss)
    "gpt-rope-0.8m": dict(_GPT2, pos="rope", bias=False, n_layer=4, n_head=4, n_embd=128, block_size=64),
    "llama-0.8m": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128),
    # quickstart size: trains to recognisable text in a few minutes on 2 cores.
    "llama-3m": dict(_LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=192, block_size=256),
    "gpt-rope-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=6, n_embd=192, block_size=128),
    "gpt-3m": dict(_GPT2, n_layer=6, n_head=6, n_embd=192, block_size=256),
    "llama-10m": dict(_LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=512),
    "llama-30m": dict(_LLAMA, n_layer=10, n_head=8, n_kv_head=4, n_embd=512, block_size=512),
    # --- the model spectrum. Byte-level super-tiny models: vocab = 256 bytes + 3 specials (the byte tokenizer).
    "byte-0.8m": dict(_GPT2, pos="rope", bias=False, vocab_size=259, n_layer=4, n_head=4, n_embd=128, block_size=256),
    "byte-3m": dict(_GPT2, pos="rope", bias=False, vocab_size=259, n_layer=8, n_head=4, n_embd=176, block_size=256),
    # MoE with gpt-rope-3m's active parameters: 8 experts of half the dense width, top-2 (fine-grained experts, as
    # DeepSeekMoE), so a token passes through 2·384 = 768 hidden units per layer like the dense 4·192 MLP.
    "moe-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=6, n_embd=192, block_size=128,
                   mlp_hidden=384, moe_experts=8, moe_top_k=2),
    # gpt-rope-3m's shape at a 256-token context with sub-quadratic attention
    "local-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=6, n_embd=192, block_size=256,
                     attention="local", attn_window=64),
    "blocksparse-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=6, n_embd=192, block_size=256,
                           attention="blocksparse", attn_block=32, attn_global=4, attn_summary=2),
    "linear-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=6, n_embd=192, block_size=256,
                      attention="linear", linear_features=64),
    "lsh-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=6, n_embd=192, block_size=256,
                   attention="lsh", attn_window=32, lsh_buckets=8, lsh_hashes=2),
    # ~3M parameters spent differently: one FFN shared by all layers (MobiLlama) buys a wider model ...
    "shared-3m": dict(_GPT2, pos="rope", bias=False, n_layer=6, n_head=8, n_embd=256, block_size=128,
                      share_mlp=True),
    # ... or rank-64 factorised projections buy a wider and deeper one
    "lowrank-3m": dict(_GPT2, pos="rope", bias=False, n_layer=8, n_head=8, n_embd=256, block_size=128, lowrank=64),
}


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(text: str | float | int | None) -> float | None:
    """'90' / '90s' / '5m' / '1.5h' → seconds."""
    if text is None or isinstance(text, int | float):
        return None if text is None else float(text)
    m = _DURATION.match(text)
    if not m:
        raise SlmError(f"cannot read duration {text!r}; use e.g. 90s, 5m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class TrainConfig(_Serializable):
    """Optimisation and budget. A run stops at whichever of `max_steps` / `max_time` comes first."""

    # fields a resumed run may change: its budget and the threads it runs on (every other one is the run's recipe)
    RESUMABLE = ("max_steps", "max_time", "threads")

    optimizer: Optimizer = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    momentum: float = 0.9  # sgd only
    muon_lr: float = 0.05  # muon only: lr of the hidden matrices (Muon); embeddings, head, norms use lr (AdamW)
    grad_clip: float = 1.0  # 0 disables
    schedule: Schedule = "cosine"
    warmup_steps: int = 50
    decay_frac: float = 0.2  # wsd: final fraction of the run spent decaying
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    max_time: float | str | None = None  # seconds of training, or a duration: "90s", "5m", "1.5h"
    eval_interval: int = 100
    eval_batches: int = 20  # auto evaluation scores at most eval_batches × batch_size windows (the final one 4x)
    # windows of block_size tokens scored per evaluation: "auto" = up to the cap above, fewer when evaluation would
    # cost more than ~10 % of the training budget (a 5-step run is not dominated by scoring the whole split);
    # "all" = the whole val split every time; or a number. `slm eval` always scores what it is asked to
    eval_windows: int | Literal["auto", "all"] = "auto"
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 10
    precision: Precision = "auto"  # auto: bf16 autocast only where the CPU has native bf16 (see runtime.py)
    threads: int | None = None  # None = all cores this process may use
    seed: int = 1337
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded in meta.json

    def __post_init__(self) -> None:
        for name, kind in (("optimizer", Optimizer), ("schedule", Schedule), ("precision", Precision)):
            _check_choice(self, name, kind)
        self.max_time = parse_duration(self.max_time)
        _check(self.lr > 0, f"TrainConfig.lr={self.lr} must be positive (typical: 1e-3 to 6e-3 for small models)")
        _check(self.muon_lr > 0, f"TrainConfig.muon_lr={self.muon_lr} must be positive (typical: 0.02 to 0.05)")
        _check(0 <= self.min_lr_ratio <= 1, f"TrainConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.weight_decay >= 0, f"TrainConfig.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "TrainConfig.beta1/beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, f"TrainConfig.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        _check(0 < self.decay_frac <= 1, f"TrainConfig.decay_frac={self.decay_frac} must be in (0, 1]")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_batches", "ckpt_interval", "log_interval",
                     "keep_checkpoints"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"TrainConfig.{name}={v!r} must be a positive integer")
        _check(self.eval_windows in ("auto", "all") or (isinstance(self.eval_windows, int) and self.eval_windows > 0),
               f"TrainConfig.eval_windows={self.eval_windows!r} must be auto, all or a positive integer")
        _check(self.warmup_steps >= 0, f"TrainConfig.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.max_steps is None or self.max_steps > 0, f"TrainConfig.max_steps={self.max_steps} must be > 0")
        _check(self.max_time is None or self.max_time > 0, f"TrainConfig.max_time={self.max_time} must be > 0")
        _check(self.threads is None or self.threads > 0, f"TrainConfig.threads={self.threads} must be > 0")


def coerce_overrides(cls: type, pairs: list[str]) -> dict[str, Any]:
    """Parse `field=value` strings (from `--set`) into values of each field's declared type (int, float, bool, str,
    Literal choices, optional: `none`). A wrong type is a one-line error naming the field and the expected type.

    >>> coerce_overrides(TrainConfig, ["lr=1e-3", "max_steps=none", "compile=true"])
    {'lr': 0.001, 'max_steps': None, 'compile': True}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SlmError(f"--set expects field=value, got {pair!r}")
        out[key.strip()] = convert_field(cls, key.strip(), value, origin=f"--set {pair}")
    return out
