// Registers the CPU kernels as torch.ops.pagedllm_cpu.*. Every op writes into tensors the
// caller allocated (marked `a!`/`b!`), so none of them allocates inside a step.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(pagedllm_cpu, m) {
  m.def("paged_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int sliding_window=0, float soft_cap=0.0, float k_scale=1.0, "
        "float v_scale=1.0) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor residual, Tensor weight, "
        "float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("quantize_per_token(Tensor(a!) q, Tensor(b!) scale, Tensor(c!) zero_point, Tensor x, int levels) -> ()");
  m.def("dequantize_int8_output(Tensor(a!) out, Tensor acc, Tensor scale, Tensor zero_point, Tensor wsum, "
        "Tensor? bias) -> ()");
  m.def("quantize_q8_blocks(Tensor(a!) qa, Tensor(b!) da, Tensor(c!) sa, Tensor x) -> ()");
  m.def("gguf_gemm(Tensor(a!) out, Tensor qa, Tensor da, Tensor sa, Tensor qweight, Tensor scales, Tensor mins, "
        "Tensor? bias, int bits, bool vectorised) -> ()");
  m.def("gguf_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, Tensor? bias, int bits, int act_bits=8) -> Tensor");
  m.def("gguf_gemm_vector_isa() -> str");
  // The one op above that allocates its output (as gguf_linear): q/k in qkv are rotated in place.
  m.def("decode_attention(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, int num_heads, "
        "int num_kv_heads, float scale, int sliding_window=0, float soft_cap=0.0) -> Tensor");
  m.def("gguf_decode_layers(Tensor hidden, Tensor? residual, Tensor positions, Tensor[] weights, int[] bits, "
        "int[] sliding_windows, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, int num_heads, int num_kv_heads, float scale, float eps) "
        "-> (Tensor, Tensor)");
  m.def("gguf_gemm_tiled(Tensor(a!) out, Tensor qa, Tensor da, Tensor sa, Tensor qweight, Tensor scales, "
        "Tensor mins, Tensor? bias, int bits) -> ()");
  m.def("gguf_gemm_auto(Tensor(a!) out, Tensor qa, Tensor da, Tensor sa, Tensor qweight, Tensor scales, "
        "Tensor mins, Tensor? bias, int bits) -> ()");
  m.def("gguf_gemm_tiled_min_rows() -> int");
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CPU, m) {
  m.impl("paged_decode", &pagedllm::paged_decode);
  m.impl("rms_norm", &pagedllm::rms_norm);
  m.impl("add_rms_norm", &pagedllm::add_rms_norm);
  m.impl("silu_and_mul", &pagedllm::silu_and_mul);
  m.impl("rotary_embedding", &pagedllm::rotary_embedding);
  m.impl("quantize_per_token", &pagedllm::quantize_per_token);
  m.impl("dequantize_int8_output", &pagedllm::dequantize_int8_output);
  m.impl("quantize_q8_blocks", &pagedllm::quantize_q8_blocks);
  m.impl("gguf_gemm", &pagedllm::gguf_gemm);
  m.impl("gguf_linear", &pagedllm::gguf_linear);
  m.impl("decode_attention", &pagedllm::decode_attention);
  m.impl("gguf_decode_layers", &pagedllm::gguf_decode_layers);
  m.impl("gguf_gemm_tiled", &pagedllm::gguf_gemm_tiled);
  m.impl("gguf_gemm_auto", &pagedllm::gguf_gemm_auto);
}

TORCH_LIBRARY_IMPL(pagedllm_cpu, CompositeExplicitAutograd, m) {
  m.impl("gguf_gemm_vector_isa", &pagedllm::gguf_gemm_vector_isa);
  m.impl("gguf_gemm_tiled_min_rows", &pagedllm::gguf_gemm_tiled_min_rows);
}
