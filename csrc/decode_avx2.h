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

// y[m] = <u[:R], t[m]> + bias for m < MB, one row u of a group (t rows readable and zero up to
// R rounded up to 32); two accumulator chains per m for a few rows, one for more (16 registers).
// The row pf_ahead rows further on is prefetched to L2 on the way (pf null: none).
template <int MB, typename E>
PGSVD_AVX2 void row(const float* t, const float*, int64_t ldt, const E* u, int64_t R,
                    const E* bias, E* y, int64_t ldy, const E* pf) {
  constexpr int Q = MB <= 4 ? 2 : 1;
  __m256 acc[MB][Q];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < Q; ++q) acc[m][q] = _mm256_setzero_ps();
  for (int64_t c = 0; c < R; c += 16) {
    const bool full = c + 16 <= R;
    const __m256 w0 = full ? load8(u + c) : load8(u + c, R - c);
    const __m256 w1 = full ? load8(u + c + 8) : load8(u + c + 8, R - c - 8);
    if (pf && (c * int64_t(sizeof(E))) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(pf + c), _MM_HINT_T1);
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(t + m * ldt + c), acc[m][0]);
      acc[m][Q - 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(t + m * ldt + c + 8), acc[m][Q - 1]);
    }
  }
  const float b = bias ? to_f(*bias) : 0.f;
  for (int m = 0; m < MB; ++m) {
    const __m256 a = Q == 2 ? _mm256_add_ps(acc[m][0], acc[m][Q - 1]) : acc[m][0];
    store(y + m * ldy, hsum(a) + b);
  }
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

  template <int MB, int S, typename E, typename P>
  static void band(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv,
                   int64_t ncols, P* t, int64_t ldt, int64_t pf_end) {
    avx2::band<MB, S>(x, ldx, k0, k1, v, ldv, ncols, t, ldt, pf_end);
  }
  template <int MB, typename E>
  static void row(const float* hi, const float* lo, int64_t ldt, const E* u, int64_t R,
                  const E* bias, E* y, int64_t ldy, const E* pf) {
    avx2::row<MB>(hi, lo, ldt, u, R, bias, y, ldy, pf);
  }
};

}  // namespace pgsvd::decode::avx2
