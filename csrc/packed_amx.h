// The AMX tiles of the packed bf16 kernels (csrc/lowrank_packed_cpu.cpp says what a call
// computes and how it is split between threads), for Intel CPUs with AMX-BF16 (Sapphire Rapids
// and later): TDPBF16PS multiplies a 16 x 32 bf16 tile by a 16-pair x 16-column tile into a
// 16 x 16 fp32 tile, 16x the work of one VDPBF16PS.
//
// The packed layout is already what the B tiles read: a panel's step s holds 32 columns x one
// bf16 pair (128 bytes), so 16 steps of columns 0-15 (or 16-31) are one B tile at a row stride
// of 128 bytes, with no repacking. Registers: C 0-3 (rows 0-15 / 16-31 x columns 0-15 / 16-31 of
// a panel: a 32 x 32 block of fp32 sums), A 4-5 (16 rows x 32 bf16 of the reduction each),
// B 6-7 (the panel's two halves); per 32 bf16 of the reduction 4 tile loads feed 4 TDPBF16PS.
//
// Edges without per-shape configuration (one tile configuration serves every call): the rows of
// A (x for stage 1, a group's columns of t for stage 2) that do not fill whole tiles are copied
// into a scratch zero-padded to 16 rows and 32 columns (all of them where the reduction is not
// a multiple of 32: a copy of M x K, against M x K x 32 multiply-adds a panel); a panel's
// last, partial 16 steps are copied into a zero-padded 16-step scratch (reading on would cross
// into the next panel, or past the tensor). Zeros in both are exact. The fp32 block goes
// through memory (TILESTORED) to the epilogue: bias in fp32, one rounding to bf16, rows and
// columns masked. Each output is one tile's sum in one order: no dependence on threads.
//
// Tile state is per thread: each call of panels() loads the configuration and releases the
// tiles (TILERELEASE) before returning; the process asks the kernel once for permission to use
// them (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16), and a refusal means no AMX.
//
// Emu runs the same kernel with the tile instructions emulated in C++ (TDPBF16PS's order: per
// output, per step, the pair's two exact products added in fp32), so the code around the
// instructions (scratch padding, edges, epilogue, threading) is tested on every CPU; Hw is the
// hardware. Included by lowrank_packed_cpu.cpp only; x86-64 with GCC/Clang.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <c10/util/BFloat16.h>

#include "bf16_simd.h"

#define PGSVD_AMX __attribute__((target("amx-tile,amx-bf16")))

