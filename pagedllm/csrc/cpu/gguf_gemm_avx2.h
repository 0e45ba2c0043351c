// The GGUF GEMV's dot products with AVX2 (+FMA; AVX-VNNI's 256-bit vpdpbusd where the build has it),
// for CPUs without AVX-512 VNNI. Same operands and the same exact int32 block sums as
// `dot_rows_vnni` in gguf_gemm.cpp (whose header comment explains the blocked layout); only the
// float sums' order differs.
//
// A group of 4 blocks is taken as 2 pairs of blocks: 32 bytes of a pair's low halves (16 elements of
// each block) against the 32 activation bytes of the same halves, which the group order stores side
// by side, and the same for the high halves. u8 x s8 products go through llama.cpp's pair:
// vpmaddubsw (u8 x s8 -> adjacent pairs summed into saturating int16) then vpmaddwd by ones
// (int16 pairs -> int32), so int32 lane l of a pair holds 4 products of block l / 4. vpmaddubsw is
// exact while a pair's sum stays within int16: 4-bit weights (<= 15) are (2 * 15 * 128 < 32767), but
// 8-bit rows reach 255 (Q8_0 is held as qs + 128), and 2 * 255 * 128 is not. So an 8-bit byte goes in
// as its two nibbles, w = 16 wh + wl, each product pair exact, and vpmaddwd scales the high nibble's
// by 16 on the way to int32: two vpmaddubsw where 4-bit weights take one. With AVX-VNNI a
// vpdpbusd takes 4 products straight to int32 (no int16 step), for any byte.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace pagedllm {
namespace gguf_avx2 {

// gguf_gemm.cpp's layout: blocks of 32, 4 blocks a group, 128 activation bytes per group and plane
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kGroupBytes = 128;

#if defined(__AVXVNNI__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// A pair of blocks' 32 weight bytes, ready for dot(): as they are, or (8-bit without VNNI) as
// their low and high nibbles, split once per weight row and used for every activation row.
template <int kBits>
struct WeightBytes {
  static constexpr int kParts = (kBits == 8 && !kVnni) ? 2 : 1;
  __m256i v[kParts];
};

template <int kBits>
inline WeightBytes<kBits> prepare(__m256i w) {
  WeightBytes<kBits> out;
  if constexpr (WeightBytes<kBits>::kParts == 2) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    out.v[0] = _mm256_and_si256(w, nibble);
    out.v[1] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
  } else {
    out.v[0] = w;
  }
  return out;
}

// int32 lane l: the 4 products w[4l..4l+3] * a[4l..4l+3], exactly.
template <int kBits>
inline __m256i dot(const WeightBytes<kBits>& w, __m256i a) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w.v[0], a);
#else
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i low = _mm256_madd_epi16(_mm256_maddubs_epi16(w.v[0], a), ones16);
  if constexpr (WeightBytes<kBits>::kParts == 1) {
    return low;
  } else {
    const __m256i high = _mm256_madd_epi16(_mm256_maddubs_epi16(w.v[1], a), _mm256_set1_epi16(16));
    return _mm256_add_epi32(low, high);
  }
#endif
}

// dot(lo, a_lo) + dot(hi, a_hi): a block pair's two halves. Without VNNI the two halves' int16
// pair sums are added before the one vpmaddwd (each at most 2 * 15 * 128, so their sum fits int16).
template <int kBits>
inline __m256i dot2(const WeightBytes<kBits>& lo, __m256i a_lo, const WeightBytes<kBits>& hi, __m256i a_hi) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo.v[0], a_lo), hi.v[0], a_hi);
#else
  const __m256i low = _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(lo.v[0], a_lo), _mm256_maddubs_epi16(hi.v[0], a_hi)), _mm256_set1_epi16(1));
  if constexpr (WeightBytes<kBits>::kParts == 1) {
    return low;
  } else {
    const __m256i high = _mm256_madd_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(lo.v[1], a_lo), _mm256_maddubs_epi16(hi.v[1], a_hi)), _mm256_set1_epi16(16));
    return _mm256_add_epi32(low, high);
  }
