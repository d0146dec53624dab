/* slmkit CPU kernels: weight-only matrix products for small batches and a fused decode step (one token for each of
 * a batch of sequences); and for training, the cross-entropy of rows of logits with its gradient (slm_xent_rows),
 * and RMSNorm, SwiGLU and RoPE forward and backward in one pass each (slm_rmsnorm_*, slm_swiglu_*, slm_rope).
 *
 * Why C: decoding one token of a small model reads every weight once, so its speed is set by memory bandwidth, and
 * at 135M parameters a token is ~10 ms of weight traffic. PyTorch spends about as long again in per-operator overhead
 * (30 layers x ~20 small ops), and its fp32 GEMV reaches a third of the bandwidth here. This file does the whole
 * step in one call with one OpenMP parallel region.
 *
 * Weights: int8 (symmetric, -127..127, one fp32 scale per output row), int4, bf16, or fp32; row-major (N, K) like
 * nn.Linear.
 *   - int8: activations are quantized to int8 in blocks of 64 (one fp32 scale per block, like llama.cpp's Q8_0) and
 *     multiplied with AMX from 2 activation rows (tdpbssd: 16 weight rows x 16 activation rows x 64 per instruction,
 *     tile_q8_amx), else
 *     AVX-512 VNNI (64 multiply-adds per instruction, in tiles of 16 weight rows: tile_q8, and tile_q8_lanes for 2
 *     to 16 activation rows), else AVX2 (vpmaddubsw, 32); in scalar builds,
 *     or K not a multiple of 64, the weights are widened to fp32 instead and activations stay exact. Every path
 *     gives a row the same bits whatever other rows share the call.
 *   - int4: (N, K/2) bytes in llama.cpp's Q4_0 block layout (slmkit/infer/quantized.py) with one fp16 scale per group
 *     of 32/64/128 weights of a row. Always int8 x int8 like llama.cpp's Q4_0 x Q8_0 dot: activations are quantized
 *     in blocks of 32, and each 32-weight block's integer dot product is scaled by activation scale x weight scale.
 *     The nibbles are unpacked in registers, 32 weights at a time: never a widened copy of the matrix.
 *     AVX-512 VNNI (vpdpbusd, in tiles of 16 weight rows: tile_int4), else AVX2 (vpmaddubsw), else scalar.
 *   - bf16: activations are rounded to bf16 and multiplied with AVX-512 BF16 (vdpbf16ps); without it, widened.
 *   - fp32: fused multiply-add.
 *   - csr (sparse, fp32 or bf16 values): each row's non-zero weights, their uint16 column indices and int32 row
 *     offsets (N + 1). A very sparse model (90 % zeros, slmkit.compress.prune --gradual) reads a fraction of the
 *     dense bytes per token; the activations a row needs are gathered by column. See csr_matmul.
 * Every vector loop has an AVX-512 path, an AVX2 + FMA one (most laptops, AMD before Zen 4) and a scalar fallback:
 * scalar fp32 reductions are chains of dependent adds (C's float order forbids the compiler to vectorize them), several
 * times slower than PyTorch's GEMV (docs/benchmarks.md, 2026-12-02).
 * Each thread reads its share of the rows front to back, one row at a time (int8 and int4 with VNNI: a tile of 16
 * contiguous rows at a time, block by block).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
/* AMX int8 tiles (tile_q8_amx), with the AVX-512 VNNI code around them */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SLM_AMX 1
#else
#define SLM_AMX 0
#endif
#if SLM_AMX
#include <sys/syscall.h> /* amx_ready */
#include <unistd.h>
#endif

enum { W_INT8 = 0, W_BF16 = 1, W_FP32 = 2, W_INT4 = 3, W_CSR32 = 4, W_CSR16 = 5 }; /* CSR16: bf16 values */
#define QBLOCK 64  /* activation block for int8 weights */
#define Q4BLOCK 32 /* int4: nibble-packing block of the weights, and the activation block */
#define TILE 16    /* int8 and int4 weights with VNNI: rows per tile (tile_q8, tile_int4) */
/* Software prefetch of the weights this far ahead of the row being read, into L2. The hardware prefetcher alone
   left a 2-core Xeon (AMX) at 62 % / 71 % of the read bandwidth with int8 / bf16 rows of 0.5-1 KB; with this,
   SmolLM2-135M decoded at ~1.45x (int8) and ~1.2x (bf16) the tokens/s, fp32 unchanged (bench/decode.py,
   docs/benchmarks.md). Prefetching into L1 (T0) instead measured slower for bf16 and fp32.
   -DPREFETCH_AHEAD=0 (via SLMKIT_KERNEL_FLAGS) turns it off for comparison. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096
#endif

typedef struct {
  const void* w;      /* (N, K); int4: (N, K/2) packed bytes */
  const void* scale;  /* int8: (N,) fp32 row scales; int4: (N, K/group) fp16 group scales; else NULL */
  const float* bias;  /* (N,) or NULL */
  int N, K, kind;
  int group;          /* int4: weights per scale, Q4BLOCK x a power of two */
  const uint16_t* col; /* csr: column of each stored value (nnz,), rows in order; else NULL */
  const int32_t* off;  /* csr: (N + 1,) row n's values are off[n] .. off[n+1]-1; else NULL */
  /* int8, K a multiple of QBLOCK: each whole tile's weight sums per block, (N / TILE, K / QBLOCK, TILE) int16 (a
     32nd of the weights' bytes; kernels.py mat() computes them), for tile_q8_lanes; NULL: that kernel is not used */
  const int16_t* wsum;
} Mat;

/* Activation scratch: x (M, K) in the form the weight kind wants. */
typedef struct {
  int8_t* q;      /* int8 blocks: M * K */
  float* qs;      /* one scale per block: M * K / Q4BLOCK (the smaller block) */
  uint16_t* b16;  /* bf16: M * K */
  int32_t* xc;    /* int4: -8 x the sum of each 4 consecutive int8 activations, M * K / 4 (dot_int4) */
  int32_t* bc;    /* VNNI tiles: -128 (int8) or -8 (int4) x the sum of each block's activations, M * K / Q4BLOCK */
  float* xt;      /* csr, M >= CSR_T_MIN: x transposed in chunks of 16 rows, (ceil(M / 16), K, 16) */
  uint8_t* xl;    /* tile_q8_lanes: the int8 blocks + 128 in lanes, 16 * K (arrange_lanes); NULL: not used */
  float* ql;      /* tile_q8_lanes: the block scales in lanes, 16 * K / QBLOCK */
} Acts;

static inline float bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v; v.u = (uint32_t)h << 16; return v.f;
}
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, like vcvtneps2bf16 */
  union { uint32_t u; float f; } v; v.f = f;
  return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}
static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  union { uint32_t u; float f; } v;
  if (exp == 0) { v.f = (float)man * 0x1p-24f; v.u |= sign; } /* zero or subnormal: exact in fp32 */
  else if (exp == 31) v.u = sign | 0x7F800000u | (man << 13);  /* inf, nan */
  else v.u = sign | ((exp + 112) << 23) | (man << 13);         /* rebias the exponent: 127 - 15 */
  return v.f;
#endif
}
static inline float widen_one(const void* w, size_t i, int kind) {
  if (kind == W_INT8) return (float)((const int8_t*)w)[i];
  if (kind == W_BF16) return bf16_to_f32(((const uint16_t*)w)[i]);
  return ((const float*)w)[i];
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum256(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

/* int8 weights x int8 activation blocks (dot_q8), where a SIMD integer dot product exists. */
static int use_q8(const Mat* A) {
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
  return A->kind == W_INT8 && A->K % QBLOCK == 0;
#else
  (void)A; return 0;
#endif
}
static int use_dpbf16(const Mat* A) {
#if defined(__AVX512BF16__)
  return A->kind == W_BF16 && A->K % 32 == 0;
#else
  (void)A; return 0;
#endif
}

/* x (n values) -> int8 in blocks of `block`, one fp32 scale each (the block's largest |x| maps to 127), rounding
   half to even (vcvtps2dq, nearbyintf: the default rounding mode, as lrintf). A batched step converts every row's
   activations before each matmul, so this is written out with AVX-512 (and with inlined scalar operations in the
   rest: fmaxf and lrintf compile to library calls here). */
static void quantize_blocks(const float* x, size_t n, int block, int8_t* q, float* qs) {
  for (size_t i = 0; i < n / block; i++) {
    const float* xb = x + i * block;
    int8_t* qb = q + i * block;
    float amax = 0.f;
    int j = 0;
#if defined(__AVX512F__)
    if (block % 16 == 0) {
      __m512 mx = _mm512_setzero_ps();
      for (; j < block; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + j)));
      amax = _mm512_reduce_max_ps(mx);
    }
#endif
    for (; j < block; j++) {
      const float a = fabsf(xb[j]);
      amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    qs[i] = amax / 127.f;
    j = 0;
#if defined(__AVX512F__)
    if (block % 16 == 0) {
      const __m512 v = _mm512_set1_ps(inv);
      for (; j < block; j += 16)
        _mm_storeu_si128((__m128i*)(qb + j),
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + j), v))));
    }
#endif
    for (; j < block; j++) qb[j] = (int8_t)(int)nearbyintf(xb[j] * inv);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* The tiles' corrections: bc[i] = f x (the sum of the int8 values q[i block .. (i+1) block - 1]), i < n / block. */
static void block_sums(const int8_t* q, int n, int block, int f, int32_t* bc) {
  for (int i = 0; i < n / block; i++) {
    int sum = 0;
    for (int j = 0; j < block; j++) sum += q[i * block + j];
    bc[i] = f * sum;
  }
}
#endif

/* int4's corrections (dot_int4): xc[i] = -8 x (the sum of the 4 int8 activations q[4i .. 4i+3]), i < n / 4. */
static void int4_corrections(const int8_t* q, int n, int32_t* xc) {
  int i = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const __m512i ones = _mm512_set1_epi8(1), f = _mm512_set1_epi32(-8);
  for (; i + 64 <= n; i += 64)
    _mm512_storeu_si512(xc + i / 4, _mm512_mullo_epi32(f, _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                                                                 _mm512_loadu_si512(q + i))));
#endif
  for (; i < n; i += 4) xc[i / 4] = -8 * (q[i] + q[i + 1] + q[i + 2] + q[i + 3]);
}

/* Convert row m of x (M, K) for A's kernel. One row per call, so that a batched decode step (M up to the number of
   sequences) spreads the conversion over the threads; K is a multiple of each block here (use_q8, int4 layout), so
   row m's blocks are the blocks m * K / block onwards of the whole. */
static void prepare(const Mat* A, const float* x, int m, Acts* acts) {
  const int K = A->K;
  const size_t o = (size_t)m * K;
  if (A->kind == W_INT4) {
    int8_t* q = acts->q + o;
    quantize_blocks(x + o, K, Q4BLOCK, q, acts->qs + o / Q4BLOCK);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    block_sums(q, K, Q4BLOCK, -8, acts->bc + o / Q4BLOCK); /* tile_int4 */
    /* dot_int4's order: in each pair of blocks (b, b+1) of a row, [b 0-15, b+1 0-15, b 16-31, b+1 16-31], the order
       in which a 32-byte load of the pair's packed weights unpacks (low nibbles, then high); a row's odd last block
       stays as it is. */
    for (int b = 0; b + 2 <= K / Q4BLOCK; b += 2) {
      int8_t* qb = q + (size_t)b * Q4BLOCK;
      int8_t t[16];
      memcpy(t, qb + 16, 16);       /* b 16-31 */
      memcpy(qb + 16, qb + 32, 16); /* b+1 0-15 */
      memcpy(qb + 32, t, 16);
    }
#endif
    int4_corrections(q, K, acts->xc + o / 4);
  }
  else if (use_q8(A)) {
    quantize_blocks(x + o, K, QBLOCK, acts->q + o, acts->qs + o / QBLOCK);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    block_sums(acts->q + o, K, QBLOCK, -128, acts->bc + o / QBLOCK); /* tile_q8 */
#endif
  }
  else if (use_dpbf16(A))
    for (int i = 0; i < K; i++) acts->b16[o + i] = f32_to_bf16(x[o + i]);
}

/* One int4 row . one activation row: w K/2 packed bytes, ws its K/group fp16 scales, xq/xs the row's int8 blocks of
   Q4BLOCK and their scales, xc its corrections (prepare). Each block adds (integer dot) x (activation scale x weight
   scale), in fp32.
   The SIMD paths multiply the unsigned nibbles u = q + 8 (0..15) by the signed activations, as vpdpbusd/vpmaddubsw
   want (unsigned x signed bytes), and start each 4-byte lane's sum at -8 x (its 4 activations), from xc:
   sum u x - 8 sum x = sum q x. That correction depends on the activations only, so it is computed once per call,
   not once per row; the sign tricks it replaces cost three instructions per block in every row. */
