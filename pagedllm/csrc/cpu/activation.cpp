// SiLU(gate) * up over the packed [gate | up] output of the gate/up projection, one pass.
//
// Rounded as the PyTorch reference is: SiLU's result to the storage type, then the product.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {

namespace {

template <typename scalar_t>
void silu_and_mul_rows(at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = xp + r * x.stride(0);
      const scalar_t* up = gate + d;
      scalar_t* o = op + r * out.stride(0);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float g = to_float(gate[i]);
        // Clamped so exp never overflows: the file is built with -ffast-math, which assumes no inf.
        const float e = std::exp(-std::min(std::max(g, -88.f), 88.f));
        const float silu = to_float(from_float<scalar_t>(g / (1.f + e)));
        o[i] = from_float<scalar_t>(silu * to_float(up[i]));
      }
    }
  });
}

}  // namespace

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "silu_and_mul: x must be [rows, 2 * d] with contiguous rows");
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == d && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              "silu_and_mul: out must be [rows, d] of x's dtype");
  check_float_or_bf16(x.scalar_type(), "silu_and_mul");
  if (x.scalar_type() == at::kFloat) silu_and_mul_rows<float>(out, x);
  else silu_and_mul_rows<c10::BFloat16>(out, x);
}

}  // namespace pagedllm
