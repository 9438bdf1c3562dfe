// bf16 GEMM pieces of the CPU low-rank kernel for M > 4 tokens (csrc/lowrank_bf16_cpu.cpp),
// used by csrc/lowrank_matmul_cpu.cpp. AVX512-BF16 (VDPBF16PS) with no per-shape state:
// why, and what they cost, is in the .cpp header.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace pgsvd::bf16 {

// True when this build has the kernels and the CPU runs AVX512-BF16.
bool available();

// t[m, :R] = sum_k x[m, k] v[k, :R] in fp32 for m < M.
// x: (M, K) bf16, row stride ldx; v: (K, R) bf16, row stride ldv; t: (M, R) fp32, row stride ldt.
void xv(const c10::BFloat16* x, int64_t ldx, int64_t M, int64_t K, const c10::BFloat16* v,
        int64_t ldv, int64_t R, float* t, int64_t ldt);

// y[m, n] = bf16(sum_r tb[m, r] u[n, r] + bias[n]) for m < M, n < N.
// tb: (M, R) bf16, row stride ldtb, with tb[m, R] readable (and 0) when R is odd;
// u: (N, R) bf16, row stride ldu; bias: (N,) or nullptr; y: (M, N) bf16, row stride ldy.
void tu(const c10::BFloat16* tb, int64_t ldtb, int64_t M, const c10::BFloat16* u, int64_t ldu,
        int64_t N, int64_t R, const c10::BFloat16* bias, c10::BFloat16* y, int64_t ldy);

}  // namespace pgsvd::bf16
