// The AVX2 tiles of the packed CPU kernels (csrc/lowrank_packed_cpu.cpp says what a tile
// computes and how a call is split between threads), for CPUs without AVX-512 (AMD Zen 2/3, most
// client CPUs) or without AVX512-BF16 (bf16 there): FMAs on 8 floats, for fp32 and bf16 factors.
//
// 16 ymm registers: a tile is up to 3 rows x one 32-column panel, 12 accumulators, the rows'
// broadcasts of the step (3) and one vector of the panel at a time; per step 4 panel loads and 3
// broadcast loads feed 12 FMAs. Sums are blocked by `chunk` steps as the AVX-512 tile's (fp32
// lanes over a chunk, the chunks added in fp32), so an output is one tile's sum in one order.
// Included by lowrank_packed_cpu.cpp only; x86-64 with GCC/Clang.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define PGSVD_PACKED_AVX2 __attribute__((target("avx2,fma")))

namespace pgsvd::packed::avx2 {

constexpr int64_t kPanel = 32;  // columns a panel (pgsvd_rt/ops/packed.py PANEL)
constexpr int kMaxRows = 3;     // rows a tile

alignas(32) inline constexpr int32_t kMaskTab[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                     0,  0,  0,  0,  0,  0,  0,  0};

// Lanes [0, n) on, n clamped to [0, 8].
PGSVD_PACKED_AVX2 inline __m256i mask8(int64_t n) {
  const int64_t k = std::clamp<int64_t>(n, 0, 8);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTab + 8 - k));
}

