// The CPU ops pagedllm registers as torch.ops.pagedllm_cpu.* (see registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace pagedllm {

void paged_decode(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                  double soft_cap, double k_scale, double v_scale);

// Refuses block tables and lengths that would read outside the cache (paged_decode; decode_attention
// calls it before it rotates or writes anything, so a refused call leaves the cache as it was).
void check_block_tables(const at::Tensor& k_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        int64_t seqs, int64_t sliding_window, const char* op);

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);

void add_rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x, const at::Tensor& residual,
                  const at::Tensor& weight, double eps);

void silu_and_mul(at::Tensor out, const at::Tensor& x);

void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin);

void quantize_per_token(at::Tensor q, at::Tensor scale, at::Tensor zero_point, const at::Tensor& x, int64_t levels);

void dequantize_int8_output(at::Tensor out, const at::Tensor& acc, const at::Tensor& scale,
                            const at::Tensor& zero_point, const at::Tensor& wsum,
                            const c10::optional<at::Tensor>& bias);

void quantize_q8_blocks(at::Tensor qa, at::Tensor da, at::Tensor sa, const at::Tensor& x);

void gguf_gemm(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
               const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
               const c10::optional<at::Tensor>& bias, int64_t bits, bool vectorised);

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, const c10::optional<at::Tensor>& bias, int64_t bits,
                       int64_t act_bits);

// The GEMV's vector path in this build: "avx512-vnni", "avx-vnni", "avx2", or "" (the portable loop).
std::string gguf_gemm_vector_isa();

at::Tensor decode_attention(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                            at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_heads,
                            int64_t num_kv_heads, double scale, int64_t sliding_window, double soft_cap);

std::tuple<at::Tensor, at::Tensor> gguf_decode_layers(
    const at::Tensor& hidden_in, const c10::optional<at::Tensor>& residual_in, const at::Tensor& positions,
    at::TensorList weights, at::IntArrayRef bits, at::IntArrayRef sliding_windows, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    int64_t num_heads, int64_t num_kv_heads, double scale, double eps);

// gguf_gemm_tiled.cpp: the many-row GEMM on the same operands; _auto picks it or the GEMV by rows.
void gguf_gemm_tiled(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
                     const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                     const c10::optional<at::Tensor>& bias, int64_t bits);

void gguf_gemm_auto(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
                    const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                    const c10::optional<at::Tensor>& bias, int64_t bits);

int64_t gguf_gemm_tiled_min_rows();  // 0 where the build has no tiled kernel

}  // namespace pagedllm
