"""Versions of the libraries that shape results, recorded in every meta.json."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("slmkit", "torch", "numpy", "tokenizers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
