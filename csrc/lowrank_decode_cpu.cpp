// The decode kernels of the CPU low-rank op (one token per sequence, a few sequences): bf16 on
// AVX512-BF16 for M <= 4 rows, fp32 on AVX-512 for M <= 16. y_g = (x @ v_cat)[:, group g] @
// u_g.T + bias_g for the G groups sharing x, in ONE parallel region (one fork/join per call).
//
// A decode step is memory-bound: the factors are read once and each element is used M times, so
// the kernel must issue few instructions per byte to keep up with memory. The one-pass kernel of
// csrc/lowrank_matmul_cpu.cpp (still the path without AVX512-BF16) widens every bf16 element with
// a shuffle and a shift: 32 GB/s from cache against oneDNN's 76 on a 2.2 MB layer (AMD EPYC).
// Here each instruction on the factors is a VDPBF16PS on 32 of them:
//   phase 1 (t = x @ v_cat): K is split across threads, each streaming its own rows of v into a
//     private fp32 partial, in bands of up to 8 strips of 32 columns whose accumulators stay in
//     registers while the rows go by in order (the whole row when R <= 256). Rows k, k+1 are
//     interleaved in registers into (v[k, r], v[k+1, r]) pairs and dotted with the broadcast pair
//     (x[m, k], x[m, k+1]).
//   the partials are summed (columns split) and t is split into bf16 hi + lo parts,
//     t = hi + lo + O(2^-17 |t|): t is never rounded to bf16 as torch's two matmuls round it.
//   phase 2 (y = t @ u.T + bias): the rows of all groups' u are split across threads; pairs
//     (u[n, 2j], u[n, 2j+1]) already lie side by side, so a row is dotted with hi and lo directly,
//     one row at a time; one rounding to bf16 on store.
// Both phases prefetch ahead into L2 in step with their loads (one line per line read): with
// the weights in DRAM (every real model: they are read once per token) phase 1 streamed up to
// 1.4x faster than with L1 prefetches (AMD EPYC; benchmarks/bench_layers.py measures the kernels
// in a model's sequence of layers).
// fp32 has the same two phases with FMAs on 16 floats: phase 1 sums each 64-row chunk in fp32
// registers and adds it to an fp64 partial (a library GEMV's blocked sums are that accurate), t
// is rounded once to fp32; up to 16 rows, as the arithmetic per byte stays below what two cores
// do while memory streams (the bf16 one stops at 4, where the GEMMs of lowrank_bf16_cpu.cpp
// take over). On this AMD EPYC torch's fp32 path (MKL, two GEMVs) read the factors
// at 5.7 GB/s inside a model's step against oneDNN's 16.7 for the dense layers.
// Accuracy: bf16 products are exact in fp32, sums are fp32; fp32 as above
// (tests/ops/test_lowrank_cpu.py holds every case to 2x torch's own error against fp64).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16_simd.h"
#include "lowrank_decode_cpu.h"

