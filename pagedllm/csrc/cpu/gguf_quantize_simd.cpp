// quantize_q8_blocks (gguf_gemm.cpp) with AVX-512 (a block of 32 activations in two vectors) or
// AVX2 (in four): to q8 (one int8 plane) or 15 bits (two planes, q = 128 h + l: h = q >> 7,
// l = q & 127, the high plane's group of 128 bytes first).
//
// The portable loop converts one float at a time (_mm_cvtss_si32, to round ties to even under
// -ffast-math) at ~1.4 G elements/s; at a prefill's rows that was 15-25% of a layer's time next
// to the tiled GEMM. Same arithmetic, so the same bytes: amax, d = amax * (1/127), inv = 1 / d as
// rounded (one division), q = round-to-nearest-even(x * inv) (vcvtps2dq in the MXCSR's default
// mode, as _mm_cvtss_si32), sum of q exact in int32, s = d * sum. tests/test_gguf_avx2.py checks
// that an AVX2 build's bytes equal the native build's.
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kGroupBytes = kBlock * kGroupBlocks;

}  // namespace

// One quantize_rows per instruction set (the build's widest), one dispatcher after them.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PAGEDLLM_QUANTIZE_SIMD 1
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> float32 is exact: the bits shifted up
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(int8_t* dst, __m512i q) { _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q)); }

template <typename scalar_t, int kPlanes>
void quantize_rows(int8_t* qp, float* dp, float* sp, const scalar_t* xp, int64_t x_stride, int64_t qa_stride,
                   int64_t rows, int64_t nb) {
  const float inv_qmax = kPlanes == 2 ? 1.f / 16383.f : 1.f / 127.f;
  at::parallel_for(0, rows, row_grain(nb * kBlock), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * x_stride;
      int8_t* qr = qp + r * qa_stride;
      std::fill(qr, qr + qa_stride, 0);
      for (int64_t b = 0; b < nb; ++b) {
        const __m512 x0 = load16(xr + b * kBlock), x1 = load16(xr + b * kBlock + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float d = amax * inv_qmax;
        volatile float d_rounded = d;  // 1 / d as rounded, as the portable loop (no 127 / amax folding)
        const float inv = d > 0.f ? 1.f / d_rounded : 0.f;
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vinv));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vinv));
        int8_t* lo = qr + (b / kGroupBlocks) * kGroupBytes * kPlanes + (b % kGroupBlocks) * 16;
        if (kPlanes == 1) {
          store16(lo, q0);
          store16(lo + 64, q1);
        } else {  // arithmetic shift: floor(q / 128), in [-128, 127]; and the low 7 bits
          const __m512i low7 = _mm512_set1_epi32(127);
          store16(lo, _mm512_srai_epi32(q0, 7));
          store16(lo + 64, _mm512_srai_epi32(q1, 7));
          store16(lo + kGroupBytes, _mm512_and_si512(q0, low7));
          store16(lo + kGroupBytes + 64, _mm512_and_si512(q1, low7));
        }
        dp[r * nb + b] = d;
        sp[r * nb + b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
      }
    }
  });
}

}  // namespace

#elif defined(__AVX2__)
#define PAGEDLLM_QUANTIZE_SIMD 1
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {  // bf16 -> float32 is exact: the bits shifted up
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// 16 int32 in [-128, 127] (a then b) as 16 bytes: the packs saturate nothing, and the permute undoes
// their per-128-bit-lane interleave
inline void store16(int8_t* dst, __m256i a, __m256i b) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}

template <typename scalar_t, int kPlanes>
void quantize_rows(int8_t* qp, float* dp, float* sp, const scalar_t* xp, int64_t x_stride, int64_t qa_stride,
                   int64_t rows, int64_t nb) {
  const float inv_qmax = kPlanes == 2 ? 1.f / 16383.f : 1.f / 127.f;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  at::parallel_for(0, rows, row_grain(nb * kBlock), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * x_stride;
      int8_t* qr = qp + r * qa_stride;
      std::fill(qr, qr + qa_stride, 0);
      for (int64_t b = 0; b < nb; ++b) {
        __m256 x[4];
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
          x[i] = load8(xr + b * kBlock + 8 * i);
          m = _mm256_max_ps(m, _mm256_and_ps(x[i], abs_mask));
        }
        const float d = reduce_max(m) * inv_qmax;
        volatile float d_rounded = d;  // 1 / d as rounded, as the portable loop (no 127 / amax folding)
        const float inv = d > 0.f ? 1.f / d_rounded : 0.f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], vinv));
        int8_t* lo = qr + (b / kGroupBlocks) * kGroupBytes * kPlanes + (b % kGroupBlocks) * 16;
        if (kPlanes == 1) {
          store16(lo, q[0], q[1]);
          store16(lo + 64, q[2], q[3]);
        } else {  // arithmetic shift: floor(q / 128), in [-128, 127]; and the low 7 bits
          const __m256i low7 = _mm256_set1_epi32(127);
          store16(lo, _mm256_srai_epi32(q[0], 7), _mm256_srai_epi32(q[1], 7));
          store16(lo + 64, _mm256_srai_epi32(q[2], 7), _mm256_srai_epi32(q[3], 7));
          store16(lo + kGroupBytes, _mm256_and_si256(q[0], low7), _mm256_and_si256(q[1], low7));
          store16(lo + kGroupBytes + 64, _mm256_and_si256(q[2], low7), _mm256_and_si256(q[3], low7));
        }
        dp[r * nb + b] = d;
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        sp[r * nb + b] = d * static_cast<float>(reduce_add(sum));
      }
    }
  });
}

}  // namespace

#endif

#ifdef PAGEDLLM_QUANTIZE_SIMD
bool quantize_q8_blocks_simd(at::Tensor& qa, at::Tensor& da, at::Tensor& sa, const at::Tensor& x, int64_t planes) {
  const int64_t rows = x.size(0), nb = x.size(1) / kBlock;
  int8_t* q = qa.data_ptr<int8_t>();
  float *d = da.data_ptr<float>(), *s = sa.data_ptr<float>();
  const bool f32 = x.scalar_type() == at::kFloat;
  if (f32 && planes == 1) quantize_rows<float, 1>(q, d, s, x.data_ptr<float>(), x.stride(0), qa.size(1), rows, nb);
  else if (f32) quantize_rows<float, 2>(q, d, s, x.data_ptr<float>(), x.stride(0), qa.size(1), rows, nb);
  else if (planes == 1) quantize_rows<c10::BFloat16, 1>(q, d, s, x.data_ptr<c10::BFloat16>(), x.stride(0), qa.size(1), rows, nb);
  else quantize_rows<c10::BFloat16, 2>(q, d, s, x.data_ptr<c10::BFloat16>(), x.stride(0), qa.size(1), rows, nb);
  return true;
}
#else
bool quantize_q8_blocks_simd(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, int64_t) { return false; }
#endif

}  // namespace pagedllm
