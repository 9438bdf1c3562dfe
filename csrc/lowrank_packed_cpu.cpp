// pgsvd::lowrank_matmul_packed on the CPU: a factored layer (one projection or several sharing
// x) whose factors were packed once for serving (pgsvd_rt/ops/packed.py gives the layout), at
// any number of rows M: decode, batched decode, prefill.
//
// Why a packed layout. The unpacked kernels read v and u as they lie: the decode kernels at
// M <= 4 dot rows of v.T and of u (a horizontal sum per output, cheap next to a row's bytes),
// the GEMMs above transpose u into pairs on every call (lowrank_bf16_cpu.cpp, pack_u). At 16-256
// rows those costs are the size of the arithmetic itself: a SmolLM2-135M step's linears at
// M = 16 ran at 0.78x vLLM's prepacked oneDNN layers on an AMD EPYC Zen 4. Packed once, every
// stage of every M is the same register tile with no shuffles: C[i, 32 columns] += A[i, one step]
// x B[step, 32 columns] over the steps of the reduction, B read as it lies (kp elements of a
// column side by side: a bf16 pair for VDPBF16PS, one fp32 for an FMA), A broadcast.
//
// The call, in ONE parallel region, rows in blocks of kBlockRows (t for a block stays in L2):
//   stage 1: t[rows, :Rp] = x @ V; t rounded to the factors' dtype (bf16 as torch's two matmuls
//            round it; fp32 as is);
//   stage 2: y[rows, group g] = t[rows, g's columns] @ U_g + bias_g for every group; fp32 sums,
//            the bias added in fp32, one rounding.
// Who does what: where every thread can have a whole block of rows (prefill: M >= threads x
// kBlockRows), each thread runs both stages on its own blocks into its own t, reading all the
// weights (from L3 after the first block: the work is compute-bound there) with no barrier;
// measured in vLLM's prefill of 8 x 512 tokens (SmolLM2-135M pgsvd-40, AMD EPYC Zen 4) the op
// took 0.94x the time of the split below. Otherwise (decode batches, memory-bound) the 32-column
// panels of V, then of all groups' U, are split across threads, a barrier between the stages:
// each thread streams its own share of the weights once and every row tile of the block reuses
// a panel from L1/L2.
// Tiles: 6 rows x 64 columns (two panels, 24 accumulators; 4 chains even at one row, decode),
// 12 x 32 where a panel is alone, the rows split evenly between tiles. Each output is one
// tile's sum in one order, so results do not depend on the thread count or the split.
// Single-threaded the bf16 tile runs at about 210 GFLOP/s on Zen 4 (VDPBF16PS's peak is about
// 64 FLOP a cycle); folding the pair broadcasts into the instructions' memory operands (as
// oneDNN does) made no measurable difference there.
// On AVX2 without AVX-512 (AMD Zen 2/3) fp32 runs the same layout in the tiles of
// packed_avx2.h (3 rows x one panel: 16 registers); bf16 there (no VDPBF16PS: also Intel CPUs
// with AVX-512 but not its BF16) in that file's bf16 tiles, each pair widened to fp32 (2 rows x
// one panel). Measured as an AVX2 CPU on the Zen 4 (benchmarks/bench_layers.py --isa avx2,
// SmolLM2-135M pgsvd-40 fp32; results ...-as-avx2-2026-12-07-layers-*): 1.2-2.1x the unpacked
// AVX2 path (decode kernels, then MKL) at M = 1-256, 2.7x-1.5x vLLM's dense GEMMs.
// On Intel CPUs with AMX-BF16, bf16 calls of at least min_rows rows (16) can run in the AMX
// tiles of packed_amx.h, on the same layout (TDPBF16PS reads a panel's 16 steps as they lie).
// They are opt-in (PGSVD_AMX=1, pgsvd_rt._C.packed_amx("on")) until measured on such a CPU: no
// development machine since they were written has had AMX; the code around the instructions
// is tested everywhere with the instructions emulated (packed_amx("emulate")).
// No per-shape state: a model's ~400 shapes cost nothing but their arithmetic and bytes.
//
// Accuracy: bf16 products are exact in fp32, sums are fp32 (as torch's bf16 GEMMs); fp32 sums
// in fp32 lanes, blocked by 128 steps. tests/ops/test_lowrank_packed.py holds every
// case to the rule of tests/accuracy.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16_simd.h"
#include "lowrank_decode_cpu.h"
#include "output_pool.h"