#endif
}

// The same for the activations' own sums (weights of 1), which per-16 scales' mins multiply.
inline __m256i sum4(__m256i a) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), a);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), a), _mm256_set1_epi16(1));
#endif
}

inline __m256i load_a(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// One or two blocks' 16 bytes (a last group's odd block: nothing read past the row; zeros after).
inline __m256i load_blocks(const uint8_t* p, int blocks) {
  return blocks == 2 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                     : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Up to 4 floats (the rest 0), without reading past p[n - 1].
inline __m128 load4(const float* p, int64_t n) {
  if (n >= 4) return _mm_loadu_ps(p);
  const __m128i lanes = _mm_setr_epi32(0, 1, 2, 3);
  return _mm_maskload_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), lanes));
}

// A weight pair's int32 lanes against kPlanes planes of activations at a (plane h, then l 128 bytes on).
template <int kBits, int kPlanes>
inline __m256i plane_dot(const WeightBytes<kBits>& w, const int8_t* a) {
  const __m256i h = dot<kBits>(w, load_a(a));
  if constexpr (kPlanes == 1) return h;
  return _mm256_add_epi32(_mm256_slli_epi32(h, 7), dot<kBits>(w, load_a(a + kGroupBytes)));
}

// dot2 over kPlanes planes: the low halves' activations at a, the high halves' at a + 64.
template <int kBits, int kPlanes>
inline __m256i plane_dot2(const WeightBytes<kBits>& lo, const WeightBytes<kBits>& hi, const int8_t* a) {
  const __m256i h = dot2<kBits>(lo, load_a(a), hi, load_a(a + 64));
  if constexpr (kPlanes == 1) return h;
  return _mm256_add_epi32(_mm256_slli_epi32(h, 7), dot2<kBits>(lo, load_a(a + kGroupBytes), hi, load_a(a + kGroupBytes + 64)));
}

template <int kPlanes>
inline __m256i plane_sum(const int8_t* a) {
  const __m256i h = sum4(load_a(a));
  if constexpr (kPlanes == 1) return h;
  return _mm256_add_epi32(_mm256_slli_epi32(h, 7), sum4(load_a(a + kGroupBytes)));
}

