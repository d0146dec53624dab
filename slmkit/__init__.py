"""slmkit: build, train, shrink, compare and ship small language models on the CPU you have.

>>> from slmkit import LLM
>>> LLM.load("runs/quickstart").generate("ROMEO:")  # doctest: +SKIP

`LLM` is imported on first use (PEP 562), so `import slmkit.train` loads the trainer and not the inference kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slmkit.config import ModelConfig, TrainConfig
from slmkit.data import load_split, prepare
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import Tokenizer

# `train` is also the name of a subpackage: bound here, after it, so `slmkit.train` is the function as documented
from slmkit.train import TrainResult, train

__version__ = "0.1.0"

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
    # LLM is imported on first use: it brings the inference engine and its C kernels, which training never needs
    if name == "LLM":
        value = importlib.import_module("slmkit.api").LLM
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")


if TYPE_CHECKING:
    from slmkit.api import LLM
