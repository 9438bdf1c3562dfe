// The decode kernels of the CPU low-rank op (one token per sequence, a few sequences): bf16 on
// AVX512-BF16 for M <= 4 rows, fp32 on AVX-512 for M <= 16 (csrc/decode_avx512.h); both dtypes
// for M <= 8 on AVX2 CPUs without AVX-512 (csrc/decode_avx2.h). y_g = (x @ v_cat)[:, group g] @
// u_g.T + bias_g for the G groups sharing x, in ONE parallel region (one fork/join per call).
// This file is the driver the kernel sets share (threads, phases, handoff); each set supplies
// band() (phase 1 on a band of v's columns) or stream() (on whole rows), dots() (phase 1 on a
// row of v.T, where v comes so), and rows() (phase 2 on kRows rows of u).
//
// A decode step is memory-bound: the factors are read once and each element is used M times, so
// the kernel must issue few instructions per byte to keep up with memory. The one-pass kernel of
// csrc/lowrank_matmul_cpu.cpp (still the bf16 path on AVX-512 without AVX512-BF16) widens every
// bf16 element with a shuffle and a shift: 32 GB/s from cache against oneDNN's 76 on a 2.2 MB
// layer (AMD EPYC Zen 4).
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
//   where v comes as v.T (ops.decode_layout, applied by the vLLM method after loading), phase 1
//     is instead dot products on its rows (dots(), run_dots: pairs side by side in memory, no
//     interleaving; no partials, one barrier): on an AMD EPYC Zen 4 the linears of one
//     SmolLM2-135M pgsvd-40 decode step took 1.11x / 1.12x / 1.15x as long with v in rows at
//     M = 1 / 2 / 4 in bf16, 1.07x-1.12x at M = 1-16 in fp32 (benchmarks/bench_layers.py,
//     op-rows; results ...-avx512-bf16-2026-12-06-layers-*).
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
// AVX2 (no AVX-512: AMD Zen 2/3 among others) has neither VDPBF16PS nor 32 registers: FMAs on
// 8 floats, bf16 widened on load, fp64 partials and t in fp32 for both dtypes. Its bands would
// be narrow (10 strips of 8 columns at one row, one strip at 8 rows: 16 bytes of a bf16 row), so
// phase 1 streams whole rows of v with the chunk's sums in L1 (bf16, fp32 up to 4 rows), and
// phase 2 dots several rows of u at once (bf16: 4 up to 2 rows, 2 up to 4), or one on several
// accumulator chains (fp32 up to 2 rows: 1.08x at one row). fp32 reads v faster as v.T: phase 1
// is then dot products on its rows (dots(), run_dots: 1.23x at 4 rows, 1.42x at 8; even at 1-2;
// ops.decode_layout lays v out so, as the vLLM method does after loading). On an AMD EPYC Zen 3 the
// linears of one decode step (benchmarks/bench_layers.py, against vLLM's dense layers) went from
// 1.43x to 1.60x in bf16 and 1.44x to 1.49x in fp32 at one row, 2.80x to 3.99x in bf16 at 8
// (results ...-avx2-2026-12-04-layers-*); an A/B of the variants in one process over the same
// layers credited streaming with 1.12x (fp32) / 1.16x (bf16) at one row and 1.27x for bf16 at
// 4 and 8, and 4 rows of u against one row on two chains with 1.14x (bf16) at one row and
// 1.12x / 1.25x (fp32 / bf16) at 4; fp32 at one row did not care (+-2%). Without it
// such a CPU ran the portable one-pass loops (bf16 M <= 4) and torch's bf16 GEMM, which has no
// fast path there (13 ms for a 32-token down_proj of SmolLM2 pgsvd-40 on an AMD EPYC Zen 3).
// Accuracy: bf16 products are exact in fp32, sums are fp32; fp32 as above
// (tests/ops/test_lowrank_cpu.py holds every case to 2x torch's own error against fp64).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16_simd.h"
#include "lowrank_decode_cpu.h"

