"""slmkit: build, train, shrink, compare and ship small language models on the CPU you have.

>>> from slmkit import LLM
>>> LLM.load("runs/quickstart").generate("ROMEO:")  # doctest: +SKIP

The names below are imported on first use (PEP 562), so `import slmkit.train` loads the trainer and not the
inference kernels, and `import slmkit` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "GPT": "slmkit.model",
    "LLM": "slmkit.api",
    "ModelConfig": "slmkit.config",
    "SamplingParams": "slmkit.sampling",
    "SlmError": "slmkit.errors",
    "Tokenizer": "slmkit.tokenizer",
    "TrainConfig": "slmkit.config",
    "TrainResult": "slmkit.train",
    "load_split": "slmkit.data",
    "prepare": "slmkit.data",
    "train": "slmkit.train",
}

__all__ = [
    "GPT",
    "LLM",
    "ModelConfig",
    "SamplingParams",
    "SlmError",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "load_split",
    "prepare",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'slmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from slmkit.api import LLM
    from slmkit.config import ModelConfig, TrainConfig
    from slmkit.data import load_split, prepare
    from slmkit.errors import SlmError
    from slmkit.model import GPT
    from slmkit.sampling import SamplingParams
    from slmkit.tokenizer import Tokenizer
    from slmkit.train import TrainResult, train
