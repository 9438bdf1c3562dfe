// bf16 GEMMs of the CPU low-rank kernel for M > 4 tokens: t = x @ v, then y = t @ u.T + bias,
// on AVX512-BF16 (VDPBF16PS: two bf16 products summed into an fp32 lane).
//
// Why our own: torch's bf16 GEMM on the CPU goes to oneDNN, which JIT-builds a primitive for
// every new (M, K, N) and keeps a bounded cache of them. A PGSVD model has a different rank in
// almost every layer, so a new batch size or prompt length builds ~420 primitives (SmolLM2-135M;
// 0.6-2.4 ms each on its shapes, the first-call column of benchmarks/bench_cpu_kernels.py), and
// a server whose batch size changes every step thrashes the cache. These kernels have no
// per-shape state; their cost is only the arithmetic and the bytes.
//
// xv (t = x @ v, x (M, K), v (K, R), t fp32): units of (up to 12 rows of x) x (32 columns of v).
// Two rows of v are interleaved in registers into (v[k, r], v[k+1, r]) pairs, x's pair
// (x[m, k], x[m, k+1]) is broadcast, VDPBF16PS accumulates: 24 fp32 accumulators per unit.
// v is walked 64 whole rows at a time (the next 64 prefetched to L2); few rows of x (decode
// batches, memory-bound) split K across threads into fp32 partials, many rows (prefill,
// compute-bound) split the rows of x.
// tu (y = tb @ u.T + bias, tb = t rounded to bf16 as torch's own two-matmul path rounds it):
// units of 64 rows of u. A unit first transposes its rows into pairs along R (16x16 transposes of
// 32-bit pairs, into a thread-local buffer of R * 128 bytes), then runs blocks of 6 rows of tb
// against it: 24 accumulators, the bias added in fp32, one rounding to bf16 on store.
//
// Accuracy: products of bf16 are exact in fp32 and sums are fp32, as in torch's bf16 GEMMs; the
// tests hold every case to 2x torch's own bf16 error against fp64 (tests/ops/test_lowrank_cpu.py).

#include "lowrank_bf16_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "bf16_simd.h"

namespace pgsvd::bf16 {

#ifdef PGSVD_BF16_X86

namespace {

using namespace simd;

constexpr int kXvRows = 12;   // rows of x per xv unit (2 x 12 accumulators)
constexpr int kXvCols = 32;   // columns of v per xv unit (one 64-byte line of a row)
constexpr int64_t kXvChunk = 64;  // rows of v per pass over the units (L1/L2-resident); even
constexpr int kTuRows = 6;    // rows of tb per tu block (6 x 4 accumulators)
constexpr int kTuCols = 64;   // rows of u per tu unit (4 vectors of 16 outputs)

// t[i, :ncols] += sum_{k < K} x[i, k] v[k, :ncols] for i < MB, ncols <= 32.
template <int MB>
PGSVD_BF16 void xv_unit(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* v, int64_t ldv,
                        int64_t ncols, float* t, int64_t ldt) {
  const __mmask16 m0 = mask16(ncols), m1 = mask16(ncols - 16);
  __m512 acc0[MB], acc1[MB];
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
    acc0[i] = _mm512_maskz_loadu_ps(m0, t + i * ldt);
    acc1[i] = _mm512_maskz_loadu_ps(m1, t + i * ldt + 16);
  }
  const __mmask32 mk = mask32(ncols);
  const __m512i ilo = _mm512_load_si512(kLoIdx), ihi = _mm512_load_si512(kHiIdx);
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const __m512i a = _mm512_maskz_loadu_epi16(mk, v + k * ldv);
    const __m512i b = _mm512_maskz_loadu_epi16(mk, v + (k + 1) * ldv);
    const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, ilo, b);
    const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, ihi, b);
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
      const __m512bh xp = bcast_pair(x + i * ldx + k);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], xp, lo);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], xp, hi);
    }
  }
  if (k < K) {  // odd K: the last row of v, paired with a zero row
    const __m512i a = _mm512_maskz_loadu_epi16(mk, v + k * ldv), z = _mm512_setzero_si512();
    const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, ilo, z);
    const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, ihi, z);
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
      const __m512bh xp = (__m512bh)_mm512_set1_epi32(int32_t(x[i * ldx + k]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], xp, lo);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], xp, hi);
    }
  }
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
    _mm512_mask_storeu_ps(t + i * ldt, m0, acc0[i]);
    _mm512_mask_storeu_ps(t + i * ldt + 16, m1, acc1[i]);
  }
}

