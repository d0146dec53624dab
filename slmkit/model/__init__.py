"""Model definitions: the transformer (`GPT`) and its parts."""

from slmkit.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