#ifdef PGSVD_BF16_X86
#include "decode_avx2.h"
#include "decode_avx512.h"
#endif

namespace pgsvd::decode {

namespace {
std::atomic<bool> g_avx2_only{false};
}  // namespace

void force_avx2(bool on) { g_avx2_only.store(on, std::memory_order_relaxed); }
bool avx2_only() { return g_avx2_only.load(std::memory_order_relaxed); }

bool has_avx2() {
#ifdef PGSVD_BF16_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#ifdef PGSVD_BF16_X86

namespace {

constexpr int64_t kGrainElems = 16384;  // factor elements per thread below which one thread runs
constexpr int64_t kAheadBytes = 4096;   // phase 2's software prefetch distance in u

// t[:MB, :R] += x[:MB, k0:k1] @ v[k0:k1, :R] (k0 even, k1 - k0 <= kChunk, prefetching up to row
// pf_end): bands of S strips, the last one narrower (no accumulator spent past R).
template <class Isa, typename E, typename P, int MB, int S = Isa::template kBand<E, MB>>
void bands(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv, int64_t R,
           P* t, int64_t ldt, int64_t pf_end) {
  constexpr int64_t C = Isa::template kStrip<E>;
  int64_t c0 = 0;
  for (; c0 + C * S <= R; c0 += C * S)
    Isa::template band<MB, S>(x, ldx, k0, k1, v + c0, ldv, C * S, t + c0, ldt, pf_end);
  const int64_t rest = R - c0;
  if (rest > C * (S - 1)) {
    Isa::template band<MB, S>(x, ldx, k0, k1, v + c0, ldv, rest, t + c0, ldt, pf_end);
  } else if (rest > 0) {
    if constexpr (S > 1)
      bands<Isa, E, P, MB, S - 1>(x, ldx, k0, k1, v + c0, ldv, rest, t + c0, ldt, pf_end);
  }
}

// t[:MB, :R] += x[:MB, k0:k1] @ v[k0:k1, :R] (k0 even), kChunk rows of v at a time: summed in
// fp32 over a chunk, added to t (fp64 for fp32) after it. Where the set streams whole rows
// (kStream), it does; else bands sweep a chunk while it sits in L2 (memory sees whole rows in
// order) and prefetch the next.
template <class Isa, int MB, typename E, typename P>
void phase1(const E* x, int64_t ldx, int64_t k0, int64_t k1, const E* v, int64_t ldv, int64_t R,
            P* t, int64_t ldt) {
  for (int64_t kb = k0; kb < k1; kb += kChunk) {
    const int64_t ke = std::min(k1, kb + kChunk);
    if constexpr (Isa::template kStream<E, MB>)
      Isa::template stream<MB>(x, ldx, kb, ke, v, ldv, R, t, ldt);
    else
      bands<Isa, E, P, MB>(x, ldx, kb, ke, v, ldv, R, t, ldt, k1);
  }
}

// Rows [n0, n1) of one group, the set's kRows at a time (the rest one by one), prefetching
// kAheadBytes of u ahead (at least one pass).
template <class Isa, int MB, typename E, typename H>
void phase2(const H* hi, const H* lo, int64_t ldt, const Group<E>& g, int64_t n0, int64_t n1) {
  constexpr int P = Isa::template kRows<E, MB>;
  const int64_t row_bytes = int64_t(sizeof(E)) * g.ldu;
  const int64_t ahead = std::max<int64_t>(P, (kAheadBytes + row_bytes - 1) / row_bytes);
  auto pass = [&](auto rows_per_pass, int64_t n) {
    constexpr int Q = decltype(rows_per_pass)::value;
    const int64_t pf_rows = std::clamp<int64_t>(n1 - (n + ahead), 0, Q);
    Isa::template rows<MB, Q>(hi, lo, ldt, g.u + n * g.ldu, g.ldu, g.R,
                              g.bias ? g.bias + n : nullptr, g.y + n, g.ldy,
                              pf_rows > 0 ? g.u + (n + ahead) * g.ldu : nullptr, pf_rows);
  };
  int64_t n = n0;
  for (; n + P <= n1; n += P) pass(std::integral_constant<int, P>{}, n);
  for (; n < n1; ++n) pass(std::integral_constant<int, 1>{}, n);
}

// This thread's share of all groups' rows (split by count across nthr threads): fn(g, n0, n1)
// on rows [n0, n1) of group g.
template <typename E, typename Fn>
void split_rows(const std::vector<Group<E>>& groups, int64_t tid, int64_t nthr, Fn&& fn) {
  int64_t n_total = 0;
  for (const auto& g : groups) n_total += g.N;
  const int64_t nc = (n_total + nthr - 1) / nthr, b = std::min(n_total, tid * nc);
  const int64_t e = std::min(n_total, b + nc);
  int64_t base = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t n0 = std::max(b, base), n1 = std::min(e, base + groups[g].N);
    if (n0 < n1) fn(g, n0 - base, n1 - base);
    base += groups[g].N;
  }
}

// What phase 2 reads of entry e of t, from its sum in the partials' type: bf16 hi + lo (the
// set's split handoff), or t rounded once to H.
template <class Isa, typename E, typename P, typename H>
inline void hand_off(P sum, H* hi, H* lo, int64_t e) {
  if constexpr (Isa::template kSplit<E>) {
    const c10::BFloat16 h(sum);
    hi[e] = h.x;
    lo[e] = c10::BFloat16(sum - static_cast<float>(h)).x;
  } else {
    hi[e] = static_cast<H>(sum);
  }
}

// The call with v given as v.T (Rt, K) (row stride ldvt), where the set has dots(): phase 1
// computes t[:, r] = x @ v.T[r] one row of v.T at a time, the rows split across threads, each
// column of t computed whole and handed off where phase 2 reads it; a barrier; phase 2. No
// partials to sum and one barrier fewer, and each thread reads its rows of v.T in memory order
// on several accumulator chains, as phase 2 reads u. AVX2 (fp32), where streaming v's rows kept
// the sums in L1 or bands swept them: in an in-process A/B over SmolLM2 pgsvd-40's linears on
// Zen 3, weights cold, the step's linears took 1.03x as long with v in rows at one row of x,
// 1.02x at 2, 1.23x at 4, 1.42x at 8. AVX-512: dots() needs no interleaving (bf16) and no
// broadcasts.
template <class Isa, int MB, typename E>
void run_dots(const E* x, int64_t ldx, int64_t K, const E* vt, int64_t ldvt,
              const std::vector<Group<E>>& groups) {
  using P = typename Isa::template Part<E>;
  using H = typename Isa::template Hand<E>;
  constexpr bool kSplit = Isa::template kSplit<E>;
  constexpr int64_t M = MB;
  const size_t G = groups.size();
  // hi / lo: (M, W), group g's columns from off[g], zero up to a multiple of 32 (rows() reads
  // them); x copied to (M, Kx), zero past K (AVX2's dots() reads it 8 at a time).
  std::vector<int64_t> off(G + 1, 0);
  std::vector<Group<E>> vg;  // phase 1's rows: group g's rows of v.T, handed to its columns
  int64_t work = 0, Rt = 0;
  for (size_t g = 0; g < G; ++g) {
    off[g + 1] = off[g] + (groups[g].R + 31) / 32 * 32;
    vg.push_back({vt + Rt * ldvt, ldvt, groups[g].R, K, nullptr, nullptr, 0});
    work += (groups[g].N + K) * groups[g].R;
    Rt += groups[g].R;
  }
  const int64_t W = off.back(), Kx = (K + 7) / 8 * 8;
  thread_local std::vector<H> handoff;
  thread_local std::vector<E> xcopy;
  handoff.assign(static_cast<size_t>((kSplit ? 2 : 1) * M * W), H(0));
  xcopy.assign(static_cast<size_t>(M * Kx), E(0));
  H* hi = handoff.data();
  H* lo = kSplit ? hi + M * W : hi;
  E* xs = xcopy.data();
  for (int64_t m = 0; m < M; ++m) std::copy(x + m * ldx, x + m * ldx + K, xs + m * Kx);
  int64_t nt = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, work / kGrainElems));
  nt = std::min(nt, Rt);
#ifdef _OPENMP
  if (omp_in_parallel()) nt = 1;
#else
  nt = 1;
#endif
  auto body = [&](int64_t tid, int64_t nthr) {
    split_rows(vg, tid, nthr, [&](size_t g, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        P tr[MB];
        Isa::template dots<MB>(xs, Kx, vg[g].u + r * ldvt, K, tr);
        for (int64_t m = 0; m < M; ++m) hand_off<Isa, E>(tr[m], hi, lo, m * W + off[g] + r);
      }
    });
#ifdef _OPENMP
    if (nthr > 1) {
#pragma omp barrier
    }
#endif
    split_rows(groups, tid, nthr, [&](size_t g, int64_t n0, int64_t n1) {
      phase2<Isa, MB>(hi + off[g], lo + off[g], W, groups[g], n0, n1);
    });
  };
  if (nt == 1) return body(0, 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(nt))
  body(omp_get_thread_num(), omp_get_num_threads());
