// Batched ALS solver for min ||W X - A B X||_F^2 given the Gram G = X X^T (see PGSVD.md).
//
// The schema `pgsvd::als_solve` is defined in Python (pgsvd_rt/ops/_library.py); this file only
// registers implementations: als_solve_cpu always, als_solve_cuda when built by CUDAExtension
// (PGSVD_WITH_CUDA). Both run the same device-generic ATen program; on CUDA every ATen call is
// enqueued on the current stream.
//
// Algorithm, identical to pgsvd_rt.ops.reference.als_solve, per iteration (A first):
//   lhs = B G B^T,  rhs = (W G B^T)^T,  A = solve(lhs, rhs)^T
//   B   = solve(A^T A, A^T W)
// with solve = batched Cholesky; problems whose Cholesky fails are retried with
// ridge * (mean |diag| + tiny) on the diagonal, and an LU solve of the damped system if that
// fails too. Only R x R systems are factorised; no M x M inverse is ever formed.
//
// Differences from the reference are re-associations that are exact in real arithmetic (fp64
// results agree to ~1e-13 relative; tests/ops/test_als_solve.py holds them to 1e-10):
//   * W G B^T is computed as W (G B^T) instead of (W G) B^T: G B^T is needed for lhs anyway, so
//     the N x M x M product W G is never formed (and never materialised Bt times when G is
//     shared).
//   * G B^T is computed as (B G^T)^T. For a shared G (1, M, M) that is ONE GEMM
//     (Bt R, M) x (M, M) over the whole batch instead of Bt broadcast copies of G.
//   * The A-step solve returns A^T (R, N) directly, which is exactly the left operand of
//     A^T A and A^T W, so no transposed copies are made.

#include <torch/extension.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

namespace pgsvd {

std::atomic<int64_t> g_native_calls{0};

namespace {


void check_als_solve_args(const at::Tensor& W, const at::Tensor& G, const at::Tensor& A0,
                          const at::Tensor& B0, int64_t iters, double ridge,
                          c10::DeviceType backend) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"W", &W}, {"G", &G}, {"A0", &A0}, {"B0", &B0}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->dim() == 3, "als_solve: ", name, " must be 3-D (batched), got shape ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble,
                     "als_solve: ", name, " must be float32 or float64, got ", t->scalar_type());
    TORCH_CHECK_TYPE(t->scalar_type() == W.scalar_type(), "als_solve: ", name, " dtype ",
                     t->scalar_type(), " != W dtype ", W.scalar_type());
    TORCH_CHECK_VALUE(t->device() == W.device(), "als_solve: ", name, " on ", t->device(),
                      " but W on ", W.device());
    TORCH_CHECK_VALUE(t->device().type() == backend, "als_solve: ", name, " on ", t->device(),
                      " reached the ", c10::DeviceTypeName(backend), " kernel");
  }
  const int64_t Bt = W.size(0), N = W.size(1), M = W.size(2), R = A0.size(2);
  TORCH_CHECK_VALUE((G.size(0) == 1 || G.size(0) == Bt) && G.size(1) == M && G.size(2) == M,
                    "als_solve: G must be (", Bt, " or 1, ", M, ", ", M, "), got ", G.sizes());
  TORCH_CHECK_VALUE(A0.size(0) == Bt && A0.size(1) == N && R >= 1, "als_solve: A0 must be (",
                    Bt, ", ", N, ", R>=1), got ", A0.sizes());
  TORCH_CHECK_VALUE(B0.size(0) == Bt && B0.size(1) == R && B0.size(2) == M,
                    "als_solve: B0 must be (", Bt, ", ", R, ", ", M, "), got ", B0.sizes());
  TORCH_CHECK_VALUE(iters >= 0, "als_solve: iters must be >= 0, got ", iters);
  TORCH_CHECK_VALUE(ridge >= 0.0, "als_solve: ridge must be >= 0, got ", ridge);  // rejects NaN
}

