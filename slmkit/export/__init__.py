"""Interchange with other tools: import GGUF (llama.cpp) and transformers checkpoints as native slmkit checkpoints.

>>> from slmkit.export import import_gguf, import_hf
>>> import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2")
"""

from slmkit.export.gguf import import_gguf
from slmkit.export.hf import import_hf

__all__ = ["import_gguf", "import_hf"]