// In place: r[j] lane i <- r[i] lane j (16 x 16 32-bit elements).
PGSVD_BF16 void transpose16(__m512i r[16]) {
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
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// pack[j * 64 + i] = (u[n0 + i, 2j], u[n0 + i, 2j + 1]) for j < ceil(R / 2), i < 64; rows past
// nrows and the column past an odd R are zero.
PGSVD_BF16 void pack_u(const uint16_t* u, int64_t ldu, int64_t nrows, int64_t R, int32_t* pack) {
  const int64_t P = (R + 1) / 2;
  for (int g = 0; g < kTuCols / 16; ++g) {
    for (int64_t c = 0; c * 16 < P; ++c) {
      const __mmask32 mk = mask32(R - c * 32);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = g * 16 + i;
        r[i] = n < nrows ? _mm512_maskz_loadu_epi16(mk, u + n * ldu + c * 32)
                         : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int j = 0; j < 16 && c * 16 + j < P; ++j)
        _mm512_storeu_si512(pack + (c * 16 + j) * kTuCols + g * 16, r[j]);
    }
  }
}

// y[i, :ncols] = bf16(sum_j tb[i, 2j..2j+1] . pack[j] + bias) for i < MB, ncols <= 64.
template <int MB>
PGSVD_BF16 void tu_block(const uint16_t* tb, int64_t ldtb, const int32_t* pack, int64_t P,
                         const uint16_t* bias, int64_t ncols, uint16_t* y, int64_t ldy) {
  __m512 acc[MB][4];
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i)
    _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < P; ++j) {
    const int32_t* w = pack + j * kTuCols;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 48);
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
      const __m512bh tp = bcast_pair(tb + i * ldtb + 2 * j);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], tp, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], tp, w1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], tp, w2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], tp, w3);
    }
  }
  for (int q = 0; q < 4; ++q) {
    const __mmask16 mk = mask16(ncols - q * 16);
    if (!mk) break;
    const __m512 b = bias ? widen(bias + q * 16, mk) : _mm512_setzero_ps();
    _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][q], b));
      _mm256_mask_storeu_epi16(y + i * ldy + q * 16, mk, out);
    }
  }
}

}  // namespace

bool available() { return cpu_ok(); }

namespace {

// t[m0:m1, :R] += x[m0:m1, k0:k1] @ v[k0:k1, :R], rows of v kXvChunk at a time (the next chunk
// prefetched): every unit of the chunk reads it from L1/L2, memory sees whole rows in order.
void xv_range(const uint16_t* xs, int64_t ldx, int64_t m0, int64_t m1, int64_t rows, int64_t k0,
              int64_t k1, const uint16_t* vs, int64_t ldv, int64_t R, float* t, int64_t ldt) {
  for (int64_t kb = k0; kb < k1; kb += kXvChunk) {
    const int64_t kc = std::min<int64_t>(kXvChunk, k1 - kb);
    if (kb + kc < k1)
      prefetch_l2(vs + (kb + kc) * ldv, std::min<int64_t>(kXvChunk, k1 - kb - kc) * ldv * 2);
    for (int64_t m = m0; m < m1; m += rows) {
      const int64_t mb = std::min(rows, m1 - m);
      for (int64_t c0 = 0; c0 < R; c0 += kXvCols) {
        const int64_t nc = std::min<int64_t>(kXvCols, R - c0);
        const uint16_t* xm = xs + m * ldx + kb;
        const uint16_t* vk = vs + kb * ldv + c0;
        float* tm = t + m * ldt + c0;
        switch (mb) {
#define PGSVD_XV(n) case n: xv_unit<n>(xm, ldx, kc, vk, ldv, nc, tm, ldt); break;
          PGSVD_XV(1) PGSVD_XV(2) PGSVD_XV(3) PGSVD_XV(4) PGSVD_XV(5) PGSVD_XV(6)
          PGSVD_XV(7) PGSVD_XV(8) PGSVD_XV(9) PGSVD_XV(10) PGSVD_XV(11) PGSVD_XV(12)
#undef PGSVD_XV
        }
      }
    }
  }
}

}  // namespace

