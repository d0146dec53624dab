"""slmkit: build, train, shrink, compare and ship small language models on the CPU you have.

>>> from slmkit import LLM
>>> LLM.load("runs/quickstart").generate("ROMEO:")  # doctest: +SKIP
"""

from slmkit.api import LLM
from slmkit.config import ModelConfig, TrainConfig
from slmkit.data import load_split, prepare
from slmkit.errors import SlmError
from slmkit.infer import SamplingParams
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer
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