namespace pgsvd::decode {

#ifdef PGSVD_BF16_X86

#define PGSVD_F32 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace {

using namespace simd;

constexpr int64_t kChunk = 64;         // rows of v per sweep of the bands (even)
constexpr int64_t kGrainElems = 16384;  // factor elements per thread below which one thread runs
constexpr int64_t kAheadBytes = 4096;   // phase 2's software prefetch distance in u

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

// Columns per strip and strips per band (16 accumulators at most).
template <typename E>
constexpr int kStripCols = std::is_same_v<E, float> ? 16 : 32;
template <typename E, int MB>
constexpr int kBandStrips = std::is_same_v<E, float> ? (MB < 16 ? 16 / MB : 1)
                                                     : (MB == 1 ? 8 : MB == 2 ? 4 : 2);

// t[:MB, :R] += x[:MB, k0:k1] @ v[k0:k1, :R] (k0 even, k1 - k0 <= kChunk, prefetching up to row
// pf_end): bands of S strips, the last one narrower (no accumulator spent past R).
template <typename E, typename P, int MB, int S = kBandStrips<E, MB>>
void bands(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv, int64_t R,
           P* t, int64_t ldt, int64_t pf_end) {
  constexpr int64_t C = kStripCols<E>;
  int64_t c0 = 0;
  for (; c0 + C * S <= R; c0 += C * S)
    band<MB, S>(x, ldx, k0, k1, v + c0, ldv, C * S, t + c0, ldt, pf_end);
  const int64_t rest = R - c0;
  if (rest > C * (S - 1)) {
    band<MB, S>(x, ldx, k0, k1, v + c0, ldv, rest, t + c0, ldt, pf_end);
  } else if (rest > 0) {
    if constexpr (S > 1) bands<E, P, MB, S - 1>(x, ldx, k0, k1, v + c0, ldv, rest, t + c0, ldt, pf_end);
  }
}

// t[:MB, :R] += x[:MB, k0:k1] @ v[k0:k1, :R] (k0 even), kChunk rows of v at a time: the bands
// sweep a chunk while it sits in L2 (memory sees whole rows in order), and prefetch the next.
template <int MB, typename E, typename P>
void phase1(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv, int64_t R,
            P* t, int64_t ldt) {
  for (int64_t kb = k0; kb < k1; kb += kChunk)
    bands<E, P, MB>(x, ldx, kb, std::min(k1, kb + kChunk), v, ldv, R, t, ldt, k1);
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

// Rows [n0, n1) of one group, prefetching kAheadBytes of u ahead (at least one row).
template <int MB, typename E>
void phase2(const E* hi, const E* lo, int64_t ldt, const Group<E>& g, int64_t n0, int64_t n1) {
  const int64_t ahead = std::max<int64_t>(
      1, (kAheadBytes + int64_t(sizeof(E)) * g.ldu - 1) / (int64_t(sizeof(E)) * g.ldu));
  for (int64_t n = n0; n < n1; ++n)
    row<MB>(hi, lo, ldt, g.u + n * g.ldu, g.R, g.bias ? g.bias + n : nullptr, g.y + n, g.ldy,
            n + ahead < n1 ? g.u + (n + ahead) * g.ldu : nullptr);
}

// The call: phase 1 (K split across threads, a private partial each), a barrier, the partials
// summed into what phase 2 reads (bf16: hi and lo; fp32: t rounded once), a barrier, phase 2
// (all groups' rows split across threads). E: storage (uint16_t for bf16, float); partials in P.
template <int MB, typename E>
void run(const E* x, int64_t ldx, int64_t K, const E* v, int64_t ldv, int64_t Rt,
         const std::vector<Group<E>>& groups) {
  constexpr bool kBf16 = std::is_same_v<E, uint16_t>;
  using P = std::conditional_t<kBf16, float, double>;
  constexpr int64_t M = MB;
  // Group g's rows of what phase 2 reads: columns [off_g, off_g + ceil32(R_g)) of (M, W) buffers.
  std::vector<int64_t> off(groups.size() + 1, 0), r0(groups.size() + 1, 0);
  int64_t n_total = 0, work = K * Rt;
  for (size_t g = 0; g < groups.size(); ++g) {
    off[g + 1] = off[g] + (groups[g].R + 31) / 32 * 32;
    r0[g + 1] = r0[g] + groups[g].R;
    n_total += groups[g].N;
    work += groups[g].N * groups[g].R;
  }
  const int64_t W = off.back();
  int64_t nt = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, work / kGrainElems));
  nt = std::min<int64_t>(nt, std::max<int64_t>(1, K / 2));
#ifdef _OPENMP
  if (omp_in_parallel()) nt = 1;
#else
  nt = 1;
#endif
  // Scratch of the calling thread, reused across calls: nt partials of t, then hi and lo (bf16)
  // or t (fp32, lo unused).
  thread_local std::vector<P> part;
  thread_local std::vector<E> handoff;
  part.resize(static_cast<size_t>(nt * M * Rt));
  handoff.resize(static_cast<size_t>((kBf16 ? 2 : 1) * M * W));
  P* pp = part.data();
  E* hi = handoff.data();
  E* lo = kBf16 ? hi + M * W : hi;
  const int64_t kper = ((K + nt - 1) / nt + 1) & ~int64_t(1);  // even: pairs never straddle

