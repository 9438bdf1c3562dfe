// Outputs of the CPU serving ops from a cache of resident blocks (output_pool.cpp says why).
#pragma once

#include <ATen/ATen.h>

namespace pgsvd {

// at::empty(sizes, options), for outputs of 256 KB and more from the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace pgsvd
