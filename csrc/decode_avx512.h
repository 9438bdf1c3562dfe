// The AVX-512 kernel set of the CPU decode kernels (csrc/lowrank_decode_cpu.cpp, which says
// why and what they cost): bf16 on AVX512-BF16 (VDPBF16PS on pairs), fp32 on AVX-512F (FMAs).
// Included by that file only; x86-64 with GCC/Clang (PGSVD_BF16_X86).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bf16_simd.h"
#include "lowrank_decode_cpu.h"

#define PGSVD_F32 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace pgsvd::decode::avx512 {

using namespace simd;

// t[m, :ncols] += x[m, k0:k1] @ v[k0:k1, :ncols] for m < MB, ncols <= 32 S (one band of S
// strips of 32 columns; k0 even). Rows k, k + 1 of the band are interleaved in registers into
// (v[k, r], v[k+1, r]) pairs and dotted with the broadcast pair (x[m, k], x[m, k+1]); the band's
// 2 S MB accumulators stay in registers while the rows go by, and the same band of the next
// chunk's rows (kChunk further on) is prefetched on the way, one line per line read.
template <int MB, int S>
PGSVD_BF16 void band(const uint16_t* x, int64_t ldx, int64_t k0, int64_t k1, const uint16_t* v,
                     int64_t ldv, int64_t ncols, float* t, int64_t ldt, int64_t pf_end) {
  const __m512i ilo = _mm512_load_si512(kLoIdx), ihi = _mm512_load_si512(kHiIdx);
  __mmask32 mk[S];
  for (int s = 0; s < S; ++s) mk[s] = mask32(ncols - 32 * s);
  __m512 acc[MB][2 * S];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 2 * S; ++q) acc[m][q] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 1 < k1; k += 2) {
    const uint16_t* va = v + k * ldv;
    if (k + kChunk + 1 < pf_end) {
      for (int s = 0; s < S; ++s) {
        _mm_prefetch(reinterpret_cast<const char*>(va + kChunk * ldv + 32 * s), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(va + (kChunk + 1) * ldv + 32 * s),
                     _MM_HINT_T1);
      }
    }
    __m512bh xp[MB];
    for (int m = 0; m < MB; ++m) xp[m] = bcast_pair(x + m * ldx + k);
    for (int s = 0; s < S; ++s) {
      const __m512i a = _mm512_maskz_loadu_epi16(mk[s], va + 32 * s);
      const __m512i b = _mm512_maskz_loadu_epi16(mk[s], va + ldv + 32 * s);
      const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, ilo, b);
      const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, ihi, b);
      for (int m = 0; m < MB; ++m) {
        acc[m][2 * s] = _mm512_dpbf16_ps(acc[m][2 * s], xp[m], lo);
        acc[m][2 * s + 1] = _mm512_dpbf16_ps(acc[m][2 * s + 1], xp[m], hi);
      }
    }
  }
  if (k < k1) {  // odd K: the last row of v, paired with a zero row
    const __m512i z = _mm512_setzero_si512();
    for (int s = 0; s < S; ++s) {
      const __m512i a = _mm512_maskz_loadu_epi16(mk[s], v + k * ldv + 32 * s);
      const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, ilo, z);
      const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, ihi, z);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xp = (__m512bh)_mm512_set1_epi32(int32_t(x[m * ldx + k]));
        acc[m][2 * s] = _mm512_dpbf16_ps(acc[m][2 * s], xp, lo);
        acc[m][2 * s + 1] = _mm512_dpbf16_ps(acc[m][2 * s + 1], xp, hi);
      }
    }
  }
  for (int s = 0; s < S; ++s) {
    const __mmask16 m0 = mask16(ncols - 32 * s), m1 = mask16(ncols - 32 * s - 16);
    for (int m = 0; m < MB; ++m) {
      float* tm = t + m * ldt + 32 * s;
      _mm512_mask_storeu_ps(tm, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, tm), acc[m][2 * s]));
      _mm512_mask_storeu_ps(tm + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, tm + 16),
                                                       acc[m][2 * s + 1]));
    }
  }
}

