// Matmuls on weights kept in GGUF's block-quantised form (model_executor/layers/quantization/gguf*.py).
//
// Every supported GGUF type is held in one "blocked" form, decoded once at load
// (`gguf_blocks.py`): per output row, blocks of 32 weights, each an unsigned integer q (4 or 8
// bits) with a float32 scale and min, w = scale * q + min. Q4_0 is (d, -8d), Q4_1 (d, m), Q8_0
// (d, -128d) with q = qs + 128, Q4_K/Q5_K their sub-block scale and min. The 4-bit bytes are the
// GGUF `qs` bytes as they are (byte j of a block: element j in the low nibble, j + 16 in the
// high one); 8-bit rows are stored the same way round, in groups of 4 blocks: the 16 first
// elements of each block, then the 16 last. So one activation layout serves both.
//
// Activations are quantised as llama.cpp's q8_1: symmetric int8 per block of 32, d = amax * (1/127),
// plus s = d * sum(q), stored in the same group order (4 blocks = 64 low-half bytes, then 64
// high-half bytes), zero-padded to whole groups. A row's dot product is then
//     sum_b scale_b * d_b * sumi_b + min_b * s_b,   sumi_b = sum_k q_w[k] * q_a[k]  (exact int32)
// which AVX-512 VNNI's vpdpbusd (u8 x s8 -> int32, 4 products a lane) computes 128 weights at a
// time: lanes 4i..4i+3 hold block i of the group, so the scales are applied lane-wise and the
// lanes summed once per row. Elsewhere a plain loop does the same integer sums.
//
// Threads split the output rows (weights are read once per call); each thread runs all the
// activation rows against the weight row it holds in cache.
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kGroupBytes = kBlock * kGroupBlocks;  // activation bytes per group
constexpr int64_t kPrefetchRows = 8;

// Round to nearest, ties to even, as torch.round. Not std::nearbyint: under -ffast-math GCC
// vectorises that as an add of 0.5 and a truncation, which turns -63.499996 into -64.
inline int32_t round_half_even(float v) {
#if defined(__SSE__)
  return _mm_cvtss_si32(_mm_set_ss(v));  // the MXCSR's default mode: nearest even
#else
  return static_cast<int32_t>(std::nearbyint(v));
#endif
}

template <typename scalar_t>
void quantize_blocks(at::Tensor& qa, at::Tensor& da, at::Tensor& sa, const at::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1), nb = k / kBlock;
  const int64_t qa_stride = qa.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int8_t* qp = qa.data_ptr<int8_t>();
  float* dp = da.data_ptr<float>();
  float* sp = sa.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * x.stride(0);
      int8_t* qr = qp + r * qa_stride;
      std::fill(qr, qr + qa_stride, 0);
      for (int64_t b = 0; b < nb; ++b) {
        const scalar_t* xb = xr + b * kBlock;
        float amax = 0.f;
        for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(to_float(xb[i])));
        // times the constant 1/127, not / 127: -ffast-math would turn a division into that
        // multiplication anyway, and the PyTorch reference must round the same way
        const float d = amax * (1.f / 127.f);
        // inv must be 1 / d as rounded: without the volatile, -ffast-math folds it into 127 / amax
        volatile float d_rounded = d;
        const float inv = d > 0.f ? 1.f / d_rounded : 0.f;
        // group order: block b is slot i of group g; its halves go to the group's two halves
        int8_t* lo = qr + (b / kGroupBlocks) * kGroupBytes + (b % kGroupBlocks) * 16;
        int8_t* hi = lo + 64;
        int32_t sum = 0;
        for (int64_t i = 0; i < kBlock; ++i) {
          const int32_t q = round_half_even(to_float(xb[i]) * inv);
          (i < 16 ? lo[i] : hi[i - 16]) = static_cast<int8_t>(q);
          sum += q;
        }
        dp[r * nb + b] = d;
        sp[r * nb + b] = d * static_cast<float>(sum);
      }
    }
  });
}