/* noinline: inlined into row(), it left the int8 path's loop short of registers, and measurably slower */
__attribute__((noinline)) static float dot_int4(const uint8_t* w, const uint16_t* ws, int group, const int8_t* xq,
                                                const float* xs, const int32_t* xc, int K) {
  /* block b's weight scale is ws[b >> gs]: a shift, as a division here cost more than the block's arithmetic */
  const int nb = K / Q4BLOCK, gs = __builtin_ctz(group / Q4BLOCK);
  float s = 0.f;
  int b = 0;
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
  float cs[nb]; /* activation scale x weight scale per block */
  int c = 0;
#if defined(__F16C__)
  if (gs == 0)
    for (; c + 8 <= nb; c += 8)
      _mm256_storeu_ps(cs + c, _mm256_mul_ps(_mm256_loadu_ps(xs + c),
                                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + c)))));
#endif
  for (; c < nb; c++) cs[c] = xs[c] * f16_to_f32(ws[c >> gs]);
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  /* Two blocks per vpdpbusd. The 32 packed bytes p of blocks b, b+1 unpack to [p & 15, p >> 4 & 15]: weights
     (b 0-15, b+1 0-15, b 16-31, b+1 16-31), the order prepare() gave the activations. So the int32 lanes 0-3 and
     8-11 sum block b's products, 4-7 and 12-15 block b+1's. */
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (; b + 4 <= nb; b += 4) {
    const __m256i p0 = _mm256_loadu_si256((const __m256i*)(w + 16 * b));
    const __m256i p1 = _mm256_loadu_si256((const __m256i*)(w + 16 * b + 32));
    const __m512i u0 = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(p0), _mm256_srli_epi16(p0, 4), 1), low);
    const __m512i u1 = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(p1), _mm256_srli_epi16(p1, 4), 1), low);
    const __m512i d0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(xc + 8 * b), u0, _mm512_loadu_si512(xq + Q4BLOCK * b));
    const __m512i d1 = _mm512_dpbusd_epi32(_mm512_loadu_si512(xc + 8 * b + 16), u1,
                                           _mm512_loadu_si512(xq + Q4BLOCK * b + 64));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(cs[b]),
                                                                       _mm512_set1_ps(cs[b + 1])), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(cs[b + 2]),
                                                                       _mm512_set1_ps(cs[b + 3])), a1);
  }
  if (b + 2 <= nb) {
    const __m256i p = _mm256_loadu_si256((const __m256i*)(w + 16 * b));
    const __m512i u = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1), low);
    const __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(xc + 8 * b), u, _mm512_loadu_si512(xq + Q4BLOCK * b));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(cs[b]),
                                                                      _mm512_set1_ps(cs[b + 1])), a0);
    b += 2;
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  /* llama.cpp's Q4_0 x Q8_0 on AVX2, with the correction above: vpmaddubsw's pairwise int16 sums of u x stay within
     2 x 15 x 127 = 3810, far from saturating. */
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (; b < nb; b++) {
    const __m128i p = _mm_loadu_si128((const __m128i*)(w + 16 * b));
    const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), low), _mm_and_si128(p, low));
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + Q4BLOCK * b));
    const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones),
                                       _mm256_loadu_si256((const __m256i*)(xc + 8 * b)));
    if (b & 1) a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(cs[b]), a1);
    else a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(cs[b]), a0);
  }
  s = hsum256(_mm256_add_ps(a0, a1));
#else
  (void)xc;
#endif
  for (; b < nb; b++) {
    const uint8_t* p = w + 16 * b;
    const int8_t* x = xq + Q4BLOCK * b;
    int d = 0;
    for (int j = 0; j < 16; j++) d += ((p[j] & 15) - 8) * x[j] + ((p[j] >> 4) - 8) * x[j + 16];
    s += (float)d * (xs[b] * f16_to_f32(ws[b >> gs]));
  }
  return s;
}

/* One int8 row . one activation row of int8 blocks (xq, their scales xs), row scale not applied: each block's exact
   integer dot product times the block's activation scale, summed in fp32. */
static inline float dot_q8(const int8_t* w, const int8_t* xq, const float* xs, int K) {
  float s = 0.f;
  int k = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  /* sum_k x_k w_k = sum_k |x_k| * (sign(x_k) w_k): vpdpbusd multiplies unsigned by signed bytes; |w| <= 127, so
     the negation never overflows. */
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (; k < K; k += QBLOCK) {
    const __m512i xv = _mm512_loadu_si512(xq + k);
    const __m512i wv = _mm512_loadu_si512(w + k);
    const __m512i ws = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), zero, wv);
    const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(xv), ws);
    if ((k / QBLOCK) & 1) a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xs[k / QBLOCK]), a1);
    else a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xs[k / QBLOCK]), a0);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  /* The same sign trick with vpmaddubsw (unsigned x signed bytes -> pairwise int16 sums, at most 2 x 127 x 127 =
     32258: no saturation), widened to int32 by vpmaddwd before the block's two halves are added. A lane sums 8
     products (< 2^24), so its fp32 conversion is exact like VNNI's. */
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; k < K; k += QBLOCK) {
    const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + k));
    const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + k + 32));
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + k));
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(w + k + 32));
    const __m256i d = _mm256_add_epi32(
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)), ones),
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(w1, x1)), ones));
    if ((k / QBLOCK) & 1) a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(xs[k / QBLOCK]), a1);
    else a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(xs[k / QBLOCK]), a0);
  }
  s = hsum256(_mm256_add_ps(a0, a1));
#endif
  for (; k < K; k += QBLOCK) { /* unused: use_q8 is false in scalar builds */
    int d = 0;
    for (int j = 0; j < QBLOCK; j++) d += xq[k + j] * w[k + j];
    s += (float)d * xs[k / QBLOCK];
  }
  return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Tiles of 16 weight rows (int8 and int4 weights, AVX-512 VNNI). A batched decode step is bound by the arithmetic of
   its products, not by the weight traffic, and a row-at-a-time dot product spends most of its instructions on work
   that does not depend on the activation row (the sign trick or the nibble unpacking, the horizontal sum at the
   end). A tile instead transposes its 16 rows' weights in registers, one block at a time, so that each lane holds
   one weight row's 4 bytes at each step: a vpdpbusd then multiplies the 16 rows' next 4 weights by 4 activations
   broadcast from memory, and after a block's worth of them each lane holds its row's exact integer dot product with
   the block. The transposition (and the weights' offset or unpacking) is done once per block for all M activation
   rows; per activation row, a block of QBLOCK costs 16 vpdpbusd for the 16 rows, one conversion and one FMA, and no
   horizontal sums. Batch-1 decoding gains too (fewer instructions per weight than the row kernels). Each block's
   integer dot product is scaled (activation scale x weight scale) and summed over the blocks in order, in fp32: the
   same for every M, so a row's result does not depend on how many rows share the call (tests compare a batched step
   with batch-1 decoding for equality). A tile's 16 rows are contiguous in memory, read block by block; the next
   tile is prefetched the same way (PREFETCH_AHEAD > 0 switches it on; the distance is the tile). That is 16 streams
   where row() keeps to one (see there), and batch-1 decoding still measured faster. Rows past the last whole tile
   take row(). */

/* A 16 x 16 matrix of 32-bit elements, r[l] its row l, transposed in place: r[j] lane l = element j of row l. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

static inline int32_t load_i32(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

/* y[m, n0 .. n0+15] for every m: int8 weight rows n0 .. n0+15 . the M activation rows (int8 blocks of QBLOCK,
   their scales, and bc: -128 x each block's sum, from prepare). The weights are offset to w + 128 (unsigned, for
   vpdpbusd) and the block's correction takes the offset out: sum (w + 128) x - 128 sum x = sum w x. */
static void tile_q8(const Mat* A, const Acts* acts, int M, int n0, float* y) {
  const int K = A->K, nb = K / QBLOCK;
  const int8_t* w = (const int8_t*)A->w + (size_t)n0 * K;
  float acc[M][16]; /* per activation row, the tile's 16 sums */
  for (int m = 0; m < M; m++) _mm512_storeu_ps(acc[m], _mm512_setzero_ps());
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int b = 0; b < nb; b++) {
    __m512i t[16];
    for (int l = 0; l < 16; l++) {
      const int8_t* p = w + (size_t)l * K + (size_t)b * QBLOCK;
#if PREFETCH_AHEAD > 0
      _mm_prefetch(p + (size_t)TILE * K, _MM_HINT_T1); /* the next tile; past the matrix's end prefetches never fault */
#endif
      t[l] = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
    }
    transpose16(t);
    for (int m = 0; m < M; m++) {
      const int8_t* x = acts->q + (size_t)m * K + (size_t)b * QBLOCK;
      __m512i d0 = _mm512_set1_epi32(acts->bc[m * nb + b]), d1 = _mm512_setzero_si512(); /* two chains */
      for (int j = 0; j < 16; j += 2) {
        d0 = _mm512_dpbusd_epi32(d0, t[j], _mm512_set1_epi32(load_i32(x + 4 * j)));
        d1 = _mm512_dpbusd_epi32(d1, t[j + 1], _mm512_set1_epi32(load_i32(x + 4 * j + 4)));
      }
      _mm512_storeu_ps(acc[m], _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                                               _mm512_set1_ps(acts->qs[m * nb + b]), _mm512_loadu_ps(acc[m])));
    }
  }
  /* the row scales, and the bias, with one rounding like row()'s single rows */
  const __m512 sc = _mm512_loadu_ps((const float*)A->scale + n0);
  const __m512 bias = A->bias ? _mm512_loadu_ps(A->bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < M; m++)
    _mm512_storeu_ps(y + (size_t)m * A->N + n0, _mm512_fmadd_ps(_mm512_loadu_ps(acc[m]), sc, bias));
}

/* --- int8 tiles for 2 to 16 activation rows: the activations in lanes (tile_q8_lanes) --------------------------
 * tile_q8 transposes each block of its 16 weight rows in registers, 64 shuffles per block whatever M is, against
 * M x 16 vpdpbusd of products: for a few rows the shuffles dominate. This kernel arranges the activations instead,
 * once per matmul (arrange_lanes), and reads the weights straight from memory as vpdpbusd's signed operand,
 * broadcast, with no shuffles per block. M is rounded up to M' = 16 / G (a power of two), and each activation row
 * takes G of the 16 int32 lanes: in step j of a block, lane m G + g holds activation row m's 4 bytes
 * j 4G + 4g .. +3 of the block, plus 128 (unsigned, for vpdpbusd), and the weights' 4G bytes j 4G .. of a row are
 * broadcast to every lane group. After the block's M' steps, the G lanes of row m hold the G partial sums of its
 * block dot product; G weight rows' vectors are added pairwise across lanes (vpermt2d, log2 G stages) into one
 * vector whose lane m G + p holds the whole integer dot product of one of the G rows. The +128 comes out with the
 * weight rows' block sums (Mat.wsum, made once per matrix): sum (x + 128) w - 128 sum w = sum x w, exact.
 * From there every lane does what tile_q8 does for its (activation row, weight row): each block's integer dot
 * product times the block's activation scale, added in block order with one fused multiply-add, then the row scale
 * and the bias with one more; so every row's result is bit for bit tile_q8's (and batch-1 decoding's). Per weight
 * row and block this costs M' vpdpbusd and a few reductions, where tile_q8 costs 16 M / 16 + ~6; tile_q8 stays for
 * M = 1 (below LANES_MIN), whose vpdpbusd use all 16 lanes. */
#ifndef LANES_MIN
#define LANES_MIN 2
#endif

/* G (lanes per activation row) for M activation rows, or 0 where tile_q8 runs instead. */
static int lanes_g(const Mat* A, int M, const Acts* acts) {
  if (M < LANES_MIN || M > 16 || !A->wsum || !acts->xl || !use_q8(A)) return 0;
  return M > 8 ? 1 : M > 4 ? 2 : M > 2 ? 4 : 8;
}

/* Activation row m's part of the lanes: xl (K / QBLOCK blocks of 16 / G steps of 64 bytes), its block scales in
   ql (16 lanes per block, the G lanes of row m each). The bytes are the int8 values xor `flip`: 0x80 adds 128
   (tile_q8_lanes), 0 keeps them signed (tile_q8_amx). q NULL: a padding row (m >= M), zeros with scale 0. */