namespace pgsvd::packed::amx {

constexpr int64_t kPanel = 32;      // columns a panel (pgsvd_rt/ops/packed.py PANEL)
constexpr int64_t kTileRows = 16;   // rows of an A or C tile; pairs (steps) of a B tile
constexpr int64_t kChunk = 32;      // bf16 of the reduction per A tile row (16 steps)
constexpr int64_t kStepElems = 64;  // bf16 a step of a panel: 32 columns x a pair

// True when the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use the tiles.
inline bool available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    if (!tile || !bf16) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// Palette 1: every tile 16 rows x 64 bytes.
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// The hardware. The intrinsics are inline assembly that name their memory operands only by
// address, so a compiler barrier orders the scratch writes before the loads.
struct Hw {
  PGSVD_AMX static void begin() {
    static const Config cfg;
    _tile_loadconfig(&cfg);
  }
  PGSVD_AMX static void end() { _tile_release(); }
  PGSVD_AMX static void zero_c() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  // B 6, 7 from a panel's 16 steps at b (columns 0-15, then 16-31); A 4 (and 5: the next 16
  // rows, lda elements on) from a; C += A B for the rows present.
  template <int RH>
  PGSVD_AMX static void step(const uint16_t* a, int64_t lda, const uint16_t* b) {
    asm volatile("" ::: "memory");
    _tile_loadd(6, b, kStepElems * 2);
    _tile_loadd(7, b + kPanel, kStepElems * 2);
    _tile_loadd(4, a, lda * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (RH == 2) {
      _tile_loadd(5, a + kTileRows * lda, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  // The 32 x 32 fp32 block (16 x 32 for RH = 1) to c, rows of 32 floats.
  template <int RH>
  PGSVD_AMX static void store_c(float* c) {
    _tile_stored(0, c, kPanel * 4);
    _tile_stored(1, c + 16, kPanel * 4);
    if constexpr (RH == 2) {
      _tile_stored(2, c + kTileRows * kPanel, kPanel * 4);
      _tile_stored(3, c + kTileRows * kPanel + 16, kPanel * 4);
    }
    asm volatile("" ::: "memory");
  }
};

// The same operations in C++, for testing on any CPU.
struct Emu {
  struct State {
    float c[4][16][16];
  };
  static State& st() {
    thread_local State s;
    return s;
  }
  static void begin() {}
  static void end() {}
  static void zero_c() { std::memset(st().c, 0, sizeof(State::c)); }
  static float f(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
  }
  // C[ci] += A (16 rows at a, stride lda) x B (16 steps at b, 16 columns from column b0).
  static void dot(int ci, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t b0) {
    float(*c)[16] = st().c[ci];
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < 16; ++k) {
        const float a0 = f(a[m * lda + 2 * k]), a1 = f(a[m * lda + 2 * k + 1]);
        const uint16_t* bk = b + k * kStepElems + 2 * b0;
        for (int n = 0; n < 16; ++n) {
          c[m][n] += a0 * f(bk[2 * n]);
          c[m][n] += a1 * f(bk[2 * n + 1]);
        }
      }
  }
  template <int RH>
  static void step(const uint16_t* a, int64_t lda, const uint16_t* b) {
    dot(0, a, lda, b, 0);
    dot(1, a, lda, b, 16);
    if constexpr (RH == 2) {
      dot(2, a + kTileRows * lda, lda, b, 0);
      dot(3, a + kTileRows * lda, lda, b, 16);
    }
  }
  template <int RH>
  static void store_c(float* c) {
    for (int h = 0; h < RH; ++h)
      for (int m = 0; m < 16; ++m)
        for (int q = 0; q < 2; ++q)
          std::memcpy(c + (h * 16 + m) * kPanel + 16 * q, st().c[2 * h + q][m], 64);
  }
};

// out[i, j] = bf16(c[i, j] + bias[j]) for i < rows, j < ncols (c: rows of 32 floats).
PGSVD_BF16 inline void epilogue_avx512(const float* c, int64_t rows, const uint16_t* bias,
                                       int64_t ncols, uint16_t* out, int64_t ldo) {
  using namespace simd;
  for (int q = 0; q < 2; ++q) {
    const __mmask16 mk = mask16(ncols - 16 * q);
    if (!mk) break;
    const __m512 bv = bias ? widen(bias + 16 * q, mk) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; ++i) {
      const __m512 s = _mm512_add_ps(_mm512_loadu_ps(c + i * kPanel + 16 * q), bv);
      _mm256_mask_storeu_epi16(out + i * ldo + 16 * q, mk, (__m256i)_mm512_cvtneps_pbh(s));
    }
  }
}

inline void epilogue(const float* c, int64_t rows, const uint16_t* bias, int64_t ncols,
                     uint16_t* out, int64_t ldo) {
  if (simd::cpu_ok()) return epilogue_avx512(c, rows, bias, ncols, out, ldo);
  const int64_t n = std::min(ncols, kPanel);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float b = bias ? Emu::f(bias[j]) : 0.f;
      out[i * ldo + j] = c10::BFloat16(c[i * kPanel + j] + b).x;
    }
}

// C[rows, :ncols] for panels [p0, p1) of B (psize elements a panel, `steps` pairs of the
// reduction each) and `rows` rows of A (2 * steps bf16 of each row readable at a, lda apart):
// the argument list of the AVX-512 path's panels() in lowrank_packed_cpu.cpp.
template <class T>
void panels(int64_t p0, int64_t p1, int64_t rows, const uint16_t* a, int64_t lda, int64_t steps,
            const uint16_t* b, int64_t psize, const uint16_t* bias, int64_t ncols, uint16_t* out,
            int64_t ldo) {
  if (p0 >= p1 || rows <= 0) return;
  const int64_t chunks = (steps + kTileRows - 1) / kTileRows, full = steps / kTileRows;
  const int64_t kpad = std::max<int64_t>(chunks, 1) * kChunk;
  // Rows [0, rin) are read in place (whole 32-row groups where the reduction is whole 32-element
  // chunks: x at the usual hidden sizes); the rest go to the zero-padded scratch.
  const int64_t rin = full == chunks ? rows / (2 * kTileRows) * (2 * kTileRows) : 0;
  const int64_t rpad = (rows - rin + kTileRows - 1) / kTileRows * kTileRows;
  thread_local std::vector<uint16_t> abuf;
  abuf.assign(static_cast<size_t>(rpad * kpad), 0);
  for (int64_t i = rin; i < rows; ++i)
    std::memcpy(abuf.data() + (i - rin) * kpad, a + i * lda, static_cast<size_t>(2 * steps) * 2);
  alignas(64) uint16_t btail[kTileRows * kStepElems];
  alignas(64) float cbuf[2 * kTileRows * kPanel];
  T::begin();
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* bp = b + p * psize;
    if (full < chunks) {
      const int64_t tail = steps - full * kTileRows;
      std::memset(btail, 0, sizeof(btail));
      std::memcpy(btail, bp + full * kTileRows * kStepElems,
                  static_cast<size_t>(tail * kStepElems) * 2);
    }
    const int64_t nc = std::min(kPanel, ncols - p * kPanel);
    const uint16_t* bb = bias ? bias + p * kPanel : nullptr;
    for (int64_t r0 = 0; r0 < rows; r0 += 2 * kTileRows) {
      const uint16_t* ar = r0 < rin ? a + r0 * lda : abuf.data() + (r0 - rin) * kpad;
      const int64_t ld = r0 < rin ? lda : kpad;
      const bool two = rows - r0 > kTileRows;
      T::zero_c();
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const uint16_t* bs = ch < full ? bp + ch * kTileRows * kStepElems : btail;
        if (two)
          T::template step<2>(ar + ch * kChunk, ld, bs);
        else
          T::template step<1>(ar + ch * kChunk, ld, bs);
      }
      if (two)
        T::template store_c<2>(cbuf);
      else
        T::template store_c<1>(cbuf);
      epilogue(cbuf, std::min(2 * kTileRows, rows - r0), bb, nc, out + r0 * ldo + p * kPanel, ldo);
    }
  }
  T::end();
}

}  // namespace pgsvd::packed::amx