// sum_b w_scale[b] * a_d[b] * sumi_b for one weight row and one activation row, plus
// sum_b w_min[b] * a_s[b]: the portable version (any x86-64 or other CPU).
template <int kBits>
float dot_row_generic(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, const float* ad,
                      const float* as, int64_t nb) {
  float acc = 0.f, acc_min = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b / kGroupBlocks, i = b % kGroupBlocks;
    const int8_t* alo = qa + g * kGroupBytes + i * 16;
    const int8_t* ahi = alo + 64;
    int32_t sumi = 0;
    if (kBits == 4) {
      const uint8_t* w = qw + b * 16;
      for (int j = 0; j < 16; ++j) sumi += (w[j] & 0x0F) * alo[j] + (w[j] >> 4) * ahi[j];
    } else {
      const int64_t in_group = std::min<int64_t>(kGroupBlocks, nb - g * kGroupBlocks);
      const uint8_t* wlo = qw + g * kGroupBytes + i * 16;
      const uint8_t* whi = qw + g * kGroupBytes + in_group * 16 + i * 16;
      for (int j = 0; j < 16; ++j) sumi += wlo[j] * alo[j] + whi[j] * ahi[j];
    }
    acc += ws[b] * ad[b] * static_cast<float>(sumi);
    acc_min += wm[b] * as[b];
  }
  return acc + acc_min;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kHaveVnni512 = true;

template <int kBits>
float dot_row_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, const float* ad,
                   const float* as, int64_t nb) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // lane l of a group's int32 sums belongs to block l / 4: spread 4 block scales over 16 lanes
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  const int64_t groups = (nb + kGroupBlocks - 1) / kGroupBlocks;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n_in = std::min<int64_t>(kGroupBlocks, nb - g * kGroupBlocks);
    const __mmask16 smask = static_cast<__mmask16>((1u << n_in) - 1);
    __m512i lo, hi;
    if (kBits == 4) {
      const __mmask64 wmask = n_in == 4 ? ~0ULL : ((1ULL << (n_in * 16)) - 1);
      const __m512i w = _mm512_maskz_loadu_epi8(wmask, qw + g * 64);
      lo = _mm512_and_si512(w, nibble);
      hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
    } else {
      const __mmask64 wmask = n_in == 4 ? ~0ULL : ((1ULL << (n_in * 16)) - 1);
      const uint8_t* base = qw + g * kGroupBytes;
      lo = _mm512_maskz_loadu_epi8(wmask, base);
      hi = _mm512_maskz_loadu_epi8(wmask, base + n_in * 16);
    }
    const int8_t* a = qa + g * kGroupBytes;
    __m512i sumi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a));
    sumi = _mm512_dpbusd_epi32(sumi, hi, _mm512_loadu_si512(a + 64));
    const __m512 scale4 = _mm512_mul_ps(_mm512_maskz_loadu_ps(smask, ws + g * kGroupBlocks),
                                        _mm512_maskz_loadu_ps(smask, ad + g * kGroupBlocks));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_permutexvar_ps(spread, scale4), acc);
  }
  __m512 acc_min = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 m = nb - b >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nb - b)) - 1);
    acc_min = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wm + b), _mm512_maskz_loadu_ps(m, as + b), acc_min);
  }
  return _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(acc_min);
}

