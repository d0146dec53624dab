"""Process-wide runtime choices made once at an entry point: threads and numeric precision."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroups affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads. Oversubscribing is the worst CPU failure: two 2-thread jobs on 2 cores ran 20-40x
    slower, so default to exactly the cores we have and never more."""
    n = n or available_cores()
    torch.set_num_threads(n)
    return n


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Without it, oneDNN emulates bf16 and a bf16
    matmul measured ~4x *slower* than fp32 on an AVX-512 (no BF16) Xeon, so "auto" precision picks fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """'auto' → 'bf16' where the CPU has native bf16, else 'fp32'."""
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass (weights stay fp32 masters), or a no-op."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_autocast(x: torch.Tensor) -> bool:
    """Whether a CPU tensor `x` is being computed on under bf16 autocast."""
    cpu = x.device.type == "cpu"
    return cpu and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def console(stderr: bool = False) -> Any:
    """A rich Console for tables: the terminal's width on a terminal; 200 columns when piped or logged (rich's default
    of 80 there truncates wide tables such as `slm presets` and `slm compare` into unreadable "…" cells)."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal or os.environ.get("COLUMNS") else Console(stderr=stderr, width=200)


def release_freed_memory() -> None:
    """Give memory freed by Python/torch back to the OS (glibc's malloc_trim; a no-op elsewhere). Replacing a model's
    fp32 weights by packed ones frees many mid-sized blocks that glibc otherwise keeps in its heap, so a process that
    quantized in memory would go on holding most of the fp32 model's footprint."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc
            libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    """The C library, looked up once (find_library runs ldconfig), or None off Linux."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not (sys.platform.startswith("linux") and name):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None