// fp32: t[m, :ncols] += x[m, k0:k1] @ v[k0:k1, :ncols] for m < MB, ncols <= 16 S (S strips of
// 16 columns), summed in fp32 registers over the chunk and added to t in fp64; the same band of
// the next chunk is prefetched on the way.
template <int MB, int S>
PGSVD_F32 void band(const float* x, int64_t ldx, int64_t k0, int64_t k1, const float* v,
                    int64_t ldv, int64_t ncols, double* t, int64_t ldt, int64_t pf_end) {
  __mmask16 mk[S];
  for (int s = 0; s < S; ++s) mk[s] = mask16(ncols - 16 * s);
  __m512 acc[MB][S];
  for (int m = 0; m < MB; ++m)
    for (int s = 0; s < S; ++s) acc[m][s] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const float* vk = v + k * ldv;
    if (k + kChunk < pf_end)
      for (int s = 0; s < S; ++s)
        _mm_prefetch(reinterpret_cast<const char*>(vk + kChunk * ldv + 16 * s), _MM_HINT_T1);
    __m512 xb[MB];
    for (int m = 0; m < MB; ++m) xb[m] = _mm512_set1_ps(x[m * ldx + k]);
    for (int s = 0; s < S; ++s) {
      const __m512 a = _mm512_maskz_loadu_ps(mk[s], vk + 16 * s);
      for (int m = 0; m < MB; ++m) acc[m][s] = _mm512_fmadd_ps(xb[m], a, acc[m][s]);
    }
  }
  for (int s = 0; s < S; ++s) {
    const __mmask8 lo = static_cast<__mmask8>(mk[s] & 0xFF), hi = static_cast<__mmask8>(mk[s] >> 8);
    for (int m = 0; m < MB; ++m) {
      double* tm = t + m * ldt + 16 * s;
      const __m512 w = acc[m][s];
      _mm512_mask_storeu_pd(tm, lo, _mm512_add_pd(_mm512_maskz_loadu_pd(lo, tm),
                                                  _mm512_cvtps_pd(_mm512_castps512_ps256(w))));
      const __m256 w_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1));
      _mm512_mask_storeu_pd(tm + 8, hi, _mm512_add_pd(_mm512_maskz_loadu_pd(hi, tm + 8),
                                                      _mm512_cvtps_pd(w_hi)));
    }
  }
}

// y[m] = bf16(<u[:R], hi[m] + lo[m]> + bias) for m < MB, one row u of the group; hi / lo rows
// hold ceil32(R) entries, zero past R (u's tail is masked, so nothing past the row is read).
// Two accumulator chains per (m, hi / lo), even and odd 32-column pieces. lo is used at M = 1
// only: there it is free (the row's bytes bound the time); at M >= 2 it would double the
// arithmetic that bounds it, and t rounded to bf16 is what torch's two matmuls compute anyway.
// The row pf_ahead rows further on is prefetched to L2 on the way (pf null: none), one line per
// line read. One row at a time, not several interleaved: interleaved rows ran at two thirds of
// this rate from cold memory.
template <int MB>
PGSVD_BF16 void row(const uint16_t* hi, const uint16_t* lo, int64_t ldt, const uint16_t* u,
                    int64_t R, const uint16_t* bias, uint16_t* y, int64_t ldy,
                    const uint16_t* pf) {
  constexpr bool kLo = MB == 1;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t c = 0; c < R; c += 64) {
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mask32(R - c), u + c);
    const __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(mask32(R - c - 32), u + c + 32);
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pf + c + 32), _MM_HINT_T1);
    }
    for (int m = 0; m < MB; ++m) {
      const uint16_t* hm = hi + m * ldt + c;
      const uint16_t* lm = lo + m * ldt + c;
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(hm));
      if (kLo) acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w0, (__m512bh)_mm512_loadu_si512(lm));
      if (c + 32 < R) {
        acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w1, (__m512bh)_mm512_loadu_si512(hm + 32));
        if (kLo) acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w1, (__m512bh)_mm512_loadu_si512(lm + 32));
      }
    }
  }
  const float b = bias ? static_cast<float>(c10::BFloat16(*bias, c10::BFloat16::from_bits())) : 0.f;
  for (int m = 0; m < MB; ++m) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                   _mm512_add_ps(acc[m][2], acc[m][3]));
    y[m * ldy] = c10::BFloat16(_mm512_reduce_add_ps(s) + b).x;
  }
}

// fp32: y[m] = <u[:R], t[m]> + bias for m < MB (t rows zero past R); two chains per m for a few
// rows, one when the MB chains are enough (and two would not fit in the registers).
template <int MB>
PGSVD_F32 void row(const float* t, const float*, int64_t ldt, const float* u, int64_t R,
                   const float* bias, float* y, int64_t ldy, const float* pf) {
  constexpr int Q = MB <= 4 ? 2 : 1;
  __m512 acc[MB][Q];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t c = 0; c < R; c += 32) {
    const __m512 w0 = _mm512_maskz_loadu_ps(mask16(R - c), u + c);
    const __m512 w1 = _mm512_maskz_loadu_ps(mask16(R - c - 16), u + c + 16);
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pf + c + 16), _MM_HINT_T1);
    }
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(t + m * ldt + c), acc[m][0]);
      acc[m][Q - 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(t + m * ldt + c + 16), acc[m][Q - 1]);
    }
  }
  const float b = bias ? *bias : 0.f;
  for (int m = 0; m < MB; ++m) {
    const __m512 a = Q == 2 ? _mm512_add_ps(acc[m][0], acc[m][Q - 1]) : acc[m][0];
    y[m * ldy] = _mm512_reduce_add_ps(a) + b;
  }
}

