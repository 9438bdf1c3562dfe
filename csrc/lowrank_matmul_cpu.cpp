// Native CPU kernels for pgsvd::lowrank_matmul, pgsvd::lowrank_matmul_grouped and
// pgsvd::lowrank_matmul_merged.
//
// The schemas are defined in Python (pgsvd_rt/ops/_library.py); this file registers the CPU
// implementations (TORCH_LIBRARY_IMPL(pgsvd, CPU)). The reference they are tested against is
// pgsvd_rt.ops.reference.lowrank_matmul: y = (x @ v) @ u.T + bias.
//
// Shapes: x (..., K) viewed as (M, K); v (K, R); u (N, R); bias (N,) or none; y (..., N).
//
// Which path serves a call is a measured policy (benchmarks/bench_cpu_kernels.py; README
// "Latency"), per dtype and M:
//   * decode: bf16 at 1 <= M <= 4 on a CPU with AVX512-BF16, fp32 at 1 <= M <= 16 on AVX-512,
//     both at 1 <= M <= 8 on AVX2 without AVX-512: the decode kernels of
//     csrc/lowrank_decode_cpu.cpp (one pass over the factors in one parallel region). In the
//     linear layers of a SmolLM2-135M decode step (benchmarks/bench_layers.py, AMD EPYC Zen 4)
//     bf16 ran 1.4x faster than the one-pass kernel below at M = 1 (measured side by
//     side when it was replaced), fp32 2.7x faster than torch's two GEMVs (MKL, the fp32 path
//     before) at M = 1 and 4, 1.2x at M = 16.
//   * bf16, M <= kOnePassMaxM on AVX-512 without AVX512-BF16: the layer is memory-bound and
//     torch's bf16 GEMV is not (it reached a third of the copy bandwidth here). One pass over the
//     factors in one parallel region, no intermediate tensor: phase 1 streams v (K split across
//     threads, each into a private fp64 partial of t = x @ v; 8-row groups summed in fp32
//     first), the partials are summed and rounded once to fp32, phase 2 splits the rows of u
//     across threads and writes y[m, n] = <u[n, :], t[m, :]> + bias[n] (fp32 accumulation).
//     bf16 factors are widened in registers (a 16-bit shift); t is never rounded to bf16.
//     Portable C++ without AVX-512.
//   * bf16, M > 4, on a CPU with AVX512-BF16: the two GEMMs of csrc/lowrank_bf16_cpu.cpp
//     (VDPBF16PS, fp32 accumulation, t rounded to bf16 between them as torch rounds it). torch's
//     bf16 GEMM would go to oneDNN, which JIT-builds a primitive per new shape (the first-call
//     column of benchmarks/bench_cpu_kernels.py): with a rank per layer, every new batch size or
//     prompt length builds hundreds of them.
//   * everything else (fp32 above the decode kernels: MKL builds nothing per shape; bf16
//     above the decode and one-pass kernels without AVX512-BF16; fp16, fp64): two library GEMMs (oneDNN/MKL through ATen) with
//     the bias fused into the second (addmm), called from C++ so the op costs one dispatch
//     instead of a Python kernel. bf16 without AVX-512 runs them in fp32 on widened copies:
//     torch's bf16 GEMM has no fast path there.
//
// Bytes moved at small M: (K R + N R) * elt + M (K + N) * elt, versus N K * elt for the dense
// layer: the ratio kappa = R (N + K) / (N K) bounds the speedup by 1 / kappa.

#include <torch/extension.h>

#include "lowrank_bf16_cpu.h"
#include "lowrank_decode_cpu.h"

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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PGSVD_X86_AVX512 1
#include <immintrin.h>
#endif

namespace pgsvd {

std::atomic<int64_t> g_lowrank_calls{0};

namespace {

// bf16 one-pass up to this many rows; above it two GEMMs won (1.2-1.6x faster at M = 4, slower
// at M = 8 on the 7B and SmolLM2 shapes; benchmarks/bench_cpu_kernels.py measures both).
constexpr int64_t kOnePassMaxM = 4;
// Minimum work (elements of a factor) per thread task: below it threading costs more than it saves.
constexpr int64_t kGrainElems = 16384;

// --------------------------------------------------------------------------------------------
// Argument checks: the same contract and messages as pgsvd_rt.ops._library.check_*_args.
// --------------------------------------------------------------------------------------------
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += std::to_string(s[i]);
    if (s.size() == 1 || i + 1 < s.size()) out += s.size() == 1 ? "," : ", ";
  }
  return out + ")";
}

