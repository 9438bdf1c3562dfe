// Outputs of the CPU serving ops from a small cache of resident blocks.
//
// Why. A fresh tensor of more than a few MB is an mmap'ed block under glibc's malloc: every
// call's output then page-faults (the kernel maps and zeroes each 4 KB page) while the GEMM
// writes it. At prefill that is no small share: a 4096 x 3072 fp32 output (SmolLM2's merged
// gate/up at 8 x 512 prompt tokens) costs 15 ms to first-touch against 1.2 ms to rewrite, next
// to 26 ms for the factored GEMM itself (AMD EPYC Zen 4, 2 threads). Eager engines pay it for
// dense layers too; compiled ones (vLLM's default) give the dense layers buffers they plan, so
// there the fault was ours alone: in vLLM's fp32 prefill of SmolLM2 dense ran at 1.13x its eager
// rate when compiled, pgsvd-40 at 0.91x, before this pool. Reusing blocks keeps the pages
// resident, as a caching allocator (CUDA's, tcmalloc) does.
//
// How. Outputs of at least kMinBytes (256 KB) take a free block of at least their size (and at
// most twice it) or a new one; the tensor's deleter gives the block back. Free blocks are kept
// up to a cap (PGSVD_OUTPUT_POOL_MB, default 1024; 0 turns the pool off), the rest freed. The
// pool is never destroyed (tensors may outlive static destruction at exit). Such a tensor's
// storage cannot be resized (from_blob): the ops' outputs never are.

#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>

namespace pgsvd {
namespace {

constexpr int64_t kMinBytes = 256 << 10;  // smaller outputs come from malloc's own heap
constexpr int64_t kGranule = 64 << 10;    // capacities in 64 KB steps

struct Pool {
  std::mutex mu;
  std::multimap<int64_t, void*> free;  // capacity -> block
  int64_t cached = 0, cap = 0, hits = 0, misses = 0;

  Pool() {
    const char* env = std::getenv("PGSVD_OUTPUT_POOL_MB");
    int64_t mb = 1024;
    if (env && *env) {
      char* end = nullptr;
      mb = std::strtoll(env, &end, 10);
      TORCH_CHECK_VALUE(*end == '\0' && mb >= 0 && mb < (int64_t{1} << 40),
                        "PGSVD_OUTPUT_POOL_MB must be a whole number of MB >= 0, got '", env,
                        "'");
    }
    cap = mb << 20;
  }

  void* take(int64_t need, int64_t& capacity) {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free.lower_bound(need);
      if (it != free.end() && it->first <= 2 * need) {
        it = std::prev(free.upper_bound(it->first));  // of equal blocks, the last freed (warm)
        capacity = it->first;
        void* p = it->second;
        cached -= it->first;
        free.erase(it);
        ++hits;
        return p;
      }
      ++misses;
    }
    capacity = (need + kGranule - 1) / kGranule * kGranule;
    return c10::alloc_cpu(static_cast<size_t>(capacity));
  }

  void give(void* p, int64_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (cached + capacity <= cap) {
        free.emplace(capacity, p);
        cached += capacity;
        return;
      }
    }
    c10::free_cpu(p);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& kv : free) c10::free_cpu(kv.second);
    free.clear();
    cached = 0;
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: see the header
  return *p;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t need = numel * static_cast<int64_t>(options.dtype().itemsize());
  Pool& P = pool();
  if (need < kMinBytes || P.cap <= 0) return at::empty(sizes, options);
  int64_t capacity = 0;
  void* p = P.take(need, capacity);
  return at::for_blob(p, sizes)
      .options(options)
      .deleter([capacity](void* q) { pool().give(q, capacity); })
      .make_tensor();
}

pybind11::dict output_pool_stats() {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  pybind11::dict d;
  d["cached_bytes"] = P.cached;
  d["cap_bytes"] = P.cap;
  d["blocks"] = static_cast<int64_t>(P.free.size());
  d["hits"] = P.hits;
  d["misses"] = P.misses;
  return d;
}

void output_pool_clear() { pool().clear(); }

}  // namespace pgsvd