// t[m] = <x[m, :K], vt[:K]> for m < MB, one row of v.T (bf16): phase 1 where v comes as v.T
// (the driver's run_dots). VDPBF16PS on 32 elements of x's row and of vt at a time: the pairs
// lie side by side in memory, so nothing is interleaved or broadcast (band() spends two
// permutes per two rows of v). 4 / MB accumulator chains, summed in fp32 as band() sums.
template <int MB>
PGSVD_BF16 void dots(const uint16_t* x, int64_t ldx, const uint16_t* vt, int64_t K, float* t) {
  constexpr int Q = MB < 4 ? 4 / MB : 1;
  __m512 acc[MB][Q];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_setzero_ps();
  const auto step = [&](int64_t c, __mmask32 mk, int q) PGSVD_BF16 {
    const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mk, vt + c);
    for (int m = 0; m < MB; ++m)
      acc[m][q] = _mm512_dpbf16_ps(
          acc[m][q], (__m512bh)_mm512_maskz_loadu_epi16(mk, x + m * ldx + c), w);
  };
  int64_t c = 0;
  for (; c + 32 * Q <= K; c += 32 * Q)
    for (int q = 0; q < Q; ++q) step(c + 32 * q, ~__mmask32(0), q);
  for (int q = 0; c < K; c += 32, ++q) step(c, mask32(K - c), q);
  for (int m = 0; m < MB; ++m) {
    for (int q = 1; q < Q; ++q) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][q]);
    t[m] = _mm512_reduce_add_ps(acc[m][0]);
  }
}

// fp32: t[m] = <x[m, :K], vt[:K]> on 4 / MB chains of 16 lanes, the chains summed into fp64 every
// kSpan columns (each lane has then summed kChunk products, as band() sums a chunk).
template <int MB>
PGSVD_F32 void dots(const float* x, int64_t ldx, const float* vt, int64_t K, double* t) {
  constexpr int Q = MB < 4 ? 4 / MB : 1;
  constexpr int64_t kSpan = kChunk * 16 * Q;
  for (int m = 0; m < MB; ++m) t[m] = 0;
  for (int64_t c0 = 0; c0 < K; c0 += kSpan) {
    const int64_t c1 = std::min(K, c0 + kSpan);
    __m512 acc[MB][Q];
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_setzero_ps();
    const auto step = [&](int64_t c, __mmask16 mk, int q) PGSVD_F32 {
      const __m512 w = _mm512_maskz_loadu_ps(mk, vt + c);
      for (int m = 0; m < MB; ++m)
        acc[m][q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + m * ldx + c), w, acc[m][q]);
    };
    int64_t c = c0;
    for (; c + 16 * Q <= c1; c += 16 * Q)
      for (int q = 0; q < Q; ++q) step(c + 16 * q, static_cast<__mmask16>(0xFFFF), q);
    for (int q = 0; c < c1; c += 16, ++q) step(c, mask16(c1 - c), q);
    for (int m = 0; m < MB; ++m) {
      for (int q = 1; q < Q; ++q) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][q]);
      const __m512d d = _mm512_add_pd(
          _mm512_cvtps_pd(_mm512_castps512_ps256(acc[m][0])),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m][0]), 1))));
      t[m] += _mm512_reduce_add_pd(d);
    }
  }
}

// The set as the driver uses it. bf16: fp32 partials of t, handed to phase 2 as bf16 hi + lo;
// fp32: fp64 partials, t rounded once to fp32.
struct Isa {
  template <typename E>
  static constexpr bool kF32 = std::is_same_v<E, float>;
  template <typename E>
  using Part = std::conditional_t<kF32<E>, double, float>;
  template <typename E>
  using Hand = E;
  template <typename E>
  static constexpr bool kSplit = !kF32<E>;  // hi + lo handoff
  template <typename E>
  static constexpr int64_t kMaxM = kF32<E> ? 16 : 4;
  // Columns per strip and strips per band (16 accumulators at most).
  template <typename E>
  static constexpr int kStrip = kF32<E> ? 16 : 32;
  template <typename E, int MB>
  static constexpr int kBand = kF32<E> ? (MB < 16 ? 16 / MB : 1) : (MB == 1 ? 8 : MB == 2 ? 4 : 2);

  template <int MB, int S, typename E, typename P>
  static void band(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv,
                   int64_t ncols, P* t, int64_t ldt, int64_t pf_end) {
    avx512::band<MB, S>(x, ldx, k0, k1, v, ldv, ncols, t, ldt, pf_end);
  }
  // Phase 1 sweeps bands; one row of u per pass of phase 2 (see row()).
  template <typename E, int MB>
  static constexpr bool kStream = false;
  template <typename E, int MB>
  static constexpr int kRows = 1;
  // v as v.T: phase 1 as dots() (decode::v_transposed; what it buys over band(): the driver's
  // header).
  template <typename E>
  static constexpr bool kDots = true;
  template <int MB, typename E, typename P>
  static void dots(const E* x, int64_t ldx, const E* vt, int64_t K, P* t) {
    avx512::dots<MB>(x, ldx, vt, K, t);
  }
  template <int MB, int P, typename E>
  static void rows(const E* hi, const E* lo, int64_t ldt, const E* u, int64_t, int64_t R,
                   const E* bias, E* y, int64_t ldy, const E* pf, int64_t) {
    static_assert(P == 1);
    avx512::row<MB>(hi, lo, ldt, u, R, bias, y, ldy, pf);  // pf null when pf_rows is 0
  }
};

}  // namespace pgsvd::decode::avx512
