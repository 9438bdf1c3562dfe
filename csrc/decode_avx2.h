// The AVX2 kernel set of the CPU decode kernels (csrc/lowrank_decode_cpu.cpp, which says why and
// what they cost), for CPUs without AVX-512 (AMD Zen 2/3, most client CPUs): bf16 and fp32 with
// FMAs on 8 floats, a bf16 factor widened on load (a zero extension and a shift: bf16 is the top
// half of an fp32). Phase 1 sums each chunk of v's rows in fp32 registers and adds it to an fp64
// partial; t is handed to phase 2 in fp32 (never rounded to bf16); phase 2 dots u's rows with t
// in fp32, one rounding on store. Included by that file only; x86-64 with GCC/Clang.
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowrank_decode_cpu.h"

#define PGSVD_AVX2 __attribute__((target("avx2,fma")))

namespace pgsvd::decode::avx2 {

inline float to_f(float a) { return a; }
inline float to_f(uint16_t a) { return static_cast<float>(c10::BFloat16(a, c10::BFloat16::from_bits())); }
inline void store(float* y, float a) { *y = a; }
inline void store(uint16_t* y, float a) { *y = c10::BFloat16(a).x; }

// 8 elements widened to fp32; the n-element forms (n < 8) read p[0, n) only, zeros past it.
PGSVD_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PGSVD_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
alignas(32) inline constexpr int32_t kMaskTab[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                     0,  0,  0,  0,  0,  0,  0,  0};
PGSVD_AVX2 inline __m256 load8(const float* p, int64_t n) {
  if (n <= 0) return _mm256_setzero_ps();
  return _mm256_maskload_ps(p, _mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(kMaskTab + 8 - std::min<int64_t>(n, 8))));
}
PGSVD_AVX2 inline __m256 load8(const uint16_t* p, int64_t n) {
  alignas(16) uint16_t b[8] = {};
  if (n > 0) std::memcpy(b, p, static_cast<size_t>(std::min<int64_t>(n, 8)) * sizeof(uint16_t));
  return load8(b);
}

PGSVD_AVX2 inline float hsum(__m256 s) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

