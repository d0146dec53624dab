"""The test tree's own rules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def test_test_file_names_are_unique():
    """pytest imports test files by basename (rootdir mode, no __init__.py): two test_x.py in different folders make
    the whole run fail to collect."""
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