#ifdef PGSVD_BF16_X86
#include "packed_amx.h"
#include "packed_avx2.h"
#endif

namespace pgsvd {

extern std::atomic<int64_t> g_lowrank_calls;  // lowrank_matmul_cpu.cpp

namespace packed {
namespace {

constexpr int64_t kPanel = 32;       // output columns per panel (pgsvd_rt/ops/packed.py PANEL)
constexpr int64_t kBlockRows = 128;  // rows of x per block (t of a block stays in L2)
constexpr int64_t kGrainElems = 16384;  // factor elements x rows per thread below which one runs

int64_t ceil_to(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The offsets of pgsvd_rt/ops/packed.py's Layout, for kp elements per reduction step.
struct Layout {
  int64_t K, kp, steps, rp;
  std::vector<int64_t> ns, rs, off, u_steps, u_panels, u_base, n0;
  int64_t numel;

  Layout(int64_t K_, at::IntArrayRef ns_, at::IntArrayRef rs_, int64_t kp_)
      : K(K_), kp(kp_), ns(ns_.begin(), ns_.end()), rs(rs_.begin(), rs_.end()) {
    steps = (K + kp - 1) / kp;
    off.push_back(0);
    for (int64_t r : rs) off.push_back(off.back() + ceil_to(r, kp));
    rp = ceil_to(off.back(), kPanel);
    int64_t o = rp * steps * kp, n = 0;
    for (size_t g = 0; g < ns.size(); ++g) {
      u_steps.push_back((rs[g] + kp - 1) / kp);
      u_panels.push_back((ns[g] + kPanel - 1) / kPanel);
      u_base.push_back(o);
      n0.push_back(n);
      o += u_panels[g] * u_steps[g] * kPanel * kp;
      n += ns[g];
    }
    numel = o;
  }
  int64_t n_total() const { return n0.back() + ns.back(); }
};

// [b, e) of n items for thread tid of nthr, contiguous.
inline void share(int64_t n, int64_t tid, int64_t nthr, int64_t& b, int64_t& e) {
  b = n * tid / nthr;
  e = n * (tid + 1) / nthr;
}

// Which register tiles serve a call (panels() below).
enum class Tiles { kAvx512, kAvx2, kAmx, kAmxEmu, kLibrary };  // kLibrary: the op unpacks

// AMX for bf16 calls of at least g_amx_min_rows rows, where set_amx() enabled it: 0 off (the
// default until the tiles are measured on an AMX CPU: issue 31), 1 the hardware, 2 emulated.
std::atomic<int> g_amx{0};
std::atomic<int64_t> g_amx_min_rows{16};

#ifdef PGSVD_BF16_X86
using namespace simd;
#define PGSVD_F32 __attribute__((target("avx512f,avx512bw,avx512vl")))

// out[i, :ncols] = round(sum_s a[i, 2s..2s+1] . b[s] + bias) for i < MB, ncols <= 16 NV: a bf16
// pair of A broadcast against 32 columns of B's pairs (b: one panel; NV = 4 also the next panel,
// pstride elements on). bias (ncols,) or null.
template <int MB, int NV>
PGSVD_BF16 void tile(const uint16_t* a, int64_t lda, int64_t steps, const uint16_t* b,
                     int64_t pstride, const uint16_t* bias, int64_t ncols, uint16_t* out,
                     int64_t ldo) {
  __m512 acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int q = 0; q < NV; ++q) acc[i][q] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* bs = b + s * 2 * kPanel;
    __m512bh w[NV];
    w[0] = (__m512bh)_mm512_loadu_si512(bs);
    w[1] = (__m512bh)_mm512_loadu_si512(bs + 32);
    if constexpr (NV == 4) {
      w[2] = (__m512bh)_mm512_loadu_si512(bs + pstride);
      w[3] = (__m512bh)_mm512_loadu_si512(bs + pstride + 32);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512bh xp = bcast_pair(a + i * lda + 2 * s);
      for (int q = 0; q < NV; ++q) acc[i][q] = _mm512_dpbf16_ps(acc[i][q], xp, w[q]);
    }
  }
  for (int q = 0; q < NV; ++q) {
    const __mmask16 mk = mask16(ncols - 16 * q);
    if (!mk) break;
    const __m512 bv = bias ? widen(bias + 16 * q, mk) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i) {
      const __m256i r = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][q], bv));
      _mm256_mask_storeu_epi16(out + i * ldo + 16 * q, mk, r);
    }
  }
}