// out[i, :ncols] = sum_s a[i, s] * b[s, :] + bias for i < MB, ncols <= 32: b is one panel
// (steps x 32, as packed), bias (ncols,) or null.
template <int MB>
PGSVD_PACKED_AVX2 void tile(const float* a, int64_t lda, int64_t steps, const float* b,
                            const float* bias, int64_t ncols, float* out, int64_t ldo,
                            int64_t chunk) {
  __m256 sum[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int q = 0; q < 4; ++q) sum[i][q] = _mm256_setzero_ps();
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    __m256 acc[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_ps();
    const int64_t s1 = std::min(steps, s0 + chunk);
    for (int64_t s = s0; s < s1; ++s) {
      const float* bs = b + s * kPanel;
      __m256 xb[MB];
      for (int i = 0; i < MB; ++i) xb[i] = _mm256_broadcast_ss(a + i * lda + s);
      for (int q = 0; q < 4; ++q) {
        const __m256 w = _mm256_loadu_ps(bs + 8 * q);
        for (int i = 0; i < MB; ++i) acc[i][q] = _mm256_fmadd_ps(xb[i], w, acc[i][q]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < 4; ++q) sum[i][q] = _mm256_add_ps(sum[i][q], acc[i][q]);
  }
  for (int q = 0; q < 4; ++q) {
    const int64_t n = ncols - 8 * q;
    if (n <= 0) break;
    const __m256i mk = mask8(n);
    const __m256 bv = bias ? _mm256_maskload_ps(bias + 8 * q, mk) : _mm256_setzero_ps();
    for (int i = 0; i < MB; ++i) {
      const __m256 v = _mm256_add_ps(sum[i][q], bv);
      if (n >= 8)
        _mm256_storeu_ps(out + i * ldo + 8 * q, v);
      else
        _mm256_maskstore_ps(out + i * ldo + 8 * q, mk, v);
    }
  }
}

// bf16 factors: AVX2 has no bf16 arithmetic, but a bf16 value is the high half of an fp32 one.
// A step is a pair of the reduction; a 256-bit vector of a panel holds 8 columns' pairs (k even
// in each 32-bit lane's low half, k odd in its high half): a shift and a mask widen the two
// halves exactly, then FMAs as the fp32 tile's (products of bf16 values are exact in fp32, sums
// in fp32 lanes blocked by `chunk` steps). 2 rows x one panel: 8 accumulators, the rows' widened
// pair (4), the panel's vector and its two halves (3).
constexpr int kMaxRowsBf16 = 2;

// fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rounding), 8 lanes.
PGSVD_PACKED_AVX2 inline __m128i round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  __m256i r = _mm256_srli_epi32(up, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // Lanes 0-3 and 4-7 packed to 16 bits within each 128-bit half, then the halves' low quads.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// out[i, :ncols] = round(sum_s a[i, 2s..2s+1] . b[s] + bias) for i < MB, ncols <= 32: b is one
// panel (steps x 32 column pairs, as packed), bias (ncols,) or null; sums and bias in fp32.
template <int MB>
PGSVD_PACKED_AVX2 void tile(const uint16_t* a, int64_t lda, int64_t steps, const uint16_t* b,
                            const uint16_t* bias, int64_t ncols, uint16_t* out, int64_t ldo,
                            int64_t chunk) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 sum[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int q = 0; q < 4; ++q) sum[i][q] = _mm256_setzero_ps();
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    __m256 acc[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_ps();
    const int64_t s1 = std::min(steps, s0 + chunk);
    for (int64_t s = s0; s < s1; ++s) {
      const uint16_t* bs = b + s * 2 * kPanel;
      __m256 x0[MB], x1[MB];
      for (int i = 0; i < MB; ++i) {
        float pair;  // the row's two bf16 values, broadcast as one 32-bit lane
        std::memcpy(&pair, a + i * lda + 2 * s, sizeof(pair));
        const __m256i p = _mm256_castps_si256(_mm256_set1_ps(pair));
        x0[i] = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
        x1[i] = _mm256_castsi256_ps(_mm256_and_si256(p, hi));
      }
      for (int q = 0; q < 4; ++q) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs + 16 * q));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
        for (int i = 0; i < MB; ++i) {
          acc[i][q] = _mm256_fmadd_ps(x0[i], we, acc[i][q]);
          acc[i][q] = _mm256_fmadd_ps(x1[i], wo, acc[i][q]);
        }
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < 4; ++q) sum[i][q] = _mm256_add_ps(sum[i][q], acc[i][q]);
  }
  for (int q = 0; q < 4; ++q) {
    const int64_t n = std::min<int64_t>(ncols - 8 * q, 8);
    if (n <= 0) break;
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (bias) std::memcpy(buf, bias + 8 * q, n * sizeof(uint16_t));
    const __m128i bh = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    const __m256 bv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bh), 16));
    for (int i = 0; i < MB; ++i) {
      const __m128i r = round_bf16(_mm256_add_ps(sum[i][q], bv));
      if (n == 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * ldo + 8 * q), r);
      } else {
        _mm_store_si128(reinterpret_cast<__m128i*>(buf), r);
        std::memcpy(out + i * ldo + 8 * q, buf, n * sizeof(uint16_t));
      }
    }
  }
}

// C[rows, :ncols] for `rows` rows of A on one panel of B: tiles of up to kMaxRows rows (fp32) or
// kMaxRowsBf16 (bf16), the rows split evenly between tiles.
template <typename E>
void panel_rows(int64_t rows, const E* a, int64_t lda, int64_t steps, const E* b, const E* bias,
                int64_t ncols, E* out, int64_t ldo, int64_t chunk) {
  constexpr int cap = std::is_same_v<E, float> ? kMaxRows : kMaxRowsBf16;
  const int64_t ntiles = (rows + cap - 1) / cap, per = (rows + ntiles - 1) / ntiles;
  for (int64_t r = 0; r < rows; r += per) {
    const int64_t mb = std::min(per, rows - r);
    const E* ar = a + r * lda;
    E* o = out + r * ldo;
    if constexpr (cap >= 3) {
      if (mb == 3) {
        tile<3>(ar, lda, steps, b, bias, ncols, o, ldo, chunk);
        continue;
      }
    }
    if (mb == 2)
      tile<2>(ar, lda, steps, b, bias, ncols, o, ldo, chunk);
    else
      tile<1>(ar, lda, steps, b, bias, ncols, o, ldo, chunk);
  }
}

}  // namespace pgsvd::packed::avx2
