// Loads and stores between the storage type (float32 or bfloat16) and float32, where all the
// math happens. c10::BFloat16 rounds to nearest even, as PyTorch's own casts do.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>

namespace pagedllm {

template <typename scalar_t>
inline float to_float(scalar_t x) {
  return static_cast<float>(x);
}

template <typename scalar_t>
inline scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}

inline void check_float_or_bf16(at::ScalarType dtype, const char* op) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": float32 or bfloat16 only, got ", dtype);
}

// Rows per task for the elementwise ops: small batches (a decode step's few dozen rows) stay
// on one thread, since waking the pool costs more than the work.
inline int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems));
}

}  // namespace pagedllm