// t[m, :ncols] += x[m, k0:k1] @ v[k0:k1, :ncols] for m < MB, ncols <= 8 S (one band of S strips
// of 8 columns): the band's MB S accumulators stay in registers while the rows go by (summed in
// fp32 over the chunk, added to t in fp64), and the same band of the next chunk's rows (kChunk
// further on) is prefetched to L2 on the way, one line per line read.
template <int MB, int S, typename E>
PGSVD_AVX2 void band(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv,
                     int64_t ncols, double* t, int64_t ldt, int64_t pf_end) {
  constexpr int64_t kLine = 64 / sizeof(E);
  __m256 acc[MB][S];
  for (int m = 0; m < MB; ++m)
    for (int s = 0; s < S; ++s) acc[m][s] = _mm256_setzero_ps();
  const bool full = ncols == 8 * S;
  for (int64_t k = k0; k < k1; ++k) {
    const E* vk = v + k * ldv;
    if (k + kChunk < pf_end)
      for (int64_t c = 0; c < ncols; c += kLine)
        _mm_prefetch(reinterpret_cast<const char*>(vk + kChunk * ldv + c), _MM_HINT_T1);
    __m256 xb[MB];
    for (int m = 0; m < MB; ++m) xb[m] = _mm256_set1_ps(to_f(x[m * ldx + k]));
    for (int s = 0; s < S; ++s) {
      const __m256 w = full || 8 * (s + 1) <= ncols ? load8(vk + 8 * s) : load8(vk + 8 * s, ncols - 8 * s);
      for (int m = 0; m < MB; ++m) acc[m][s] = _mm256_fmadd_ps(xb[m], w, acc[m][s]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int s = 0; s < S; ++s) {
      alignas(32) float a[8];
      _mm256_store_ps(a, acc[m][s]);
      const int64_t n = std::min<int64_t>(8, ncols - 8 * s);
      for (int64_t i = 0; i < n; ++i) t[m * ldt + 8 * s + i] += a[i];
    }
}

// t[m, :R] += x[m, k0:k1] @ v[k0:k1, :R] for m < MB, whole rows of v in order: memory sees one
// sequential stream, which the hardware prefetchers follow (software prefetches made no
// measurable difference here). The chunk's fp32 sums live in a scratch row per m (in L1), not in
// registers: the same sums in the same order as band(), so the results are identical. Per 8
// columns a load, an FMA and a store per m: at MB <= 4 (fp32) memory stays the bound; bf16 has
// the narrow bands (16 bytes a row at MB = 8) that this replaces at every MB.
template <int MB, typename E>
PGSVD_AVX2 void stream(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv,
                       int64_t R, double* t, int64_t ldt) {
  const int64_t R8 = R & ~int64_t(7), lda = R8 + 8;
  thread_local std::vector<float> scratch;
  scratch.assign(static_cast<size_t>(MB * lda), 0.f);
  float* acc = scratch.data();
  const auto step = [&](const __m256* xb, __m256 w, int64_t c) PGSVD_AVX2 {
    for (int m = 0; m < MB; ++m) {
      float* a = acc + m * lda + c;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(xb[m], w, _mm256_loadu_ps(a)));
    }
  };
  for (int64_t k = k0; k < k1; ++k) {
    const E* vk = v + k * ldv;
    __m256 xb[MB];
    for (int m = 0; m < MB; ++m) xb[m] = _mm256_set1_ps(to_f(x[m * ldx + k]));
    for (int64_t c = 0; c < R8; c += 8) step(xb, load8(vk + c), c);
    if (R8 < R) step(xb, load8(vk + R8, R - R8), R8);
  }
  for (int m = 0; m < MB; ++m)
    for (int64_t c = 0; c < R; ++c) t[m * ldt + c] += acc[m * lda + c];
}

// y[m, p] = <u[p, :R], t[m]> + bias[p] for m < MB, p < P: P rows of u at once (row stride ldu;
// t rows readable and zero up to R rounded up to 32), 8 columns at a time, t's loaded once for
// all P. One accumulator chain per (p, m), 8 / MB when P = 1: with few chains the loads behind
// a stalled one wait too, and the reads of u fall behind memory (an in-process A/B on Zen 3,
// weights cold, fp32 at one row: SmolLM2 pgsvd-40's gate/up calls took 1.19x as long with 4 rows
// of u on one chain each as with one row on 4 chains; a plain read of u in place of phase 2 was
// 5% faster still; 8 chains and 4 measured alike over the whole step).
// Rows pf[0, pf_rows) (stride ldu) are prefetched to L2 on the way, one line per line read.
template <int MB, int P, typename E>
PGSVD_AVX2 void rows(const float* t, int64_t ldt, const E* u, int64_t ldu, int64_t R,
                     const E* bias, E* y, int64_t ldy, const E* pf, int64_t pf_rows) {
  constexpr int64_t kLine = 64 / sizeof(E);
  constexpr int Q = P == 1 && MB < 8 ? 8 / MB : 1;  // chains per (p, m)
  __m256 acc[P][MB][Q];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < Q; ++q) acc[p][m][q] = _mm256_setzero_ps();
  // One step: 8 columns from c of the P rows into chain q (n < 8: the last, partial one).
  const auto step = [&](int64_t c, int64_t n, int q) PGSVD_AVX2 {
    if (pf_rows > 0 && c % kLine == 0)
      for (int64_t p = 0; p < pf_rows; ++p)
        _mm_prefetch(reinterpret_cast<const char*>(pf + p * ldu + c), _MM_HINT_T1);
    __m256 tm[MB];
    for (int m = 0; m < MB; ++m) tm[m] = _mm256_loadu_ps(t + m * ldt + c);
    for (int p = 0; p < P; ++p) {
      const __m256 w = n == 8 ? load8(u + p * ldu + c) : load8(u + p * ldu + c, n);
      for (int m = 0; m < MB; ++m) acc[p][m][q] = _mm256_fmadd_ps(w, tm[m], acc[p][m][q]);
    }
  };
  int64_t c = 0;
  for (; c + 8 * Q <= R; c += 8 * Q)
    for (int q = 0; q < Q; ++q) step(c + 8 * q, 8, q);
  for (int q = 0; c < R; c += 8, ++q) step(c, std::min<int64_t>(8, R - c), q);
  for (int p = 0; p < P; ++p) {
    const float b = bias ? to_f(bias[p]) : 0.f;
    for (int m = 0; m < MB; ++m) {
      __m256 a = acc[p][m][0];
      for (int q = 1; q < Q; ++q) a = _mm256_add_ps(a, acc[p][m][q]);
      store(y + m * ldy + p, hsum(a) + b);
    }
  }
}