  auto body = [&](int64_t tid, int64_t nthr) {
    P* tp = pp + tid * M * Rt;
    std::fill(tp, tp + M * Rt, P(0));
    const int64_t k0 = std::min(K, tid * kper), k1 = std::min(K, k0 + kper);
    if (k0 < k1) phase1<MB>(x, ldx, k0, k1, v, ldv, Rt, tp, Rt);
#ifdef _OPENMP
    if (nthr > 1) {
#pragma omp barrier
    }
#endif
    const int64_t per = (M * W + nthr - 1) / nthr;
    for (int64_t e = tid * per; e < std::min(M * W, (tid + 1) * per); ++e) {
      const int64_t m = e / W, c = e % W;
      const size_t g = std::upper_bound(off.begin(), off.end(), c) - off.begin() - 1;
      const int64_t r = c - off[g];
      P sum = 0;
      if (r < groups[g].R)
        for (int64_t p = 0; p < nthr; ++p) sum += pp[(p * M + m) * Rt + r0[g] + r];
      if constexpr (kBf16) {
        const c10::BFloat16 h(sum);
        hi[e] = h.x;
        lo[e] = c10::BFloat16(sum - static_cast<float>(h)).x;
      } else {
        hi[e] = static_cast<float>(sum);
      }
    }
#ifdef _OPENMP
    if (nthr > 1) {
#pragma omp barrier
    }
#endif
    const int64_t nc = (n_total + nthr - 1) / nthr, b = std::min(n_total, tid * nc);
    const int64_t e = std::min(n_total, b + nc);
    int64_t base = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      const int64_t n0 = std::max(b, base), n1 = std::min(e, base + groups[g].N);
      if (n0 < n1) phase2<MB>(hi + off[g], lo + off[g], W, groups[g], n0 - base, n1 - base);
      base += groups[g].N;
    }
  };
  if (nt == 1) {
    body(0, 1);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(nt))
  body(omp_get_thread_num(), omp_get_num_threads());
#endif
}

template <typename E, int MB = 1>
void dispatch(const E* x, int64_t ldx, int64_t M, int64_t K, const E* v, int64_t ldv, int64_t Rt,
              const std::vector<Group<E>>& groups) {
  constexpr int64_t kMax = std::is_same_v<E, float> ? kMaxMF32 : kMaxMBf16;
  if constexpr (MB <= kMax) {
    if (M == MB) return run<MB>(x, ldx, K, v, ldv, Rt, groups);
    return dispatch<E, MB + 1>(x, ldx, M, K, v, ldv, Rt, groups);
  }
  TORCH_CHECK(false, "pgsvd: the decode kernel takes 1-", kMax, " rows, got ", M);
}

}  // namespace

bool bf16_available() { return simd::cpu_ok(); }

bool f32_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

void run(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, const c10::BFloat16* v,
         int64_t ldv, int64_t Rt, const std::vector<Group<c10::BFloat16>>& groups) {
  std::vector<Group<uint16_t>> gs;
  for (const auto& g : groups)
    gs.push_back({reinterpret_cast<const uint16_t*>(g.u), g.ldu, g.N, g.R,
                  reinterpret_cast<const uint16_t*>(g.bias), reinterpret_cast<uint16_t*>(g.y),
                  g.ldy});
  dispatch(reinterpret_cast<const uint16_t*>(x), ldx, M, K, reinterpret_cast<const uint16_t*>(v),
           ldv, Rt, gs);
}

void run(const float* x, int64_t ldx, int64_t M, int64_t K, const float* v, int64_t ldv,
         int64_t Rt, const std::vector<Group<float>>& groups) {
  dispatch(x, ldx, M, K, v, ldv, Rt, groups);
}

#else  // not x86-64 with GCC/Clang: never available, never called

bool bf16_available() { return false; }
bool f32_available() { return false; }
void run(const c10::BFloat16*, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
         const std::vector<Group<c10::BFloat16>>&) {}
void run(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
         const std::vector<Group<float>>&) {}

#endif

}  // namespace pgsvd::decode
