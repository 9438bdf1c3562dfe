// The decode kernels of the CPU low-rank op (csrc/lowrank_decode_cpu.cpp), used by
// csrc/lowrank_matmul_cpu.cpp for 1 <= M <= kMaxMBf16 rows in bf16 (AVX512-BF16) and
// 1 <= M <= kMaxMF32 in fp32 (AVX-512).
// Why they exist and what they cost is in the .cpp header.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace pgsvd::decode {

// Up to where each beat the GEMM path in a model's decode step (benchmarks/bench_layers.py).
constexpr int64_t kMaxMBf16 = 4;
constexpr int64_t kMaxMF32 = 16;

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

// True when this build has the kernel and the CPU runs what it needs.
bool bf16_available();
bool f32_available();

// Every group's y_g = (x @ v)[:, its columns] @ u_g.T + bias_g in one parallel region.
// x: (M, K), row stride ldx; v: (K, Rt), row stride ldv, Rt = sum of the groups' R.
void run(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, const c10::BFloat16* v,
         int64_t ldv, int64_t Rt, const std::vector<Group<c10::BFloat16>>& groups);
void run(const float* x, int64_t ldx, int64_t M, int64_t K, const float* v, int64_t ldv,
         int64_t Rt, const std::vector<Group<float>>& groups);

}  // namespace pgsvd::decode
