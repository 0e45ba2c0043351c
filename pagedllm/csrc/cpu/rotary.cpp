// Rotary position embedding applied in place to the query and key heads, half-split (NeoX/HF)
// layout, reading cos/sin straight from the [max_position, head_dim / 2] tables by position.
//
// In place because query and key are views into the fused QKV projection's output, which
// nothing else reads; the PyTorch path builds the rotated copies with about ten ops per layer.
#include <ATen/Parallel.h>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

template <typename scalar_t>
inline void rotate_heads(scalar_t* x, int64_t heads, int64_t head_stride, const scalar_t* cos, const scalar_t* sin,
                         int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    scalar_t* x1 = x + h * head_stride;
    scalar_t* x2 = x1 + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = to_float(x1[i]), b = to_float(x2[i]), c = to_float(cos[i]), s = to_float(sin[i]);
      x1[i] = from_float<scalar_t>(a * c - b * s);
      x2[i] = from_float<scalar_t>(b * c + a * s);
    }
  }
}

template <typename scalar_t>
void rotate_tokens(at::Tensor& query, at::Tensor& key, const int64_t* pos, const at::Tensor& cos,
                   const at::Tensor& sin) {
  const int64_t tokens = query.size(0), head_dim = query.size(2), half = head_dim / 2;
  const int64_t q_heads = query.size(1), k_heads = key.size(1);
  scalar_t* q = query.data_ptr<scalar_t>();
  scalar_t* k = key.data_ptr<scalar_t>();
  const scalar_t* cp = cos.data_ptr<scalar_t>();
  const scalar_t* sp = sin.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, row_grain((q_heads + k_heads) * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* c = cp + pos[t] * half;
      const scalar_t* s = sp + pos[t] * half;
      rotate_heads(q + t * query.stride(0), q_heads, query.stride(1), c, s, half);
      rotate_heads(k + t * key.stride(0), k_heads, key.stride(1), c, s, half);
    }
  });
}

}  // namespace

void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && query.size(0) == key.size(0) && query.size(2) == key.size(2) &&
                  query.stride(2) == 1 && key.stride(2) == 1,
              "rotary_embedding: query and key must be [tokens, heads, head_dim] with contiguous head_dim");
  const int64_t tokens = query.size(0), head_dim = query.size(2), half = head_dim / 2;
  TORCH_CHECK(head_dim % 2 == 0, "rotary_embedding: head_dim must be even");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == tokens && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous(),
              "rotary_embedding: positions must be contiguous int64 [tokens]");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == half && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "rotary_embedding: cos and sin must be contiguous [max_position, head_dim / 2]");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && cos.scalar_type() == query.scalar_type() &&
                  sin.scalar_type() == query.scalar_type(),
              "rotary_embedding: query, key, cos and sin must share a dtype");
  const int64_t max_position = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "rotary_embedding: position ", pos[t], " outside [0, ",
                max_position, ")");
  check_float_or_bf16(query.scalar_type(), "rotary_embedding");
  if (query.scalar_type() == at::kFloat) rotate_tokens<float>(query, key, pos, cos, sin);
  else rotate_tokens<c10::BFloat16>(query, key, pos, cos, sin);
}

}  // namespace pagedllm
