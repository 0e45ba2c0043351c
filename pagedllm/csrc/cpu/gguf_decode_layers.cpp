// A decode-only step through a run of Llama-family decoder layers whose four projections are
// GGUF blocks, in one op: per layer, (residual add +) RMSNorm, QKV, rotary + K/V write + decode
// attention (decode_attention.cpp), o_proj, residual add + RMSNorm, gate/up, SiLU-and-mul, down.
//
// Why: at batch 1 with 4-bit weights the matmuls of a 135M-parameter model take ~5 ms a step,
// and the ~600 Python calls around them (module calls, dispatcher trips, allocations) cost
// another ~2-3 ms. Here the same kernels are called from C++, in the same order on the same
// inputs, so the results are the ones the layer-by-layer path computes, bit for bit.
//
// `weights` holds, per layer, kWeightsPerLayer tensors: input_layernorm.weight, cos, sin (the
// layer's rotary tables), qkv (qweight, scales, mins), o_proj (3), post_attention_layernorm.weight,
// gate_up (3), down (3); `bits` the four projections' (weight bits, activation bits) per layer
// (gguf_linear's `bits` and `act_bits`); `sliding_windows` each
// layer's window (0: full attention). Activations and the model are float32 (gguf_linear's output).
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "ops.h"

namespace pagedllm {
namespace {

constexpr int64_t kWeightsPerLayer = 16;
constexpr int64_t kBitsPerLayer = 8;  // (weight bits, activation bits) of each projection

}  // namespace

std::tuple<at::Tensor, at::Tensor> gguf_decode_layers(
    const at::Tensor& hidden_in, const c10::optional<at::Tensor>& residual_in, const at::Tensor& positions,
    at::TensorList weights, at::IntArrayRef bits, at::IntArrayRef sliding_windows, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    int64_t num_heads, int64_t num_kv_heads, double scale, double eps) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kWeightsPerLayer &&
                  static_cast<int64_t>(bits.size()) == layers * kBitsPerLayer &&
                  static_cast<int64_t>(sliding_windows.size()) == layers &&
                  static_cast<int64_t>(v_caches.size()) == layers,
              "gguf_decode_layers: expected ", kWeightsPerLayer, " weights, ", kBitsPerLayer,
              " bits and one window, K and V cache per layer");
  TORCH_CHECK(layers > 0, "gguf_decode_layers: no layers");
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.scalar_type() == at::kFloat && hidden_in.stride(1) == 1,
              "gguf_decode_layers: hidden must be float32 [tokens, hidden_size]");
  at::Tensor hidden = hidden_in;
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = *residual_in;
  } else {  // the first layer: its input is the residual
    residual = hidden;
    hidden = at::empty_like(residual);
    rms_norm(hidden, residual, weights[0], eps);
  }
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kWeightsPerLayer;
    const int64_t* b = bits.data() + l * kBitsPerLayer;
    if (l > 0 || residual_in.has_value()) {
      at::Tensor normed = at::empty_like(hidden), summed = at::empty_like(hidden);
      add_rms_norm(normed, summed, hidden, residual, w[0], eps);
      hidden = normed;
      residual = summed;
    }
    at::Tensor qkv = gguf_linear(hidden, w[3], w[4], w[5], c10::nullopt, b[0], b[1]);
    at::Tensor attn = decode_attention(qkv, positions, w[1], w[2], k_caches[l], v_caches[l], slot_mapping,
                                       block_tables, seq_lens, num_heads, num_kv_heads, scale, sliding_windows[l], 0.0);
    at::Tensor o = gguf_linear(attn, w[6], w[7], w[8], c10::nullopt, b[2], b[3]);
    at::Tensor normed = at::empty_like(o), summed = at::empty_like(o);
    add_rms_norm(normed, summed, o, residual, w[9], eps);
    residual = summed;
    at::Tensor gate_up = gguf_linear(normed, w[10], w[11], w[12], c10::nullopt, b[4], b[5]);
    at::Tensor act = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
    silu_and_mul(act, gate_up);
    hidden = gguf_linear(act, w[13], w[14], w[15], c10::nullopt, b[6], b[7]);
  }
  return {hidden, residual};
}

}  // namespace pagedllm
