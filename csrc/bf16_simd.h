// AVX512-BF16 helpers shared by the bf16 CPU kernels (lowrank_bf16_cpu.cpp: GEMMs for M > 4;
// lowrank_bf16_decode.cpp: the decode kernel for M <= 4). x86-64 with GCC/Clang only; the
// including file guards with PGSVD_BF16_X86.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PGSVD_BF16_X86 1
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define PGSVD_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace pgsvd::simd {

// True when the CPU runs AVX-512 F/BW/VL and AVX512-BF16 (VDPBF16PS).
inline bool cpu_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

// (p[0], p[1]) broadcast to every 32-bit lane, low half first: a broadcast load (load port only;
// a broadcast from a general register would take a shuffle port per row).
PGSVD_BF16 inline __m512bh bcast_pair(const uint16_t* p) {
  float f;
  std::memcpy(&f, p, sizeof(f));
  return (__m512bh)_mm512_castps_si512(_mm512_set1_ps(f));
}

// The first lanes of k of p[0..16) widened from bf16 to fp32 (a 16-bit shift), the others 0.
PGSVD_BF16 inline __m512 widen(const uint16_t* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? ~__mmask32(0)
                 : static_cast<__mmask32>(n <= 0 ? 0u : (uint32_t(1) << n) - 1u);
}
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : static_cast<__mmask16>(n <= 0 ? 0u : (1u << n) - 1u);
}

// Software prefetch of [p, p + bytes) into L2: the next block of rows while this one computes.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

// Indices that interleave two rows a, b of 32 bf16 into (a[j], b[j]) pairs: j < 16, then j >= 16.
alignas(64) inline constexpr uint16_t kLoIdx[32] = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) inline constexpr uint16_t kHiIdx[32] = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

}  // namespace pgsvd::simd

#endif
