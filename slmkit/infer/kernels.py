"""Weight-only int8 / bf16 matrix-vector kernels for batch-1 decoding.

Why: decoding one token reads every weight once, so on CPU its speed is the memory bandwidth divided by the bytes of
the weights. fp32 weights cost 4 bytes per parameter; int8 weights cost 1 (+ one fp32 scale per output row) and bf16 2.
PyTorch's own CPU paths do not get there: `torch._weight_int8pack_mm` with fp32 activations runs slower than the fp32
matmul, and bf16 GEMV without native bf16 instructions is no faster than fp32 (docs/benchmarks.md). So this module
compiles a small C kernel with the system C compiler on first use (`-O3 -march=native -fopenmp`; cached under
~/.cache/slmkit/kernels) and calls it through ctypes (which releases the GIL). Activations stay fp32: each weight is
widened in registers and fused-multiply-added, so accuracy is that of the stored weights.

The kernel links the OpenMP runtime that torch itself loaded, so its threads are torch's threads: no second pool
spinning against the first (two pools on 2 cores slow both by 20x+).

Without a C compiler everything still works, at fp32-matmul speed (the weights are widened per call).
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

import torch

_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* y[m, n] = scale[n] * sum_k x[m, k] * W[n, k] for int8 (kind 0) or bf16 (kind 1) W; 4 rows of W per inner loop so
   each activation load serves 4 weight rows. */
#if defined(__AVX512F__)
static inline __m512 widen_i8(const void* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 widen_bf16(const void* p) {  /* bf16 is the top half of an fp32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

static inline float widen_one(const void* w, size_t i, int kind) {
  if (kind == 0) return (float)((const int8_t*)w)[i];
  union { uint32_t u; float f; } v; v.u = ((uint32_t)((const uint16_t*)w)[i]) << 16; return v.f;
}

void slm_gemv(const float* x, const void* w, const float* scale, float* y, int M, int N, int K, int kind,
              int nthreads) {
  const size_t es = kind == 0 ? 1 : 2;
  const int NB = N / 4;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int nb = 0; nb < NB; nb++) {
    const int n = nb * 4;
    const char* w0 = (const char*)w + (size_t)n * K * es;
    const char* w1 = w0 + K * es; const char* w2 = w1 + K * es; const char* w3 = w2 + K * es;
    for (int m = 0; m < M; m++) {
      const float* xr = x + (size_t)m * K;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int k = 0;
#if defined(__AVX512F__)
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      if (kind == 0) {
        for (; k + 16 <= K; k += 16) {
          const __m512 xv = _mm512_loadu_ps(xr + k);
          a0 = _mm512_fmadd_ps(xv, widen_i8(w0 + k), a0); a1 = _mm512_fmadd_ps(xv, widen_i8(w1 + k), a1);
          a2 = _mm512_fmadd_ps(xv, widen_i8(w2 + k), a2); a3 = _mm512_fmadd_ps(xv, widen_i8(w3 + k), a3);
        }
      } else {
        for (; k + 16 <= K; k += 16) {
          const __m512 xv = _mm512_loadu_ps(xr + k);
          a0 = _mm512_fmadd_ps(xv, widen_bf16(w0 + 2 * k), a0); a1 = _mm512_fmadd_ps(xv, widen_bf16(w1 + 2 * k), a1);
          a2 = _mm512_fmadd_ps(xv, widen_bf16(w2 + 2 * k), a2); a3 = _mm512_fmadd_ps(xv, widen_bf16(w3 + 2 * k), a3);
        }
      }
      s0 = _mm512_reduce_add_ps(a0); s1 = _mm512_reduce_add_ps(a1);
      s2 = _mm512_reduce_add_ps(a2); s3 = _mm512_reduce_add_ps(a3);
#endif
      for (; k < K; k++) {
        s0 += xr[k] * widen_one(w0, k, kind); s1 += xr[k] * widen_one(w1, k, kind);
        s2 += xr[k] * widen_one(w2, k, kind); s3 += xr[k] * widen_one(w3, k, kind);
      }
      float* yr = y + (size_t)m * N + n;
      yr[0] = s0 * scale[n]; yr[1] = s1 * scale[n + 1]; yr[2] = s2 * scale[n + 2]; yr[3] = s3 * scale[n + 3];
    }
  }
  for (int n = NB * 4; n < N; n++) {
    const char* wr = (const char*)w + (size_t)n * K * es;
    for (int m = 0; m < M; m++) {
      float s = 0.f;
      for (int k = 0; k < K; k++) s += x[(size_t)m * K + k] * widen_one(wr, k, kind);
      y[(size_t)m * N + n] = s * scale[n];
    }
  }
}
"""

_lib: ctypes.CDLL | bool | None = None  # None = not tried yet, False = unavailable
KINDS = {torch.int8: 0, torch.bfloat16: 1}


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
    return hashlib.sha256((_SOURCE + flags + platform.machine() + sys.version).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL | None:
    if sys.platform != "linux" or os.environ.get("SLMKIT_NO_KERNELS"):
        return None
    cache = Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit")) / "kernels"
    so = cache / f"gemv-{_cpu_key()}.so"
    if not so.exists():
        omp = _torch_openmp()
        cc = os.environ.get("CC", "cc")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "gemv.c", Path(tmp) / "gemv.so"
            src.write_text(_SOURCE)
            link = [f"-L{omp.parent}", f"-l:{omp.name}", f"-Wl,-rpath,{omp.parent}"] if omp else []
            cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out), *link]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                return None
            os.replace(out, so)  # atomic: a concurrent builder sees no half-written library
    lib = ctypes.CDLL(str(so))
    lib.slm_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    lib.slm_gemv.restype = None
    return lib


def available() -> bool:
    """True when the compiled kernel can be used (built on first call)."""
    global _lib
    if _lib is None:
        _lib = _build() or False
    return bool(_lib)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 @ (weight (N, K) int8|bf16 × scale (N,))ᵀ → (M, N) fp32, for small M (decoding)."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    assert available() and isinstance(_lib, ctypes.CDLL)
    _lib.slm_gemv(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K, KINDS[weight.dtype],
                  torch.get_num_threads())
    return y
