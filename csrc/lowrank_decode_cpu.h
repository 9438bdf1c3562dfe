// The decode kernels of the CPU low-rank op (csrc/lowrank_decode_cpu.cpp), used by
// csrc/lowrank_matmul_cpu.cpp for 1 <= M <= max_rows_bf16() rows in bf16 and
// 1 <= M <= max_rows_f32() in fp32 (AVX-512 kernels where the CPU has them, AVX2 otherwise).
// Why they exist and what they cost is in the .cpp header.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace pgsvd::decode {

// Rows of v per sweep of the bands in phase 1 (even), shared by the kernel sets.
constexpr int64_t kChunk = 64;

// One projection: u (N, R) with row stride ldu, bias (N,) or nullptr, y (M, N) with row stride
// ldy (N for an output of its own, the sum of N when the groups share one); its columns of
// v_cat follow the previous group's.
template <typename E>
struct Group {
  const E* u;
  int64_t ldu, N, R;
  const E* bias;
  E* y;
  int64_t ldy;
};

// Up to how many rows the decode kernels serve each dtype on this CPU (0: none), up to where
// each beat the GEMM path in a model's decode step (benchmarks/bench_layers.py): AVX512-BF16
// bf16 4, AVX-512 fp32 16, AVX2 8 for both.
int64_t max_rows_bf16();
int64_t max_rows_f32();

// Serve with the AVX2 kernels even where AVX-512 ones exist (tests cover both on one CPU): the
// decode kernels and the packed kernels (lowrank_packed_cpu.cpp) alike.
void force_avx2(bool on);
bool avx2_only();  // force_avx2(true) is in effect
bool has_avx2();   // the CPU runs AVX2 and FMA (what the AVX2 kernel sets need)

// True when the kernels of this dtype (bf16, else fp32) read v fastest as v.T, (Rt, K)
// row-major (a (K, Rt) tensor of strides (1, K)): phase 1 then runs as dot products
// (lowrank_decode_cpu.cpp, run_dots).
bool v_transposed(bool bf16);

// Every group's y_g = (x @ v)[:, its columns] @ u_g.T + bias_g in one parallel region.
// x: (M, K), row stride ldx; v: (K, Rt), row stride ldv, Rt = sum of the groups' R; with
// v_t: v given as v.T, (Rt, K) with row stride ldv (only where v_transposed(dtype)).
void run(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, const c10::BFloat16* v,
         int64_t ldv, int64_t Rt, const std::vector<Group<c10::BFloat16>>& groups,
         bool v_t = false);
void run(const float* x, int64_t ldx, int64_t M, int64_t K, const float* v, int64_t ldv,
         int64_t Rt, const std::vector<Group<float>>& groups, bool v_t = false);

}  // namespace pgsvd::decode