static void arrange_lanes(const int8_t* q, const float* qs, int K, int m, int G, uint8_t flip, uint8_t* xl,
                          float* ql) {
  const int S = 16 / G, wd = 4 * G; /* steps per block, and bytes of a row per step */
  for (int b = 0; b < K / QBLOCK; b++) {
    uint8_t u[QBLOCK];
    for (int k = 0; k < QBLOCK; k++) u[k] = q ? (uint8_t)q[b * QBLOCK + k] ^ flip : flip;
    for (int j = 0; j < S; j++) memcpy(xl + ((size_t)b * S + j) * 64 + m * wd, u + j * wd, wd);
    for (int g = 0; g < G; g++) ql[b * 16 + m * G + g] = q ? qs[b] : 0.f;
  }
}

/* 4G bytes at p, repeated over a vector (a broadcast load: no shuffle). */
static inline __attribute__((always_inline)) __m512i bcast_bytes(const void* p, int G) {
  if (G == 1) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
  if (G == 2) { long long v; memcpy(&v, p, 8); return _mm512_set1_epi64(v); }
  if (G == 4) return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
  return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
}

/* The weight row (of a group of G) that chain i of the group computes. The reduction leaves chain p's sums in lane
   group position p; this order lets position p pick its row's int16 block sum from one broadcast load of the G sums
   (dword p mod G/2 of it, low half for p < G/2, high half else), with vpdpwssd against (-128, 0) or (0, -128). */
static inline int lanes_row(int i, int G) { return G == 1 ? 0 : 2 * (i % (G / 2)) + i / (G / 2); }

static inline __attribute__((always_inline)) void tile_q8_lanes_g(const Mat* A, const Acts* acts, int M, int n0,
                                                                  float* y, const int G) {
  const int K = A->K, N = A->N, nb = K / QBLOCK, S = 16 / G, L = __builtin_ctz(G);
  const int P = G == 1 ? 4 : G == 2 ? 2 : 1, R = P * G; /* G-row groups and rows per pass over the blocks */
  const int8_t* w = (const int8_t*)A->w + (size_t)n0 * K;
  const int16_t* cs = A->wsum + (size_t)(n0 / TILE) * nb * TILE;
  /* stage s of the reduction adds vectors 2u and 2u+1 (of 2^s chains each) into u: position p of a lane group takes
     chain p mod 2^(s+1) from vector 2u + (p >> s & 1), the sum of its partial sums 2q and 2q+1, q = p >> (s+1) */
  __m512i ia[3], ib[3];
  for (int s = 0; s < L; s++) {
    int32_t a[16], b[16];
    for (int l = 0; l < 16; l++) {
      const int p = l % G, at = l - p + (p & ((1 << s) - 1)) + 16 * (p >> s & 1), q = p >> (s + 1);
      a[l] = at + (2 * q << s);
      b[l] = at + ((2 * q + 1) << s);
    }
    ia[s] = _mm512_loadu_si512(a);
    ib[s] = _mm512_loadu_si512(b);
  }
  /* the multipliers of the block sums' int16 pairs (low word first), and the permutation back to row order */
  int32_t hl[16], back[16], inv[8];
  for (int p = 0; p < G; p++) inv[lanes_row(p, G)] = p;
  for (int l = 0; l < 16; l++) {
    hl[l] = G > 1 && l % G >= G / 2 ? (int32_t)0xFF800000 : 0x0000FF80;
    back[l] = l - l % G + inv[l % G];
  }
  const __m512i mult = _mm512_loadu_si512(hl), perm = _mm512_loadu_si512(back);
  const __m512i lo = _mm512_set1_epi32(0x0000FF80), hi = _mm512_set1_epi32((int32_t)0xFF800000); /* G = 1 */
  for (int r0 = 0; r0 < TILE; r0 += R) {
    __m512 acc[4];
    for (int p = 0; p < P; p++) acc[p] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
      const int8_t* wb = w + (size_t)r0 * K + (size_t)b * QBLOCK;
#if PREFETCH_AHEAD > 0
      for (int i = 0; i < R; i++) _mm_prefetch(wb + (size_t)(i + TILE) * K, _MM_HINT_T1); /* as in tile_q8 */
#endif
      __m512i d[8];
      for (int i = 0; i < R; i++) d[i] = _mm512_setzero_si512();
      for (int j = 0; j < S; j++) {
        const __m512i a = _mm512_loadu_si512(acts->xl + ((size_t)b * S + j) * 64);
        for (int i = 0; i < R; i++)
          d[i] = _mm512_dpbusd_epi32(d[i], a, bcast_bytes(wb + (size_t)(i - i % G + lanes_row(i % G, G)) * K + j * 4 * G,
                                                          G));
      }
      const __m512 qs = _mm512_loadu_ps(acts->ql + b * 16);
      for (int p = 0; p < P; p++) {
        __m512i* v = d + p * G;
        for (int s = 0, n = G; s < L; s++, n /= 2)
          for (int u = 0; u < n / 2; u++)
            v[u] = _mm512_add_epi32(_mm512_permutex2var_epi32(v[2 * u], ia[s], v[2 * u + 1]),
                                    _mm512_permutex2var_epi32(v[2 * u], ib[s], v[2 * u + 1]));
        const int rg = r0 + p * G;
        const __m512i c = G == 1 ? _mm512_dpwssd_epi32(v[0], bcast_bytes(cs + b * TILE + (rg & ~1), 1), rg & 1 ? hi : lo)
                                 : _mm512_dpwssd_epi32(v[0], bcast_bytes(cs + b * TILE + rg, G / 2), mult);
        acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), qs, acc[p]);
      }
    }
    /* the row scales, and the bias, with one rounding as in tile_q8; lanes back in row order for the stores */
    for (int p = 0; p < P; p++) {
      const int n = n0 + r0 + p * G;
      const __m512 sc = _mm512_castsi512_ps(bcast_bytes((const float*)A->scale + n, G));
      const __m512 bias = A->bias ? _mm512_castsi512_ps(bcast_bytes(A->bias + n, G)) : _mm512_setzero_ps();
      float out[16];
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_permutexvar_ps(perm, acc[p]), sc, bias));
      for (int m = 0; m < M; m++) memcpy(y + (size_t)m * N + n, out + m * G, G * sizeof(float));
    }
  }
}

/* y[m, n0 .. n0+15] for every m < M (LANES_MIN <= M <= 16): tile_q8's result, with the activations in lanes (see
   above; G from lanes_g). */
static void tile_q8_lanes(const Mat* A, const Acts* acts, int M, int G, int n0, float* y) {
  switch (G) {
  case 1: tile_q8_lanes_g(A, acts, M, n0, y, 1); break;
  case 2: tile_q8_lanes_g(A, acts, M, n0, y, 2); break;
  case 4: tile_q8_lanes_g(A, acts, M, n0, y, 4); break;
  default: tile_q8_lanes_g(A, acts, M, n0, y, 8);
  }
}

#if SLM_AMX
/* --- int8 tiles with AMX (tile_q8_amx) --------------------------------------------------------------------------
 * The same arrangement with Advanced Matrix Extensions: one tdpbssd multiplies a 16 x 64 tile of int8 weights (16
 * rows of a block, loaded straight from the matrix with its row stride) by the block's activations in lanes (16
 * rows of 4 k-values x 16 activation rows: arrange_lanes with G = 1, signed, no +128 and no weight sums), into
 * 16 x 16 exact int32 dot products, weight row by activation row. Its 16 K multiply-adds take one instruction, where
 * VNNI needs 256. Each weight row's 16 sums are then scaled like tile_q8's lanes, block by block in order, so the
 * results are again bit for bit tile_q8's. Linux lends a process the tile registers on request (amx_ready); each
 * thread loads the tile configuration before its tiles and releases the registers after (matmul). */
static int amx_ready(void) {
  static int ok = -1; /* the first calls may race: all store the same answer */
  int v = __atomic_load_n(&ok, __ATOMIC_RELAXED);
  if (v < 0) {
    v = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    __atomic_store_n(&ok, v, __ATOMIC_RELAXED);
  }
  return v;
}

/* From 2 rows: at one row a tile multiply uses 1/16 of its rows, and batch-1 decode measured no faster (often
   slower) than tile_q8's VNNI dots (bench/batch_decode.py, docs/benchmarks.md). -DAMX_MIN=1 to compare. */
#ifndef AMX_MIN
#define AMX_MIN 2
#endif

static int use_amx(const Mat* A, int M, const Acts* acts) {
  return M >= AMX_MIN && acts->xl && use_q8(A) && amx_ready();
}

/* Tiles 0-1: int32 sums, 2-3: weights, 4-5: activations; all 16 rows of 64 bytes. */
static void amx_config(void) {
  struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 6; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

/* y[m, n0 .. n0+15] for every m < M: tile_q8's result, with AMX, 16 activation rows at a time (a chunk of the
   lanes: arrange_lanes' rows 16c .. 16c+15 at xl + 16 c K). The tile's weights come from memory for the first
   chunk and from cache for the others. Blocks alternate between two sets of tiles, so a block's product can start
   while the last one's sums are read. */
static void tile_q8_amx(const Mat* A, const Acts* acts, int M, int n0, float* y) {
  const int K = A->K, N = A->N, nb = K / QBLOCK;
  const int8_t* w = (const int8_t*)A->w + (size_t)n0 * K;
  int32_t c[2][TILE * 16] __attribute__((aligned(64)));
  for (int m0 = 0; m0 < M; m0 += 16) {
    const uint8_t* xl = acts->xl + (size_t)m0 * K;
    const float* ql = acts->ql + (size_t)m0 * nb;
    __m512 acc[TILE]; /* per weight row, its sums with the chunk's 16 activation rows */
    for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
      const int8_t* wb = w + (size_t)b * QBLOCK;
      const uint8_t* xb = xl + (size_t)b * TILE * 64;
#if PREFETCH_AHEAD > 0
      if (m0 == 0)
        for (int r = 0; r < TILE; r++) _mm_prefetch(wb + (size_t)(r + TILE) * K, _MM_HINT_T1); /* as in tile_q8 */
#endif
      if (b & 1) {
        _tile_loadd(3, wb, K);
        _tile_loadd(5, xb, 64);
        _tile_zero(1);
        _tile_dpbssd(1, 3, 5);
        _tile_stored(1, c[1], 64);
      } else {
        _tile_loadd(2, wb, K);
        _tile_loadd(4, xb, 64);
        _tile_zero(0);
        _tile_dpbssd(0, 2, 4);
        _tile_stored(0, c[0], 64);
      }
      const __m512 qs = _mm512_loadu_ps(ql + b * 16);
      for (int r = 0; r < TILE; r++)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[b & 1] + r * 16)), qs, acc[r]);
    }
    /* the row scales, and the bias, with one rounding as in tile_q8 */
    float out[TILE][16];
    for (int r = 0; r < TILE; r++)
      _mm512_storeu_ps(out[r], _mm512_fmadd_ps(acc[r], _mm512_set1_ps(((const float*)A->scale)[n0 + r]),
                                               _mm512_set1_ps(A->bias ? A->bias[n0 + r] : 0.f)));
    for (int m = m0; m < M && m < m0 + 16; m++)
      for (int r = 0; r < TILE; r++) y[(size_t)m * N + n0 + r] = out[r][m - m0];
  }
}
#endif

/* The 32 packed bytes of int4 blocks b, b+1 as unsigned nibbles, in dot_int4's order. */
static inline __attribute__((always_inline)) __m512i unpack_pair(const uint8_t* w, int b) {
  const __m256i p = _mm256_loadu_si256((const __m256i*)(w + 16 * b));
  return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1),
                          _mm512_set1_epi8(0x0F));
}

/* y[m, n0 .. n0+15] for every m: int4 weight rows n0 .. n0+15 (K/2 packed bytes each, fp16 scales per group) . the
   M activation rows (int8 blocks of Q4BLOCK in dot_int4's pair order, their scales, and bc: -8 x each block's sum,
   from prepare). As tile_q8, two blocks at a time: a pair's 32 packed bytes per row unpack (unpack_pair) to 64
   nibbles u = q + 8, in the activations' order, and the transposed dwords 0-3 and 8-11 hold block b, 4-7 and 12-15
   block b+1. An odd last block is unpacked in its original order (low nibbles, then high), like its activations. */