void check_args(const std::string& op, const at::Tensor& x, const at::Tensor& u,
                const at::Tensor& v, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dim, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(u.dim() == 2 && v.dim() == 2, op, ": u (N, R) and v (K, R) must be 2-D, got u ",
                    shape_str(u.sizes()), ", v ", shape_str(v.sizes()));
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(v.size(0) == K, op, ": v has ", v.size(0), " rows but x has K=", K,
                    " features");
  TORCH_CHECK_VALUE(u.size(1) == v.size(1), op, ": rank mismatch, u R=", u.size(1), " vs v R=",
                    v.size(1));
  TORCH_CHECK_VALUE(u.size(1) >= 1, op, ": rank must be >= 1, got R=", u.size(1));
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"x", &x}, {"u", &u}, {"v", &v}, {"bias", bias.has_value() ? &*bias : nullptr}};
  for (const auto& [name, t] : named) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name,
                     " must be floating point, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " dtype ",
                     dtype_name(t->scalar_type()), " != x dtype ", dtype_name(x.scalar_type()));
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " on ", t->device(),
                      " but x on ", x.device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == u.size(0), op,
                      ": bias must have shape (", u.size(0), ",), got ",
                      shape_str(bias->sizes()));
  }
}

// --------------------------------------------------------------------------------------------
// Element access: fp32 math on bf16 storage (the one-pass kernels are templated on the storage
// type E; only bf16 is dispatched to them, fp32 measured faster through MKL).
// --------------------------------------------------------------------------------------------
inline float to_f(c10::BFloat16 a) { return static_cast<float>(a); }
template <typename E> inline E from_f(float a) { return static_cast<E>(a); }

// Portable kernels (any CPU; the compiler vectorises the axpy loop). Phase 1 accumulates t in
// fp64: a sequential sum over K rows in fp32 errs like K ulps, far above a library GEMV's
// lane-split sums (the tests hold the kernel to 2x torch's error); fp64 costs nothing here, the
// loop is memory-bound.
template <typename E>
void phase1_portable(const float* x, int64_t ldx, int64_t M, const E* v, int64_t R, int64_t k0,
                     int64_t k1, double* t) {
  for (int64_t k = k0; k < k1; ++k) {
    const E* vk = v + k * R;
    for (int64_t m = 0; m < M; ++m) {
      const double a = x[m * ldx + k];
      double* tm = t + m * R;
      for (int64_t r = 0; r < R; ++r) tm[r] += a * static_cast<double>(to_f(vk[r]));
    }
  }
}

template <typename E>
void phase2_portable(const float* t, int64_t ldt, int64_t M, const E* u, int64_t R, int64_t n0,
                     int64_t n1, const E* bias, E* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const E* un = u + n * R;
    const float b = bias ? to_f(bias[n]) : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* tm = t + m * ldt;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t r = 0;
      for (; r + 8 <= R; r += 8)
        for (int j = 0; j < 8; ++j) acc[j] += to_f(un[r + j]) * tm[r + j];
      float s = 0.f;
      for (; r < R; ++r) s += to_f(un[r]) * tm[r];
      for (int j = 0; j < 8; ++j) s += acc[j];
      y[m * ldy + n] = from_f<E>(s + b);
    }
  }
}

#ifdef PGSVD_X86_AVX512
#define PGSVD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

PGSVD_AVX512 inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PGSVD_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PGSVD_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Software prefetch of [p, p + bytes) into L1, one request per 64-byte line. The loops below read
// v and u in an order the hardware prefetcher does not follow when rows are short (16 columns of
// 8 rows, then the next 16): without this a small layer streams from L3 at a third of the rate.
inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// t8 += the low / high 8 floats of w, widened to fp64.
PGSVD_AVX512 inline __m512d add_lo(__m512d t8, __m512 w) {
  return _mm512_add_pd(t8, _mm512_cvtps_pd(_mm512_castps512_ps256(w)));
}
PGSVD_AVX512 inline __m512d add_hi(__m512d t8, __m512 w) {
  return _mm512_add_pd(
      t8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))));
}

