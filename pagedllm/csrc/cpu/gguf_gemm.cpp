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
// lanes summed once per row. Without AVX-512 VNNI, AVX2 does the same (gguf_gemm_avx2.h), and
// elsewhere a plain loop does the same integer sums.
//
// Two refinements of that scheme, both exact in their integers:
// - 15-bit activations (`act_bits` 15, the default for quantization="gguf"): per block of 32,
//   d = amax / 16383 and q = round(x / d) in [-16383, 16383], held as two int8 planes, q = 128 h + l
//   (h = q >> 7 signed, l = q & 127). vpdpbusd takes each plane as it takes q8, and the group's int32
//   sums are (sum_h << 7) + sum_l: two more vpdpbusd a group for ~256x less rounding error than q8
//   (q8 activations cost SmolLM2 +1.1% perplexity, mostly in down_proj, whose SiLU(gate) * up inputs
//   have the widest range in a block). Planes sit side by side per group: 128 bytes of h, then of l.
// - sub-blocks of 16 (Q6_K): scales and mins per 16 weights. The low-half and high-half vpdpbusd
//   then go to separate int32 sums, which are exactly the per-16 sums; the min term takes the per-16
//   sums of the activations themselves (vpdpbusd of a vector of ones), w = scale16 * q + min16.
//
// Threads split the output rows (weights are read once per call); each thread runs all the
// activation rows against the weight row it holds in cache.
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dtype_utils.h"
#include "gguf_common.h"
#include "gguf_gemm_avx2.h"
#include "ops.h"

namespace pagedllm {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kGroupBytes = kBlock * kGroupBlocks;  // activation bytes per group and plane
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

// int8 planes an activation row is held in: 1 for q8, 2 for 15-bit (q = 128 h + l)
inline int64_t planes_for(int64_t act_bits) { return act_bits == 15 ? 2 : 1; }

inline int64_t padded_bytes(int64_t nb, int64_t planes) {
  return (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBytes * planes;
}

template <typename scalar_t>
void quantize_blocks(at::Tensor& qa, at::Tensor& da, at::Tensor& sa, const at::Tensor& x, int64_t planes) {
  const int64_t rows = x.size(0), k = x.size(1), nb = k / kBlock;
  const int64_t qa_stride = qa.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int8_t* qp = qa.data_ptr<int8_t>();
  float* dp = da.data_ptr<float>();
  float* sp = sa.data_ptr<float>();
  // times the constant 1/qmax, not / qmax: -ffast-math would turn a division into that
  // multiplication anyway, and the PyTorch reference must round the same way
  const float inv_qmax = planes == 2 ? 1.f / 16383.f : 1.f / 127.f;
  at::parallel_for(0, rows, row_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * x.stride(0);
      int8_t* qr = qp + r * qa_stride;
      std::fill(qr, qr + qa_stride, 0);
      for (int64_t b = 0; b < nb; ++b) {
        const scalar_t* xb = xr + b * kBlock;
        float amax = 0.f;
        for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(to_float(xb[i])));
        const float d = amax * inv_qmax;
        // inv must be 1 / d as rounded: without the volatile, -ffast-math folds it into qmax / amax
        volatile float d_rounded = d;
        const float inv = d > 0.f ? 1.f / d_rounded : 0.f;
        // group order: block b is slot i of group g; its halves go to the group's two halves
        int8_t* lo = qr + (b / kGroupBlocks) * kGroupBytes * planes + (b % kGroupBlocks) * 16;
        int8_t* hi = lo + 64;
        int32_t sum = 0;
        for (int64_t i = 0; i < kBlock; ++i) {
          const int32_t q = round_half_even(to_float(xb[i]) * inv);
          int8_t* dst = i < 16 ? lo + i : hi + (i - 16);
          if (planes == 2) {
            dst[0] = static_cast<int8_t>(q >> 7);  // arithmetic shift: floor(q / 128), in [-128, 127]
            dst[kGroupBytes] = static_cast<int8_t>(q & 127);
          } else {
            dst[0] = static_cast<int8_t>(q);
          }
          sum += q;
        }
        dp[r * nb + b] = d;
        sp[r * nb + b] = d * static_cast<float>(sum);
      }
    }
  });
}