static void tile_int4(const Mat* A, const Acts* acts, int M, int n0, float* y) {
  const int K = A->K, nb = K / Q4BLOCK, ng = K / A->group, gs = __builtin_ctz(A->group / Q4BLOCK);
  const size_t rb = (size_t)K / 2;
  const uint8_t* w = (const uint8_t*)A->w + (size_t)n0 * rb;
  const uint16_t* ws = (const uint16_t*)A->scale + (size_t)n0 * ng;
  /* the tile's weight scales in fp32, row by row (ng of them, padded to whole vectors); a block's 16 (one per row)
     are gathered from there */
  const int ngp = (ng + 15) & ~15;
  float wsc[16 * ngp];
  for (int l = 0; l < 16; l++)
    for (int g = 0; g < ng; g += 16) {
      const __mmask16 k = ng - g >= 16 ? 0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
      _mm512_mask_storeu_ps(wsc + l * ngp + g, k,
                            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, ws + (size_t)l * ng + g)));
    }
  const __m512i rows = _mm512_mullo_epi32(_mm512_set1_epi32(ngp), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                     11, 12, 13, 14, 15));
  float acc[M][16]; /* per activation row, the tile's 16 sums */
  for (int m = 0; m < M; m++) _mm512_storeu_ps(acc[m], _mm512_setzero_ps());
  __m512i t[16];
  int b = 0;
  for (; b + 2 <= nb; b += 2) {
    for (int l = 0; l < 16; l++) {
#if PREFETCH_AHEAD > 0
      _mm_prefetch(w + (size_t)(l + TILE) * rb + 16 * b, _MM_HINT_T1);
#endif
      t[l] = unpack_pair(w + (size_t)l * rb, b);
    }
    transpose16(t);
    const __m512 s0 = _mm512_i32gather_ps(rows, wsc + (b >> gs), 4);
    const __m512 s1 = _mm512_i32gather_ps(rows, wsc + ((b + 1) >> gs), 4);
    for (int m = 0; m < M; m++) {
      const int8_t* x = acts->q + (size_t)m * K + (size_t)b * Q4BLOCK;
      const int c = m * nb + b;
      __m512i d0 = _mm512_set1_epi32(acts->bc[c]), d1 = _mm512_set1_epi32(acts->bc[c + 1]);
      for (int j = 0; j < 4; j++) {
        d0 = _mm512_dpbusd_epi32(d0, t[j], _mm512_set1_epi32(load_i32(x + 4 * j)));
        d1 = _mm512_dpbusd_epi32(d1, t[j + 4], _mm512_set1_epi32(load_i32(x + 16 + 4 * j)));
        d0 = _mm512_dpbusd_epi32(d0, t[j + 8], _mm512_set1_epi32(load_i32(x + 32 + 4 * j)));
        d1 = _mm512_dpbusd_epi32(d1, t[j + 12], _mm512_set1_epi32(load_i32(x + 48 + 4 * j)));
      }
      __m512 a = _mm512_loadu_ps(acc[m]);
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(_mm512_set1_ps(acts->qs[c]), s0), a);
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(_mm512_set1_ps(acts->qs[c + 1]), s1), a);
      _mm512_storeu_ps(acc[m], a);
    }
  }
  if (b < nb) {
    for (int l = 0; l < 16; l++) {
      const __m128i p = _mm_loadu_si128((const __m128i*)(w + (size_t)l * rb + 16 * b));
      const __m256i u = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(p), _mm_srli_epi16(p, 4), 1),
                                         _mm256_set1_epi8(0x0F));
      t[l] = _mm512_zextsi256_si512(u);
    }
    transpose16(t); /* dwords 0-7: the block */
    const __m512 s0 = _mm512_i32gather_ps(rows, wsc + (b >> gs), 4);
    for (int m = 0; m < M; m++) {
      const int8_t* x = acts->q + (size_t)m * K + (size_t)b * Q4BLOCK;
      __m512i d = _mm512_set1_epi32(acts->bc[m * nb + b]);
      for (int j = 0; j < 8; j++) d = _mm512_dpbusd_epi32(d, t[j], _mm512_set1_epi32(load_i32(x + 4 * j)));
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(acts->qs[m * nb + b]), s0);
      _mm512_storeu_ps(acc[m], _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, _mm512_loadu_ps(acc[m])));
    }
  }
  const __m512 bias = A->bias ? _mm512_loadu_ps(A->bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < M; m++)
    _mm512_storeu_ps(y + (size_t)m * A->N + n0, _mm512_add_ps(_mm512_loadu_ps(acc[m]), bias));
}
#endif

/* x row . weight row for the int8 kind with exact activations (row scale not applied), bf16 and fp32. */
static float dot_row(const Mat* A, const char* wr, const float* xr, const Acts* acts, int m) {
  const int K = A->K, kind = A->kind;
  float s = 0.f;
  int k = 0;
  (void)acts; (void)m; /* used by the AVX-512 BF16 path only */
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  if (use_dpbf16(A)) {
#if defined(__AVX512BF16__)
    const uint16_t* xb = acts->b16 + (size_t)m * K;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xb + k), (__m512bh)_mm512_loadu_si512(wr + 2 * k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(xb + k + 32),
                            (__m512bh)_mm512_loadu_si512(wr + 2 * k + 64));
    }
    for (; k < K; k += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xb + k), (__m512bh)_mm512_loadu_si512(wr + 2 * k));
#endif
  } else if (kind == W_FP32) {
    const float* w = (const float*)wr;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k), _mm512_loadu_ps(w + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 16), _mm512_loadu_ps(w + k + 16), a1);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k), _mm512_loadu_ps(w + k), a0);
  } else if (kind == W_INT8) {
    for (; k + 16 <= K; k += 16) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k))));
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k), wv, a0);
    }
  } else {
    for (; k + 16 <= K; k += 16) {
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(wr + 2 * k)));
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k), _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), a0);
    }
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  /* Four accumulators: an FMA's latency is 4-5 cycles and two issue per cycle, so one chain would idle the units. */
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  if (kind == W_FP32) {
    const float* w = (const float*)wr;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(w + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8), _mm256_loadu_ps(w + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 16), _mm256_loadu_ps(w + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 24), _mm256_loadu_ps(w + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(w + k), a0);
  } else if (kind == W_INT8) {
    for (; k + 16 <= K; k += 16) {
      const __m128i b = _mm_loadu_si128((const __m128i*)(wr + k));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8),
                           _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b))), a1);
    }
  } else { /* bf16: the upper half of an fp32, so widening is a 16-bit shift */
    for (; k + 16 <= K; k += 16) {
      const __m256i h0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wr + 2 * k)));
      const __m256i h1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wr + 2 * k + 16)));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_castsi256_ps(_mm256_slli_epi32(h0, 16)), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8), _mm256_castsi256_ps(_mm256_slli_epi32(h1, 16)), a1);
    }
  }
  s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; k < K; k++) s += xr[k] * widen_one(wr, k, kind);
  return s;
}

static size_t row_bytes(const Mat* A) {
  const int kind = A->kind;
  return kind == W_INT4 ? (size_t)A->K / 2 : (size_t)A->K * (kind == W_INT8 ? 1 : kind == W_BF16 ? 2 : 4);
}

/* y[m, n] for every m: one weight row, read as one sequential stream (interleaving 4 rows measured 35% slower here:
   the hardware prefetcher follows one stream per core better than four), reused from L1 for each activation row. */
static void row(const Mat* A, const float* x, const Acts* acts, int M, int n, float* y) {
  const int K = A->K;
  const size_t rb = row_bytes(A);
  const char* wr = (const char*)A->w + n * rb;
  const float bias = A->bias ? A->bias[n] : 0.f;
#if defined(__AVX512F__) && PREFETCH_AHEAD > 0
  /* past the matrix's end this touches the next allocation or nothing: prefetches never fault */
  for (size_t off = 0; off < rb; off += 64) _mm_prefetch(wr + PREFETCH_AHEAD + off, _MM_HINT_T1);
#endif
  for (int m = 0; m < M; m++) {
    float s;
    if (A->kind == W_INT4) {
      const uint16_t* ws = (const uint16_t*)A->scale + (size_t)n * (K / A->group);
      s = dot_int4((const uint8_t*)wr, ws, A->group, acts->q + (size_t)m * K, acts->qs + (size_t)m * (K / Q4BLOCK),
                   acts->xc + (size_t)m * (K / 4), K);
    } else if (use_q8(A)) { /* scale and bias with one rounding, as in tile_q8 */
      y[(size_t)m * A->N + n] = fmaf(dot_q8((const int8_t*)wr, acts->q + (size_t)m * K,
                                            acts->qs + (size_t)m * (K / QBLOCK), K), ((const float*)A->scale)[n], bias);
      continue;
    } else {
      s = dot_row(A, wr, x + (size_t)m * K, acts, m);
      if (A->kind == W_INT8) s *= ((const float*)A->scale)[n];
    }
    y[(size_t)m * A->N + n] = s + bias;
  }
}

/* --- sparse (CSR) weights -----------------------------------------------------------------------------------
 * A row's dot product with activation row m sums v_j x[m, col_j] over its stored values j in 16 lanes: lane l takes
 * the j with (j - off[n]) % 16 == l, in order, one fused multiply-add each; the lanes are then added in a fixed tree
 * (sum16). Every path below computes exactly that, so a row's result does not depend on M or on which path ran
 * (tests compare a batched step with batch-1 decoding for equality). Against the dense kinds it differs only by
 * float rounding: the same products, summed in another order.
 *   - M < CSR_T_MIN (batch-1 decoding): per activation row, 16 values at a time, the activations gathered by column
 *     (vgatherdps), since x (K floats) sits in L1.
 *   - M >= CSR_T_MIN: x is first transposed into chunks of 16 rows (Acts.xt), so each stored value multiplies the
 *     16 rows' activations of its column with one broadcast and one contiguous load, and no gathers. */
#ifndef CSR_T_MIN
#define CSR_T_MIN 4
#endif

static inline int is_csr(const Mat* A) { return A->kind == W_CSR32 || A->kind == W_CSR16; }
static inline float csr_val(const Mat* A, int32_t j) {
  return A->kind == W_CSR16 ? bf16_to_f32(((const uint16_t*)A->w)[j]) : ((const float*)A->w)[j];
}
static inline float sum16(const float* t) { /* the lanes' fixed reduction tree: (l, l+8), (l, l+4), (l, l+2), (0, 1) */
  float a[8];
  for (int l = 0; l < 8; l++) a[l] = t[l] + t[l + 8];
  for (int l = 0; l < 4; l++) a[l] += a[l + 4];
  for (int l = 0; l < 2; l++) a[l] += a[l + 2];
  return a[0] + a[1];
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* sum16 of the 16 lanes of v, in registers: the same additions in the same tree */
static inline float sum16_512(__m512 v) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
  const __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
  return _mm_cvtss_f32(_mm_add_ss(a2, _mm_movehdup_ps(a2)));
}

/* 16 stored values from j as fp32; lanes outside `k` are zero */
static inline __m512 csr_vals16(const Mat* A, int32_t j, __mmask16 k) {
  if (A->kind == W_CSR16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t*)A->w + j)), 16));
  return _mm512_maskz_loadu_ps(k, (const float*)A->w + j);
}
#endif

/* y[m, n] for every m < M: row n against each activation row in turn (gathering x by column). */
static void csr_row(const Mat* A, const float* x, int M, int n, float* y) {
  const int32_t o0 = A->off[n], o1 = A->off[n + 1];
  const float bias = A->bias ? A->bias[n] : 0.f;
  for (int m = 0; m < M; m++) {
    const float* xr = x + (size_t)m * A->K;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512 acc = _mm512_setzero_ps();
    int32_t j = o0;
    for (; j + 16 <= o1; j += 16) {
      const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(A->col + j)));
      acc = _mm512_fmadd_ps(csr_vals16(A, j, 0xFFFF), _mm512_i32gather_ps(idx, xr, 4), acc);
    }
    if (j < o1) { /* the lanes past the row's end keep their sums */
      const __mmask16 k = (__mmask16)((1u << (o1 - j)) - 1);
      const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, A->col + j));
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, xr, 4);
      acc = _mm512_mask3_fmadd_ps(csr_vals16(A, j, k), xv, acc, k);
    }
    y[(size_t)m * A->N + n] = sum16_512(acc) + bias;
#else
    float lane[16];
    for (int l = 0; l < 16; l++) lane[l] = 0.f;
    for (int32_t j = o0; j < o1; j++) lane[(j - o0) & 15] = fmaf(csr_val(A, j), xr[A->col[j]], lane[(j - o0) & 15]);
    y[(size_t)m * A->N + n] = sum16(lane) + bias;