// fp32: one element of A broadcast against 32 columns of B (FMAs), summed in fp32 lanes over
// kChunkF32 steps, the chunks' sums added up in fp32 too (a blocked sum, as a library GEMM's:
// a lane summing all of K in one chain erred up to 2.5x torch's at K = 1000; adding the chunks
// in fp64 instead cost 5% of the tile's rate for no measurable accuracy over this).
constexpr int64_t kChunkF32 = 128;

template <int MB, int NV>
PGSVD_F32 void tile(const float* a, int64_t lda, int64_t steps, const float* b, int64_t pstride,
                    const float* bias, int64_t ncols, float* out, int64_t ldo) {
  __m512 acc[MB][NV], sum[MB][NV];
  for (int64_t s0 = 0; s0 < steps; s0 += kChunkF32) {
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < NV; ++q) acc[i][q] = _mm512_setzero_ps();
    for (int64_t s = s0; s < std::min(steps, s0 + kChunkF32); ++s) {
      const float* bs = b + s * kPanel;
      __m512 w[NV];
      w[0] = _mm512_loadu_ps(bs);
      w[1] = _mm512_loadu_ps(bs + 16);
      if constexpr (NV == 4) {
        w[2] = _mm512_loadu_ps(bs + pstride);
        w[3] = _mm512_loadu_ps(bs + pstride + 16);
      }
      for (int i = 0; i < MB; ++i) {
        const __m512 xb = _mm512_set1_ps(a[i * lda + s]);
        for (int q = 0; q < NV; ++q) acc[i][q] = _mm512_fmadd_ps(xb, w[q], acc[i][q]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < NV; ++q) sum[i][q] = s0 ? _mm512_add_ps(sum[i][q], acc[i][q]) : acc[i][q];
  }
  if (steps == 0)
    for (int i = 0; i < MB; ++i)
      for (int q = 0; q < NV; ++q) sum[i][q] = _mm512_setzero_ps();
  for (int q = 0; q < NV; ++q) {
    const __mmask16 mk = mask16(ncols - 16 * q);
    if (!mk) break;
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + 16 * q) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i)
      _mm512_mask_storeu_ps(out + i * ldo + 16 * q, mk, _mm512_add_ps(sum[i][q], bv));
  }
}

// tile<mb, NV> for a runtime mb (1..12 for NV = 2, 1..6 for NV = 4).
template <int NV, typename E>
void tile_rows(int64_t mb, const E* a, int64_t lda, int64_t steps, const E* b, int64_t pstride,
               const E* bias, int64_t ncols, E* out, int64_t ldo) {
#define PGSVD_TILE(n)                                                  \
  case n:                                                              \
    if constexpr (n * NV <= 24)                                        \
      return tile<n, NV>(a, lda, steps, b, pstride, bias, ncols, out, ldo); \
    break;
  switch (mb) {
    PGSVD_TILE(1) PGSVD_TILE(2) PGSVD_TILE(3) PGSVD_TILE(4) PGSVD_TILE(5) PGSVD_TILE(6)
    PGSVD_TILE(7) PGSVD_TILE(8) PGSVD_TILE(9) PGSVD_TILE(10) PGSVD_TILE(11) PGSVD_TILE(12)
  }
#undef PGSVD_TILE
  TORCH_CHECK(false, "pgsvd: packed tile of ", mb, " rows x ", 16 * NV, " columns");
}