// sum_{i<8} a[i] * v[i * R + r ...] for 16 columns (masked by mk), in fp32 (a short tree).
template <typename E>
PGSVD_AVX512 inline __m512 eight_rows(const __m512* a, const E* v, int64_t R, __mmask16 mk) {
  __m512 s0 = _mm512_mul_ps(a[0], load16(v, mk));
  __m512 s1 = _mm512_mul_ps(a[1], load16(v + R, mk));
  s0 = _mm512_fmadd_ps(a[2], load16(v + 2 * R, mk), s0);
  s1 = _mm512_fmadd_ps(a[3], load16(v + 3 * R, mk), s1);
  s0 = _mm512_fmadd_ps(a[4], load16(v + 4 * R, mk), s0);
  s1 = _mm512_fmadd_ps(a[5], load16(v + 5 * R, mk), s1);
  s0 = _mm512_fmadd_ps(a[6], load16(v + 6 * R, mk), s0);
  s1 = _mm512_fmadd_ps(a[7], load16(v + 7 * R, mk), s1);
  return _mm512_add_ps(s0, s1);
}

// t[m, :R] += sum_{k in [k0, k1)} x[m, k] v[k, :R]: groups of 8 rows of v summed in fp32 (4 terms
// per chain), each group added to t in fp64 (see phase1_portable for why). v is read 8 rows at a
// time, a contiguous 8 R block; t (M, R) stays in L1/L2.
template <typename E>
PGSVD_AVX512 void phase1_avx512(const float* x, int64_t ldx, int64_t M, const E* v, int64_t R,
                                int64_t k0, int64_t k1, double* t) {
  const __mmask16 full = static_cast<__mmask16>(0xFFFF);
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const E* vk = v + k * R;
    if (k + 24 <= k1) prefetch_range(vk + 16 * R, 8 * R * int64_t(sizeof(E)));  // 2 groups ahead
    for (int64_t m = 0; m < M; ++m) {
      __m512 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm512_set1_ps(x[m * ldx + k + i]);
      double* tm = t + m * R;
      int64_t r = 0;
      for (; r + 16 <= R; r += 16) {
        const __m512 s = eight_rows(a, vk + r, R, full);
        _mm512_storeu_pd(tm + r, add_lo(_mm512_loadu_pd(tm + r), s));
        _mm512_storeu_pd(tm + r + 8, add_hi(_mm512_loadu_pd(tm + r + 8), s));
      }
      if (r < R) {
        const __mmask16 mk = tail_mask(R - r);
        const __mmask8 lo = static_cast<__mmask8>(mk & 0xFF), hi = static_cast<__mmask8>(mk >> 8);
        const __m512 s = eight_rows(a, vk + r, R, mk);
        _mm512_mask_storeu_pd(tm + r, lo, add_lo(_mm512_maskz_loadu_pd(lo, tm + r), s));
        _mm512_mask_storeu_pd(tm + r + 8, hi, add_hi(_mm512_maskz_loadu_pd(hi, tm + r + 8), s));
      }
    }
  }
  if (k < k1) phase1_portable<E>(x, ldx, M, v, R, k, k1, t);  // the last 1-7 rows
}