// One weight row against one activation row: the portable version (any CPU). `sub` is 32 (a
// scale and min per block, with the activations' s) or 16 (per half block, with the activations'
// own per-16 integer sums).
template <int kBits, int kPlanes, int kSub>
float dot_row_generic(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, const float* ad,
                      const float* as, int64_t nb) {
  float acc = 0.f, acc_min = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b / kGroupBlocks, i = b % kGroupBlocks;
    const int8_t* alo = qa + g * kGroupBytes * kPlanes + i * 16;
    const int8_t* ahi = alo + 64;
    int32_t sumi[2] = {0, 0}, suma[2] = {0, 0};  // per half: weights x activations, activations
    for (int j = 0; j < 16; ++j) {
      int32_t wl, wh;
      if (kBits == 4) {
        const uint8_t w = qw[b * 16 + j];
        wl = w & 0x0F;
        wh = w >> 4;
      } else {
        const int64_t in_group = std::min<int64_t>(kGroupBlocks, nb - g * kGroupBlocks);
        wl = qw[g * kGroupBytes + i * 16 + j];
        wh = qw[g * kGroupBytes + in_group * 16 + i * 16 + j];
      }
      int32_t al = alo[j], ah = ahi[j];
      if (kPlanes == 2) {
        al = al * 128 + alo[j + kGroupBytes];
        ah = ah * 128 + ahi[j + kGroupBytes];
      }
      sumi[0] += wl * al;
      sumi[1] += wh * ah;
      suma[0] += al;
      suma[1] += ah;
    }
    if (kSub == 32) {
      acc += ws[b] * ad[b] * static_cast<float>(sumi[0] + sumi[1]);
      acc_min += wm[b] * as[b];
    } else {
      for (int h = 0; h < 2; ++h) {
        acc += ad[b] * (ws[2 * b + h] * static_cast<float>(sumi[h]) + wm[2 * b + h] * static_cast<float>(suma[h]));
      }
    }
  }
  return acc + acc_min;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// int32 lanes of w . a over one half of a group (64 weight bytes against the half's 64 activation
// bytes in each plane): lane l sums 4 products of block l / 4.
template <int kPlanes>
inline __m512i half_sums(__m512i acc, __m512i w, const int8_t* a) {
  if (kPlanes == 1) return _mm512_dpbusd_epi32(acc, w, _mm512_loadu_si512(a));
  const __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(a));
  const __m512i l = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(a + kGroupBytes));
  return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_slli_epi32(h, 7), l));
}

