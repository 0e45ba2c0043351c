// The two elementwise halves of a W8A8 linear layer (model_executor/layers/quantization/int8.py),
// around oneDNN's integer matmul.
//
// quantize_per_token: asymmetric uint8 per row (token). Each row's [min, max] (widened to include
// 0) is mapped onto [0, levels] (255, or 127 where the CPU's int8 products would saturate on full
// 8-bit inputs): scale = (max - min) / levels, zero_point = round(-min / scale), and
// x ≈ scale * (q - zero_point). Asymmetric, because it spends all 256 levels on the row's actual
// range: on SmolLM2 it halved the perplexity change of symmetric int8 (see docs/performance.md).
//
// dequantize_int8_output: oneDNN returns acc = (q @ Wq^T) * w_scale, with the row's zero point
// still inside q; the exact product is scale * (acc - zero_point * wsum), where
// wsum[n] = w_scale[n] * sum_k Wq[n, k]. One pass, bias added, written in the output's dtype.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

template <typename scalar_t>
void quantize_rows(at::Tensor& q, at::Tensor& scale, at::Tensor& zero_point, const at::Tensor& x, float levels) {
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero_point.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * x.stride(0);
      uint8_t* qr = qp + r * q.stride(0);
      float lo = 0.f, hi = 0.f;
#pragma omp simd reduction(min : lo) reduction(max : hi)
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_float(xr[i]);
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      const float s = (hi - lo) / levels;
      // A denormal scale (a row of values near 1e-38) would make 1 / s infinite and 0 * inf NaN.
      const float inv = s >= std::numeric_limits<float>::min() ? 1.f / s : 0.f;
      const float z = std::nearbyint(-lo * inv);
      sp[r] = s;
      zp[r] = z;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float v = std::nearbyint(to_float(xr[i]) * inv) + z;
        qr[i] = static_cast<uint8_t>(std::min(std::max(v, 0.f), levels));
      }
    }
  });
}

template <typename scalar_t>
void dequantize_rows(at::Tensor& out, const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& zero_point,
                     const at::Tensor& wsum, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = acc.size(0), n = acc.size(1);
  const float* ap = acc.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero_point.data_ptr<float>();
  const float* ws = wsum.data_ptr<float>();
  const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* ar = ap + r * acc.stride(0);
      scalar_t* orow = op + r * out.stride(0);
      const float s = sp[r], z = zp[r];
      if (bp) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) orow[i] = from_float<scalar_t>(s * (ar[i] - z * ws[i]) + to_float(bp[i]));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) orow[i] = from_float<scalar_t>(s * (ar[i] - z * ws[i]));
      }
    }
  });
}

void check_row_vector(const at::Tensor& t, int64_t rows, const char* op, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows && t.is_contiguous(), op, ": ", what,
              " must be float32 with one value per row");
}

}  // namespace

void quantize_per_token(at::Tensor q, at::Tensor scale, at::Tensor zero_point, const at::Tensor& x, int64_t levels) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize_per_token: x must be [rows, n] with contiguous rows");
  check_float_or_bf16(x.scalar_type(), "quantize_per_token");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.sizes() == x.sizes() && q.stride(1) == 1,
              "quantize_per_token: q must be uint8 of x's shape");
  check_row_vector(scale, x.size(0), "quantize_per_token", "scale");
  check_row_vector(zero_point, x.size(0), "quantize_per_token", "zero_point");
  TORCH_CHECK(levels >= 1 && levels <= 255, "quantize_per_token: levels must be in [1, 255]");
  const float lv = static_cast<float>(levels);
  if (x.scalar_type() == at::kFloat) quantize_rows<float>(q, scale, zero_point, x, lv);
  else quantize_rows<c10::BFloat16>(q, scale, zero_point, x, lv);
}

void dequantize_int8_output(at::Tensor out, const at::Tensor& acc, const at::Tensor& scale,
                            const at::Tensor& zero_point, const at::Tensor& wsum,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.stride(1) == 1 && acc.scalar_type() == at::kFloat,
              "dequantize_int8_output: acc must be float32 [rows, n] with contiguous rows");
  const int64_t rows = acc.size(0), n = acc.size(1);
  TORCH_CHECK(out.dim() == 2 && out.sizes() == acc.sizes() && out.stride(1) == 1,
              "dequantize_int8_output: out must have acc's shape");
  check_float_or_bf16(out.scalar_type(), "dequantize_int8_output");
  check_row_vector(scale, rows, "dequantize_int8_output", "scale");
  check_row_vector(zero_point, rows, "dequantize_int8_output", "zero_point");
  TORCH_CHECK(wsum.scalar_type() == at::kFloat && wsum.numel() == n && wsum.is_contiguous(),
              "dequantize_int8_output: wsum must be float32 with one value per column");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == n && bias->is_contiguous() &&
                                    bias->scalar_type() == out.scalar_type()),
              "dequantize_int8_output: bias must have one value per column, in out's dtype");
  if (out.scalar_type() == at::kFloat) dequantize_rows<float>(out, acc, scale, zero_point, wsum, bias);
  else dequantize_rows<c10::BFloat16>(out, acc, scale, zero_point, wsum, bias);
}

}  // namespace pagedllm
