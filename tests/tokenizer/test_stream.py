"""TextStream: the text given out, piece by piece, is exactly the decoded text up to the first stop string."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.stream import TextStream

TOK = Tokenizer.train("byte", ["x"])  # ids are UTF-8 bytes: any byte sequence, split anywhere


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab é€\n", max_size=40), stops=st.lists(st.text(alphabet="ab é\n", min_size=1,
                                                                               max_size=3), max_size=3))
def test_pieces_are_the_text_before_the_first_stop(text, stops):
    ts = TextStream(TOK, stops)
    pieces = []
    for b in text.encode():
        pieces.append(ts.push(b))
        if ts.stopped:
            break
    pieces.append(ts.flush())
    ends = [i for s in stops if (i := text.find(s)) >= 0]
    # the stream ends at the earliest position where some stop string is complete
    cut = min((i + len(s) for s in stops if (i := text.find(s)) >= 0), default=None)
    want = text if cut is None else text[: min(i for s in stops if (i := text[:cut].find(s)) >= 0)]
    assert "".join(pieces) == want
    assert ts.stopped == bool(ends)
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_a_split_character_waits_for_its_last_byte():
    ts = TextStream(TOK)
    e = "é".encode()
    assert ts.push(e[0]) == "" and ts.push(e[1]) == "é"
    assert TextStream(TOK).push(e[0]) == "" and ts.flush() == ""


def test_empty_stop_is_refused():
    with pytest.raises(ValueError):
        TextStream(TOK, [""])