// y[m, n] = <u[n, :R], t[m, :R]> + bias[n] for MB rows m at once (u's row read once for all).
template <typename E, int MB>
PGSVD_AVX512 void phase2_rows_avx512(const float* t, int64_t ldt, const E* un, int64_t R,
                                     float* out) {
  const int64_t R32 = R & ~int64_t(31);
  __m512 acc0[MB], acc1[MB];
  for (int j = 0; j < MB; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
  int64_t r = 0;
  for (; r < R32; r += 32) {  // two independent chains per row hide the FMA latency
    const __m512 ua = load16(un + r), ub = load16(un + r + 16);
    for (int j = 0; j < MB; ++j) {
      acc0[j] = _mm512_fmadd_ps(ua, _mm512_loadu_ps(t + j * ldt + r), acc0[j]);
      acc1[j] = _mm512_fmadd_ps(ub, _mm512_loadu_ps(t + j * ldt + r + 16), acc1[j]);
    }
  }
  for (; r < R; r += 16) {
    const __mmask16 mk = R - r >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(R - r);
    const __m512 ua = load16(un + r, mk);
    for (int j = 0; j < MB; ++j)
      acc0[j] = _mm512_fmadd_ps(ua, _mm512_maskz_loadu_ps(mk, t + j * ldt + r), acc0[j]);
  }
  for (int j = 0; j < MB; ++j) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
}

template <typename E>
PGSVD_AVX512 void phase2_avx512(const float* t, int64_t ldt, int64_t M, const E* u, int64_t R,
                                int64_t n0, int64_t n1, const E* bias, E* y, int64_t ldy) {
  float out[8];
  for (int64_t n = n0; n < n1; ++n) {
    const E* un = u + n * R;
    if (n + 4 < n1) prefetch_range(un + 4 * R, R * int64_t(sizeof(E)));  // 4 rows ahead
    const float b = bias ? to_f(bias[n]) : 0.f;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const float* tm = t + m0 * ldt;
      const int64_t mb = std::min<int64_t>(8, M - m0);
      switch (mb) {
        case 1: phase2_rows_avx512<E, 1>(tm, ldt, un, R, out); break;
        case 2: phase2_rows_avx512<E, 2>(tm, ldt, un, R, out); break;
        case 3: phase2_rows_avx512<E, 3>(tm, ldt, un, R, out); break;
        case 4: phase2_rows_avx512<E, 4>(tm, ldt, un, R, out); break;
        case 5: phase2_rows_avx512<E, 5>(tm, ldt, un, R, out); break;
        case 6: phase2_rows_avx512<E, 6>(tm, ldt, un, R, out); break;
        case 7: phase2_rows_avx512<E, 7>(tm, ldt, un, R, out); break;
        default: phase2_rows_avx512<E, 8>(tm, ldt, un, R, out); break;
      }
      for (int64_t j = 0; j < mb; ++j) y[(m0 + j) * ldy + n] = from_f<E>(out[j] + b);
    }
  }
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
}
#else
bool cpu_has_avx512() { return false; }
#endif

template <typename E>
void phase1(const float* x, int64_t ldx, int64_t M, const E* v, int64_t R, int64_t k0, int64_t k1,
            double* t) {
#ifdef PGSVD_X86_AVX512
  if (cpu_has_avx512()) return phase1_avx512<E>(x, ldx, M, v, R, k0, k1, t);
#endif
  phase1_portable<E>(x, ldx, M, v, R, k0, k1, t);
}

template <typename E>
void phase2(const float* t, int64_t ldt, int64_t M, const E* u, int64_t R, int64_t n0, int64_t n1,
            const E* bias, E* y, int64_t ldy) {
#ifdef PGSVD_X86_AVX512
  if (cpu_has_avx512()) return phase2_avx512<E>(t, ldt, M, u, R, n0, n1, bias, y, ldy);
#endif
  phase2_portable<E>(t, ldt, M, u, R, n0, n1, bias, y, ldy);
}

// One group of the small-M kernel: u_g (N_g, R_g) reading columns [r0, r0 + R_g) of t.
template <typename E>
struct Group {
  const E* u;
  int64_t N, R, r0;
  const E* bias;  // (N_g,) or nullptr
  E* y;           // (M, N_g), contiguous
};

// t = x @ v_cat, then every group's y_g = t[:, r0:r0+R_g] @ u_g.T + bias_g, in ONE parallel
// region (one fork/join per call): phase 1 splits K (each thread into a private fp64 partial of
// t), a barrier, the partials are summed and rounded once to fp32 (columns split), a barrier,
// phase 2 splits the rows of all groups' u (one index space). Layers too small to amortise a
// fork/join (< kGrainElems factor elements per thread) run on fewer threads, down to one.
template <typename E>
void small_m(const at::Tensor& x2, const E* v, int64_t Rt, const std::vector<Group<E>>& groups) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const at::Tensor xf = x2.to(at::kFloat);  // x is tiny next to the factors
  const float* xp = xf.data_ptr<float>();
  int64_t n_total = 0, work = K * Rt;
  for (const auto& g : groups) n_total += g.N, work += g.N * g.R;
  int64_t nt = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, work / kGrainElems));
#ifdef _OPENMP
  if (omp_in_parallel()) nt = 1;  // called from inside a parallel region: stay on this thread
#else
  nt = 1;