// t[m] = <x[m, :K], vt[:K]> for m < MB, one row of v.T (fp32; x rows readable and zero up to K
// rounded up to 8): phase 1 where v comes as v.T (the driver's run_dots). Like rows() at P = 1
// on 8 / MB chains, but the chains are summed (pairwise) into fp64 every kSpan columns, where
// each of their lanes has summed kChunk products (the driver rounds t once): as accurate as
// phase 1's fp64 partials of kChunk-row sums where v comes in rows. No software prefetch: one line
// ahead per line read, as rows() does, made the step's linears 5-8% slower at 1-2 rows (Zen 3).
template <int MB>
PGSVD_AVX2 void dots(const float* x, int64_t ldx, const float* vt, int64_t K, double* t) {
  constexpr int Q = MB < 8 ? 8 / MB : 1;
  constexpr int64_t kSpan = kChunk * 8 * Q;
  double sum[MB] = {};
  for (int64_t c0 = 0; c0 < K; c0 += kSpan) {
    const int64_t c1 = std::min(K, c0 + kSpan);
    __m256 acc[MB][Q];
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < Q; ++q) acc[m][q] = _mm256_setzero_ps();
    const auto step = [&](int64_t c, int64_t n, int q) PGSVD_AVX2 {
      const __m256 w = n == 8 ? load8(vt + c) : load8(vt + c, n);
      for (int m = 0; m < MB; ++m)
        acc[m][q] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + c), w, acc[m][q]);
    };
    int64_t c = c0;
    for (; c + 8 * Q <= c1; c += 8 * Q)
      for (int q = 0; q < Q; ++q) step(c + 8 * q, 8, q);
    for (int q = 0; c < c1; c += 8, ++q) step(c, std::min<int64_t>(8, c1 - c), q);
    for (int m = 0; m < MB; ++m) {
      for (int w = 1; w < Q; w *= 2)  // pairwise over the chains
        for (int q = 0; q + w < Q; q += 2 * w) acc[m][q] = _mm256_add_ps(acc[m][q], acc[m][q + w]);
      const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(acc[m][0])),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(acc[m][0], 1)));
      __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
      sum[m] += _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    }
  }
  for (int m = 0; m < MB; ++m) t[m] = sum[m];
}

// The set as the driver uses it: fp64 partials of t, t handed to phase 2 in fp32, for both dtypes.
struct Isa {
  template <typename E>
  using Part = double;
  template <typename E>
  using Hand = float;
  template <typename E>
  static constexpr bool kSplit = false;
  template <typename E>
  static constexpr int64_t kMaxM = 8;
  template <typename E>
  static constexpr int kStrip = 8;
  // Strips per band: MB S accumulators + MB broadcasts + a load within 16 registers.
  template <typename E, int MB>
  static constexpr int kBand = MB <= 4 ? 10 / MB : 1;
  // Phase 1 streams whole rows (stream()) rather than sweeping bands: bf16 always, fp32 up to 4
  // rows (at 8 the band's registers won by 1.15x in an A/B over bench_layers' layers, Zen 3).
  template <typename E, int MB>
  static constexpr bool kStream = sizeof(E) == 2 || MB <= 4;
  // Rows of u per pass of phase 2 (registers: P MB accumulators + MB + 1). fp32 up to 2 rows
  // of x: one row of u on 8 / MB chains (rows()), 1.08x (M = 1) and 1.07x (M = 2) over 4 rows
  // on one chain each in an A/B over bench_layers' layers (Zen 3); at 4 rows of x it lost
  // (0.92x against 2 rows of u), as did bf16 at one (0.89x against 4, which beat 2 and 8).
  template <typename E, int MB>
  static constexpr int kRows = sizeof(E) == 4 && MB <= 2 ? 1 : MB <= 2 ? 4 : MB <= 4 ? 2 : 1;
  // v as v.T: phase 1 as dots() (fp32; decode::v_transposed).
  template <typename E>
  static constexpr bool kDots = sizeof(E) == 4;

  template <int MB, int S, typename E, typename P>
  static void band(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv,
                   int64_t ncols, P* t, int64_t ldt, int64_t pf_end) {
    avx2::band<MB, S>(x, ldx, k0, k1, v, ldv, ncols, t, ldt, pf_end);
  }
  template <int MB, typename E, typename P>
  static void stream(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv,
                     int64_t R, P* t, int64_t ldt) {
    avx2::stream<MB>(x, ldx, k0, k1, v, ldv, R, t, ldt);
  }
  template <int MB, typename E, typename P>
  static void dots(const E* x, int64_t ldx, const E* vt, int64_t K, P* t) {
    static_assert(sizeof(E) == 4, "AVX2 dots(): fp32 only (kDots)");
    avx2::dots<MB>(x, ldx, vt, K, t);
  }
  template <int MB, int P, typename E>
  static void rows(const float* hi, const float*, int64_t ldt, const E* u, int64_t ldu, int64_t R,
                   const E* bias, E* y, int64_t ldy, const E* pf, int64_t pf_rows) {
    avx2::rows<MB, P>(hi, ldt, u, ldu, R, bias, y, ldy, pf, pf_rows);
  }
};

}  // namespace pgsvd::decode::avx2
