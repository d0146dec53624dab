"""Byte, char and byte-level BPE tokenizers, all stored as one HF `tokenizer.json`.

>>> tok = Tokenizer.train("char", ["to be or not to be"])
>>> tok.encode("to be", bos=True)
[7, 6, 4, 0, 1, 2]
>>> tok.decode(tok.encode("not to be"))
'not to be'
"""

from slmkit.tokenizer.tokenizer import SPECIALS, Tokenizer

__all__ = ["SPECIALS", "Tokenizer"]