void xv(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, const c10::BFloat16* v,
        int64_t ldv, int64_t R, float* t, int64_t ldt) {
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  const auto* vs = reinterpret_cast<const uint16_t*>(v);
  if (M == 0) return;
  for (int64_t m = 0; m < M; ++m) std::fill(t + m * ldt, t + m * ldt + R, 0.f);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t nmb = (M + kXvRows - 1) / kXvRows, rows = (M + nmb - 1) / nmb;
  if (nmb >= 4 * threads) {
    // Many rows (prefill, big batches): compute-bound; threads take row blocks of x and each
    // reads all of v (from cache after the first block), so no partials to sum.
    at::parallel_for(0, nmb, 1, [&](int64_t b, int64_t e) {
      xv_range(xs, ldx, b * rows, std::min(M, e * rows), rows, 0, K, vs, ldv, R, t, ldt);
    });
    return;
  }
  // Few rows (decode batches): memory-bound; K is split across threads, each streaming its own
  // rows of v into a private fp32 partial of t, then the partials are summed. Splitting M or R
  // instead would have every thread read all of v, in 64-byte pieces of every row, which ran at
  // a fifth of the bandwidth with cold weights.
  const int64_t nt = std::min<int64_t>(threads, std::max<int64_t>(1, K / (2 * kXvChunk)));
  const int64_t kper = ((K + nt - 1) / nt + 1) & ~int64_t(1);  // even: pairs never straddle
  std::vector<float> part(static_cast<size_t>((nt - 1) * M * R), 0.f);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {  // part 0 accumulates into t itself
      float* tp = p == 0 ? t : part.data() + (p - 1) * M * R;
      xv_range(xs, ldx, 0, M, rows, p * kper, std::min(K, (p + 1) * kper), vs, ldv, R, tp,
               p == 0 ? ldt : R);
    }
  });
  for (int64_t p = 1; p < nt; ++p)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < R; ++r) t[m * ldt + r] += part[((p - 1) * M + m) * R + r];
}

void tu(const c10::BFloat16* tb, int64_t ldtb, int64_t M, const c10::BFloat16* u, int64_t ldu,
        int64_t N, int64_t R, const c10::BFloat16* bias, c10::BFloat16* y, int64_t ldy) {
  if (M == 0) return;
  const auto* ts = reinterpret_cast<const uint16_t*>(tb);
  const auto* us = reinterpret_cast<const uint16_t*>(u);
  const auto* bs = reinterpret_cast<const uint16_t*>(bias);
  auto* ys = reinterpret_cast<uint16_t*>(y);
  const int64_t P = (R + 1) / 2, nb = (N + kTuCols - 1) / kTuCols;
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<int32_t> pack;
    pack.resize(static_cast<size_t>(std::max<int64_t>(P, 1) * kTuCols));
    for (int64_t w = b; w < e; ++w) {
      const int64_t n0 = w * kTuCols, nc = std::min<int64_t>(kTuCols, N - n0);
      if (w + 1 < e)  // the next unit's rows, into L2 while this one computes
        prefetch_l2(us + (n0 + nc) * ldu, std::min<int64_t>(kTuCols, N - n0 - nc) * ldu * 2);
      pack_u(us + n0 * ldu, ldu, nc, R, pack.data());
      const uint16_t* bn = bs ? bs + n0 : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += kTuRows) {
        const uint16_t* tm = ts + m0 * ldtb;
        uint16_t* ym = ys + m0 * ldy + n0;
        switch (std::min<int64_t>(kTuRows, M - m0)) {
#define PGSVD_TU(n) case n: tu_block<n>(tm, ldtb, pack.data(), P, bn, nc, ym, ldy); break;
          PGSVD_TU(1) PGSVD_TU(2) PGSVD_TU(3) PGSVD_TU(4) PGSVD_TU(5) PGSVD_TU(6)
#undef PGSVD_TU
        }
      }
    }
  });
}

#else  // not x86-64 with GCC/Clang: never available, never called

bool available() { return false; }
void xv(const c10::BFloat16*, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
        float*, int64_t) {}
void tu(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t,
        const c10::BFloat16*, c10::BFloat16*, int64_t) {}

#endif

}  // namespace pgsvd::bf16