#endif
  at::Tensor part = at::zeros({nt, M, Rt}, x2.options().dtype(at::kDouble));
  at::Tensor tf = at::empty({M, Rt}, x2.options().dtype(at::kFloat));
  double* pp = part.data_ptr<double>();
  float* tp = tf.data_ptr<float>();
  auto body = [&](int64_t tid, int64_t nthr) {
    const int64_t kc = (K + nthr - 1) / nthr, k0 = std::min(K, tid * kc);
    if (k0 < std::min(K, k0 + kc)) phase1<E>(xp, K, M, v, Rt, k0, std::min(K, k0 + kc),
                                             pp + tid * M * Rt);
#pragma omp barrier
    const int64_t jc = (M * Rt + nthr - 1) / nthr, j0 = std::min(M * Rt, tid * jc);
    for (int64_t j = j0; j < std::min(M * Rt, j0 + jc); ++j) {
      double acc = pp[j];
      for (int64_t i = 1; i < nthr; ++i) acc += pp[i * M * Rt + j];
      tp[j] = static_cast<float>(acc);
    }
#pragma omp barrier
    const int64_t nc = (n_total + nthr - 1) / nthr, b = std::min(n_total, tid * nc);
    const int64_t e = std::min(n_total, b + nc);
    int64_t base = 0;
    for (const auto& g : groups) {
      const int64_t lo = std::max(b, base), hi = std::min(e, base + g.N);
      if (lo < hi)
        phase2<E>(tp + g.r0, Rt, M, g.u, g.R, lo - base, hi - base, g.bias, g.y, g.N);
      base += g.N;
    }
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

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

// Small-M kernel for one storage type: y_g (M, N_g) for every group.
template <typename E>
std::vector<at::Tensor> small_m_typed(const at::Tensor& x2, const std::vector<at::Tensor>& us,
                                      const at::Tensor& v_cat,
                                      const std::vector<at::Tensor>& biases) {
  const int64_t M = x2.size(0);
  const at::Tensor vc = v_cat.contiguous();
  std::vector<at::Tensor> keep, ys;  // contiguous operands live until the kernel returns
  std::vector<Group<E>> groups;
  int64_t r0 = 0;
  for (size_t g = 0; g < us.size(); ++g) {
    const at::Tensor ug = us[g].contiguous();
    const at::Tensor bg = biases[g].defined() ? biases[g].contiguous() : at::Tensor();
    keep.push_back(ug);
    keep.push_back(bg);
    ys.push_back(at::empty({M, ug.size(0)}, x2.options()));
    groups.push_back({ug.data_ptr<E>(), ug.size(0), ug.size(1), r0,
                      bg.defined() ? bg.data_ptr<E>() : nullptr, ys.back().data_ptr<E>()});
    r0 += ug.size(1);
  }
  small_m<E>(x2, vc.data_ptr<E>(), vc.size(1), groups);
  return ys;
}

// True when v (K, R) is a view of v.T, (R, K) row-major: what ops.decode_layout makes.
bool is_v_transposed(const at::Tensor& v) { return v.stride(1) != 1 && v.stride(0) == 1; }

// bf16 at M > 4 on AVX512-BF16: t = x @ v_cat once (fp32), each group's slice of t rounded to
// bf16 (zero-padded to an even width: the kernel reads R in pairs), then y_g = t_g @ u_g.T + b_g.
// v_cat given as v.T (what ops.decode_layout makes for the decode kernels) is not copied: each
// group's t_g = x @ v_g is then tu(x, v_g.T), rounded to bf16 from its fp32 sums as above (K
// even: tu reads x in pairs).
std::vector<at::Tensor> bf16_gemms(const at::Tensor& x2, const std::vector<at::Tensor>& us,
                                   const at::Tensor& v_cat, const std::vector<at::Tensor>& biases) {
  using c10::BFloat16;
  const int64_t M = x2.size(0), K = x2.size(1), Rt = v_cat.size(1);
  const bool v_t = is_v_transposed(v_cat) && K % 2 == 0;
  const at::Tensor vc = v_t || v_cat.stride(1) == 1 ? v_cat : v_cat.contiguous();
  at::Tensor t;
  if (!v_t) {
    t = at::empty({M, Rt}, x2.options().dtype(at::kFloat));
    bf16::xv(x2.data_ptr<BFloat16>(), K, M, K, vc.data_ptr<BFloat16>(), vc.stride(0), Rt,
             t.data_ptr<float>(), Rt);
  }
  std::vector<at::Tensor> ys;
  int64_t r0 = 0;
  for (size_t g = 0; g < us.size(); ++g) {
    const int64_t N = us[g].size(0), R = us[g].size(1), ld = R + (R & 1);
    at::Tensor tb = at::empty({M, ld}, x2.options());
    BFloat16* tbp = tb.data_ptr<BFloat16>();
    if (v_t) {
      bf16::tu(x2.data_ptr<BFloat16>(), K, M, vc.data_ptr<BFloat16>() + r0 * vc.stride(1),
               vc.stride(1), R, K, nullptr, tbp, ld);
      if (ld > R)
        for (int64_t m = 0; m < M; ++m) tbp[m * ld + R] = BFloat16(0.f);
    } else {
      const float* tp = t.data_ptr<float>();
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / ld), [&](int64_t b, int64_t e) {
        for (int64_t m = b; m < e; ++m) {
          for (int64_t r = 0; r < R; ++r) tbp[m * ld + r] = BFloat16(tp[m * Rt + r0 + r]);
          if (ld > R) tbp[m * ld + R] = BFloat16(0.f);
        }
      });
    }
    const at::Tensor ug = us[g].stride(1) == 1 ? us[g] : us[g].contiguous();
    const at::Tensor bg = biases[g].defined() ? biases[g].contiguous() : at::Tensor();
    ys.push_back(at::empty({M, N}, x2.options()));
    bf16::tu(tbp, ld, M, ug.data_ptr<BFloat16>(), ug.stride(0), N, R,
             bg.defined() ? bg.data_ptr<BFloat16>() : nullptr, ys.back().data_ptr<BFloat16>(), N);
    r0 += R;
  }
  return ys;
}

