// A decode step's attention glue in one op: from the fused QKV projection's output to the input
// of o_proj. Rotates q and k in place (rotary.cpp), writes k and v into their cache slots, and
// attends over the paged cache (paged_decode.cpp).
//
// Why one op: in Python the same work is a split, three views, the rotary op, two casts and two
// index_copy_ calls for the KV write, an output allocation and the decode kernel, each a Python
// call and a trip through the dispatcher (~15 per layer, 30 layers a step). At batch 1 with
// 4-bit weights those calls cost about as much as the matmuls they sit between; here they are
// C++ calls of a few hundred nanoseconds. The math is the same as the separate ops', in the same
// order (rotate, round k/v to the cache's dtype when written, attend), so the results are equal.
//
// Layout: qkv [tokens, (heads + 2 * kv_heads) * head_dim], rows may be strided, features
// contiguous; every token is a decode (one query token per sequence, row i = sequence i).
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

// Copy `tokens` rows of `row` elements (source rows `src_stride` apart) to the cache rows `slots`.
template <typename src_t, typename dst_t>
void write_rows(dst_t* cache, const src_t* src, int64_t src_stride, const int64_t* slots, int64_t tokens,
                int64_t row) {
  for (int64_t t = 0; t < tokens; ++t) {
    dst_t* dst = cache + slots[t] * row;
    const src_t* s = src + t * src_stride;
    if constexpr (std::is_same_v<src_t, dst_t>) {
      std::memcpy(dst, s, row * sizeof(dst_t));
    } else {
      for (int64_t i = 0; i < row; ++i) dst[i] = from_float<dst_t>(to_float(s[i]));
    }
  }
}

template <typename src_t, typename dst_t>
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const int64_t* slots, int64_t row) {
  const int64_t tokens = k.size(0), stride = k.stride(0);
  write_rows(k_cache.data_ptr<dst_t>(), k.data_ptr<src_t>(), stride, slots, tokens, row);
  write_rows(v_cache.data_ptr<dst_t>(), v.data_ptr<src_t>(), stride, slots, tokens, row);
}

}  // namespace

at::Tensor decode_attention(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                            at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_heads,
                            int64_t num_kv_heads, double scale, int64_t sliding_window, double soft_cap) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "decode_attention: caches must be contiguous [blocks, block_size, kv_heads, head_dim] of one dtype");
  const int64_t head_dim = k_cache.size(3), tokens = qkv.size(0);
  TORCH_CHECK(num_heads > 0 && num_kv_heads == k_cache.size(2),
              "decode_attention: num_kv_heads must match the cache's kv_heads");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "decode_attention: qkv must be [tokens, (heads + 2 * kv_heads) * head_dim] with contiguous features");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "decode_attention: slot_mapping must be contiguous int64 [tokens]");
  check_float_or_bf16(qkv.scalar_type(), "decode_attention");
  check_float_or_bf16(k_cache.scalar_type(), "decode_attention (cache)");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "decode_attention: slot ", slots[t], " outside the cache's ",
                num_slots, " slots");
  check_block_tables(k_cache, block_tables, seq_lens, tokens, sliding_window, "decode_attention");

  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads, head_dim});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
  at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size);
  rotary_embedding(q, k, positions, cos, sin);  // checks positions and the tables

  const int64_t row = kv_size;
  const bool src32 = qkv.scalar_type() == at::kFloat, dst32 = k_cache.scalar_type() == at::kFloat;
  at::Tensor k2 = k.view({tokens, kv_size});
  if (src32 && dst32) write_kv<float, float>(k2, v, k_cache, v_cache, slots, row);
  else if (src32) write_kv<float, c10::BFloat16>(k2, v, k_cache, v_cache, slots, row);
  else if (dst32) write_kv<c10::BFloat16, float>(k2, v, k_cache, v_cache, slots, row);
  else write_kv<c10::BFloat16, c10::BFloat16>(k2, v, k_cache, v_cache, slots, row);

  at::Tensor out = at::empty({tokens, num_heads, head_dim}, qkv.options());
  paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, soft_cap, 1.0, 1.0);
  return out.view({tokens, q_size});
}

}  // namespace pagedllm
