// RMSNorm, and RMSNorm with the residual add fused in, one pass per row.
//
// Same rounding as the PyTorch reference (layers/fused_ops.py): the sum x + residual is
// rounded to the storage type, the normalisation is float32, its result is rounded to the
// storage type before the weight multiplies it, and the product is rounded again.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

template <typename scalar_t>
inline void norm_row(scalar_t* out, const float* xf, const scalar_t* w, int64_t n, float eps) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) sq += xf[i] * xf[i];
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float normed = to_float(from_float<scalar_t>(xf[i] * inv));
    out[i] = from_float<scalar_t>(to_float(w[i]) * normed);
  }
}

// One pass per row; with `residual` (and `residual_out`), x + residual is formed, stored and
// normalised, otherwise x itself is normalised.
template <typename scalar_t>
void norm_rows(at::Tensor& out, at::Tensor* residual_out, const at::Tensor& x, const at::Tensor* residual,
               const at::Tensor& weight, float eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* ro = residual_out ? residual_out->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> xf(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * x.stride(0);
      if (rp) {
        const scalar_t* rr = rp + r * residual->stride(0);
        scalar_t* sum = ro + r * residual_out->stride(0);
        for (int64_t i = 0; i < n; ++i) {
          sum[i] = from_float<scalar_t>(to_float(xr[i]) + to_float(rr[i]));
          xf[i] = to_float(sum[i]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) xf[i] = to_float(xr[i]);
      }
      norm_row(op + r * out.stride(0), xf.data(), w, n, eps);
    }
  });
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes() && t.stride(1) == 1, what,
              " must be [rows, hidden] with contiguous rows, like x");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), what, " must have x's dtype");
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              op, ": weight must be [hidden], contiguous, of x's dtype");
  check_float_or_bf16(x.scalar_type(), op);
}

void dispatch(at::Tensor& out, at::Tensor* residual_out, const at::Tensor& x, const at::Tensor* residual,
              const at::Tensor& weight, double eps) {
  if (x.scalar_type() == at::kFloat) norm_rows<float>(out, residual_out, x, residual, weight, static_cast<float>(eps));
  else norm_rows<c10::BFloat16>(out, residual_out, x, residual, weight, static_cast<float>(eps));
}

}  // namespace

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, x, "rms_norm: x");
  check_rows(out, x, "rms_norm: out");
  check_weight(weight, x, "rms_norm");
  dispatch(out, nullptr, x, nullptr, weight, eps);
}

void add_rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x, const at::Tensor& residual,
                  const at::Tensor& weight, double eps) {
  check_rows(x, x, "add_rms_norm: x");
  check_rows(residual, x, "add_rms_norm: residual");
  check_rows(out, x, "add_rms_norm: out");
  check_rows(residual_out, x, "add_rms_norm: residual_out");
  check_weight(weight, x, "add_rms_norm");
  dispatch(out, &residual_out, x, &residual, weight, eps);
}

}  // namespace pagedllm