bool has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// C[rows, :ncols] for `rows` rows of A on one or two panels of B: tiles of up to 12 rows x 32
// columns or 6 x 64 (24 accumulators), the rows split evenly between tiles.
template <typename E>
void panel_rows(int64_t rows, int64_t npanels, const E* a, int64_t lda, int64_t steps,
                const E* b, int64_t pstride, const E* bias, int64_t ncols, E* out, int64_t ldo) {
  const int64_t cap = npanels == 2 ? 6 : 12;
  const int64_t ntiles = (rows + cap - 1) / cap, per = (rows + ntiles - 1) / ntiles;
  for (int64_t r = 0; r < rows; r += per) {
    const int64_t mb = std::min(per, rows - r);
    if (npanels == 2)
      tile_rows<4>(mb, a + r * lda, lda, steps, b, pstride, bias, ncols, out + r * ldo, ldo);
    else
      tile_rows<2>(mb, a + r * lda, lda, steps, b, pstride, bias, ncols, out + r * ldo, ldo);
  }
}

// Panels [p0, p1) of one matrix for `rows` rows: two at a time (tiles of up to 6 rows x 64
// columns), the last one alone (up to 12 x 32) where their number is odd; with kAvx2 one at a
// time in the tiles of packed_avx2.h; with kAmx (bf16 only) in the AMX tiles of
// packed_amx.h (kAmxEmu: the same code, the tile instructions emulated).
template <typename E>
void panels(Tiles tiles, int64_t p0, int64_t p1, int64_t rows, const E* a, int64_t lda,
            int64_t steps, const E* b, int64_t psize, const E* bias, int64_t ncols, E* out,
            int64_t ldo) {
  if constexpr (std::is_same_v<E, uint16_t>) {
    if (tiles == Tiles::kAmx)
      return amx::panels<amx::Hw>(p0, p1, rows, a, lda, steps, b, psize, bias, ncols, out, ldo);
    if (tiles == Tiles::kAmxEmu)
      return amx::panels<amx::Emu>(p0, p1, rows, a, lda, steps, b, psize, bias, ncols, out, ldo);
  }
  if (tiles == Tiles::kAvx2) {
    for (int64_t p = p0; p < p1; ++p)
      avx2::panel_rows<E>(rows, a, lda, steps, b + p * psize, bias ? bias + p * kPanel : nullptr,
                          std::min(kPanel, ncols - p * kPanel), out + p * kPanel, ldo, kChunkF32);
    return;
  }
  for (int64_t p = p0; p < p1;) {
    const int64_t np = p + 1 < p1 ? 2 : 1;
    panel_rows<E>(rows, np, a, lda, steps, b + p * psize, psize,
                  bias ? bias + p * kPanel : nullptr, std::min(np * kPanel, ncols - p * kPanel),
                  out + p * kPanel, ldo);
    p += np;
  }
}