#endif
}

// The call: phase 1 (K split across threads, a private partial each), a barrier, the partials
// summed into what phase 2 reads (the set's handoff: bf16 hi and lo, or t rounded once to H), a
// barrier, phase 2 (all groups' rows split across threads). E: storage (uint16_t for bf16,
// float); partials in P.
template <class Isa, int MB, typename E>
void run(const E* x, int64_t ldx, int64_t K, const E* v, int64_t ldv, int64_t Rt,
         const std::vector<Group<E>>& groups, bool v_t) {
  using P = typename Isa::template Part<E>;
  using H = typename Isa::template Hand<E>;
  constexpr bool kSplit = Isa::template kSplit<E>;
  if constexpr (Isa::template kDots<E>) {
    if (v_t) return run_dots<Isa, MB>(x, ldx, K, v, ldv, groups);
  }
  TORCH_CHECK(!v_t, "pgsvd: this decode kernel set takes v as (K, R) rows, not transposed");
  constexpr int64_t M = MB;
  // Group g's rows of what phase 2 reads: columns [off_g, off_g + ceil32(R_g)) of (M, W) buffers.
  std::vector<int64_t> off(groups.size() + 1, 0), r0(groups.size() + 1, 0);
  int64_t work = K * Rt;
  for (size_t g = 0; g < groups.size(); ++g) {
    off[g + 1] = off[g] + (groups[g].R + 31) / 32 * 32;
    r0[g + 1] = r0[g] + groups[g].R;
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
  // Scratch of the calling thread, reused across calls: nt partials of t, then hi and lo (split
  // handoff) or t (lo unused).
  thread_local std::vector<P> part;
  thread_local std::vector<H> handoff;
  part.resize(static_cast<size_t>(nt * M * Rt));
  handoff.resize(static_cast<size_t>((kSplit ? 2 : 1) * M * W));
  P* pp = part.data();
  H* hi = handoff.data();
  H* lo = kSplit ? hi + M * W : hi;
  const int64_t kper = ((K + nt - 1) / nt + 1) & ~int64_t(1);  // even: pairs never straddle

  auto body = [&](int64_t tid, int64_t nthr) {
    P* tp = pp + tid * M * Rt;
    std::fill(tp, tp + M * Rt, P(0));
    const int64_t k0 = std::min(K, tid * kper), k1 = std::min(K, k0 + kper);
    if (k0 < k1) phase1<Isa, MB>(x, ldx, k0, k1, v, ldv, Rt, tp, Rt);
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
      hand_off<Isa, E>(sum, hi, lo, e);
    }
#ifdef _OPENMP
    if (nthr > 1) {
#pragma omp barrier
    }
#endif
    split_rows(groups, tid, nthr, [&](size_t g, int64_t n0, int64_t n1) {
      phase2<Isa, MB>(hi + off[g], lo + off[g], W, groups[g], n0, n1);
    });
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

template <class Isa, typename E, int MB = 1>
void dispatch(const E* x, int64_t ldx, int64_t M, int64_t K, const E* v, int64_t ldv, int64_t Rt,
              const std::vector<Group<E>>& groups, bool v_t = false) {
  constexpr int64_t kMax = Isa::template kMaxM<E>;
  if constexpr (MB <= kMax) {
    if (M == MB) return run<Isa, MB>(x, ldx, K, v, ldv, Rt, groups, v_t);
    return dispatch<Isa, E, MB + 1>(x, ldx, M, K, v, ldv, Rt, groups, v_t);
  }
  TORCH_CHECK(false, "pgsvd: the decode kernel takes 1-", kMax, " rows, got ", M);
}

bool has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// Which set serves: AVX-512 where the CPU has it (bf16: AVX512-BF16), AVX2 otherwise, except bf16
// on AVX-512 without AVX512-BF16 (the one-pass AVX-512 kernel of lowrank_matmul_cpu.cpp serves
// it); force_avx2 takes AVX2 wherever the CPU runs it.
bool bf16_avx512() { return !avx2_only() && simd::cpu_ok(); }
bool f32_avx512() { return !avx2_only() && has_avx512f(); }
bool bf16_avx2() { return has_avx2() && (avx2_only() || !has_avx512f()); }

}  // namespace

int64_t max_rows_bf16() {
  if (bf16_avx512()) return avx512::Isa::kMaxM<uint16_t>;
  return bf16_avx2() ? avx2::Isa::kMaxM<uint16_t> : 0;
}

int64_t max_rows_f32() {
  if (f32_avx512()) return avx512::Isa::kMaxM<float>;
  return has_avx2() ? avx2::Isa::kMaxM<float> : 0;
}

bool v_transposed(bool bf16) {
  if (bf16) {
    if (bf16_avx512()) return avx512::Isa::kDots<uint16_t>;
    return bf16_avx2() && avx2::Isa::kDots<uint16_t>;
  }
  if (f32_avx512()) return avx512::Isa::kDots<float>;
  return has_avx2() && avx2::Isa::kDots<float>;
}

void run(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, const c10::BFloat16* v,
         int64_t ldv, int64_t Rt, const std::vector<Group<c10::BFloat16>>& groups, bool v_t) {
  std::vector<Group<uint16_t>> gs;
  for (const auto& g : groups)
    gs.push_back({reinterpret_cast<const uint16_t*>(g.u), g.ldu, g.N, g.R,
                  reinterpret_cast<const uint16_t*>(g.bias), reinterpret_cast<uint16_t*>(g.y),
                  g.ldy});
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  const auto* vs = reinterpret_cast<const uint16_t*>(v);
  if (bf16_avx512()) return dispatch<avx512::Isa>(xs, ldx, M, K, vs, ldv, Rt, gs, v_t);
  dispatch<avx2::Isa>(xs, ldx, M, K, vs, ldv, Rt, gs, v_t);
}


void run(const float* x, int64_t ldx, int64_t M, int64_t K, const float* v, int64_t ldv,
         int64_t Rt, const std::vector<Group<float>>& groups, bool v_t) {
  if (f32_avx512()) return dispatch<avx512::Isa>(x, ldx, M, K, v, ldv, Rt, groups, v_t);
  dispatch<avx2::Isa>(x, ldx, M, K, v, ldv, Rt, groups, v_t);
}

#else  // not x86-64 with GCC/Clang: never available, never called

int64_t max_rows_bf16() { return 0; }
int64_t max_rows_f32() { return 0; }
bool v_transposed(bool) { return false; }
void run(const c10::BFloat16*, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
         const std::vector<Group<c10::BFloat16>>&, bool) {}
void run(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
         const std::vector<Group<float>>&, bool) {}

#endif

}  // namespace pgsvd::decode