// Solves lhs X = rhs for symmetric positive semi-definite lhs (Bt, R, R), rhs (Bt, R, K).
// Mirrors reference._spd_solve op for op, so the fallback decisions are the same.
at::Tensor spd_solve(const at::Tensor& lhs, const at::Tensor& rhs, double ridge) {
  auto [chol, info] = at::linalg_cholesky_ex(lhs);
  // One host sync per solve (as in the reference): the fallback is taken only where needed.
  if (info.ne(0).any().item<bool>()) {
    const int64_t r = lhs.size(-1);
    const double tiny = lhs.scalar_type() == at::kDouble
                            ? std::numeric_limits<double>::min()
                            : static_cast<double>(std::numeric_limits<float>::min());
    auto diag_mean = lhs.diagonal(0, -2, -1).abs().mean(-1, /*keepdim=*/true);
    auto eye = at::eye(r, lhs.options());
    auto shift = (diag_mean + tiny) * ridge;
    auto damped = lhs + shift.unsqueeze(-1) * eye;
    auto [chol_d, info_d] = at::linalg_cholesky_ex(damped);
    if (info_d.ne(0).any().item<bool>()) {  // pathological (indefinite beyond the shift): LU
      return at::linalg_solve(damped, rhs);
    }
    auto failed = info.ne(0).view({info.size(0), 1, 1});
    chol = at::where(failed, chol_d, chol);
  }
  return at::cholesky_solve(rhs, chol);
}

std::tuple<at::Tensor, at::Tensor> als_solve_impl(const at::Tensor& W, const at::Tensor& G,
                                                  const at::Tensor& A0, const at::Tensor& B0,
                                                  int64_t iters, double ridge,
                                                  c10::DeviceType backend) {
  check_als_solve_args(W, G, A0, B0, iters, ridge, backend);
  c10::DeviceGuard guard(W.device());
  g_native_calls.fetch_add(1, std::memory_order_relaxed);
  if (iters == 0) {  // outputs must never alias inputs (schema has no alias annotation)
    return {A0.clone(at::MemoryFormat::Contiguous), B0.clone(at::MemoryFormat::Contiguous)};
  }
  const int64_t Bt = W.size(0), M = W.size(2), R = A0.size(2);
  const bool shared_g = G.size(0) == 1 && Bt > 1;
  const at::Tensor Gt = G.transpose(1, 2);  // a view: BLAS reads it with a transpose flag
  const at::Tensor Wt = W.transpose(1, 2);
  at::Tensor At;  // (Bt, R, N): A^T, the layout the A-step solve returns
  at::Tensor B = B0;
  for (int64_t it = 0; it < iters; ++it) {
    // BGt = B G^T = (G B^T)^T, (Bt, R, M).
    at::Tensor BGt = shared_g ? at::mm(B.reshape({Bt * R, M}), Gt[0]).view({Bt, R, M})
                              : at::bmm(B, Gt);
    at::Tensor lhs = at::bmm(B, BGt.transpose(1, 2));  // B G B^T, (Bt, R, R)
    at::Tensor rhs = at::bmm(BGt, Wt);                 // (W G B^T)^T, (Bt, R, N)
    At = spd_solve(lhs, rhs, ridge);
    B = spd_solve(at::bmm(At, At.transpose(1, 2)), at::bmm(At, W), ridge);
  }
  return {At.transpose(1, 2).contiguous(), B.contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> als_solve_cpu(const at::Tensor& W, const at::Tensor& G,
                                                 const at::Tensor& A0, const at::Tensor& B0,
                                                 int64_t iters, double ridge) {
  return als_solve_impl(W, G, A0, B0, iters, ridge, c10::DeviceType::CPU);
}

#ifdef PGSVD_WITH_CUDA
// Same ATen program: batched cuBLAS GEMMs and cuSOLVER/MAGMA Cholesky on the current stream.
std::tuple<at::Tensor, at::Tensor> als_solve_cuda(const at::Tensor& W, const at::Tensor& G,
                                                  const at::Tensor& A0, const at::Tensor& B0,
                                                  int64_t iters, double ridge) {
  return als_solve_impl(W, G, A0, B0, iters, ridge, c10::DeviceType::CUDA);
}
#endif

TORCH_LIBRARY_IMPL(pgsvd, CPU, m) { m.impl("als_solve", &als_solve_cpu); }

#ifdef PGSVD_WITH_CUDA
TORCH_LIBRARY_IMPL(pgsvd, CUDA, m) { m.impl("als_solve", &als_solve_cuda); }
#endif

}  // namespace pgsvd