// y (M, sum N) for x (M, K) contiguous rows (ldx >= K, K even for bf16 or x readable one past
// each row with zeros... the caller pads odd K), the packed factors w, bias_cat or null.
template <typename E>
void run(Tiles tiles, const E* x, int64_t ldx, int64_t M, const E* w, const Layout& L,
         const E* bias, E* y, int64_t ldy) {
  constexpr int64_t kp = std::is_same_v<E, float> ? 1 : 2;
  const int64_t Rp = L.rp, nv = Rp / kPanel, vsize = L.steps * kPanel * kp;
  int64_t up_total = 0;
  for (int64_t q : L.u_panels) up_total += q;
  int64_t nt = std::min<int64_t>(at::get_num_threads(),
                                 std::max<int64_t>(1, M * L.numel / kGrainElems));
#ifdef _OPENMP
  if (omp_in_parallel()) nt = 1;
#else
  nt = 1;
#endif
  // Rows split across threads where each gets a whole block (prefill): no barriers, no t shared
  // between cores; else V's and U's panels split (every thread streams its own weights).
  const bool by_rows = nt > 1 && M >= nt * kBlockRows;
  if (!by_rows) nt = std::min(nt, std::max(nv, up_total));
  const int64_t blk = std::min(M, kBlockRows);
  thread_local std::vector<E> tbuf;
  tbuf.resize(static_cast<size_t>((by_rows ? nt : 1) * blk * Rp));
  E* const tb = tbuf.data();  // the caller's buffer (a thread_local named in body would be each
                              // worker's own, empty one)
  // Rows [m0, m0 + rows): stage 1 on V's panels [vb, ve), stage 2 on all groups' U panels
  // [ub, ue) (a barrier between them where the threads share t).
  auto stage1 = [&](int64_t m0, int64_t rows, int64_t vb, int64_t ve, E* t) {
    panels<E>(tiles, vb, ve, rows, x + m0 * ldx, ldx, L.steps, w, vsize, nullptr, Rp, t, Rp);
  };
  auto stage2 = [&](int64_t m0, int64_t rows, int64_t ub, int64_t ue, const E* t) {
    int64_t base = 0;
    for (size_t g = 0; g < L.ns.size(); ++g) {
      const int64_t q0 = std::max(ub, base) - base, q1 = std::min(ue, base + L.u_panels[g]) - base;
      if (q0 < q1)
        panels<E>(tiles, q0, q1, rows, t + L.off[g], Rp, L.u_steps[g], w + L.u_base[g],
                  L.u_steps[g] * kPanel * kp, bias ? bias + L.n0[g] : nullptr, L.ns[g],
                  y + m0 * ldy + L.n0[g], ldy);
      base += L.u_panels[g];
    }
  };
  auto body = [&](int64_t tid, int64_t nthr) {
    if (by_rows) {  // each thread its own blocks of rows, both stages, its own t
      E* t = tb + tid * blk * Rp;
      for (int64_t m0 = tid * blk; m0 < M; m0 += nthr * blk) {
        const int64_t rows = std::min(blk, M - m0);
        stage1(m0, rows, 0, nv, t);
        stage2(m0, rows, 0, up_total, t);
      }
      return;
    }
    E* t = tb;
    for (int64_t m0 = 0; m0 < M; m0 += blk) {
      const int64_t rows = std::min(blk, M - m0);
      int64_t b, e;
      share(nv, tid, nthr, b, e);
      stage1(m0, rows, b, e, t);
#ifdef _OPENMP
      if (nthr > 1) {
#pragma omp barrier
      }
#endif
      share(up_total, tid, nthr, b, e);
      stage2(m0, rows, b, e, t);
#ifdef _OPENMP
      if (nthr > 1 && m0 + blk < M) {
#pragma omp barrier
      }
#endif
    }
  };
  if (nt == 1) return body(0, 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(nt))
  body(omp_get_thread_num(), omp_get_num_threads());
#endif
}

// Which tiles serve: AVX-512 where the CPU has them (bf16: AVX512-BF16), else AVX2;
// decode::force_avx2 takes AVX2 wherever the CPU runs it.
bool f32_avx512() { return !decode::avx2_only() && has_avx512f(); }
bool bf16_avx512() { return !decode::avx2_only() && cpu_ok(); }

bool kernels_for(at::ScalarType dt) {
  if (dt == at::kBFloat16) return bf16_avx512() || decode::has_avx2();
  if (dt == at::kFloat) return f32_avx512() || decode::has_avx2();
  return false;
}