#endif
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* y[m, n] for every m < M from the transposed activations xt (ceil(M / 16) chunks of (K, 16)): a[l] holds lane l's
   sums of the chunk's 16 rows, so the tree of sum16 is taken across the vectors. */
static void csr_row_t(const Mat* A, const float* xt, int M, int n, float* y) {
  const int32_t o0 = A->off[n], o1 = A->off[n + 1];
  const float bias = A->bias ? A->bias[n] : 0.f;
  for (int c = 0; c * 16 < M; c++) {
    const float* xc = xt + (size_t)c * A->K * 16;
    __m512 a[16];
    for (int l = 0; l < 16; l++) a[l] = _mm512_setzero_ps();
    int32_t j = o0;
    for (; j + 16 <= o1; j += 16)
      for (int l = 0; l < 16; l++)
        a[l] = _mm512_fmadd_ps(_mm512_set1_ps(csr_val(A, j + l)), _mm512_loadu_ps(xc + (size_t)A->col[j + l] * 16),
                               a[l]);
    for (int l = 0; l < 16; l++) /* a constant trip count, unrolled: a[] stays in registers */
      if (j + l < o1)
        a[l] = _mm512_fmadd_ps(_mm512_set1_ps(csr_val(A, j + l)), _mm512_loadu_ps(xc + (size_t)A->col[j + l] * 16),
                               a[l]);
    for (int l = 0; l < 8; l++) a[l] = _mm512_add_ps(a[l], a[l + 8]);
    for (int l = 0; l < 4; l++) a[l] = _mm512_add_ps(a[l], a[l + 4]);
    for (int l = 0; l < 2; l++) a[l] = _mm512_add_ps(a[l], a[l + 2]);
    float out[16];
    _mm512_storeu_ps(out, _mm512_add_ps(a[0], a[1]));
    for (int i = 0; i < 16 && c * 16 + i < M; i++) y[(size_t)(c * 16 + i) * A->N + n] = out[i] + bias;
  }
}
#endif

/* y (M, N) = x (M, K) @ W^T (+ bias) for a CSR matrix. Call from inside a parallel region. Static schedule: rows of a
   magnitude-pruned matrix differ in length, but a thread's share of hundreds of rows evens that out. */
static void csr_matmul(const Mat* A, const float* x, int M, float* y, Acts* acts) {
  const int K = A->K;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (M >= CSR_T_MIN && acts->xt) {
    const int Mp = (M + 15) & ~15; /* the last chunk's unused rows are zeros */
    #pragma omp for schedule(static)
    for (int m = 0; m < Mp; m++) {
      float* t = acts->xt + (size_t)(m / 16) * K * 16 + m % 16;
      if (m < M) for (int k = 0; k < K; k++) t[(size_t)k * 16] = x[(size_t)m * K + k];
      else for (int k = 0; k < K; k++) t[(size_t)k * 16] = 0.f;
    }
    #pragma omp for schedule(static)
    for (int n = 0; n < A->N; n++) csr_row_t(A, acts->xt, M, n, y);
    return;
  }
#else
  (void)acts; (void)K;
#endif
  #pragma omp for schedule(static)
  for (int n = 0; n < A->N; n++) csr_row(A, x, M, n, y);
}

/* y (M, N) = x (M, K) @ W^T (+ bias). Call from inside a parallel region: all threads must call it. */
static void matmul(const Mat* A, const float* x, int M, float* y, Acts* acts) {
  if (is_csr(A)) {
    csr_matmul(A, x, M, y, acts);
    return;
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#if SLM_AMX
  const int amx = use_amx(A, M, acts);
#else
  const int amx = 0;
#endif
  /* the activations in lanes, for M' = 16 / G rows (zeros past M; AMX: whole chunks of 16), else tile_q8_lanes */
  const int G = amx ? 1 : lanes_g(A, M, acts), Mp = amx ? (M + 15) & ~15 : G ? 16 / G : M;
#else
  const int Mp = M;
#endif
  #pragma omp for schedule(static)
  for (int m = 0; m < Mp; m++) {
    if (m < M) prepare(A, x, m, acts);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (G) /* AMX: chunk m / 16 (tile_q8_amx); else M <= 16 / G */
      arrange_lanes(m < M ? acts->q + (size_t)m * A->K : NULL, acts->qs + (size_t)m * (A->K / QBLOCK), A->K, m % 16,
                    G, amx ? 0 : 0x80, acts->xl + (size_t)(m / 16) * 16 * A->K,
                    acts->ql + (size_t)(m / 16) * 16 * (A->K / QBLOCK));
#endif
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (use_q8(A) || A->kind == W_INT4) { /* whole tiles, then the rows left over: a row always takes the same path */
    const int tiles = A->N / TILE, rest = A->N % TILE;
#if SLM_AMX
    if (amx) amx_config(); /* in every thread */
#endif
    #pragma omp for schedule(static)
    for (int u = 0; u < tiles + rest; u++) {
      if (u >= tiles) row(A, x, acts, M, tiles * TILE + u - tiles, y);
      else if (A->kind == W_INT8 && G) {
#if SLM_AMX
        if (amx) tile_q8_amx(A, acts, M, u * TILE, y);
        else
#endif
          tile_q8_lanes(A, acts, M, G, u * TILE, y);
      }
      else if (A->kind == W_INT8) tile_q8(A, acts, M, u * TILE, y);
      else tile_int4(A, acts, M, u * TILE, y);
    }
#if SLM_AMX
    if (amx) _tile_release(); /* after the loop's barrier: a thread's tile state stays no longer than its tiles */
#endif
    return;
  }
#endif
  #pragma omp for schedule(static)
  for (int n = 0; n < A->N; n++) row(A, x, acts, M, n, y);
}

void slm_matmul(const Mat* A, const float* x, int M, float* y, Acts* acts, int nthreads) {
  #pragma omp parallel num_threads(nthreads)
  matmul(A, x, M, y, acts);
}

/* Rows n0 .. n1-1 of A's weights as fp32 (n1 - n0, K), exactly what slmkit.infer.quantized.dequantize gives (one
   fp32 product per weight). Prefill widens a slice of rows at a time for PyTorch's GEMM, so the fp32 copy stays
   cache-sized and is made in one pass. */
void slm_widen(const Mat* A, int n0, int n1, float* out, int nthreads) {
  const int K = A->K;
  if (is_csr(A)) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++) {
      float* o = out + (size_t)(n - n0) * K;
      memset(o, 0, (size_t)K * sizeof(float));
      for (int32_t j = A->off[n]; j < A->off[n + 1]; j++) o[A->col[j]] = csr_val(A, j);
    }
    return;
  }
  const size_t rb = row_bytes(A);
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int n = n0; n < n1; n++) {
    const char* wr = (const char*)A->w + n * rb;
    float* o = out + (size_t)(n - n0) * K;
    if (A->kind == W_INT4) {
      const uint16_t* ws = (const uint16_t*)A->scale + (size_t)n * (K / A->group);
      for (int b = 0; b < K / Q4BLOCK; b++) {
        const uint8_t* p = (const uint8_t*)wr + 16 * b;
        const float sc = f16_to_f32(ws[b * Q4BLOCK / A->group]);
        for (int j = 0; j < 16; j++) {
          o[Q4BLOCK * b + j] = (float)((p[j] & 15) - 8) * sc;
          o[Q4BLOCK * b + j + 16] = (float)((p[j] >> 4) - 8) * sc;
        }
      }
    } else {
      const float sc = A->kind == W_INT8 ? ((const float*)A->scale)[n] : 1.f;
      for (int k = 0; k < K; k++) o[k] = widen_one(wr, k, A->kind) * sc;
    }
  }
}

/* ---------------------------------------------------------------------------------------------------------------
 * One decode step of a pre-norm transformer (slmkit.model.GPT): GPT-2 style (learned or sinusoidal positions,
 * LayerNorm, GELU) or Llama style (RoPE, RMSNorm, SwiGLU, GQA); full, sliding-window, block-sparse, linear (a
 * recurrent state per sequence instead of keys/values: lin_attend) or LSH attention (lsh_attend); dense or
 * Mixture-of-Experts FFN; dense or low-rank projections (project). The KV cache holds fp32, bf16, or int8 rows (one
 * fp32 scale per position and head, the row's largest |value| mapping to 127: slmkit.model.gpt.KVCache).
 *
 * A step advances n sequences of one batch cache by one token each, every sequence at its own position (continuous
 * batching: slmkit.infer.fused.BatchDecoder); batch-1 decoding is the case n = 1. The n activation rows go through
 * each matmul together, so every weight is read from memory once per step, not once per sequence: decoding is bound
 * by that traffic, and n sequences share it. Attention reads each sequence's own cache rows, so it is parallel over
 * (sequence, head) pairs.
 */
enum { POS_NONE = 0, POS_TABLE = 1, POS_ROPE = 2 };
enum { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2 };
enum { ATT_DENSE = 0, ATT_BLOCKSPARSE = 1, ATT_LINEAR = 2, ATT_LSH = 3 }; /* fused.py ATTENTION_KINDS */

typedef struct {
  const float *n1w, *n1b, *n2w, *n2b;
  Mat qkv, proj, fc, down; /* fc/down: the dense FFN (unused when E > 0) */
  void *kc, *vc;  /* this layer's cache, (S, nkv, max_len, hd) of the model's kv kind, S = the batch */
  float *ks, *vs; /* int8 cache: one scale per row, (S, nkv, max_len); else NULL */
  int E, k;       /* Mixture-of-Experts FFN: E experts, k per token; 0 = dense */
  Mat router;
  const Mat *efc, *edown; /* E expert matrices each, laid out like fc/down */
  /* low-rank layers (slmkit.model.ffn.LowRankLinear, W = B A): the first factor A (rank, in) of each projection,
     whose second factor B is the Mat above; N = 0 for a dense projection */
  Mat qkv_a, proj_a, fc_a, down_a;
  const float* feat; /* linear attention: the random features (m, hd) */
  float *ls, *lz;    /* linear attention: the cache's recurrent state, sum phi(k) v^T (S, nh, m, hd), sum phi(k) (S, nh, m) */
  const float* rot;  /* LSH attention: the random rotations as (R, buckets / 2, hd): lsh_buckets */
} Layer;

typedef struct {
  int n_layer, C, nh, nkv, hd, H, max_len, rmsnorm, swiglu, pos_kind;
  int window; /* sliding-window attention: each query sees the last `window` positions; 0 = all */
  int kv_kind; /* KV_F32, KV_BF16, KV_INT8 */
  float eps;
  const float *emb, *pos_table, *cos, *sin, *nfw, *nfb; /* emb (V, C); pos_table (block, C); cos/sin (block, hd) */
  Mat head;
  const Layer* layers;
  /* scratch for as many sequences per step as the cache holds (fused.py sizes it), per sequence: */
  float *x, *xb, *qkv, *att, *hb, *ha; /* C, C, (nh + 2 nkv) hd, nh hd, fc's outputs (2H SwiGLU, else H), H */
  float* scores;                       /* nh * max_len */
  Acts acts;                           /* max(C, H) */
  /* MoE scratch, per sequence: router probabilities (E), gates (k), chosen experts (k); per (sequence, choice),
     grouped by expert: the expert's input and output rows (C each), which (sequence, choice) each place holds, and
     for each (sequence, choice) its place; estart (E + 1): where each expert's places begin */
  float *ew, *eg, *xe, *eo;
  int *esel, *epair, *eplace, *estart;
  int attn; /* ATT_DENSE (full, or sliding-window with `window`), ATT_BLOCKSPARSE, ATT_LINEAR, ATT_LSH */
  int bs_block, bs_global, bs_summary; /* block-sparse: block size, global positions, summary positions per block */
  int lin_feats;                       /* linear: random features m */
  int lsh_rounds, lsh_buckets, lsh_keys; /* LSH: hash rounds R, buckets per round, same-bucket keys per query */
  float* lr; /* low-rank layers: the first factor's outputs, per sequence: the rank */
} Model;

/* Loads of 16 (AVX-512) or 8 (AVX2) cache values as fp32, from row storage of `kind` at element offset i. */
#if defined(__AVX512F__)
static inline __m512 kv_load16(int kind, const void* c, size_t i) {
  if (kind == KV_BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)c + i))), 16));
  if (kind == KV_INT8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)c + i))));
  return _mm512_loadu_ps((const float*)c + i);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 kv_load8(int kind, const void* c, size_t i) {
  if (kind == KV_BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)c + i))), 16));
  if (kind == KV_INT8)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)c + i))));
  return _mm256_loadu_ps((const float*)c + i);
}
#endif
static inline float kv_at(int kind, const void* c, size_t i) {
  if (kind == KV_BF16) return bf16_to_f32(((const uint16_t*)c)[i]);
  if (kind == KV_INT8) return (float)((const int8_t*)c)[i];
  return ((const float*)c)[i];
}