// The decode kernels of csrc/lowrank_decode_cpu.cpp (M and the CPU checked by the caller);
// merged: every group writes its columns of one (M, sum N) output.
template <typename E>
std::vector<at::Tensor> decode_groups(const at::Tensor& x2, const std::vector<at::Tensor>& us,
                                      const at::Tensor& v_cat,
                                      const std::vector<at::Tensor>& biases, bool merged) {
  const int64_t M = x2.size(0);
  // v as v.T (Rt, K) row-major, where the kernels read it so (decode::v_transposed).
  const bool v_t = is_v_transposed(v_cat) && decode::v_transposed(!std::is_same_v<E, float>);
  const at::Tensor vc = v_t || v_cat.stride(1) == 1 ? v_cat : v_cat.contiguous();
  std::vector<at::Tensor> keep, ys;  // contiguous operands live until the kernel returns
  std::vector<decode::Group<E>> groups;
  int64_t n_total = 0;
  for (const auto& u : us) n_total += u.size(0);
  if (merged) ys.push_back(at::empty({M, n_total}, x2.options()));
  for (size_t g = 0, n0 = 0; g < us.size(); n0 += us[g++].size(0)) {
    const at::Tensor ug = us[g].stride(1) == 1 ? us[g] : us[g].contiguous();
    const at::Tensor bg = biases[g].defined() ? biases[g].contiguous() : at::Tensor();
    keep.push_back(ug);
    keep.push_back(bg);
    if (!merged) ys.push_back(at::empty({M, ug.size(0)}, x2.options()));
    E* y = merged ? ys[0].data_ptr<E>() + n0 : ys.back().data_ptr<E>();
    groups.push_back({ug.data_ptr<E>(), ug.stride(0), ug.size(0), ug.size(1),
                      bg.defined() ? bg.data_ptr<E>() : nullptr, y,
                      merged ? n_total : ug.size(0)});
  }
  decode::run(x2.data_ptr<E>(), x2.stride(0), M, x2.size(1), vc.data_ptr<E>(),
              v_t ? vc.stride(1) : vc.stride(0), vc.size(1), groups, v_t);
  return ys;
}