// bf16 on the AVX2 tiles (2 rows x 32 columns, each pair widened) against the unpacked op's
// library GEMMs, SmolLM2-135M pgsvd-40 linears on an AMD EPYC Zen 3 (benchmarks/results/
// cpu-amd-epyc-avx2-2026-12-07-layers-smollm2-pgsvd-40-bfloat16-tiles.md): 1.35 / 1.65 / 3.9 /
// 1.25x as fast at M = 1 / 4 / 16 / 64, 0.93x at 256; from 256 rows the op unpacks.
constexpr int64_t kAvx2Bf16MaxRows = 255;

// The tiles that serve a call of M rows where kernels_for(dt): bf16 on AMX from
// g_amx_min_rows rows where enabled (emulated AMX too needs AVX512-BF16), else AVX-512; without
// AVX512-BF16 (fp32: AVX-512 F) AVX2, bf16 up to kAvx2Bf16MaxRows rows.
Tiles tiles_for(at::ScalarType dt, int64_t M) {
  if (dt == at::kFloat) return f32_avx512() ? Tiles::kAvx512 : Tiles::kAvx2;
  if (!bf16_avx512()) return M <= kAvx2Bf16MaxRows ? Tiles::kAvx2 : Tiles::kLibrary;
  const int mode = g_amx.load(std::memory_order_relaxed);
  if (mode == 0 || M < g_amx_min_rows.load(std::memory_order_relaxed)) return Tiles::kAvx512;
  return mode == 1 ? Tiles::kAmx : Tiles::kAmxEmu;
}
#else
bool kernels_for(at::ScalarType) { return false; }
#endif

// Any dtype, any CPU: unpack (pgsvd_rt/ops/packed.py, unpack) and two library GEMMs per group.
at::Tensor unpacked(const at::Tensor& x2, const at::Tensor& w, const Layout& L,
                    const c10::optional<at::Tensor>& bias) {
  const int64_t nvel = L.rp * L.steps * L.kp;
  const at::Tensor v_pad = w.narrow(0, 0, nvel)
                               .view({L.rp / kPanel, L.steps, kPanel, L.kp})
                               .permute({1, 3, 0, 2})
                               .reshape({L.steps * L.kp, L.rp})
                               .narrow(0, 0, L.K);
  const at::Tensor t = at::mm(x2, v_pad);
  std::vector<at::Tensor> ys;
  for (size_t g = 0; g < L.ns.size(); ++g) {
    const int64_t q = L.u_panels[g], s = L.u_steps[g];
    const at::Tensor u = w.narrow(0, L.u_base[g], q * s * kPanel * L.kp)
                             .view({q, s, kPanel, L.kp})
                             .permute({0, 2, 1, 3})
                             .reshape({q * kPanel, s * L.kp})
                             .narrow(0, 0, L.ns[g]);
    ys.push_back(at::mm(t.narrow(1, L.off[g], s * L.kp), u.t()));
  }
  at::Tensor y = ys.size() == 1 ? ys[0] : at::cat(ys, 1);
  return bias.has_value() ? y + *bias : y;
}

void check(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef ns, at::IntArrayRef rs,
           const c10::optional<at::Tensor>& bias, int64_t numel, int64_t n_total) {
  const char* op = "lowrank_matmul_packed";
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have at least 1 dim and K >= 1");
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), op, ": packed dtype ", w.scalar_type(),
                   " != x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.numel() == numel, op, ": expected a 1-D packed tensor of ",
                    numel, " elements for K=", x.size(-1), ", ns=", ns, ", rs=", rs, "; got ",
                    w.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ",
                     bias->scalar_type(), " != x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n_total, op,
                      ": bias must have shape (", n_total, ",) (sum of N), got ", bias->sizes());
  }
}

}  // namespace

bool kernels(bool bf16) { return kernels_for(bf16 ? at::kBFloat16 : at::kFloat); }

