"""CPU kernels in C: weight-only int8 / int4 / bf16 / fp32 and sparse (CSR) matrix products for small batches, a
fused decode step for dense transformers (one token for each of a batch of sequences), and, for training, the
cross-entropy of rows of logits with their gradient (slmkit/csrc/kernels.c explains the numerics).

Why: decoding one token reads every weight once, so on CPU its speed is the memory bandwidth divided by the bytes of
the weights (fp32 4 per parameter, bf16 2, int8 1 + one fp32 scale per output row, int4 0.5 + one fp16 scale per
group of 32-128 weights). PyTorch does not get close at batch 1: its fp32 GEMV reaches about a third of the bandwidth
here, `torch._weight_int8pack_mm` with fp32 activations is slower than fp32, and ~600 small operators per token of a
30-layer model cost as much as the weight traffic. So this module compiles the C file with the system C compiler on
first use (`-O3 -march=native -fopenmp`; cached under ~/.cache/slmkit/kernels, keyed by source and CPU flags) and
calls it through ctypes (which releases the GIL).

The library links the OpenMP runtime that torch itself loaded, so its threads are torch's threads: no second pool
spinning against the first (two pools on 2 cores slow both by 20x+).

Without a C compiler (or with SLMKIT_NO_KERNELS=1) everything still works through PyTorch, only slower. A build that
fails says so once per process, in one line on stderr with the reason (compiler missing, its first error line, or
the timeout); SLMKIT_NO_KERNELS=1 skips the build silently.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_SOURCE = (Path(__file__).parent / "csrc" / "kernels.c").read_text()

_lib: ctypes.CDLL | bool | None = None  # None = not tried yet, False = unavailable
# A build takes seconds (docs/benchmarks.md); the first decode waits for it, so a compiler that hangs must not hold the
# user for long. 30 s leaves room for a loaded machine.
COMPILE_TIMEOUT_S = 30
KINDS = {torch.int8: 0, torch.bfloat16: 1, torch.float32: 2, torch.uint8: 3}  # uint8: int4, two weights a byte
QBLOCK = 64  # activations are quantized in blocks of this many values for int8 weights
TILE = 16  # kernels.c: int8 and int4 weights are multiplied in tiles of this many rows (with VNNI or AMX)
Q4BLOCK = 32  # int4: the weights' packing block, and the activations' quantization block
W_CSR32, W_CSR16 = 4, 5  # sparse weights: CSR with fp32 or bf16 values (kernels.c csr_matmul)
CSR_T_MIN = 4  # kernels.c: from this many activation rows on, the CSR product transposes them instead of gathering
# A matrix with at most this share of non-zero weights decodes faster as CSR than dense (fused.py picks it per
# matrix). Decided on the whole batch-1 decode step of a trained model pruned to 50-90 % (CSR forced vs dense,
# interleaved; docs/benchmarks.md): the crossover lies between 60 and 70 % zeros. Single matrices timed in a loop
# (bench/prune.py --csr-sweep) sit in cache and favour the dense kernel, so they do not decide it.
CSR_MAX_DENSITY = 0.3
# Prefill widens this many bytes of fp32 weights at a time: L2-sized, so PyTorch's GEMM finds them in cache.
WIDEN_BYTES = 1 << 20


# --- the C structs (kernels.c) ---------------------------------------------------------------------------------

# Model's scratch buffers, in the struct's order: the step's activations, then the MoE layers' (fused.py sizes them)
MODEL_SCRATCH = ("x", "xb", "qkv", "att", "hb", "ha", "scores")
MOE_SCRATCH = ("ew", "eg", "xe", "eo", "esel", "epair", "eplace", "estart")


class Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int), ("K", ctypes.c_int), ("kind", ctypes.c_int), ("group", ctypes.c_int),
                ("col", ctypes.c_void_p), ("off", ctypes.c_void_p), ("wsum", ctypes.POINTER(ctypes.c_int16))]


class Acts(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "qs", "b16", "xc", "bc", "xt", "xl", "ql")]


class Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("n1w", "n1b", "n2w", "n2b")] + \
               [(n, Mat) for n in ("qkv", "proj", "fc", "down")] + \
               [(n, ctypes.c_void_p) for n in ("kc", "vc", "ks", "vs")] + [("E", ctypes.c_int), ("k", ctypes.c_int),
                ("router", Mat), ("efc", ctypes.POINTER(Mat)), ("edown", ctypes.POINTER(Mat))] + \
               [(n, Mat) for n in ("qkv_a", "proj_a", "fc_a", "down_a")] + \
               [(n, ctypes.c_void_p) for n in ("feat", "ls", "lz", "rot")]


class Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("n_layer", "C", "nh", "nkv", "hd", "H", "max_len", "rmsnorm", "swiglu",
                                            "pos_kind", "window", "kv_kind")] + [("eps", ctypes.c_float)] + \
               [(n, ctypes.c_void_p) for n in ("emb", "pos_table", "cos", "sin", "nfw", "nfb")] + \
               [("head", Mat), ("layers", ctypes.POINTER(Layer))] + \
               [(n, ctypes.c_void_p) for n in MODEL_SCRATCH] + [("acts", Acts)] + \
               [(n, ctypes.c_void_p) for n in MOE_SCRATCH] + \
               [(n, ctypes.c_int) for n in ("attn", "bs_block", "bs_global", "bs_summary", "lin_feats", "lsh_rounds",
                                            "lsh_buckets", "lsh_keys")] + [("lr", ctypes.c_void_p)]


def _torch_openmp() -> Path | None:
    """The OpenMP runtime torch loaded (its wheel bundles libgomp), so the kernel shares torch's thread pool."""
    lib_dir = Path(torch.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libgomp*.so*"))
    return found[0] if found else None


def _cpu_key() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    extra = os.environ.get("SLMKIT_KERNEL_FLAGS", "")
    return hashlib.sha256((_SOURCE + flags + extra + platform.machine() + sys.version).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL | None:
    """The compiled library, or None (after one line on stderr saying why, unless the kernels are switched off)."""
    if sys.platform != "linux" or os.environ.get("SLMKIT_NO_KERNELS"):
        return None
    cache = Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit")) / "kernels"
    so = cache / f"kernels-{_cpu_key()}.so"
    try:
        if not so.exists():
            _compile(so)
        lib = ctypes.CDLL(str(so))
    except (_BuildError, OSError) as e:  # OSError: the dynamic loader refused the library
        print(f"slmkit: C kernels unavailable, using PyTorch (slower): {e}. SLMKIT_NO_KERNELS=1 skips the build.",
              file=sys.stderr)
        return None
    lib.slm_matmul.argtypes = [ctypes.POINTER(Mat), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.POINTER(Acts), ctypes.c_int]
    lib.slm_matmul.restype = None
    lib.slm_widen.argtypes = [ctypes.POINTER(Mat), ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.slm_widen.restype = None
    lib.slm_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.slm_decode_step.restype = None
    lib.slm_decode_batch.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.slm_decode_batch.restype = None
    lib.slm_features.restype = ctypes.c_int
    lib.slm_xent_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.slm_xent_rows.restype = None
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.slm_rmsnorm_fwd.argtypes = [P, P, I, I, ctypes.c_float, P, P, I]
    lib.slm_rmsnorm_bwd.argtypes = [P, I, P, P, P, I, I, P, I]
    lib.slm_swiglu_fwd.argtypes = [P, I, I, P, I]
    lib.slm_swiglu_bwd.argtypes = [P, P, I, I, P, I]
    lib.slm_rope.argtypes = [P, ctypes.c_long, I, I, I, I, I, P, P, ctypes.c_float, P, I]
    for f in (lib.slm_rmsnorm_fwd, lib.slm_rmsnorm_bwd, lib.slm_swiglu_fwd, lib.slm_swiglu_bwd, lib.slm_rope):
        f.restype = None
    return lib


class _BuildError(Exception):
    """Why the kernels could not be built or loaded, in a few words."""


def _compile(so: Path) -> None:
    omp = _torch_openmp()
    cc = os.environ.get("CC", "cc")
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(_SOURCE)
            link = [f"-L{omp.parent}", f"-l:{omp.name}", f"-Wl,-rpath,{omp.parent}"] if omp else []
            # SLMKIT_KERNEL_FLAGS: extra compiler flags, e.g. "-mno-avx512vnni -mno-avx512bf16" to test other paths
            extra = os.environ.get("SLMKIT_KERNEL_FLAGS", "").split()
            cmd = [cc, "-O3", "-march=native", *extra, "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out), *link]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True, errors="replace",
                               timeout=COMPILE_TIMEOUT_S)
            except FileNotFoundError:
                raise _BuildError(f"C compiler {cc!r} not found (install gcc or set CC)") from None
            except subprocess.TimeoutExpired:
                raise _BuildError(f"{cc} took over {COMPILE_TIMEOUT_S} s to compile kernels.c") from None
            except subprocess.CalledProcessError as e:
                raise _BuildError(_first_error(e.stderr or e.stdout or "", tmp) or
                                  f"{cc} exited with status {e.returncode} and no message") from None
            os.replace(out, so)  # atomic: a concurrent builder sees no half-written library
    except OSError as e:  # cannot run the compiler, or cannot write the cache directory
        raise _BuildError(f"{type(e).__name__}: {e}") from None


def _first_error(output: str, tmp: str) -> str:
    """The compiler's first error line (else its first line), without the temporary directory's path."""
    lines = [ln.replace(tmp + os.sep, "").strip() for ln in output.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")


def available() -> bool:
    """True when the compiled kernel can be used (built on first call)."""
    global _lib
    if _lib is None:
        _lib = _build() or False
    return bool(_lib)


def features() -> set[str]:
    """The instruction paths the compiled kernels use: "vnni" (int8 and int4 weights × int8 activations), "bf16"
    (bf16 dot products), "avx512", "avx2" (AVX2 + FMA: the int8 and int4 dots where VNNI is missing, every vector
    loop where AVX-512 is), "f16c" (int4's fp16 scales), "amx" (int8 weights × int8 activation blocks in AMX
    tiles). Int8 weights take int8 activation blocks with "vnni" or "avx2", exact fp32 activations without either.
    Empty when the kernels are unavailable."""
    if not available():
        return set()
    bits = _lib.slm_features()  # type: ignore[union-attr]
    names = ((1, "vnni"), (2, "bf16"), (4, "avx512"), (8, "avx2"), (16, "f16c"), (32, "amx"))
    return {name for bit, name in names if bits & bit}


_VNNI: tuple[object, bool] = (None, False)


def has_vnni() -> bool:
    """Whether the int8/int4 kernels use AVX-512 VNNI (features() has "vnni"), asked once per loaded library."""
    global _VNNI
    if _VNNI[0] is not _lib:
        _VNNI = (_lib, "vnni" in features())
    return _VNNI[1]


def _require() -> None:
    if not available():
        raise RuntimeError("the C kernels are not available (no C compiler, or SLMKIT_NO_KERNELS is set)")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def mat(weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Mat:
    """A C view of an (N, K) weight: int8 with its per-row fp32 `scale` (N,), int4 packed as (N, K/2) uint8
    (slmkit.infer.quantized) with its fp16 `scale` (N, K/group), bf16 or fp32. The tensors must outlive it."""
    if weight.dtype not in KINDS or not weight.is_contiguous() or weight.dim() != 2:
        raise ValueError(f"need a contiguous 2-D int8/int4/bf16/fp32 weight, not {weight.dtype} {list(weight.shape)}")
    N, K, group = weight.shape[0], weight.shape[1], 0
    if weight.dtype == torch.int8:
        if scale is None or scale.dtype != torch.float32 or scale.shape != (N,) or not scale.is_contiguous():
            raise ValueError(f"int8 weights need their row scales: contiguous fp32 ({N},)")
    elif weight.dtype == torch.uint8:
        K *= 2
        groups = 0 if scale is None or scale.dim() != 2 else scale.shape[1]
        group = K // groups if groups and K % groups == 0 else 0
        if scale is None or scale.dtype != torch.float16 or scale.shape[0] != N or not scale.is_contiguous() or \
                group < Q4BLOCK or group & (group - 1):
            raise ValueError(f"int4 weights need their group scales: contiguous fp16 ({N}, {K}/group), group "
                             f"{Q4BLOCK}, {2 * Q4BLOCK}, {4 * Q4BLOCK}, ...")
    else:
        scale = None
    wsum = _weight_sums(weight) if weight.dtype == torch.int8 else None
    return Mat(_ptr(weight), _ptr(scale), _ptr(bias), N, K, KINDS[weight.dtype], group, None, None, wsum)


def _weight_sums(q: torch.Tensor) -> ctypes.Array | None:
    """The int8 weights' sums per block of QBLOCK in each whole tile of TILE rows, (N / TILE, K / QBLOCK, TILE)
    int16 (|sum| <= 64 x 128): kernels.c tile_q8_lanes takes the +128 it adds to the activations back out with them.
    A 32nd of the weights' bytes, made once per Mat; the ctypes array keeps its memory alive, and so does every
    struct it is copied into. None where the kernel does not apply (K not a multiple of QBLOCK, fewer than TILE
    rows)."""
    N, K = q.shape
    if K % QBLOCK or N < TILE:
        return None
    T, nb = N // TILE, K // QBLOCK
    sums = q[: T * TILE].view(T, TILE, nb, QBLOCK).sum(-1, dtype=torch.int32).transpose(1, 2).to(torch.int16)
    return (ctypes.c_int16 * sums.numel()).from_buffer(sums.contiguous().numpy())


def csr(weight: torch.Tensor, bias: torch.Tensor | None = None,
        values: torch.dtype | None = None) -> tuple[Mat, tuple[torch.Tensor, ...]]:
    """A C view of the non-zero weights of an fp32 (N, K) `weight` in CSR form, and the tensors it points into (keep
    them alive as long as the Mat). `values`: torch.float32 or torch.bfloat16; None picks bf16 when every weight is
    exactly a bf16 number (a checkpoint stored with bf16 values: no rounding, fewer bytes), else fp32. K ≤ 65536
    (uint16 column indices)."""
    w = weight.detach()
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] > 65536:
        raise ValueError(f"CSR needs a 2-D fp32 weight of at most 65536 columns, not {w.dtype} {list(w.shape)}")
    if values is None:
        values = torch.bfloat16 if is_bf16_exact(w) else torch.float32
    if values not in (torch.float32, torch.bfloat16):
        raise ValueError(f"CSR values are fp32 or bf16, not {values}")
    nz = w != 0
    off = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    off[1:] = nz.sum(1).cumsum(0)
    col = torch.from_numpy(nz.nonzero()[:, 1].numpy().astype(np.uint16))  # row-major, like w[nz]
    val = w[nz].to(values).contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    kind = W_CSR16 if values == torch.bfloat16 else W_CSR32
    m = Mat(val.data_ptr(), None, _ptr(b), w.shape[0], w.shape[1], kind, 0, col.data_ptr(), off.data_ptr())
    return m, tuple(t for t in (val, col, off, b) if t is not None)


def is_bf16_exact(w: torch.Tensor) -> bool:
    """Whether every element of the fp32 tensor `w` is a bf16 number (its low 16 bits are zero)."""
    return bool((w.detach().contiguous().view(torch.int32) & 0xFFFF).eq(0).all())


def density(w: torch.Tensor) -> float:
    """The share of non-zero elements of `w`."""
    return float(w.detach().ne(0).sum()) / max(1, w.numel())


def sparse_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  values: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ weightᵀ + bias → (M, N) fp32 through the CSR kernel (`csr`); for tests and measurements."""
    _require()
    m, _keep = csr(weight, bias, values)  # _keep: the tensors m points into, alive for the call
    x = x.contiguous().float()
    if x.dim() != 2 or x.shape[1] != m.K:
        raise ValueError(f"x {list(x.shape)} does not match the weight's {m.K} input features")
    y = torch.empty(x.shape[0], m.N, dtype=torch.float32)
    scratch = _Scratch(*x.shape)
    _lib.slm_matmul(ctypes.byref(m), x.data_ptr(), x.shape[0], y.data_ptr(),  # type: ignore[union-attr]
                    ctypes.byref(scratch.acts), torch.get_num_threads())
    return y


class _Scratch:
    """Activation buffers in the forms the kernels want (int8 blocks, bf16), for up to `rows` × `k` values."""

    def __init__(self, rows: int, k: int):
        n = rows * k
        self.q = torch.empty(n, dtype=torch.int8)
        self.qs = torch.empty(max(1, n // Q4BLOCK), dtype=torch.float32)  # the smaller block: a scale per 32
        self.b16 = torch.empty(n, dtype=torch.int16)
        self.xc = torch.empty(max(1, n // 4), dtype=torch.int32)  # int4: per-lane corrections
        self.bc = torch.empty(max(1, n // Q4BLOCK), dtype=torch.int32)  # VNNI tiles: per-block corrections
        # CSR weights: the activations transposed in chunks of 16 rows; batch-1 scratch leaves it NULL (gathers)
        self.xt = torch.zeros(-(-rows // 16) * 16 * k) if rows >= CSR_T_MIN else None
        # int8 tiles (AMX; VNNI for 2 to 16 rows): the activations arranged in lanes, 16 rows a chunk, and their block
        # scales
        chunks = -(-rows // 16)
        self.xl = torch.empty(chunks * 16 * k, dtype=torch.uint8)
        self.ql = torch.empty(chunks * 16 * max(1, k // QBLOCK))
        self.acts = Acts(*(t.data_ptr() for t in (self.q, self.qs, self.b16, self.xc, self.bc)),
                         *(_ptr(t) for t in (self.xt, self.xl, self.ql)))


def _operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, Mat, ctypes.CDLL]:
    """x as contiguous fp32, the weight's C view, the library; refuses mismatched shapes."""
    _require()
    x = x.contiguous().float()
    m = mat(weight, scale, bias)
    if x.dim() != 2 or x.shape[1] != m.K:
        raise ValueError(f"x {list(x.shape)} does not match the weight's {m.K} input features")
    return x, m, _lib  # type: ignore[return-value]


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 @ dequantize(weight, scale)ᵀ + bias → (M, N) fp32, for small M (decoding, short prompts); weight
    and scale as `mat` takes them."""
    b = None if bias is None else bias.float().contiguous()  # kept alive for the call: Mat holds only its address
    x, m, lib = _operands(x, weight, scale, b)
    y = torch.empty(x.shape[0], m.N, dtype=torch.float32)
    scratch = _Scratch(*x.shape)
    lib.slm_matmul(ctypes.byref(m), x.data_ptr(), x.shape[0], y.data_ptr(), ctypes.byref(scratch.acts),
                   torch.get_num_threads())
    return y


def widened_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product `matmul` computes, for larger M (prefill), with exact fp32 activations: the weights are widened to
    fp32 a slice of rows at a time (C, one pass) and multiplied by PyTorch's GEMM — never a full fp32 copy."""
    x, m, lib = _operands(x, weight, scale, None)
    y = torch.empty(x.shape[0], m.N, dtype=torch.float32)
    rows = max(1, WIDEN_BYTES // (4 * m.K))
    w = torch.empty(min(rows, m.N), m.K, dtype=torch.float32)
    for n0 in range(0, m.N, rows):
        n1 = min(n0 + rows, m.N)
        lib.slm_widen(ctypes.byref(m), n0, n1, w.data_ptr(), torch.get_num_threads())
        y[:, n0:n1] = F.linear(x, w[: n1 - n0], None if bias is None else bias[n0:n1].float())
    return y


def xent_rows(z: torch.Tensor, y: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of each row of logits z (R, V), bf16 or fp32 and contiguous, against targets y (R,) int64 (each in
    [0, V)): returns the losses lse(z_r) − z_r[y_r] (R,) fp32, and unless `grad_scale` is None overwrites z in place
    with the gradient grad_scale[r] · (softmax(z_r) − onehot(y_r)) (kernels.c slm_xent_rows)."""
    _require()
    if z.dtype not in (torch.bfloat16, torch.float32) or z.dim() != 2 or not z.is_contiguous():
        raise ValueError(f"need contiguous 2-D bf16 or fp32 logits, not {z.dtype} {list(z.shape)}")
    R, V = z.shape
    y = y.to(torch.int64).contiguous()
    if y.shape != (R,) or (R and (int(y.min()) < 0 or int(y.max()) >= V)):
        raise ValueError(f"need ({R},) targets in [0, {V})")
    scale = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
    loss = torch.empty(R, dtype=torch.float32)
    _lib.slm_xent_rows(z.data_ptr(), KINDS[z.dtype], R, V, y.data_ptr(),  # type: ignore[union-attr]
                       _ptr(scale), loss.data_ptr(), torch.get_num_threads())
    return loss


def _need(cond: bool, what: str) -> None:
    """The kernels built (else RuntimeError), and `cond` holds (else ValueError: what)."""
    _require()
    if not cond:
        raise ValueError(what)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of x (..., C) fp32 contiguous, rounded once to bf16: (y bf16 like x, rstd (rows,) fp32 =
    1 / sqrt(mean(x²) + eps), what `rmsnorm_backward` needs). weight (C,) fp32 or None (kernels.c slm_rmsnorm_fwd)."""
    C = x.size(-1)
    _need(x.dtype == torch.float32 and x.is_contiguous() and (weight is None or (
        weight.dtype == torch.float32 and weight.shape == (C,) and weight.is_contiguous())),
        f"need contiguous fp32 rows and a ({C},) fp32 weight, not {x.dtype} {list(x.shape)}")
    R = x.numel() // C if C else 0
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    rstd = torch.empty(R, dtype=torch.float32)
    _lib.slm_rmsnorm_fwd(x.data_ptr(), _ptr(weight), R, C, eps, y.data_ptr(),  # type: ignore[union-attr]
                         rstd.data_ptr(), torch.get_num_threads())
    return y, rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                     rstd: torch.Tensor) -> torch.Tensor:
    """The gradient of `rmsnorm`'s x (fp32, x's shape) from that of y (bf16 or fp32, contiguous) (slm_rmsnorm_bwd)."""
    C = x.size(-1)
    _need(dy.shape == x.shape and dy.dtype in (torch.bfloat16, torch.float32) and dy.is_contiguous(),
          f"need a contiguous bf16 or fp32 gradient of shape {list(x.shape)}, not {dy.dtype} {list(dy.shape)}")
    dx = torch.empty(x.shape, dtype=torch.float32)
    _lib.slm_rmsnorm_bwd(dy.data_ptr(), KINDS[dy.dtype], x.data_ptr(), _ptr(weight),  # type: ignore[union-attr]
                         rstd.data_ptr(), rstd.numel(), C, dx.data_ptr(), torch.get_num_threads())
    return dx


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for h (..., 2H) bf16 contiguous, gate the first half: (..., H) bf16, computed in fp32 and
    rounded once (kernels.c slm_swiglu_fwd)."""
    _need(h.dtype == torch.bfloat16 and h.is_contiguous() and h.size(-1) % 2 == 0,
          f"need contiguous bf16 (..., 2H) input, not {h.dtype} {list(h.shape)}")
    H = h.size(-1) // 2
    out = torch.empty((*h.shape[:-1], H), dtype=torch.bfloat16)
    _lib.slm_swiglu_fwd(h.data_ptr(), out.numel() // H if H else 0, H, out.data_ptr(),  # type: ignore[union-attr]
                        torch.get_num_threads())
    return out


def swiglu_backward(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """The gradient of `swiglu`'s input h (bf16, h's shape) from that of its output (bf16, contiguous)."""
    H = h.size(-1) // 2
    _need(dout.dtype == torch.bfloat16 and dout.is_contiguous() and dout.shape == (*h.shape[:-1], H),
          f"need a contiguous bf16 gradient of shape {[*h.shape[:-1], H]}, not {dout.dtype} {list(dout.shape)}")
    dh = torch.empty(h.shape, dtype=torch.bfloat16)
    _lib.slm_swiglu_bwd(h.data_ptr(), dout.data_ptr(), dout.numel() // H if H else 0, H,  # type: ignore[union-attr]
                        dh.data_ptr(), torch.get_num_threads())
    return dh


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, heads: int, inverse: bool = False
         ) -> torch.Tensor:
    """Rotate-half RoPE of x (B, T, heads·hd) bf16, whose rows may be strided (a slice of a fused q/k/v projection's
    output) but whose values within a row are contiguous: (B, T, heads·hd) bf16 contiguous, row t rotated by position
    pos + t of the fp32 tables cos/sin (positions, hd). inverse rotates back (the backward). kernels.c slm_rope."""
    B, T, D = x.shape
    hd = D // heads if heads else 0
    _need(x.dtype == torch.bfloat16 and heads > 0 and heads * hd == D and hd % 2 == 0 and x.stride(2) == 1 and
          x.stride(0) == T * x.stride(1) and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and
          sin.is_contiguous() and cos.shape == sin.shape and cos.dim() == 2 and cos.size(1) == hd and
          pos >= 0 and pos + T <= cos.size(0),
          f"need bf16 (B, T, {heads}·hd) rows contiguous within and fp32 (positions, hd) tables covering "
          f"{pos}..{pos + T}, not {x.dtype} {list(x.shape)} strides {list(x.stride())}, tables {list(cos.shape)}")
    out = torch.empty((B, T, D), dtype=torch.bfloat16)
    _lib.slm_rope(x.data_ptr(), x.stride(1), B * T, T, heads, hd, pos, cos.data_ptr(),  # type: ignore[union-attr]
                  sin.data_ptr(), -1.0 if inverse else 1.0, out.data_ptr(), torch.get_num_threads())
    return out
