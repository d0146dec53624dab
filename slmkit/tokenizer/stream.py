"""Generated token ids → text, as it arrives: `LLM.stream` and the server (slmkit.serve) share these rules.

>>> ts = TextStream(tok, stop=["\\n\\n"])
>>> for id in ids:
...     piece = ts.push(id)          # text that is final, possibly ""
...     if ts.stopped: break          # a stop string was completed: the text before it was all given out
>>> rest = ts.flush()                 # what was held back, at the end of generation
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from slmkit.tokenizer.tokenizer import Tokenizer


class TextStream:
    """Token ids in, text pieces out. Bytes are decoded incrementally, so a multi-byte character split across tokens
    is never given out half-way; text that might still become the start of a `stop` string is held back until it
    cannot, and a completed stop string ends the stream with the text before it (the stop string is not given out).
    Special tokens (BOS/EOS/end-of-turn) contribute no text."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("a stop string must not be empty (it would stop before the first token)")
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # text that might still become a stop string
        self.text = ""  # everything decoded so far (up to the stop string once stopped)
        self.emitted = 0  # how much of `text` was given out
        self.stopped = False

    def push(self, id: int) -> str:
        """Add one generated token; return the text it makes final ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self.text += self._utf8.decode(self.tokenizer.token_bytes(id))
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        cut = min((i for s in self.stop if (i := self.text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            return self._take(cut)
        return self._take(len(self.text) - self._hold)

    def flush(self) -> str:
        """The end of generation: whatever was held back (and an incomplete trailing character, as U+FFFD)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : end], end
        return piece