std::string isa(bool bf16, int64_t rows) {
  if (!kernels(bf16)) return "none";
#ifdef PGSVD_BF16_X86
  switch (tiles_for(bf16 ? at::kBFloat16 : at::kFloat, rows)) {
    case Tiles::kAvx2: return "avx2";
    case Tiles::kAmx: return "amx";
    case Tiles::kAmxEmu: return "amx-emulated";
    case Tiles::kLibrary: return "none";
    case Tiles::kAvx512: break;
  }
#endif
  return "avx512";
}

bool amx_available() {
#ifdef PGSVD_BF16_X86
  return amx::available();
#else
  return false;
#endif
}

void set_amx(const std::string& mode, int64_t min_rows) {
  TORCH_CHECK_VALUE(mode == "off" || mode == "on" || mode == "emulate",
                    "packed_amx: mode must be 'off', 'on' or 'emulate', got '", mode, "'");
  TORCH_CHECK_VALUE(min_rows >= 1, "packed_amx: min_rows must be >= 1, got ", min_rows);
  TORCH_CHECK_VALUE(mode != "on" || amx_available(), "packed_amx: mode 'on' needs AMX-TILE and "
                    "AMX-BF16 and the kernel's permission to use them (arch_prctl); this CPU or "
                    "kernel has not");
  g_amx.store(mode == "on" ? 1 : mode == "emulate" ? 2 : 0);
  g_amx_min_rows.store(min_rows);
}

at::Tensor lowrank_matmul_packed_cpu(const at::Tensor& x, const at::Tensor& w,
                                     at::IntArrayRef ns, at::IntArrayRef rs,
                                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(!ns.empty() && ns.size() == rs.size(), "lowrank_matmul_packed: need one rank "
                    "per group, got ns=", ns, ", rs=", rs);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                   "lowrank_matmul_packed: x must be torch.bfloat16 or torch.float32, got ",
                   x.scalar_type());
  const int64_t kp = x.scalar_type() == at::kBFloat16 ? 2 : 1;
  const Layout L(x.size(-1), ns, rs, kp);
  check(x, w, ns, rs, bias, L.numel, L.n_total());
  g_lowrank_calls.fetch_add(1, std::memory_order_relaxed);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = L.n_total();
  at::Tensor x2 = x.reshape({M, L.K});
  if (!kernels_for(x.scalar_type())) return unpacked(x2, w, L, bias).view(shape);
#ifdef PGSVD_BF16_X86
  const Tiles tiles = tiles_for(x.scalar_type(), M);
  if (tiles == Tiles::kLibrary) return unpacked(x2, w, L, bias).view(shape);
#endif
  at::Tensor y = pooled_empty({M, L.n_total()}, x.options());  // resident pages, see there
  if (M == 0) return y.view(shape);
#ifdef PGSVD_BF16_X86
  const at::Tensor wc = w.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (x2.stride(1) != 1 || (kp == 2 && L.K % 2)) {  // rows read in pairs: pad an odd K with 0
    at::Tensor xp = at::zeros({M, L.steps * kp}, x.options());
    xp.narrow(1, 0, L.K).copy_(x2);
    x2 = xp;
  }
  if (kp == 2) {
    using E = c10::BFloat16;
    run<uint16_t>(tiles, reinterpret_cast<const uint16_t*>(x2.data_ptr<E>()), x2.stride(0), M,
                  reinterpret_cast<const uint16_t*>(wc.data_ptr<E>()), L,
                  bc.defined() ? reinterpret_cast<const uint16_t*>(bc.data_ptr<E>()) : nullptr,
                  reinterpret_cast<uint16_t*>(y.data_ptr<E>()), L.n_total());
  } else {
    run<float>(tiles, x2.data_ptr<float>(), x2.stride(0), M, wc.data_ptr<float>(), L,
               bc.defined() ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>(), L.n_total());
  }
#endif
  return y.view(shape);
}

}  // namespace packed

TORCH_LIBRARY_IMPL(pgsvd, CPU, m) {
  m.impl("lowrank_matmul_packed", &packed::lowrank_matmul_packed_cpu);
}

}  // namespace pgsvd
