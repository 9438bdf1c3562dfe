// The AVX2 tiles of the packed CPU kernels (csrc/lowrank_packed_cpu.cpp says what a tile
// computes and how a call is split between threads), for CPUs without AVX-512 (AMD Zen 2/3, most
// client CPUs): fp32 factors, FMAs on 8 floats.
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

// C[rows, :ncols] for `rows` rows of A on one panel of B: tiles of up to kMaxRows rows, the rows
// split evenly between tiles.
inline void panel_rows(int64_t rows, const float* a, int64_t lda, int64_t steps, const float* b,
                       const float* bias, int64_t ncols, float* out, int64_t ldo, int64_t chunk) {
  const int64_t ntiles = (rows + kMaxRows - 1) / kMaxRows, per = (rows + ntiles - 1) / ntiles;
  for (int64_t r = 0; r < rows; r += per) {
    const int64_t mb = std::min(per, rows - r);
    const float* ar = a + r * lda;
    float* o = out + r * ldo;
    if (mb == 3)
      tile<3>(ar, lda, steps, b, bias, ncols, o, ldo, chunk);
    else if (mb == 2)
      tile<2>(ar, lda, steps, b, bias, ncols, o, ldo, chunk);
    else
      tile<1>(ar, lda, steps, b, bias, ncols, o, ldo, chunk);
  }
}

}  // namespace pgsvd::packed::avx2