// kRows activation rows against one weight row: the weights are loaded and unpacked once for all of
// them (a prefill's many rows would otherwise unpack every weight row once per token).
template <int kBits, int kPlanes, int kSub, int kRows>
void dot_rows_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, int64_t qa_stride,
                   const float* ad, const float* as, int64_t nb, float* out, int64_t out_stride) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i ones = _mm512_set1_epi8(1);
  // lane l of a group's int32 sums belongs to block l / 4: spread 4 block values over 16 lanes
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  // per-16 tables hold [block 0 low half, block 0 high half, block 1 low, ...]
  const __m512i spread_lo = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  const __m512i spread_hi = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
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
    if (kSub == 32) {
      const __m512 wscale = _mm512_maskz_loadu_ps(smask, ws + g * kGroupBlocks);
      for (int r = 0; r < kRows; ++r) {
        const int8_t* a = qa + r * qa_stride + g * kGroupBytes * kPlanes;
        __m512i sumi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a)), hi,
                                           _mm512_loadu_si512(a + 64));
        if (kPlanes == 2) {  // both halves of each plane first, then one shift and add
          const __m512i low = _mm512_dpbusd_epi32(
              _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a + kGroupBytes)), hi,
              _mm512_loadu_si512(a + kGroupBytes + 64));
          sumi = _mm512_add_epi32(_mm512_slli_epi32(sumi, 7), low);
        }
        const __m512 scale4 = _mm512_mul_ps(wscale, _mm512_maskz_loadu_ps(smask, ad + r * nb + g * kGroupBlocks));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_permutexvar_ps(spread, scale4), acc[r]);
      }
    } else {
      const __mmask16 hmask = static_cast<__mmask16>((1u << (2 * n_in)) - 1);
      const __m512 s8 = _mm512_maskz_loadu_ps(hmask, ws + g * 2 * kGroupBlocks);
      const __m512 m8 = _mm512_maskz_loadu_ps(hmask, wm + g * 2 * kGroupBlocks);
      const __m512 sc_lo = _mm512_permutexvar_ps(spread_lo, s8), sc_hi = _mm512_permutexvar_ps(spread_hi, s8);
      const __m512 mn_lo = _mm512_permutexvar_ps(spread_lo, m8), mn_hi = _mm512_permutexvar_ps(spread_hi, m8);
      for (int r = 0; r < kRows; ++r) {
        const int8_t* a = qa + r * qa_stride + g * kGroupBytes * kPlanes;
        const __m512i z = _mm512_setzero_si512();
        const __m512 wl = _mm512_cvtepi32_ps(half_sums<kPlanes>(z, lo, a));
        const __m512 wh = _mm512_cvtepi32_ps(half_sums<kPlanes>(z, hi, a + 64));
        const __m512 al = _mm512_cvtepi32_ps(half_sums<kPlanes>(z, ones, a));
        const __m512 ah = _mm512_cvtepi32_ps(half_sums<kPlanes>(z, ones, a + 64));
        __m512 t = _mm512_mul_ps(wl, sc_lo);
        t = _mm512_fmadd_ps(wh, sc_hi, t);
        t = _mm512_fmadd_ps(al, mn_lo, t);
        t = _mm512_fmadd_ps(ah, mn_hi, t);
        const __m512 d4 = _mm512_maskz_loadu_ps(smask, ad + r * nb + g * kGroupBlocks);
        acc[r] = _mm512_fmadd_ps(t, _mm512_permutexvar_ps(spread, d4), acc[r]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    __m512 acc_min = _mm512_setzero_ps();
    if (kSub == 32) {
      for (int64_t b = 0; b < nb; b += 16) {
        const __mmask16 m = nb - b >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nb - b)) - 1);
        acc_min = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wm + b), _mm512_maskz_loadu_ps(m, as + r * nb + b), acc_min);
      }
    }
    out[r * out_stride] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(acc_min);
  }
}
constexpr const char* kVectorIsa = "avx512-vnni";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kVectorIsa = gguf_avx2::kVnni ? "avx-vnni" : "avx2";

// no AVX-512: the same products 32 bytes at a time (gguf_gemm_avx2.h)
template <int kBits, int kPlanes, int kSub, int kRows>
void dot_rows_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, int64_t qa_stride,
                   const float* ad, const float* as, int64_t nb, float* out, int64_t out_stride) {
  gguf_avx2::dot_rows<kBits, kPlanes, kSub, kRows>(qw, ws, wm, qa, qa_stride, ad, as, nb, out, out_stride);
}
#else
constexpr const char* kVectorIsa = "";

template <int kBits, int kPlanes, int kSub, int kRows>
void dot_rows_vnni(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, int64_t qa_stride,
                   const float* ad, const float* as, int64_t nb, float* out, int64_t out_stride) {
  for (int r = 0; r < kRows; ++r) {
    out[r * out_stride] = dot_row_generic<kBits, kPlanes, kSub>(qw, ws, wm, qa + r * qa_stride, ad + r * nb,
                                                                as + r * nb, nb);
  }
}
#endif

