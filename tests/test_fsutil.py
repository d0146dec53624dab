"""Atomic writes: the final name holds a complete artifact or nothing, with the permissions of an ordinary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slmkit.fsutil import atomic_dir, write_bytes


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_dir_gives_files_and_dir_the_umask_modes(tmp_path: Path, umask_022) -> None:
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    assert _mode(final) == 0o755
    assert _mode(final / "model.safetensors") == 0o644
    assert _mode(final / "sub" / "x.json") == 0o644


def test_atomic_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_when_asked_and_only_slmkit_dirs(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old").write_text("old")
    (tmp_path / ".ckpt.old").mkdir()  # a name the old implementation used as scratch and deleted
    with pytest.raises(FileExistsError), atomic_dir(final) as tmp:
        (tmp / "new").write_text("new")
    with pytest.raises(FileExistsError, match=r"no meta\.json"), atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.old", "ckpt"] and (final / "old").exists()
    (final / "meta.json").write_text("{}")
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.old", "ckpt"]


def test_atomic_dir_fills_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out/x").read_text() == "x"


def test_write_bytes_is_atomic_with_normal_mode(tmp_path: Path, umask_022) -> None:
    target = tmp_path / "meta.json"
    write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}" and _mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