/* q . (cache row at element offset off) over one head, the row's scale not applied. Written out with SIMD because C's
   strict float order keeps the compiler from vectorizing a reduction: the scalar loop is a chain of dependent adds,
   and with it decoding slowed markedly as the context grew (docs/benchmarks.md, 2026-12-01, attention vectorized). */
static inline __attribute__((always_inline)) float dot_kv(const float* a, int kind, const void* c, size_t off, int n) {
  float s = 0.f;
  int i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), kv_load16(kind, c, off + i), acc);
  s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), kv_load8(kind, c, off + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), kv_load8(kind, c, off + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), kv_load8(kind, c, off + i), a0);
  s = hsum256(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; i++) s += a[i] * kv_at(kind, c, off + i);
  return s;
}

static void norm(const Model* m, const float* x, const float* w, const float* b, float* out) {
  const int C = m->C;
  float mean = 0.f, var = 0.f;
  if (m->rmsnorm) {
    for (int i = 0; i < C; i++) var += x[i] * x[i];
    const float r = 1.f / sqrtf(var / C + m->eps);
    for (int i = 0; i < C; i++) out[i] = x[i] * r * w[i];
    return;
  }
  for (int i = 0; i < C; i++) mean += x[i];
  mean /= C;
  for (int i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
  const float r = 1.f / sqrtf(var / C + m->eps);
  for (int i = 0; i < C; i++) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.f);
}

static void rope(const Model* m, float* v, int pos) { /* rotate-half layout (HF Llama) */
  const int h2 = m->hd / 2;
  const float* c = m->cos + (size_t)pos * m->hd;
  const float* s = m->sin + (size_t)pos * m->hd;
  for (int i = 0; i < h2; i++) {
    const float x1 = v[i], x2 = v[i + h2];
    v[i] = x1 * c[i] - x2 * s[i];
    v[i + h2] = x2 * c[i + h2] + x1 * s[i + h2];
  }
}

/* Write one key or value row (hd values) at row r = (slot * nkv + group) * max_len + position, as the cache stores
   it. */
static void kv_put(const Model* m, void* c, float* cs, size_t r, const float* x) {
  const int hd = m->hd;
  if (m->kv_kind == KV_BF16)
    for (int i = 0; i < hd; i++) ((uint16_t*)c)[r * hd + i] = f32_to_bf16(x[i]);
  else if (m->kv_kind == KV_INT8) quantize_blocks(x, hd, hd, (int8_t*)c + r * hd, cs + r);
  else memcpy((float*)c + r * hd, x, hd * sizeof(float));
}

/* Block-sparse attention: is the key at position t visible to a query whose local part (its own block and the one
   before) begins at lo? Before lo only the global positions are: the first bs_global of the sequence and the last
   bs_summary of every block (slmkit.model.attention.BlockSparseAttention.visible). */
static inline int bs_visible(const Model* m, int t, int lo) {
  return t >= lo || t < m->bs_global || t % m->bs_block >= m->bs_block - m->bs_summary;
}

/* Attention of one query head q over cache rows r0 + t0 .. r0 + pos (r0: position 0 of its sequence and group),
   the rows of `kind`; with `sparse`, only the rows bs_visible from lo. kind and sparse are constants in each call of
   attend's switch, so each combination compiles to its own loops (dense attention's without the test). sc (max_len)
   holds the scores, out (hd) receives the result. */
static inline __attribute__((always_inline)) void attend_kind(const Model* m, const Layer* L, const float* q,
                                                              size_t r0, int t0, int lo, int pos, float* sc,
                                                              float* out, int kind, int sparse) {
  const int hd = m->hd;
  const float *ks = L->ks ? L->ks + r0 : NULL, *vs = L->vs ? L->vs + r0 : NULL;
  const float scale = 1.f / sqrtf((float)hd);
  float mx = -INFINITY;
  for (int t = t0; t <= pos; t++) {
    if (sparse && !bs_visible(m, t, lo)) continue;
    sc[t] = dot_kv(q, kind, L->kc, (r0 + t) * hd, hd) * (kind == KV_INT8 ? ks[t] * scale : scale);
    mx = sc[t] > mx ? sc[t] : mx; /* not fmaxf: a library call per position here */
  }
  float sum = 0.f;
  for (int t = t0; t <= pos; t++) {
    if (sparse && !bs_visible(m, t, lo)) continue;
    sc[t] = expf(sc[t] - mx);
    sum += sc[t];
  }
  /* int8 values: each position's weight carries its row scale */
  if (kind == KV_INT8)
    for (int t = t0; t <= pos; t++)
      if (!sparse || bs_visible(m, t, lo)) sc[t] *= vs[t];
#if defined(__AVX512F__)
  if (hd % 16 == 0 && hd <= 256) { /* the output row stays in registers across positions */
    __m512 acc[16];
    for (int j = 0; j < hd / 16; j++) acc[j] = _mm512_setzero_ps();
    for (int t = t0; t <= pos; t++) {
      if (sparse && !bs_visible(m, t, lo)) continue;
      const __m512 p = _mm512_set1_ps(sc[t]);
      const size_t v = (r0 + t) * hd;
      for (int j = 0; j < hd / 16; j++) acc[j] = _mm512_fmadd_ps(p, kv_load16(kind, L->vc, v + 16 * j), acc[j]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int j = 0; j < hd / 16; j++) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(acc[j], inv));
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (hd % 8 == 0 && hd <= 256) {
    __m256 acc[32];
    for (int j = 0; j < hd / 8; j++) acc[j] = _mm256_setzero_ps();
    for (int t = t0; t <= pos; t++) {
      if (sparse && !bs_visible(m, t, lo)) continue;
      const __m256 p = _mm256_set1_ps(sc[t]);
      const size_t v = (r0 + t) * hd;
      for (int j = 0; j < hd / 8; j++) acc[j] = _mm256_fmadd_ps(p, kv_load8(kind, L->vc, v + 8 * j), acc[j]);
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int j = 0; j < hd / 8; j++) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(acc[j], inv));
    return;
  }
#endif
  for (int i = 0; i < hd; i++) out[i] = 0.f;
  for (int t = t0; t <= pos; t++) {
    if (sparse && !bs_visible(m, t, lo)) continue;
    const float p = sc[t] / sum;
    for (int i = 0; i < hd; i++) out[i] += p * kv_at(kind, L->vc, (r0 + t) * hd + i);
  }
}

/* Attention of query head h (q, hd values) of the sequence in cache slot `slot` over its positions 0..pos: all of
   them, the last m->window (sliding window), or the block-sparse pattern. */
static void attend(const Model* m, const Layer* L, const float* q, int slot, int h, int pos, float* sc, float* out) {
  const int t0 = m->window > 0 && pos >= m->window ? pos - m->window + 1 : 0;
  const size_t r0 = ((size_t)slot * m->nkv + h / (m->nh / m->nkv)) * m->max_len;
  if (m->attn == ATT_BLOCKSPARSE) {
    const int lo = pos / m->bs_block > 0 ? (pos / m->bs_block - 1) * m->bs_block : 0;
    switch (m->kv_kind) {
      case KV_BF16: attend_kind(m, L, q, r0, 0, lo, pos, sc, out, KV_BF16, 1); break;
      case KV_INT8: attend_kind(m, L, q, r0, 0, lo, pos, sc, out, KV_INT8, 1); break;
      default: attend_kind(m, L, q, r0, 0, lo, pos, sc, out, KV_F32, 1);
    }
    return;
  }
  switch (m->kv_kind) {
    case KV_BF16: attend_kind(m, L, q, r0, t0, t0, pos, sc, out, KV_BF16, 0); break;
    case KV_INT8: attend_kind(m, L, q, r0, t0, t0, pos, sc, out, KV_INT8, 0); break;
    default: attend_kind(m, L, q, r0, t0, t0, pos, sc, out, KV_F32, 0);
  }
}

/* Linear attention's features (slmkit.model.attention.LinearAttention._phi) of one head x (hd values) into f (m):
   u = W x' - |x'|^2 / 2 with x' = x hd^-1/4 (s4) and W the m random features (m, hd); a query's features are
   exp(u - max u), a key's exp(u - kmax), kmax = max_j |W_j|^2 / 2 bounding u independently of the data. */
static void lin_phi(const Model* m, const float* W, const float* x, float s4, int is_query, float kmax, float* f) {
  const int hd = m->hd, M = m->lin_feats;
  float xs[hd], sq = 0.f, mx = -INFINITY;
  for (int i = 0; i < hd; i++) { xs[i] = x[i] * s4; sq += xs[i] * xs[i]; }
  for (int j = 0; j < M; j++) {
    f[j] = dot_kv(xs, KV_F32, W, (size_t)j * hd, hd) - 0.5f * sq;
    mx = f[j] > mx ? f[j] : mx;
  }
  const float st = is_query ? mx : kmax;
  for (int j = 0; j < M; j++) f[j] = expf(f[j] - st);
}

/* Linear attention of query head h over the rows `rows` (nr of them, in position order) that this step gives the
   sequence in cache slot `slot`: each row reads the recurrent state of the positions before it, then adds its own
   key and value to it, so a prompt chunk computes what one token per step does. The arithmetic is the PyTorch
   decode step's (LinearAttention._causal with one token): y = (a v + phi(q) S) / (a + phi(q) . z), a = phi(q) .
   phi(k), then S += phi(k) v^T, z += phi(k). Position 0 starts a sequence from an empty state, whatever an earlier
   sequence of the slot left (the PyTorch forward ignores the cached state there too). Queries get RoPE here; keys
   got it when the step stored them. */
static void lin_attend(Model* m, const Layer* L, int slot, int h, const int* rows, int nr, const int* pos, int QKV) {
  const int hd = m->hd, M = m->lin_feats, nh = m->nh, nkv = m->nkv, g = h / (nh / nkv);
  float* S = L->ls + ((size_t)slot * nh + h) * M * hd;
  float* z = L->lz + ((size_t)slot * nh + h) * M;
  const float s4 = (float)pow((double)hd, -0.25);
  float kmax = 0.f, qf[M], kf[M], acc[hd];
  for (int j = 0; j < M; j++) {
    const float w2 = dot_kv(L->feat + (size_t)j * hd, KV_F32, L->feat, (size_t)j * hd, hd);
    kmax = w2 > kmax ? w2 : kmax;
  }
  kmax *= 0.5f;
  for (int r = 0; r < nr; r++) {
    const int i = rows[r];
    float* q = m->qkv + (size_t)i * QKV + (size_t)h * hd;
    const float* k = m->qkv + (size_t)i * QKV + (size_t)(nh + g) * hd;
    const float* v = k + (size_t)nkv * hd;
    if (m->pos_kind == POS_ROPE) rope(m, q, pos[i]);
    if (pos[i] == 0) {
      memset(S, 0, (size_t)M * hd * sizeof(float));
      memset(z, 0, (size_t)M * sizeof(float));
    }
    lin_phi(m, L->feat, q, s4, 1, kmax, qf);
    lin_phi(m, L->feat, k, s4, 0, kmax, kf);
    float a = 0.f, den = 0.f;
    for (int j = 0; j < M; j++) { a += qf[j] * kf[j]; den += qf[j] * z[j]; }
    den += a;
    for (int d = 0; d < hd; d++) acc[d] = 0.f;
    for (int j = 0; j < M; j++)
      for (int d = 0; d < hd; d++) acc[d] += qf[j] * S[(size_t)j * hd + d];
    float* out = m->att + ((size_t)i * m->nh + h) * hd;
    const float inv = den > 1e-30f ? den : 1e-30f;
    for (int d = 0; d < hd; d++) out[d] = (a * v[d] + acc[d]) / inv;
    for (int j = 0; j < M; j++) {
      for (int d = 0; d < hd; d++) S[(size_t)j * hd + d] += kf[j] * v[d];
      z[j] += kf[j];
    }
  }
}

/* LSH attention's buckets of a key k (hd) in every hash round, into b (R): in round r the argmax over [k R_r; -k R_r]
   of its rotation R_r, the first maximum on a tie like torch.argmax (LSHAttention._buckets). rot (R, buckets / 2,
   hd) holds each rotation's columns as rows, so each projection is one contiguous dot product. */