// The same for 4 activation rows against one weight row: the weights are loaded and unpacked once
// for the 4 (a prefill's many rows would otherwise unpack every weight row once per token).
template <int kBits>
void dot4_rows_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, int64_t qa_stride,
                    const float* ad, const float* as, int64_t nb, float* out, int64_t out_stride) {
  constexpr int kRows = 4;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t groups = (nb + kGroupBlocks - 1) / kGroupBlocks;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n_in = std::min<int64_t>(kGroupBlocks, nb - g * kGroupBlocks);
    const __mmask16 smask = static_cast<__mmask16>((1u << n_in) - 1);
    const __mmask64 wmask = n_in == 4 ? ~0ULL : ((1ULL << (n_in * 16)) - 1);
    __m512i lo, hi;
    if (kBits == 4) {
      const __m512i w = _mm512_maskz_loadu_epi8(wmask, qw + g * 64);
      lo = _mm512_and_si512(w, nibble);
      hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
    } else {
      const uint8_t* base = qw + g * kGroupBytes;
      lo = _mm512_maskz_loadu_epi8(wmask, base);
      hi = _mm512_maskz_loadu_epi8(wmask, base + n_in * 16);
    }
    const __m512 wscale = _mm512_maskz_loadu_ps(smask, ws + g * kGroupBlocks);
    for (int r = 0; r < kRows; ++r) {
      const int8_t* a = qa + r * qa_stride + g * kGroupBytes;
      __m512i sumi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a));
      sumi = _mm512_dpbusd_epi32(sumi, hi, _mm512_loadu_si512(a + 64));
      const __m512 scale4 = _mm512_mul_ps(wscale, _mm512_maskz_loadu_ps(smask, ad + r * nb + g * kGroupBlocks));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_permutexvar_ps(spread, scale4), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    __m512 acc_min = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 m = nb - b >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nb - b)) - 1);
      acc_min = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wm + b), _mm512_maskz_loadu_ps(m, as + r * nb + b), acc_min);
    }
    out[r * out_stride] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(acc_min);
  }
}
#else
constexpr bool kHaveVnni512 = false;

template <int kBits>
void dot4_rows_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, int64_t qa_stride,
                    const float* ad, const float* as, int64_t nb, float* out, int64_t out_stride) {
  for (int r = 0; r < 4; ++r) {
    out[r * out_stride] = dot_row_generic<kBits>(qw, ws, wm, qa + r * qa_stride, ad + r * nb, as + r * nb, nb);
  }
}

template <int kBits>
float dot_row_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, const float* ad,
                   const float* as, int64_t nb) {
  return dot_row_generic<kBits>(qw, ws, wm, qa, ad, as, nb);
}
#endif

template <int kBits>
void gemm(at::Tensor& out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa, const at::Tensor& qweight,
          const at::Tensor& scales, const at::Tensor& mins, const float* bias, bool vectorised) {
  const int64_t m_rows = qa.size(0), n_rows = qweight.size(0), nb = scales.size(1);
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  const float* wm = mins.data_ptr<float>();
  const int8_t* qap = qa.data_ptr<int8_t>();
  const float* adp = da.data_ptr<float>();
  const float* asp = sa.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t w_stride = qweight.size(1), qa_stride = qa.size(1), o_stride = out.stride(0);
  auto dot = vectorised ? dot_row_vnni<kBits> : dot_row_generic<kBits>;
  // a task of at least ~64 KB of weights: a decode step's small matrices still split over 2 threads
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, w_stride * std::max<int64_t>(1, m_rows)));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (n + kPrefetchRows < end) {  // a few rows ahead: more DRAM reads in flight than the prefetcher keeps
        const uint8_t* ahead = qw + (n + kPrefetchRows) * w_stride;
        for (int64_t off = 0; off < w_stride; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        for (int64_t off = 0; off < nb; off += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(ws + (n + kPrefetchRows) * nb + off), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(wm + (n + kPrefetchRows) * nb + off), _MM_HINT_T0);
        }
      }
      const uint8_t* wr = qw + n * w_stride;
      const float* wsr = ws + n * nb;
      const float* wmr = wm + n * nb;
      const float bn = bias ? bias[n] : 0.f;
      int64_t m = 0;
      if (vectorised) {
        for (; m + 4 <= m_rows; m += 4) {
          dot4_rows_vnni<kBits>(wr, wsr, wmr, qap + m * qa_stride, qa_stride, adp + m * nb, asp + m * nb, nb,
                                op + m * o_stride + n, o_stride);
          for (int r = 0; r < 4; ++r) op[(m + r) * o_stride + n] += bn;
        }
      }
      for (; m < m_rows; ++m) {
        op[m * o_stride + n] = dot(wr, wsr, wmr, qap + m * qa_stride, adp + m * nb, asp + m * nb, nb) + bn;
      }
    }
  });
}

}  // namespace