template <int kBits, int kPlanes, int kSub>
void gemm(at::Tensor& out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa, const at::Tensor& qweight,
          const at::Tensor& scales, const at::Tensor& mins, const float* bias, int64_t nb, bool vectorised) {
  const int64_t m_rows = qa.size(0), n_rows = qweight.size(0), ns = scales.size(1);
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  const float* wm = mins.data_ptr<float>();
  const int8_t* qap = qa.data_ptr<int8_t>();
  const float* adp = da.data_ptr<float>();
  const float* asp = sa.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t w_stride = qweight.size(1), qa_stride = qa.size(1), o_stride = out.stride(0);
  // a task of at least ~64 KB of weights: a decode step's small matrices still split over 2 threads
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, w_stride * std::max<int64_t>(1, m_rows)));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (n + kPrefetchRows < end) {  // a few rows ahead: more DRAM reads in flight than the prefetcher keeps
        const uint8_t* ahead = qw + (n + kPrefetchRows) * w_stride;
        for (int64_t off = 0; off < w_stride; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        for (int64_t off = 0; off < ns; off += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(ws + (n + kPrefetchRows) * ns + off), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(wm + (n + kPrefetchRows) * ns + off), _MM_HINT_T0);
        }
      }
      const uint8_t* wr = qw + n * w_stride;
      const float* wsr = ws + n * ns;
      const float* wmr = wm + n * ns;
      const float bn = bias ? bias[n] : 0.f;
      int64_t m = 0;
      if (vectorised) {
        for (; m + 4 <= m_rows; m += 4) {
          dot_rows_vnni<kBits, kPlanes, kSub, 4>(wr, wsr, wmr, qap + m * qa_stride, qa_stride, adp + m * nb,
                                                 asp + m * nb, nb, op + m * o_stride + n, o_stride);
          for (int r = 0; r < 4; ++r) op[(m + r) * o_stride + n] += bn;
        }
        for (; m < m_rows; ++m) {
          dot_rows_vnni<kBits, kPlanes, kSub, 1>(wr, wsr, wmr, qap + m * qa_stride, qa_stride, adp + m * nb,
                                                 asp + m * nb, nb, op + m * o_stride + n, o_stride);
          op[m * o_stride + n] += bn;
        }
      }
      for (; m < m_rows; ++m) {
        op[m * o_stride + n] =
            dot_row_generic<kBits, kPlanes, kSub>(wr, wsr, wmr, qap + m * qa_stride, adp + m * nb, asp + m * nb, nb) + bn;
      }
    }
  });
}

template <int kBits, int kPlanes>
void gemm_sub(at::Tensor& out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
              const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, const float* bias,
              int64_t nb, bool vec) {
  if (scales.size(1) == nb) gemm<kBits, kPlanes, 32>(out, qa, da, sa, qweight, scales, mins, bias, nb, vec);
  else gemm<kBits, kPlanes, 16>(out, qa, da, sa, qweight, scales, mins, bias, nb, vec);
}

}  // namespace

void quantize_q8_blocks(at::Tensor qa, at::Tensor da, at::Tensor sa, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize_q8_blocks: x must be [rows, k] with contiguous rows");
  check_float_or_bf16(x.scalar_type(), "quantize_q8_blocks");
  const int64_t rows = x.size(0), k = x.size(1), nb = k / kBlock;
  TORCH_CHECK(k % kBlock == 0, "quantize_q8_blocks: k must be a multiple of 32, got ", k);
  // the width of qa says the precision: one int8 plane (q8) or two (15-bit)
  const int64_t planes = qa.dim() == 2 && qa.size(1) == padded_bytes(nb, 2) ? 2 : 1;
  TORCH_CHECK(qa.scalar_type() == at::kChar && qa.is_contiguous() && qa.dim() == 2 && qa.size(0) == rows &&
                  qa.size(1) == padded_bytes(nb, planes),
              "quantize_q8_blocks: qa must be contiguous int8 [rows, k padded to 128] (q8) or [rows, 2x that] "
              "(15-bit)");
  for (const at::Tensor* t : {&da, &sa}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows * nb,
                "quantize_q8_blocks: da and sa must be contiguous float32 [rows, k / 32]");
  }
  if (quantize_q8_blocks_simd(qa, da, sa, x, planes)) return;  // the same bytes, 8 or 16 at a time
  if (x.scalar_type() == at::kFloat) quantize_blocks<float>(qa, da, sa, x, planes);
  else quantize_blocks<c10::BFloat16>(qa, da, sa, x, planes);
}