static void lsh_buckets(const Model* m, const float* rot, const float* k, int* b) {
  const int hd = m->hd, nb2 = m->lsh_buckets / 2;
  for (int r = 0; r < m->lsh_rounds; r++) {
    int best = 0;
    float bv = -INFINITY;
    for (int j = 0; j < 2 * nb2; j++) {
      const int c = r * nb2 + j % nb2;
      const float d = dot_kv(k, KV_F32, rot, (size_t)c * hd, hd), x = j < nb2 ? d : -d;
      if (x > bv) { bv = x; best = j; }
    }
    b[r] = best;
  }
}

/* LSH attention (LSHAttention._dense) of query head h (q, RoPE applied) of the sequence in cache slot `slot` at
   position pos. In each hash round q attends to the lsh_keys most recent cached keys (its own included) in its own
   key's bucket: unscaled scores q . k, its own key's replaced by -1e4 (SELF_SCORE, seen only when nothing else is);
   the rounds' outputs are weighted by the softmax of their log-sum-exps. The keys are hashed again each step, as the
   PyTorch path does, walking back from pos until every round has its keys. The cache holds the keys (unit vectors,
   shared-QK, nkv = nh) and values in fp32: KVCache refuses a rounded cache for LSH. */
static void lsh_attend(const Model* m, const Layer* L, const float* q, int slot, int h, int pos, float* out) {
  const int hd = m->hd, R = m->lsh_rounds, keys = m->lsh_keys;
  const size_t r0 = ((size_t)slot * m->nkv + h) * m->max_len * hd;
  const float *kc = (const float*)L->kc + r0, *vc = (const float*)L->vc + r0;
  int bq[R], b[R], n[R], idx[R][keys], open = R;
  lsh_buckets(m, L->rot, kc + (size_t)pos * hd, bq);
  for (int r = 0; r < R; r++) { idx[r][0] = pos; n[r] = 1; open -= keys == 1; }
  for (int t = pos - 1; t >= 0 && open > 0; t--) {
    lsh_buckets(m, L->rot, kc + (size_t)t * hd, b);
    for (int r = 0; r < R; r++)
      if (n[r] < keys && b[r] == bq[r]) {
        idx[r][n[r]++] = t;
        open -= n[r] == keys;
      }
  }
  float o[R][hd], lse[R], s[keys];
  for (int r = 0; r < R; r++) {
    float mx = -INFINITY, sum = 0.f;
    for (int a = 0; a < n[r]; a++) {
      s[a] = idx[r][a] == pos ? -1e4f : dot_kv(q, KV_F32, kc, (size_t)idx[r][a] * hd, hd);
      mx = s[a] > mx ? s[a] : mx;
    }
    for (int a = 0; a < n[r]; a++) sum += expf(s[a] - mx);
    lse[r] = mx + logf(sum);
    for (int d = 0; d < hd; d++) o[r][d] = 0.f;
    for (int a = 0; a < n[r]; a++) {
      const float p = expf(s[a] - lse[r]);
      const float* v = vc + (size_t)idx[r][a] * hd;
      for (int d = 0; d < hd; d++) o[r][d] += p * v[d];
    }
  }
  float mx = -INFINITY, sum = 0.f, w[R];
  for (int r = 0; r < R; r++) mx = lse[r] > mx ? lse[r] : mx;
  for (int r = 0; r < R; r++) { w[r] = expf(lse[r] - mx); sum += w[r]; }
  for (int d = 0; d < hd; d++) out[d] = 0.f;
  for (int r = 0; r < R; r++)
    for (int d = 0; d < hd; d++) out[d] += o[r][d] * (w[r] / sum);
}

/* Linear attention's rows of a step: the rows of the n that feed the sequence in row i's slot, in position order,
   into rows, and their count; 0 when row i is not the first of them (another pair of the step takes that sequence). */
static int slot_rows(int n, const int* pos, const int* slots, int i, int* rows) {
  int nr = 0;
  for (int j = 0; j < n; j++) {
    if (slots[j] != slots[i]) continue;
    if (pos[j] < pos[i]) return 0;
    int at = nr++;
    for (; at > 0 && pos[rows[at - 1]] > pos[j]; at--) rows[at] = rows[at - 1];
    rows[at] = j;
  }
  return nr;
}

/* y (n, N) = x W^T through a projection's C view: one matmul, or for a low-rank layer two, x A^T into m->lr, then
   B. Call from inside a parallel region (matmul's closing barrier orders the two). */
static void project(Model* m, const Mat* A, const Mat* W, const float* x, int n, float* y) {
  if (A->N > 0) {
    matmul(A, x, n, m->lr, &m->acts);
    x = m->lr;
  }
  matmul(W, x, n, y, &m->acts);
}

static inline float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }
static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* One row of fc outputs h -> the H inputs of down, out. SwiGLU: silu(gate) * up, gate = the first half; else GELU.
   A separate output row, so the rows of a batch stay contiguous for down (SwiGLU halves them). */
static void activate(const Model* m, const float* h, float* out) {
  if (m->swiglu) for (int i = 0; i < m->H; i++) out[i] = silu(h[i]) * h[m->H + i];
  else for (int i = 0; i < m->H; i++) out[i] = gelu(h[i]);
}

/* Router logits p (E) -> softmax probabilities, the top-k experts in `sel` (highest first) and their gates: k = 1
   keeps the probability itself, k > 1 renormalises the k to sum to 1 (slmkit.model.ffn.MoE). */
static void route(const Layer* L, float* p, int* sel, float* gate) {
  float mx = -INFINITY, sum = 0.f, top = 0.f;
  for (int e = 0; e < L->E; e++) mx = fmaxf(mx, p[e]);
  for (int e = 0; e < L->E; e++) { p[e] = expf(p[e] - mx); sum += p[e]; }
  for (int e = 0; e < L->E; e++) p[e] /= sum;
  for (int j = 0; j < L->k; j++) {
    int best = -1;
    for (int e = 0; e < L->E; e++) {
      int taken = 0;
      for (int i = 0; i < j; i++) taken |= sel[i] == e;
      if (!taken && (best < 0 || p[e] > p[best])) best = e;
    }
    sel[j] = best;
    top += p[best];
  }
  for (int j = 0; j < L->k; j++) gate[j] = L->k == 1 ? p[sel[j]] : p[sel[j]] / top;
}

/* The MoE FFN of n rows (input m->xb), added to m->x. The (row, choice) pairs are grouped by expert, so each chosen
   expert's weights are read once per step for all the rows that chose it, like a dense layer's. Each row then adds
   its k expert outputs in its own choice order (highest gate first), the order of batch-1 decoding, so a row's
   result does not depend on which other rows share the step. Call from inside a parallel region. */
static void moe(Model* m, const Layer* L, int n) {
  const int C = m->C, E = L->E, k = L->k, H = m->H;
  matmul(&L->router, m->xb, n, m->ew, &m->acts);
  #pragma omp for schedule(static)
  for (int i = 0; i < n; i++) route(L, m->ew + (size_t)i * E, m->esel + (size_t)i * k, m->eg + (size_t)i * k);
  #pragma omp single
  { /* counting sort of the pairs by expert; within an expert, in row order */
    int next[E];
    for (int e = 0; e <= E; e++) m->estart[e] = 0;
    for (int p = 0; p < n * k; p++) m->estart[m->esel[p] + 1]++;
    for (int e = 0; e < E; e++) m->estart[e + 1] += m->estart[e];
    for (int e = 0; e < E; e++) next[e] = m->estart[e];
    for (int p = 0; p < n * k; p++) {
      const int at = next[m->esel[p]]++;
      m->epair[at] = p;
      m->eplace[p] = at;
    }
  }
  #pragma omp for schedule(static)
  for (int at = 0; at < n * k; at++)
    memcpy(m->xe + (size_t)at * C, m->xb + (size_t)(m->epair[at] / k) * C, C * sizeof(float));
  for (int e = 0; e < E; e++) { /* every thread walks the same experts, in step */
    const int p0 = m->estart[e], cnt = m->estart[e + 1] - p0;
    if (cnt == 0) continue;
    const Mat* fc = &L->efc[e];
    matmul(fc, m->xe + (size_t)p0 * C, cnt, m->hb, &m->acts);
    #pragma omp for schedule(static)
    for (int i = 0; i < cnt; i++) activate(m, m->hb + (size_t)i * fc->N, m->ha + (size_t)i * H);
    matmul(&L->edown[e], m->ha, cnt, m->eo + (size_t)p0 * C, &m->acts);
  }
  #pragma omp for schedule(static)
  for (int i = 0; i < n; i++) {
    float* x = m->x + (size_t)i * C;
    for (int j = 0; j < k; j++) {
      const float g = m->eg[i * k + j], *o = m->eo + (size_t)m->eplace[i * k + j] * C;
      for (int c = 0; c < C; c++) x[c] += g * o[c];
    }
  }
}

/* One token for each of n sequences of the batch cache: tokens[i] at position pos[i] of the sequence in cache slot
   slots[i] (distinct slots; n at most the cache's batch, what the scratch is sized for). Writes those positions'
   keys/values into the cache and the next-token logits: of the rows out_rows[0 .. n_out-1], in that order,
   (n_out, V); out_rows NULL: of every row, (n, V). A prompt chunk's rows before its last need none, and the final
   norm and the LM head (a large share of a small model's weights) are skipped for them. */
void slm_decode_batch(Model* m, int n, const int* tokens, const int* pos, const int* slots, float* logits,
                      int nthreads, const int* out_rows, int n_out) {
  const int C = m->C, hd = m->hd, nh = m->nh, nkv = m->nkv;
  const int QKV = (m->attn == ATT_LSH ? 2 * nh : nh + 2 * nkv) * hd; /* LSH: queries and values, keys shared */
  for (int i = 0; i < n; i++) {
    float* x = m->x + (size_t)i * C;
    memcpy(x, m->emb + (size_t)tokens[i] * C, C * sizeof(float));
    if (m->pos_kind == POS_TABLE)
      for (int c = 0; c < C; c++) x[c] += m->pos_table[(size_t)pos[i] * C + c];
  }
  #pragma omp parallel num_threads(nthreads)
  {
    for (int l = 0; l < m->n_layer; l++) {
      const Layer* L = &m->layers[l];
      #pragma omp for schedule(static)
      for (int i = 0; i < n; i++) norm(m, m->x + (size_t)i * C, L->n1w, L->n1b, m->xb + (size_t)i * C);
      project(m, &L->qkv_a, &L->qkv, m->xb, n, m->qkv);
      /* every key/value of this step is stored before any query reads the cache (the loop's closing barrier) */
      #pragma omp for schedule(static)
      for (int p = 0; p < n * nkv; p++) {
        const int i = p / nkv, g = p % nkv;
        const size_t r = ((size_t)slots[i] * nkv + g) * m->max_len + pos[i];
        if (m->attn == ATT_LSH) { /* the key is the unit-length query (F.normalize), after RoPE */
          float* q = m->qkv + (size_t)i * QKV + (size_t)g * hd;
          float k[hd], ss = 0.f;
          if (m->pos_kind == POS_ROPE) rope(m, q, pos[i]);
          for (int j = 0; j < hd; j++) ss += q[j] * q[j];
          const float len = sqrtf(ss) > 1e-12f ? sqrtf(ss) : 1e-12f;
          for (int j = 0; j < hd; j++) k[j] = q[j] / len;
          kv_put(m, L->kc, L->ks, r, k);
          kv_put(m, L->vc, L->vs, r, q + (size_t)nh * hd);
          continue;
        }
        float* k = m->qkv + (size_t)i * QKV + (size_t)(nh + g) * hd;
        const float* v = k + (size_t)nkv * hd;
        if (m->pos_kind == POS_ROPE) rope(m, k, pos[i]);
        if (m->attn != ATT_LINEAR) { /* linear attention keeps a recurrent state instead (lin_attend) */
          kv_put(m, L->kc, L->ks, r, k);
          kv_put(m, L->vc, L->vs, r, v);
        }
      }
      /* dynamic: the sequences' lengths, so the pairs' costs, differ */
      #pragma omp for schedule(dynamic)
      for (int p = 0; p < n * nh; p++) {
        const int i = p / nh, h = p % nh;
        float* q = m->qkv + (size_t)i * QKV + (size_t)h * hd;
        float* sc = m->scores + (size_t)p * m->max_len;
        if (m->attn == ATT_LINEAR) { /* a sequence's rows in order: each one's state includes the rows before it */
          int rows[n];
          const int nr = slot_rows(n, pos, slots, i, rows);
          if (nr > 0) lin_attend(m, L, slots[i], h, rows, nr, pos, QKV);
        } else if (m->attn == ATT_LSH) { /* RoPE was applied with the keys */
          lsh_attend(m, L, q, slots[i], h, pos[i], m->att + (size_t)i * nh * hd + h * hd);
        } else {
          if (m->pos_kind == POS_ROPE) rope(m, q, pos[i]);
          attend(m, L, q, slots[i], h, pos[i], sc, m->att + (size_t)i * nh * hd + h * hd);
        }
      }
      project(m, &L->proj_a, &L->proj, m->att, n, m->xb);
      #pragma omp for schedule(static)
      for (int i = 0; i < n; i++) {
        float *x = m->x + (size_t)i * C, *xb = m->xb + (size_t)i * C;
        for (int c = 0; c < C; c++) x[c] += xb[c];
        norm(m, x, L->n2w, L->n2b, xb);
      }
      if (L->E == 0) {
        project(m, &L->fc_a, &L->fc, m->xb, n, m->hb);
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++) activate(m, m->hb + (size_t)i * L->fc.N, m->ha + (size_t)i * m->H);
        project(m, &L->down_a, &L->down, m->ha, n, m->xb);
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++)
          for (int c = 0; c < C; c++) m->x[(size_t)i * C + c] += m->xb[(size_t)i * C + c];
      } else {
        moe(m, L, n);
      }
    }
    const int nl = out_rows ? n_out : n;
    #pragma omp for schedule(static)
    for (int i = 0; i < nl; i++)
      norm(m, m->x + (size_t)(out_rows ? out_rows[i] : i) * C, m->nfw, m->nfb, m->xb + (size_t)i * C);
    if (nl > 0) matmul(&m->head, m->xb, nl, logits, &m->acts);
  }
}

