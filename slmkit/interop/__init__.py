"""Interchange with other tools: import GGUF (llama.cpp) and transformers checkpoints as native slmkit checkpoints.

>>> from slmkit.interop import import_gguf, import_hf
>>> import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2")
"""

from slmkit.interop.gguf import import_gguf
from slmkit.interop.hf import import_hf

__all__ = ["import_gguf", "import_hf"]