// y_g for every group, (M, N_g) each; us[g] (N_g, R_g), v_cat (K, sum R_g), biases[g] or undefined.
// merged: one (M, sum N) tensor, the groups' columns side by side (written in place by the
// decode kernels, concatenated otherwise).
std::vector<at::Tensor> lowrank_2d(const at::Tensor& x2, const std::vector<at::Tensor>& us,
                                   const at::Tensor& v_cat, const std::vector<at::Tensor>& biases,
                                   bool merged) {
  const int64_t M = x2.size(0);
  const auto out = [merged](std::vector<at::Tensor> ys) {
    return merged && ys.size() > 1 ? std::vector<at::Tensor>{at::cat(ys, 1)} : ys;
  };
  if (x2.scalar_type() == at::kFloat && M >= 1 && M <= decode::max_rows_f32())
    return decode_groups<float>(x2, us, v_cat, biases, merged);
  if (x2.scalar_type() == at::kBFloat16) {
    if (M >= 1 && M <= decode::max_rows_bf16())
      return decode_groups<c10::BFloat16>(x2, us, v_cat, biases, merged);
    if (M <= kOnePassMaxM) return out(small_m_typed<c10::BFloat16>(x2, us, v_cat, biases));
    if (bf16::available()) return out(bf16_gemms(x2, us, v_cat, biases));
  }
  // Otherwise: two library GEMMs per group, the bias fused into the second. Per
  // group (a column view of v_cat), not one GEMM over v_cat: the library picks its blocking by
  // shape, and this keeps every group's rounding that of the reference (x is tiny next to v).
  // bf16 without AVX-512: torch's bf16 GEMM has no fast path there (13 ms for one 32-token
  // down_proj of SmolLM2 pgsvd-40 on an AMD EPYC Zen 3), so the GEMMs run in fp32 on widened
  // copies (t is not rounded to bf16 between them) and y is rounded once.
  const bool widen = x2.scalar_type() == at::kBFloat16 && !cpu_has_avx512();
  const auto w = [widen](const at::Tensor& t) { return widen && t.defined() ? t.to(at::kFloat) : t; };
  const at::Tensor xw = w(x2), vw = w(v_cat);
  std::vector<at::Tensor> ys;
  int64_t r0 = 0;
  for (size_t g = 0; g < us.size(); ++g) {
    const int64_t R = us[g].size(1);
    const at::Tensor t = at::mm(xw, us.size() == 1 ? vw : vw.narrow(1, r0, R));
    const at::Tensor ug = w(us[g]).t(), bg = w(biases[g]);
    const at::Tensor y = bg.defined() ? at::addmm(bg, t, ug) : at::mm(t, ug);
    ys.push_back(widen ? y.to(x2.scalar_type()) : y);
    r0 += R;
  }
  return out(ys);
}

// (..., K) -> (M, K) contiguous (a view when x already is); M from the leading dims, so K = 0 works.
// A 2-D contiguous x (what engines pass) is returned as is: no op call at all.
at::Tensor as_2d(const at::Tensor& x) {
  if (x.dim() == 2 && x.is_contiguous()) return x;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  return x.reshape({M, x.size(-1)}).contiguous();
}

// y (M, N) viewed as x's leading dims + N (no op call when x is 2-D).
at::Tensor as_out(const at::Tensor& y, const at::Tensor& x) {
  return x.dim() == 2 ? y : y.view(out_shape(x, y.size(1)));
}

// True when check_args would pass for every group of a grouped call, checked on sizes and types
// only (no tensor views): the per-group check_args, which names what is wrong, runs otherwise.
bool grouped_args_ok(const at::Tensor& x, at::TensorList us, const at::Tensor& v_cat,
                     const c10::optional<at::Tensor>& bias_cat) {
  const auto ok = [&](const at::Tensor& t) {
    return t.scalar_type() == x.scalar_type() && t.device() == x.device();
  };
  if (x.dim() < 1 || !at::isFloatingType(x.scalar_type()) || !ok(v_cat) ||
      v_cat.size(0) != x.size(-1))
    return false;
  if (bias_cat.has_value() && !ok(*bias_cat)) return false;
  for (const auto& u : us)
    if (u.dim() != 2 || u.size(1) < 1 || !ok(u)) return false;
  return true;
}