/* Batch-1 decoding: logits (V,) of the token after `token` at position `pos` of cache slot 0. */
void slm_decode_step(Model* m, int token, int pos, float* logits, int nthreads) {
  const int slot = 0;
  slm_decode_batch(m, 1, &token, &pos, &slot, logits, nthreads, NULL, 0);
}

/* Which instruction paths this build uses: 1 = int8 VNNI (int8 and int4 weights), 2 = bf16 dot products,
   4 = AVX-512, 8 = AVX2 + FMA (the int8 and int4 dots where VNNI is missing, every other vector loop where AVX-512
   is), 16 = F16C (fp16 scales), 32 = AMX int8 tiles (tile_q8_amx: built, and granted by the kernel). */
/* --- training: cross-entropy over rows of logits ------------------------------------------------------------------

   slm_xent_rows: for each row r of z (R, V) logits, bf16 (kind W_BF16) or fp32 (W_FP32), the row's loss
   lse(z_r) - z_r[y_r] into loss[r] (fp32), and, unless grad_scale is NULL, z_r overwritten in place by the gradient
   grad_scale[r] * (softmax(z_r) - onehot(y_r)), rounded once to z's type (a zero scale writes a zero row). The
   training loss (slmkit/model/loss.py) calls it on a chunk of rows at a time, right after the chunk's logits are
   computed, so the logits of a whole batch never exist.
   Two passes over a row: the max, then the sum of exp(z - max) (the row stays in L1/L2 between them); a third writes
   the gradient. exp is a Cephes-style polynomial (relative error ~1e-7 on the range used, z - max <= 0) in plain C
   that GCC vectorizes for any ISA together with the `omp simd` reductions — AVX-512, AVX2 or SSE from one source. */
static inline float exp_neg(float x) { /* e^x for x <= 0; 0 below -87 (e^-87 ~ 1.6e-38: where fp32 turns subnormal) */
  const float c = x < -87.f ? -87.f : x;
  /* n = round(c / ln2) by the 1.5 * 2^23 trick (round-to-nearest, no library call, vectorizes) */
  const float n = (c * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f; /* c - n ln2, ln2 in two parts */
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  union { uint32_t u; float f; } s;
  s.u = (uint32_t)((int32_t)n + 127) << 23;
  return x < -87.f ? 0.f : p * s.f;
}

void slm_xent_rows(void* z, int kind, int R, int V, const int64_t* y, const float* grad_scale, float* loss,
                   int nthreads) {
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int r = 0; r < R; r++) {
    const size_t off = (size_t)r * V;
    const uint16_t* zb = (const uint16_t*)z + off;
    const float* zf = (const float*)z + off;
    float m = -INFINITY, s = 0.f;
    if (kind == W_BF16) {
      #pragma omp simd reduction(max : m)
      for (int j = 0; j < V; j++) { const float v = bf16_to_f32(zb[j]); m = v > m ? v : m; } /* fmaxf: a call */
      #pragma omp simd reduction(+ : s)
      for (int j = 0; j < V; j++) s += exp_neg(bf16_to_f32(zb[j]) - m);
    } else {
      #pragma omp simd reduction(max : m)
      for (int j = 0; j < V; j++) m = zf[j] > m ? zf[j] : m;
      #pragma omp simd reduction(+ : s)
      for (int j = 0; j < V; j++) s += exp_neg(zf[j] - m);
    }
    const float lse = m + logf(s);
    const int64_t t = y[r];
    loss[r] = lse - (kind == W_BF16 ? bf16_to_f32(zb[t]) : zf[t]);
    if (!grad_scale) continue;
    const float g = grad_scale[r];
    if (kind == W_BF16) {
      uint16_t* ob = (uint16_t*)z + off;
      #pragma omp simd
      for (int j = 0; j < V; j++) ob[j] = f32_to_bf16(g * (exp_neg(bf16_to_f32(ob[j]) - lse) - (j == t)));
    } else {
      float* of = (float*)z + off;
      #pragma omp simd
      for (int j = 0; j < V; j++) of[j] = g * (exp_neg(of[j] - lse) - (j == t));
    }
  }
}

/* --- training: RMSNorm, SwiGLU and RoPE under bf16 autocast -----------------------------------------------------

   What a bf16 training step does around its GEMMs (slmkit/model/elementwise.py). In PyTorch an RMSNorm of the fp32
   residual stream is five operators forward (pow, mean, rsqrt, two multiplies) plus the cast of its output to bf16 for
   the next linear, and about twice that backward; SwiGLU is silu, a multiply and, backward, three more and a
   concatenation; RoPE (slm_rope, below) six for each of q and k. Each is a trip through memory for a (rows, C)
   tensor. Here each is one pass per row, computed in fp32 and rounded once.

   slm_rmsnorm_fwd: y_r = bf16(x_r * rstd_r * w) with rstd_r = 1 / sqrt(mean(x_r^2) + eps) (kept for the backward);
   w NULL = no weight. slm_rmsnorm_bwd: dx_r = rstd_r * g_r - x_r * rstd_r^3 / C * <g_r, x_r>, g = dy * w, dy bf16
   (dy_kind W_BF16) or fp32 (W_FP32), dx fp32.
   slm_swiglu_fwd: h (R, 2H) bf16, gate first, up second -> out (R, H) = bf16(silu(gate) * up).
   slm_swiglu_bwd: dout (R, H) bf16 -> dh (R, 2H) bf16: d gate = dout * up * s * (1 + gate * (1 - s)), s = sigmoid(gate),
   d up = dout * gate * s. */
void slm_rmsnorm_fwd(const float* x, const float* w, int R, int C, float eps, uint16_t* y, float* rstd, int nthreads) {
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int r = 0; r < R; r++) {
    const float* xr = x + (size_t)r * C;
    uint16_t* yr = y + (size_t)r * C;
    float ss = 0.f;
    #pragma omp simd reduction(+ : ss)
    for (int j = 0; j < C; j++) ss += xr[j] * xr[j];
    const float s = 1.f / sqrtf(ss / (float)C + eps);
    rstd[r] = s;
    if (w) {
      #pragma omp simd
      for (int j = 0; j < C; j++) yr[j] = f32_to_bf16(xr[j] * s * w[j]);
    } else {
      #pragma omp simd
      for (int j = 0; j < C; j++) yr[j] = f32_to_bf16(xr[j] * s);
    }
  }
}

void slm_rmsnorm_bwd(const void* dy, int dy_kind, const float* x, const float* w, const float* rstd, int R, int C,
                     float* dx, int nthreads) {
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int r = 0; r < R; r++) {
    const size_t off = (size_t)r * C;
    const float* xr = x + off;
    float* g = dx + off; /* dy * w first, in dx's row */
    if (dy_kind == W_BF16) {
      const uint16_t* d = (const uint16_t*)dy + off;
      #pragma omp simd
      for (int j = 0; j < C; j++) g[j] = bf16_to_f32(d[j]) * (w ? w[j] : 1.f);
    } else {
      const float* d = (const float*)dy + off;
      #pragma omp simd
      for (int j = 0; j < C; j++) g[j] = d[j] * (w ? w[j] : 1.f);
    }
    float dot = 0.f;
    #pragma omp simd reduction(+ : dot)
    for (int j = 0; j < C; j++) dot += g[j] * xr[j];
    const float s = rstd[r], c = dot * s * s * s / (float)C;
    #pragma omp simd
    for (int j = 0; j < C; j++) g[j] = s * g[j] - c * xr[j];
  }
}

static inline float sigmoid_f(float v) { /* exp_neg's argument stays <= 0 on both sides */
  const float e = exp_neg(v > 0.f ? -v : v);
  return v > 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

void slm_swiglu_fwd(const uint16_t* h, int R, int H, uint16_t* out, int nthreads) {
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int r = 0; r < R; r++) {
    const uint16_t* gt = h + (size_t)r * 2 * H;
    const uint16_t* up = gt + H;
    uint16_t* o = out + (size_t)r * H;
    #pragma omp simd
    for (int j = 0; j < H; j++) {
      const float g = bf16_to_f32(gt[j]);
      o[j] = f32_to_bf16(g * sigmoid_f(g) * bf16_to_f32(up[j]));
    }
  }
}

void slm_swiglu_bwd(const uint16_t* h, const uint16_t* dout, int R, int H, uint16_t* dh, int nthreads) {
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int r = 0; r < R; r++) {
    const uint16_t* gt = h + (size_t)r * 2 * H;
    const uint16_t* up = gt + H;
    const uint16_t* d = dout + (size_t)r * H;
    uint16_t* dg = dh + (size_t)r * 2 * H;
    uint16_t* du = dg + H;
    #pragma omp simd
    for (int j = 0; j < H; j++) {
      const float g = bf16_to_f32(gt[j]), u = bf16_to_f32(up[j]), o = bf16_to_f32(d[j]), s = sigmoid_f(g);
      dg[j] = f32_to_bf16(o * u * s * (1.f + g * (1.f - s)));
      du[j] = f32_to_bf16(o * g * s);
    }
  }
}

/* slm_rope: rotate-half RoPE of H heads of hd values per row, bf16: src row r (row stride in elements) at position
   pos + r % T -> dst (R, H, hd) contiguous, out_i = x_i cos_i - x_{i+hd/2} sin_i, out_{i+hd/2} = x_{i+hd/2} cos +
   x_i sin (cos/sin (positions, hd) fp32, RoPE's tables). sign -1 rotates back: the backward of the forward's
   rotation. Reads q and k straight out of the fused qkv projection's output and writes them in the layout the
   attention takes. */
void slm_rope(const uint16_t* src, long row_stride, int R, int T, int H, int hd, int pos, const float* cos_t,
              const float* sin_t, float sign, uint16_t* dst, int nthreads) {
  const int half = hd / 2;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int r = 0; r < R; r++) {
    const float* c = cos_t + (size_t)(pos + r % T) * hd;
    const float* s = sin_t + (size_t)(pos + r % T) * hd;
    for (int h = 0; h < H; h++) {
      const uint16_t* x = src + (size_t)r * row_stride + (size_t)h * hd;
      uint16_t* o = dst + ((size_t)r * H + h) * hd;
      #pragma omp simd
      for (int i = 0; i < half; i++) {
        const float x1 = bf16_to_f32(x[i]), x2 = bf16_to_f32(x[i + half]);
        o[i] = f32_to_bf16(x1 * c[i] - x2 * sign * s[i]);
        o[i + half] = f32_to_bf16(x2 * c[i + half] + x1 * sign * s[i + half]);
      }
    }
  }
}

int slm_features(void) {
  int f = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  f |= 1;
#endif
#if defined(__AVX2__) && defined(__FMA__)
  f |= 8;
#endif
#if defined(__F16C__)
  f |= 16;
#endif
#if defined(__AVX512BF16__)
  f |= 2;
#endif
#if defined(__AVX512F__)
  f |= 4;
#endif
#if SLM_AMX
  if (amx_ready()) f |= 32;
#endif
  return f;
}