// _mm512_reduce_add_ps's tree (once the two 256-bit halves are added): the halves of 128, then
// lanes (0 + 2) + (1 + 3).
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// kRows activation rows against one weight row (arguments as dot_rows_vnni's). Each row's float
// sums are kept as dot_rows_vnni keeps them: its 16 lanes as two vectors of 8 (acc[r][p]: pair p's
// lanes are lanes 8p..8p+7 of the group's 16), the same fused multiply-adds per lane, and the same
// reduction tree at the end, so the two builds round alike: bit for bit where the compiler unrolls
// both loops alike (-fvariable-expansion-in-unroller splits accumulators as it sees fit), which
// keeps a decode's q8 activations rounding as the AVX-512 build's do.
template <int kBits, int kPlanes, int kSub, int kRows>
void dot_rows(const uint8_t* qw, const float* ws, const float* wm, const int8_t* qa, int64_t qa_stride,
              const float* ad, const float* as, int64_t nb, float* out, int64_t out_stride) {
  // pair p's lanes 0-3 are its first block, 4-7 its second: spread 4 per-block values over them
  const __m256i spread[2] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)};
  // per-16 tables of a pair: [first block's low half, its high half, second block's low, high]
  const __m256i spread_lo = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i spread_hi = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
  __m256 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t groups = (nb + kGroupBlocks - 1) / kGroupBlocks;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b_first = g * kGroupBlocks;
    const int n_in = static_cast<int>(std::min<int64_t>(kGroupBlocks, nb - b_first));
    const __m128 wscale4 = kSub == 32 ? load4(ws + b_first, n_in) : _mm_setzero_ps();
    for (int p = 0; 2 * p < n_in; ++p) {
      const int blocks = std::min(2, n_in - 2 * p);
      __m256i lo_bytes, hi_bytes;
      if (kBits == 4) {  // a block's 16 bytes: element j in the low nibble, j + 16 in the high one
        const __m256i w = load_blocks(qw + (b_first + 2 * p) * 16, blocks);
        const __m256i nibble = _mm256_set1_epi8(0x0F);
        lo_bytes = _mm256_and_si256(w, nibble);
        hi_bytes = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
      } else {  // the group's low halves, then its high halves
        const uint8_t* base = qw + g * kGroupBytes;
        lo_bytes = load_blocks(base + 2 * p * 16, blocks);
        hi_bytes = load_blocks(base + n_in * 16 + 2 * p * 16, blocks);
      }
      const WeightBytes<kBits> lo = prepare<kBits>(lo_bytes), hi = prepare<kBits>(hi_bytes);
      if constexpr (kSub == 32) {
        for (int r = 0; r < kRows; ++r) {
          const int8_t* a = qa + r * qa_stride + g * kGroupBytes * kPlanes + p * 32;
          const __m256i sumi = plane_dot2<kBits, kPlanes>(lo, hi, a);
          const __m128 scale4 = _mm_mul_ps(wscale4, load4(ad + r * nb + b_first, n_in));
          acc[r][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi),
                                      _mm256_permutevar8x32_ps(_mm256_castps128_ps256(scale4), spread[p]), acc[r][p]);
        }
      } else {
        const int64_t h_first = 2 * (b_first + 2 * p);  // this pair's first per-16 entry
        const __m256 s4 = _mm256_castps128_ps256(load4(ws + h_first, 2 * blocks));
        const __m256 m4 = _mm256_castps128_ps256(load4(wm + h_first, 2 * blocks));
        const __m256 sc_lo = _mm256_permutevar8x32_ps(s4, spread_lo), sc_hi = _mm256_permutevar8x32_ps(s4, spread_hi);
        const __m256 mn_lo = _mm256_permutevar8x32_ps(m4, spread_lo), mn_hi = _mm256_permutevar8x32_ps(m4, spread_hi);
        for (int r = 0; r < kRows; ++r) {
          const int8_t* a = qa + r * qa_stride + g * kGroupBytes * kPlanes + p * 32;
          __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(plane_dot<kBits, kPlanes>(lo, a)), sc_lo);
          t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plane_dot<kBits, kPlanes>(hi, a + 64)), sc_hi, t);
          t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plane_sum<kPlanes>(a)), mn_lo, t);
          t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plane_sum<kPlanes>(a + 64)), mn_hi, t);
          const __m256 d4 = _mm256_castps128_ps256(load4(ad + r * nb + b_first, n_in));
          acc[r][p] = _mm256_fmadd_ps(t, _mm256_permutevar8x32_ps(d4, spread[p]), acc[r][p]);
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    // the mins' term (per 32): min * s over blocks, 16 lanes (two vectors) as dot_rows_vnni
    __m256 acc_min[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    if constexpr (kSub == 32) {
      const float* s = as + r * nb;
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t b = 0; b < nb; b += 16) {  // dot_rows_vnni's loop: 16 blocks (two vectors) a step
        for (int half = 0; half < 2; ++half) {
          const int64_t n = std::clamp<int64_t>(nb - b - 8 * half, 0, 8);
          const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
          acc_min[half] = _mm256_fmadd_ps(_mm256_maskload_ps(wm + b + 8 * half, mask),
                                          _mm256_maskload_ps(s + b + 8 * half, mask), acc_min[half]);
        }
      }
    }
    out[r * out_stride] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + hsum(_mm256_add_ps(acc_min[0], acc_min[1]));
  }
}

}  // namespace gguf_avx2
}  // namespace pagedllm
#endif
