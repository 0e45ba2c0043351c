// Helpers shared between the GGUF kernels' files (gguf_gemm.cpp, gguf_gemm_tiled.cpp,
// gguf_quantize_simd.cpp) that are not ops of their own.
#pragma once

#include <ATen/ATen.h>

namespace pagedllm {

// quantize_q8_blocks' work with AVX-512 or AVX2 (checked arguments; `planes` 1: q8, 2: 15-bit as two int8
// planes); false where the build has none, and the caller runs its portable loop.
bool quantize_q8_blocks_simd(at::Tensor& qa, at::Tensor& da, at::Tensor& sa, const at::Tensor& x, int64_t planes);

}  // namespace pagedllm