// The checks of a grouped call (op names it in the message), then each group's bias (a view of
// bias_cat, or undefined).
std::vector<at::Tensor> grouped_biases(const std::string& op, const at::Tensor& x,
                                       at::TensorList us, const at::Tensor& v_cat,
                                       const c10::optional<at::Tensor>& bias_cat) {
  TORCH_CHECK_VALUE(!us.empty(), op, ": need at least one u, got an empty list");
  TORCH_CHECK_VALUE(v_cat.dim() == 2, op, ": v_cat must be 2-D, got ", shape_str(v_cat.sizes()));
  int64_t r_sum = 0, n_total = 0;
  std::string ranks = "[";
  for (size_t g = 0; g < us.size(); ++g) {
    const int64_t r = us[g].dim() == 2 ? us[g].size(1) : -1;
    r_sum += r;
    n_total += us[g].dim() >= 1 ? us[g].size(0) : 0;
    ranks += std::to_string(r) + (g + 1 < us.size() ? ", " : "]");
  }
  TORCH_CHECK_VALUE(r_sum == v_cat.size(1), op, ": ranks of us ", ranks, " sum to ", r_sum,
                    " but v_cat has R=", v_cat.size(1));
  if (bias_cat.has_value()) {
    TORCH_CHECK_VALUE(bias_cat->dim() == 1 && bias_cat->size(0) == n_total, op,
                      ": bias_cat must have shape (", n_total, ",) (sum of N), got ",
                      shape_str(bias_cat->sizes()));
  }
  std::vector<at::Tensor> biases;
  const bool fast = grouped_args_ok(x, us, v_cat, bias_cat);
  int64_t r0 = 0, n0 = 0;
  for (size_t g = 0; g < us.size(); ++g) {
    c10::optional<at::Tensor> bg;
    if (bias_cat.has_value()) bg = bias_cat->narrow(0, n0, us[g].size(0));
    try {
      if (!fast) check_args("lowrank_matmul", x, us[g], v_cat.narrow(1, r0, us[g].size(1)), bg);
    } catch (const c10::Error& e) {
      // Name the group, keep the exception type (ValueError / TypeError).
      const std::string msg = op + " (group " + std::to_string(g) + "): " + e.what_without_backtrace();
      if (dynamic_cast<const c10::TypeError*>(&e)) TORCH_CHECK_TYPE(false, msg);
      TORCH_CHECK_VALUE(false, msg);
    }
    biases.push_back(bg.has_value() ? *bg : at::Tensor());
    r0 += us[g].size(1);
    n0 += us[g].size(0);
  }
  return biases;
}

}  // namespace

at::Tensor lowrank_matmul_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                              const c10::optional<at::Tensor>& bias) {
  check_args("lowrank_matmul", x, u, v, bias);
  g_lowrank_calls.fetch_add(1, std::memory_order_relaxed);
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  auto ys = lowrank_2d(as_2d(x), {u}, v, {b}, false);
  return as_out(ys[0], x);
}

std::vector<at::Tensor> lowrank_matmul_grouped_cpu(const at::Tensor& x, at::TensorList us,
                                                   const at::Tensor& v_cat,
                                                   const c10::optional<at::Tensor>& bias_cat) {
  const auto biases = grouped_biases("lowrank_matmul_grouped", x, us, v_cat, bias_cat);
  g_lowrank_calls.fetch_add(1, std::memory_order_relaxed);
  auto ys = lowrank_2d(as_2d(x), {us.begin(), us.end()}, v_cat, biases, false);
  for (auto& y : ys) y = as_out(y, x);
  return ys;
}

// The groups' outputs side by side in one (..., sum N) tensor, as an engine's merged layer
// (q/k/v, gate/up) returns them: the decode kernels write each group's columns in place.
at::Tensor lowrank_matmul_merged_cpu(const at::Tensor& x, at::TensorList us,
                                     const at::Tensor& v_cat,
                                     const c10::optional<at::Tensor>& bias_cat) {
  const auto biases = grouped_biases("lowrank_matmul_merged", x, us, v_cat, bias_cat);
  g_lowrank_calls.fetch_add(1, std::memory_order_relaxed);
  return as_out(lowrank_2d(as_2d(x), {us.begin(), us.end()}, v_cat, biases, true)[0], x);
}

bool lowrank_cpu_avx512() { return cpu_has_avx512(); }

TORCH_LIBRARY_IMPL(pgsvd, CPU, m) {
  m.impl("lowrank_matmul", &lowrank_matmul_cpu);
  m.impl("lowrank_matmul_grouped", &lowrank_matmul_grouped_cpu);
  m.impl("lowrank_matmul_merged", &lowrank_matmul_merged_cpu);
}

}  // namespace pgsvd