void gguf_gemm(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
               const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
               const c10::optional<at::Tensor>& bias, int64_t bits, bool vectorised) {
  TORCH_CHECK(bits == 4 || bits == 8, "gguf_gemm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(1) * 8 % (bits * kBlock) == 0,
              "gguf_gemm: qweight must be contiguous uint8 [n, k * bits / 8]");
  const int64_t n = qweight.size(0), nb = qweight.size(1) * 8 / bits / kBlock, m = qa.size(0);
  for (const at::Tensor* t : {&scales, &mins}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    (t->size(1) == nb || t->size(1) == 2 * nb) && t->size(1) == scales.size(1),
                "gguf_gemm: scales and mins must be contiguous float32 [n, k / 32] (or [n, k / 16], per 16)");
  }
  const int64_t planes = qa.dim() == 2 && qa.size(1) == padded_bytes(nb, 2) ? 2 : 1;
  TORCH_CHECK(qa.scalar_type() == at::kChar && qa.is_contiguous() && qa.size(1) == padded_bytes(nb, planes),
              "gguf_gemm: qa must come from quantize_q8_blocks for this k");
  TORCH_CHECK(da.numel() == m * nb && sa.numel() == m * nb, "gguf_gemm: da and sa must be [m, k / 32]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == m && out.size(1) == n &&
                  out.stride(1) == 1,
              "gguf_gemm: out must be float32 [m, n] with contiguous rows");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "gguf_gemm: bias must be float32 [n]");
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const bool vec = vectorised && kVectorIsa[0] != '\0';
  if (bits == 4 && planes == 1) gemm_sub<4, 1>(out, qa, da, sa, qweight, scales, mins, bp, nb, vec);
  else if (bits == 4) gemm_sub<4, 2>(out, qa, da, sa, qweight, scales, mins, bp, nb, vec);
  else if (planes == 1) gemm_sub<8, 1>(out, qa, da, sa, qweight, scales, mins, bp, nb, vec);
  else gemm_sub<8, 2>(out, qa, da, sa, qweight, scales, mins, bp, nb, vec);
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t act_bits) {
  // quantize_q8_blocks + gguf_gemm in one call: a decode step makes ~120 of these, and each op
  // dispatched from Python (and each tensor allocated there) costs microseconds.
  TORCH_CHECK(x.dim() == 2, "gguf_linear: x must be [rows, k]");
  TORCH_CHECK(act_bits == 8 || act_bits == 15, "gguf_linear: act_bits must be 8 or 15, got ", act_bits);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1), nb = k / kBlock;
  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor qa = at::empty({rows, padded_bytes(nb, planes_for(act_bits))}, xc.options().dtype(at::kChar));
  at::Tensor da = at::empty({rows, nb}, f32), sa = at::empty({rows, nb}, f32);
  quantize_q8_blocks(qa, da, sa, xc);
  at::Tensor out = at::empty({rows, qweight.size(0)}, f32);
  gguf_gemm_auto(out, qa, da, sa, qweight, scales, mins, bias, bits);  // many rows: gguf_gemm_tiled.cpp
  return out;
}

std::string gguf_gemm_vector_isa() { return kVectorIsa; }

}  // namespace pagedllm
