// The Python module pgsvd_rt._C: importing it registers every kernel of csrc/ (their
// TORCH_LIBRARY_IMPL blocks run at load time); the functions below only report what was built.

#include <torch/extension.h>

#include <torch/version.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace pgsvd {
extern std::atomic<int64_t> g_native_calls;   // als_solve.cpp
extern std::atomic<int64_t> g_lowrank_calls;  // lowrank_matmul_cpu.cpp
bool lowrank_cpu_avx512();                    // lowrank_matmul_cpu.cpp
namespace bf16 {
bool available();                             // lowrank_bf16_cpu.cpp
}  // namespace bf16
namespace decode {
int64_t max_rows_bf16();                      // lowrank_decode_cpu.cpp
int64_t max_rows_f32();
bool v_transposed(bool bf16);
void force_avx2(bool on);
}  // namespace decode
namespace packed {
bool kernels(bool bf16);                      // lowrank_packed_cpu.cpp
std::string isa(bool bf16, int64_t rows);     // lowrank_packed_cpu.cpp
bool amx_available();
void set_amx(const std::string& mode, int64_t min_rows);
}  // namespace packed
pybind11::dict output_pool_stats();           // output_pool.cpp
void output_pool_clear();
}  // namespace pgsvd

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  d["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  d["compiler"] = std::string("unknown");
#endif
#ifdef PGSVD_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["torch"] = std::string(TORCH_VERSION);
  d["ops"] = pybind11::make_tuple("als_solve", "lowrank_matmul", "lowrank_matmul_grouped",
                                 "lowrank_matmul_merged", "lowrank_matmul_packed");
  d["cpu_avx512"] = pgsvd::lowrank_cpu_avx512();
  d["cpu_avx512_bf16"] = pgsvd::bf16::available();
  d["decode_max_rows"] = pybind11::make_tuple(pgsvd::decode::max_rows_bf16(),
                                              pgsvd::decode::max_rows_f32());
  d["decode_v_transposed"] = pybind11::make_tuple(pgsvd::decode::v_transposed(true),
                                                  pgsvd::decode::v_transposed(false));
  d["packed_kernels"] = pybind11::make_tuple(pgsvd::packed::kernels(true),
                                             pgsvd::packed::kernels(false));
  d["amx_available"] = pgsvd::packed::amx_available();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgsvd_rt native kernels; importing registers CPU (and CUDA) impls of pgsvd ops";
  m.def("build_info", &build_info,
        "compiler, with_cuda, torch version, ops, cpu_avx512(_bf16), decode_max_rows (bf16, fp32), "
        "decode_v_transposed (bf16, fp32), packed_kernels (bf16, fp32), amx_available");
  m.def("decode_v_transposed", &pgsvd::decode::v_transposed, pybind11::arg("bf16"),
        "whether the decode kernels of bf16 (else fp32) read v (K, R) fastest as v.T, (R, K) "
        "row-major");
  m.def("packed_kernels", &pgsvd::packed::kernels, pybind11::arg("bf16"),
        "whether lowrank_matmul_packed has kernels for bf16 (else fp32) on this CPU");
  m.def("packed_isa", &pgsvd::packed::isa, pybind11::arg("bf16"),
        pybind11::arg("rows") = int64_t(1) << 40,
        "which tiles serve a lowrank_matmul_packed call of `rows` rows (default: a large call) "
        "for bf16 (else fp32): avx512, avx2, amx, amx-emulated or none (the op unpacks)");
  m.def("packed_amx", &pgsvd::packed::set_amx, pybind11::arg("mode"),
        pybind11::arg("min_rows") = 16,
        "serve bf16 lowrank_matmul_packed calls of >= min_rows rows with the AMX tiles: 'on' (the "
        "hardware; refused where the CPU or kernel has no AMX), 'emulate' (the same code, the "
        "tile instructions in C++: tests), 'off' (the default)");
  m.def("amx_available", &pgsvd::packed::amx_available,
        "whether this CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use them");
  m.def("decode_force_avx2", &pgsvd::decode::force_avx2, pybind11::arg("on"),
        "serve the decode and packed kernels with the AVX2 set even on an AVX-512 CPU (tests "
        "cover both)");
  m.def(
      "native_calls", [] { return pgsvd::g_native_calls.load(std::memory_order_relaxed); },
      "number of als_solve calls served by this extension (to verify dispatch)");
  m.def(
      "lowrank_calls", [] { return pgsvd::g_lowrank_calls.load(std::memory_order_relaxed); },
      "number of lowrank_matmul(_grouped) calls served by the CPU kernels (to verify dispatch)");
  m.def("output_pool_stats", &pgsvd::output_pool_stats,
        "the CPU ops' output pool: cached_bytes, cap_bytes, blocks, hits, misses");
  m.def("output_pool_clear", &pgsvd::output_pool_clear,
        "free the pool's cached blocks (outputs still alive come back to it later)");
}