void quantize_q8_blocks(at::Tensor qa, at::Tensor da, at::Tensor sa, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize_q8_blocks: x must be [rows, k] with contiguous rows");
  check_float_or_bf16(x.scalar_type(), "quantize_q8_blocks");
  const int64_t rows = x.size(0), k = x.size(1), nb = k / kBlock;
  TORCH_CHECK(k % kBlock == 0, "quantize_q8_blocks: k must be a multiple of 32, got ", k);
  const int64_t padded = (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBytes;
  TORCH_CHECK(qa.scalar_type() == at::kChar && qa.is_contiguous() && qa.dim() == 2 && qa.size(0) == rows &&
                  qa.size(1) == padded,
              "quantize_q8_blocks: qa must be contiguous int8 [rows, k padded to 128]");
  for (const at::Tensor* t : {&da, &sa}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows * nb,
                "quantize_q8_blocks: da and sa must be contiguous float32 [rows, k / 32]");
  }
  if (x.scalar_type() == at::kFloat) quantize_blocks<float>(qa, da, sa, x);
  else quantize_blocks<c10::BFloat16>(qa, da, sa, x);
}

void gguf_gemm(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
               const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
               const c10::optional<at::Tensor>& bias, int64_t bits, bool vectorised) {
  TORCH_CHECK(bits == 4 || bits == 8, "gguf_gemm: bits must be 4 or 8, got ", bits);
  const int64_t n = qweight.size(0), nb = scales.size(1), m = qa.size(0);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(1) == nb * kBlock * bits / 8,
              "gguf_gemm: qweight must be contiguous uint8 [n, k * bits / 8]");
  for (const at::Tensor* t : {&scales, &mins}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    t->size(1) == nb,
                "gguf_gemm: scales and mins must be contiguous float32 [n, k / 32]");
  }
  TORCH_CHECK(qa.scalar_type() == at::kChar && qa.is_contiguous() &&
                  qa.size(1) == (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBytes,
              "gguf_gemm: qa must come from quantize_q8_blocks for this k");
  TORCH_CHECK(da.numel() == m * nb && sa.numel() == m * nb, "gguf_gemm: da and sa must be [m, k / 32]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == m && out.size(1) == n &&
                  out.stride(1) == 1,
              "gguf_gemm: out must be float32 [m, n] with contiguous rows");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "gguf_gemm: bias must be float32 [n]");
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const bool vec = vectorised && kHaveVnni512;
  if (bits == 4) gemm<4>(out, qa, da, sa, qweight, scales, mins, bp, vec);
  else gemm<8>(out, qa, da, sa, qweight, scales, mins, bp, vec);
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, const c10::optional<at::Tensor>& bias, int64_t bits) {
  // quantize_q8_blocks + gguf_gemm in one call: a decode step makes ~120 of these, and each op
  // dispatched from Python (and each tensor allocated there) costs microseconds.
  TORCH_CHECK(x.dim() == 2, "gguf_linear: x must be [rows, k]");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1), nb = k / kBlock;
  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor qa = at::empty({rows, (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBytes}, xc.options().dtype(at::kChar));
  at::Tensor da = at::empty({rows, nb}, f32), sa = at::empty({rows, nb}, f32);
  quantize_q8_blocks(qa, da, sa, xc);
  at::Tensor out = at::empty({rows, qweight.size(0)}, f32);
  gguf_gemm(out, qa, da, sa, qweight, scales, mins, bias, bits, true);
  return out;
}

bool gguf_gemm_has_vnni512() { return kHaveVnni512; }

}  // namespace pagedllm
