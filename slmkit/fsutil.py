"""Atomic file and directory writes: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (never whole: corpora and model files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as pretty JSON to `path` via a temp file + rename."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; a finished artifact gets normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it is renamed to `final`, on error removed.

    The rename is the commit point: a reader either sees no `final` or a complete one. An existing `final` is replaced
    only when it is empty, or with `overwrite` when it holds a meta.json (slmkit wrote it: `slmkit.run.check_out` is
    the full check, made by every stage before it starts; this one is the last line of defence).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        mask = _umask()
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700 directories
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():  # some writers (safetensors' save_file) make 0600 files: a finished artifact is shareable
                f.chmod(0o666 & ~mask)
        if final.exists() and (final.is_file() or any(final.iterdir())):
            if not overwrite:
                raise FileExistsError(final)
            if not (final / "meta.json").exists():
                raise FileExistsError(f"refusing to replace {final}: it holds no meta.json, so slmkit did not write it")
            # out of the way under a fresh name (never one a user could own), then the new one in, then delete
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # rename(2) replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
